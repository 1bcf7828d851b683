"""HuBERT (facebook/hubert-*) as a Flax module, with PyTorch weight conversion.

Both encoder variants (post-LN base, stable pre-LN large) and both feature projections
(`feat_proj_layer_norm` True / False); built from the shared wav2vec2-family pieces.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
from transformers import HubertConfig

from jax_ifmvse.backbones.conv_frontend import Encoder, SSLBackbone, SSLModel


class HubertModule(SSLModel):
    """HubertModel without heads: (B, T) waves, (B, F) mask -> num_layers + 1 hidden states."""

    config: HubertConfig

    def feat_proj_layer_norm(self) -> bool:
        """HuBERT-large has no layer norm before the projection; HuBERT-base has one."""
        return bool(self.config.feat_proj_layer_norm)

    def make_encoder(self) -> nn.Module:
        """Post-LN or stable-LN encoder, as `do_stable_layer_norm` says."""
        return Encoder(
            self.config,
            stable=self.config.do_stable_layer_norm,
            dtype=self.dtype,
            remat=self.remat,
            name="encoder",
        )


class HubertBackbone(SSLBackbone):
    """HuBERT behind the common waveform interface."""

    family = "hubert"
    module_cls = HubertModule
    prefixes = ("hubert.",)


def convert_state_dict(state_dict: Mapping[str, Any], config: HubertConfig) -> dict[str, Any]:
    """HubertModel / HubertForCTC state dict (numpy) -> Flax params; heads are dropped."""
    return HubertBackbone.convert(state_dict, config)


def init_params(config: HubertConfig, key: jax.Array) -> dict[str, Any]:
    """Random float32 parameters, no torch needed."""
    return HubertBackbone.init_params(config, key)
