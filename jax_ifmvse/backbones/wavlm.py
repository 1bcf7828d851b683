"""WavLM (microsoft/wavlm-*) as a Flax module, with PyTorch weight conversion.

WavLM is wav2vec2 plus a gated relative position bias: layer 0 embeds bucketed relative
positions into a per-head (H, F, F) bias that every layer reuses, each layer gating it per
query frame from its own input (`gru_rel_pos_linear`, `gru_rel_pos_const`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from transformers import WavLMConfig
from transformers.models.wav2vec2.modeling_flax_wav2vec2 import FlaxWav2Vec2FeedForward

from jax_ifmvse.backbones.conv_frontend import (
    PositionalConvEmbedding,
    SSLBackbone,
    SSLModel,
    layer_keep,
    run_encoder,
)


@functools.cache
def relative_position_buckets(n: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of (key - query) for an n-frame sequence, (n, n) int32, as WavLMAttention does.

    Computed in float32 like the torch code so bucket edges land identically.
    """
    rel = np.arange(n)[None, :] - np.arange(n)[:, None]  # memory - context
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        large = np.log(rel.astype(np.float32) / np.float32(max_exact))
    large = large / np.float32(math.log(max_distance / max_exact))
    large = large * np.float32(half - max_exact)
    large = np.where(rel < max_exact, 0, (np.float32(max_exact) + large)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


class WavLMAttention(nn.Module):
    """Self-attention with the gated relative position bias; returns (out, ungated bias).

    Training drops attention weights as torch's `multi_head_attention_forward(dropout_p=...)`.
    """

    config: WavLMConfig
    has_relative_position_bias: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, position_bias=None, deterministic: bool = True):
        # (B, F, D), (B, F), (H, F, F) | None
        c = self.config
        b, f, d = x.shape
        h = c.num_attention_heads
        hd = d // h
        if position_bias is None:
            buckets = relative_position_buckets(f, c.num_buckets, c.max_bucket_distance)
            embed = nn.Embed(c.num_buckets, h, name="rel_attn_embed")
            position_bias = jnp.transpose(embed(jnp.asarray(buckets)), (2, 0, 1))  # (H, F, F)

        def proj(name):
            return nn.Dense(d, dtype=self.dtype, name=name)(x).reshape(b, f, h, hd)

        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")  # (B, F, H, hd)

        # Gate per head and query frame, from this layer's attention input.
        g = nn.Dense(8, dtype=self.dtype, name="gru_rel_pos_linear")(x.reshape(b, f, h, hd))
        g = jax.nn.sigmoid(g.reshape(b, f, h, 2, 4).sum(-1))  # (B, F, H, 2)
        const = self.param("gru_rel_pos_const", nn.initializers.ones, (1, h, 1, 1))
        gate = g[..., 0] * (g[..., 1] * const.reshape(h) - 1.0) + 2.0  # (B, F, H)
        bias = jnp.transpose(gate, (0, 2, 1))[..., None] * position_bias  # (B, H, F, F)

        logits = jnp.einsum("bqhd,bkhd->bhqk", q * (hd**-0.5), k).astype(jnp.float32)
        key_bias = jnp.where(mask[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits + bias.astype(jnp.float32) + key_bias, axis=-1)
        weights = nn.Dropout(c.attention_dropout)(weights, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v).reshape(b, f, d)
        return nn.Dense(d, dtype=self.dtype, name="out_proj")(out), position_bias


class WavLMEncoderLayer(nn.Module):
    """Post-LN (wavlm-base) or pre-LN (`do_stable_layer_norm`, wavlm-large) layer."""

    config: WavLMConfig
    has_relative_position_bias: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, position_bias, mask, deterministic: bool = True):
        # (B, F, D), (H, F, F) | None, (B, F) -> (B, F, D), (H, F, F)
        c = self.config
        drop = nn.Dropout(c.hidden_dropout)
        attention = WavLMAttention(
            c, self.has_relative_position_bias, dtype=self.dtype, name="attention"
        )
        layer_norm = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="layer_norm")
        feed_forward = FlaxWav2Vec2FeedForward(c, dtype=self.dtype, name="feed_forward")
        final_ln = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")
        if c.do_stable_layer_norm:
            a, position_bias = attention(layer_norm(x), mask, position_bias, deterministic)
            x = x + drop(a, deterministic=deterministic)
            x = x + feed_forward(final_ln(x), deterministic=deterministic)
        else:
            a, position_bias = attention(x, mask, position_bias, deterministic)
            x = layer_norm(x + drop(a, deterministic=deterministic))
            x = final_ln(x + feed_forward(x, deterministic=deterministic))
        return x, position_bias


class WavLMEncoder(nn.Module):
    """Positional conv, then the layers threading layer 0's relative position bias."""

    config: WavLMConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False  # gradient checkpointing per layer (fine-tuning)

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):  # (B, F, D), (B, F) -> L + 1 states
        c = self.config
        # Same parameter names; each layer's activations are recomputed in the backward pass.
        layer_cls = WavLMEncoderLayer
        if self.remat:
            layer_cls = nn.remat(WavLMEncoderLayer, static_argnums=(4,))  # deterministic
        layers = [
            layer_cls(c, i == 0, dtype=self.dtype, name=f"layers_{i}")
            for i in range(c.num_hidden_layers)
        ]
        rate = float(getattr(c, "layerdrop", 0.0))
        keep = None
        if not deterministic and rate > 0:
            keep = layer_keep(self, len(layers), rate, first_always=True)  # as WavLM's `i > 0`
        return run_encoder(
            x,
            mask,
            PositionalConvEmbedding(c, dtype=self.dtype, name="pos_conv_embed"),
            nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="layer_norm"),
            [lambda h, bias, layer=layer: layer(h, bias, mask, deterministic) for layer in layers],
            c.do_stable_layer_norm,
            lambda h: nn.Dropout(c.hidden_dropout)(h, deterministic=deterministic),
            keep,
        )


class WavLMModule(SSLModel):
    """WavLMModel without heads: (B, T) waves, (B, F) mask -> num_layers + 1 hidden states."""

    config: WavLMConfig

    def make_encoder(self) -> nn.Module:
        """The WavLM encoder (post-LN or stable, as the config says)."""
        return WavLMEncoder(self.config, dtype=self.dtype, remat=self.remat, name="encoder")


class WavLMBackbone(SSLBackbone):
    """WavLM behind the common waveform interface."""

    family = "wavlm"
    module_cls = WavLMModule
    prefixes = ("wavlm.",)


def convert_state_dict(state_dict: Mapping[str, Any], config: WavLMConfig) -> dict[str, Any]:
    """WavLMModel / WavLMForCTC state dict (numpy) -> Flax params; heads are dropped."""
    return WavLMBackbone.convert(state_dict, config)


def init_params(config: WavLMConfig, key: jax.Array) -> dict[str, Any]:
    """Random float32 parameters, no torch needed."""
    return WavLMBackbone.init_params(config, key)
