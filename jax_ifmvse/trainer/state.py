"""`TrainState` and the one training step: loss, gradients, optimizer update; pure, jitted once."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

# apply(params, batch, dropout_rng) -> predictions; loss(predictions, batch) -> (loss, logs).
Apply = Callable[[Any, Mapping[str, jax.Array], jax.Array], jax.Array]
Loss = Callable[[jax.Array, Mapping[str, jax.Array]], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree saved whole by Orbax."""

    step: jax.Array  # () int32, global (micro-)step count: keys dropout via fold_in
    params: Any
    opt_state: Any


def init_state(
    model: nn.Module, tx: optax.GradientTransformation, example: Mapping[str, Any], key: jax.Array
) -> TrainState:
    """Fresh parameters and optimizer state from one example batch of features."""
    params = model.init(key, example, train=False)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def train_step(
    state: TrainState,
    batch: dict,
    *,
    apply: Apply,
    loss: Loss,
    tx: optax.GradientTransformation,
    dropout_key: jax.Array,
    trainable: Any = None,
    batch_sharding: NamedSharding | None = None,
) -> tuple[TrainState, dict]:
    """One optimizer call on `loss(apply(params, batch, rng), batch)`; rng = fold_in(dropout_key,
    step). `trainable` (a bool per parameter) stops the gradient of the False ones.

    Gradient accumulation is the optimizer's (`optim.make_optimizer(accumulation=k)`): each call
    is one micro-batch, and the update is applied every k-th call.
    """
    if batch_sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    rng = jax.random.fold_in(dropout_key, state.step)

    def loss_fn(params):
        if trainable is not None:  # no gradient flows into frozen parameters (XLA drops it)
            params = jax.tree.map(
                lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable
            )
        return loss(apply(params, batch, rng), batch)

    (value, logs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new, {"loss": value, "grad_norm": optax.global_norm(grads), **logs}


def make_step(
    apply: Apply,
    loss: Loss,
    tx: optax.GradientTransformation,
    dropout_key: jax.Array,
    *,
    trainable: Any = None,
    batch_sharding: NamedSharding | None = None,
    jit: bool = True,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`train_step` bound: `(state, batch) -> (state, metrics)`, jitted once with the state
    donated (`jit=False` for a step scanned inside a jitted epoch)."""
    step = partial(
        train_step,
        apply=apply,
        loss=loss,
        tx=tx,
        dropout_key=dropout_key,
        trainable=trainable,
        batch_sharding=batch_sharding,
    )
    return jax.jit(step, donate_argnums=0) if jit else step
