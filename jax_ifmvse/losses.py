"""Differentiable losses: CCC and the paper's 1 - CCC (task 2), class-weighted cross-entropy (task 1)."""

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


def ccc_sum_loss(y_true: jax.Array, y_pred: jax.Array, weights: jax.Array | None) -> jax.Array:
    """Sum over output columns of 1 - CCC over the (weighted) batch: the fine-tuning baseline's."""
    return jnp.sum(1.0 - ccc(y_true, y_pred.astype(jnp.float32), weights, axis=0))


def weighted_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array | None = None,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Class-weighted cross-entropy, as `torch.nn.CrossEntropyLoss(weight=class_weights)`.

    logits (B, C), labels (B,) int with -1 for rows without a class (X, O, empty: no loss);
    `weights` (B,) 0/1 masks padded rows. torch's mean is sum_i w[y_i] * nll_i / sum_i w[y_i], so
    a batch's loss does not depend on how many rows of each class it holds.
    """
    valid = labels >= 0
    safe = jnp.where(valid, labels, 0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[:, None], axis=-1)[:, 0]  # (B,)
    w = valid.astype(jnp.float32)
    if class_weights is not None:
        w = w * jnp.asarray(class_weights, jnp.float32)[safe]
    if weights is not None:
        w = w * weights.astype(jnp.float32)
    return jnp.sum(w * nll) / jnp.maximum(jnp.sum(w), 1e-12)
