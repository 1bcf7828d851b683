"""Differentiable concordance correlation coefficient (CCC) and the paper's loss, 1 - CCC."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ccc(
    y_true: jax.Array, y_pred: jax.Array, weights: jax.Array | None = None, axis: int = 0
) -> jax.Array:
    """CCC with population variances along `axis`, as `metrics.ccc_np`; `weights` masks rows (0/1)."""
    if weights is None:
        weights = jnp.ones_like(y_true)
    # (B,) row weights apply to every output column of a (B, K) target.
    weights = jnp.reshape(weights, weights.shape + (1,) * (y_true.ndim - weights.ndim))
    weights = jnp.broadcast_to(weights, y_true.shape).astype(y_true.dtype)
    n = jnp.maximum(jnp.sum(weights, axis=axis, keepdims=True), 1.0)

    def mean(x):
        return jnp.sum(weights * x, axis=axis, keepdims=True) / n

    mt, mp = mean(y_true), mean(y_pred)
    dt, dp = y_true - mt, y_pred - mp
    cov = mean(dt * dp)
    denom = mean(dt * dt) + mean(dp * dp) + (mt - mp) ** 2
    return jnp.squeeze(2.0 * cov / jnp.maximum(denom, 1e-12), axis)


def ccc_loss(y_true: jax.Array, y_pred: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean over output columns of 1 - CCC; (B,) or (B, K) inputs, CCC taken over the batch."""
    return jnp.mean(1.0 - ccc(y_true, y_pred, weights, axis=0))
