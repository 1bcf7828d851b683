"""Pooling of frame-level features (B, T, D) under a padding mask, as the challenge baseline pools.

`AttentiveStatisticsPooling` is the baseline's (msplabresearch/MSP-Podcast_Challenge_IS2025,
`net/pooling.py`; Okabe et al. 2018): attention logits tanh(x W + b) . a, a softmax over the
valid frames, and the concatenated weighted mean and standard deviation, the variance clamped at
1e-5 before the square root. The baseline loops over utterances and slices each to its length; here
padded frames get a logit of -inf instead, which is the same softmax without the loop. Parameter
names mirror the baseline's state dict: `sap_linear.{weight,bias}` and `attention` (D, 1).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_ifmvse.heads.mlp import Linear


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over valid frames: x (B, T, D), mask (B, T) -> (B, D)."""
    m = mask.astype(x.dtype)[..., None]  # (B, T, 1)
    return (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


class AttentiveStatisticsPooling(nn.Module):
    """x (B, T, D), mask (B, T) -> (B, 2D): attention-weighted mean and standard deviation."""

    param_init: str = "torch"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        d = x.shape[-1]
        h = jnp.tanh(Linear(d, self.param_init, name="sap_linear")(x))  # (B, T, D)
        # torch.nn.init.normal_(attention, 0, 1) in the baseline.
        att = self.param("attention", nn.initializers.normal(1.0), (d, 1), jnp.float32)
        logits = (h @ att.astype(h.dtype))[..., 0].astype(jnp.float32)  # (B, T)
        valid = mask.astype(bool)
        logits = jnp.where(valid, logits, -jnp.inf)
        w = jax.nn.softmax(logits, axis=1)
        w = jnp.where(valid.any(1, keepdims=True), w, 0.0)[..., None]  # (B, T, 1); no NaN rows
        xf = x.astype(jnp.float32)
        mu = (xf * w).sum(1)  # (B, D)
        var = (xf**2 * w).sum(1) - mu**2
        return jnp.concatenate([mu, jnp.sqrt(jnp.maximum(var, 1e-5))], axis=-1).astype(x.dtype)
