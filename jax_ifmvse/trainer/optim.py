"""The one optimizer builder: AdamW as torch.optim.AdamW, parameter groups and accumulation on request."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

FROZEN = "frozen"  # the group label of parameters that get no update (and no weight decay)


def adamw(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
    """AdamW with torch.optim.AdamW's constants (betas 0.9/0.999, eps 1e-8), no schedule."""
    # No lr schedule, no clipping, every parameter decayed (biases too). torch decays first
    # (p *= 1 - lr * wd) and then subtracts lr * m_hat / (sqrt(v_hat) + eps); optax subtracts
    # lr * (m_hat / (sqrt(v_hat) + eps) + wd * p) with the same old p: equal in value
    # (tests/test_torch_twin.py checks it over hundreds of steps).
    return optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)


def make_optimizer(
    learning_rate: float,
    weight_decay: float,
    *,
    labels: Any = None,
    group_learning_rates: Mapping[str, float] | None = None,
    accumulation: int | None = None,
) -> optax.GradientTransformation | optax.MultiSteps:
    """AdamW; with `labels` (a group name per parameter) one AdamW per group at its rate in
    `group_learning_rates` (default `learning_rate`) and no update for the `frozen` group; with
    `accumulation=k` one update every k calls with the mean gradient (`optax.MultiSteps`)."""
    if labels is None:
        tx = adamw(learning_rate, weight_decay)
    else:
        rates = dict(group_learning_rates or {})
        names = sorted((set(rates) | set(jax.tree.leaves(labels))) - {FROZEN})
        transforms = {n: adamw(rates.get(n, learning_rate), weight_decay) for n in names}
        transforms[FROZEN] = optax.set_to_zero()
        tx = optax.multi_transform(transforms, labels)
    if accumulation is not None:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulation)
    return tx
