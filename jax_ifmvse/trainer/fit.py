"""The one epoch loop: resume, history, metrics.jsonl, the save rule, restoring the best state.

`fit` runs `train_epoch(state, epoch)` for each epoch not yet done, then `evaluate(params)` (the
development metrics, `score_key` among them: higher is better), and writes under `directory`:
- `checkpoints/`: one Orbax manager (`checkpoints.py`) keeping the latest checkpoint (resume) and
  the best by `score_key`; an epoch is saved when it improves on every earlier one, when it is
  the last, and every `checkpoint_every` epochs (so a killed run loses at most that many);
- `metrics.jsonl`: one line per epoch; rewritten from the restored history on resume.
A rerun restores the latest checkpoint and its history and continues; as the data order and
dropout depend only on (seed, epoch, step), it makes the same updates as an uninterrupted run.

An epoch is either the in-memory `lax.scan` of `train.make_train_epoch` or `host_epoch`: a step
fed with batches from the host (decoded audio, frames streamed from disk).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import NamedSharding

from jax_ifmvse.errors import IfmvseError
from jax_ifmvse.trainer.checkpoints import (
    checkpoint_manager,
    restore_history,
    restore_state,
    save_checkpoint,
)
from jax_ifmvse.trainer.rundir import append_jsonl, write_jsonl
from jax_ifmvse.trainer.state import TrainState

Epoch = Callable[[TrainState, int], tuple[TrainState, dict]]


class FitError(IfmvseError, ValueError):
    """A fit that leaves nothing to select from (no checkpoint)."""


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What `fit` leaves behind."""

    best_epoch: int
    best_params: Any  # the best checkpoint's parameters
    history: list[dict]  # every epoch's record, in order
    state: TrainState  # the last epoch's state

    @property
    def best(self) -> dict:
        """The best epoch's record."""
        return next(h for h in self.history if h["epoch"] == self.best_epoch)


def host_epoch(
    step: Callable[[TrainState, Any], tuple[TrainState, dict]],
    batches: Callable[[int], Iterable[Any]],
    on_step: Callable[[TrainState, int, int], None] | None = None,
) -> Epoch:
    """An epoch fed from the host: `step` over `batches(epoch)`; `{"train_loss": mean loss}`.

    `on_step(state, epoch, k)` runs after micro-batch k (progress, the resume test's kill hook).
    """

    def run(state: TrainState, epoch: int) -> tuple[TrainState, dict]:
        losses = []
        for k, batch in enumerate(batches(epoch)):
            state, m = step(state, batch)
            losses.append(m["loss"])
            if on_step is not None:
                on_step(state, epoch, k)
        loss = float(np.mean([float(x) for x in losses])) if losses else 0.0
        return state, {"train_loss": loss}

    return run


def fit(
    state: TrainState,
    *,
    directory: str | Path,
    epochs: int,
    train_epoch: Epoch,
    evaluate: Callable[[Any], dict],
    score_key: str,
    sharding: NamedSharding,
    checkpoint_every: int = 1,
    on_start: Callable[[int], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train (or resume) to `epochs` epochs; the best epoch by `score_key` and its parameters.

    `train_epoch(state, epoch)` returns the new state and its train metrics (floats); `evaluate`
    the development metrics of some parameters; `sharding` lays out a restored state;
    `on_start(first epoch to run)` and `on_epoch(record)` report progress.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "metrics.jsonl"
    mngr = checkpoint_manager(directory / "checkpoints")
    try:
        history: list[dict] = []
        start = mngr.latest_step() or 0
        if start:
            state = restore_state(mngr, start, state, sharding)
            history = [h for h in restore_history(mngr, start) if h["epoch"] <= start]
        write_jsonl(log, history)
        if on_start is not None:
            on_start(start)
        best_so_far = max((h[score_key] for h in history), default=-np.inf)
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            state, train_rec = train_epoch(state, epoch)
            rec = {"epoch": epoch + 1, "step": int(state.step), **train_rec}
            rec.update(evaluate(state.params))
            rec["seconds"] = round(time.perf_counter() - t0, 3)
            history.append(rec)
            score = rec[score_key]
            last = epoch + 1 == epochs
            if score > best_so_far or last or (epoch + 1) % max(1, checkpoint_every) == 0:
                save_checkpoint(mngr, epoch + 1, state, history, score)
            best_so_far = max(best_so_far, score)
            append_jsonl(log, rec)
            if on_epoch is not None:
                on_epoch(rec)
        mngr.wait_until_finished()
        best = mngr.best_step()
        if best is None:
            raise FitError(f"{directory}: no checkpoint to select from ({epochs} epochs)")
        best_params = restore_state(mngr, best, state, sharding).params
    finally:
        mngr.close()
    return FitResult(best, best_params, history, state)
