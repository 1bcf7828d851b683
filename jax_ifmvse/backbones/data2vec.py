"""Data2Vec-audio (facebook/data2vec-audio-*) as a Flax module, with PyTorch weight conversion.

Post-LN encoder (like wav2vec2-base) whose positional embedding is a stack of
`num_conv_pos_embeddings` grouped convs, each followed by a parameter-free layer norm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from transformers import Data2VecAudioConfig
from transformers.modeling_flax_utils import ACT2FN

from jax_ifmvse.backbones.conv_frontend import (
    TORCH_NORM_EPS,
    Encoder,
    SSLBackbone,
    SSLModel,
    same_pad_conv,
)


class Data2VecAudioPositionalConvLayer(nn.Module):
    """Grouped same-padded conv, affine-free layer norm, activation."""

    config: Data2VecAudioConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, F, D) -> (B, F, D)
        c = self.config
        x = same_pad_conv(
            x, c.conv_pos_kernel_size, c.num_conv_pos_embedding_groups, c.hidden_size, self.dtype,
            "conv",
        )  # fmt: skip
        x = nn.LayerNorm(
            epsilon=TORCH_NORM_EPS, use_scale=False, use_bias=False, dtype=self.dtype,
            name="layer_norm",
        )(x)  # fmt: skip
        return ACT2FN[c.feat_extract_activation](x)


class Data2VecAudioPositionalConvEmbedding(nn.Module):
    """`num_conv_pos_embeddings` stacked positional conv layers.

    transformers zeroes padded frames only before the first conv, so in a padded batch the
    later convs see non-zero values past an utterance's end and its last ~(K//2 * layers)
    frames differ from running it alone. `mask_between_layers` re-zeroes padded frames before
    each conv, which makes every utterance equal to transformers run on it alone.
    """

    config: Data2VecAudioConfig
    mask_between_layers: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):  # (B, F, D), (B, F) -> (B, F, D)
        for i in range(self.config.num_conv_pos_embeddings):
            if self.mask_between_layers and mask is not None:
                x = jnp.where(mask[:, :, None], x, 0).astype(x.dtype)
            x = Data2VecAudioPositionalConvLayer(self.config, dtype=self.dtype, name=f"layers_{i}")(
                x
            )
        return x


class Data2VecAudioModule(SSLModel):
    """Data2VecAudioModel without heads: (B, T) waves, (B, F) mask -> L + 1 hidden states."""

    config: Data2VecAudioConfig
    mask_between_pos_convs: bool = True

    def make_encoder(self) -> nn.Module:
        """Post-LN encoder with the stacked positional convs."""
        return Encoder(
            self.config,
            stable=False,
            pos_conv_cls=Data2VecAudioPositionalConvEmbedding,
            pos_conv_kwargs=(("mask_between_layers", self.mask_between_pos_convs),),
            dtype=self.dtype,
            remat=self.remat,
            name="encoder",
        )


class Data2VecAudioBackbone(SSLBackbone):
    """Data2Vec-audio behind the common waveform interface.

    `pad_invariant=True` (default) re-zeroes padding between the positional convs, so pooled
    results do not depend on batch padding (equal to transformers on each utterance alone);
    False reproduces transformers' padded-batch output exactly.
    """

    family = "data2vec-audio"
    module_cls = Data2VecAudioModule
    prefixes = ("data2vec_audio.",)

    def __init__(self, *args, pad_invariant: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.module = Data2VecAudioModule(
            self.config, dtype=self.dtype, mask_between_pos_convs=pad_invariant
        )


def convert_state_dict(
    state_dict: Mapping[str, Any], config: Data2VecAudioConfig
) -> dict[str, Any]:
    """Data2VecAudioModel / ...ForCTC state dict (numpy) -> Flax params; heads are dropped."""
    return Data2VecAudioBackbone.convert(state_dict, config)


def init_params(config: Data2VecAudioConfig, key: jax.Array) -> dict[str, Any]:
    """Random float32 parameters, no torch needed."""
    return Data2VecAudioBackbone.init_params(config, key)
