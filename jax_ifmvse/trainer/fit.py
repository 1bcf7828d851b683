"""The one epoch loop: resume, history, metrics.jsonl, the save rule, restoring the best state.

`fit` runs `train_epoch(state, epoch)` for each epoch not yet done, then `evaluate(params)` (the
development metrics, `score_key` among them: higher is better), and writes under `directory`:
- `checkpoints/`: one Orbax manager (`checkpoints.py`) keeping the latest checkpoint (resume) and
  the best by `score_key`; an epoch is saved when it improves on every earlier one, when it is
  the last, and every `checkpoint_every` epochs (so a killed run loses at most that many);
- `checkpoints_in_epoch/`: with `checkpoint_steps` k > 0, a host-fed epoch also saves every k
  steps (one kept): the state, the history, the steps' metrics so far and the loader's iterator
  state (Grain's Orbax handler: `get_state` of the batch iterator), so a killed run continues
  within the epoch instead of repeating it;
- `metrics.jsonl`: one line per epoch; rewritten from the restored history on resume.
A rerun restores the latest checkpoint (the one within an epoch when it is further along) and
its history and continues; as the data order and dropout depend only on (seed, epoch, step), it
makes the same updates as an uninterrupted run and ends with the same bits.

An epoch is either the in-memory `lax.scan` of `train.make_train_epoch` or a host-fed one
(`host_epoch`, `train.streamed_epoch`): a step per batch from the host (decoded audio, frames
streamed from disk); a host-fed epoch takes an `InEpoch` (`run_steps`) to save and resume
within itself.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from jax_ifmvse.errors import IfmvseError
from jax_ifmvse.trainer.checkpoints import (
    IN_EPOCH_DIR,
    checkpoint_manager,
    in_epoch_manager,
    restore_history,
    restore_in_epoch,
    restore_loader,
    restore_state,
    save_checkpoint,
    save_in_epoch,
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


@dataclasses.dataclass
class InEpoch:
    """What `fit` gives a host-fed epoch to save and resume within itself."""

    every: int  # save after every `every` steps (0: never)
    steps: int  # steps of this epoch already done (a resume), 0 for a fresh start
    metrics: list[dict]  # their metrics (floats), in order
    restore: Callable[[Any], None]  # puts a fresh batch iterator where the save left it
    save: Callable[[TrainState, int, list[dict], Any], None]  # (state, steps, metrics, iterator)


def run_steps(
    state: TrainState,
    step: Callable[[TrainState, Any], tuple[TrainState, dict]],
    batches: Iterable[Any],
    within: InEpoch | None = None,
    on_step: Callable[[TrainState, int], None] | None = None,
) -> tuple[TrainState, list[dict]]:
    """`step` over `batches` from where `within` left off; (state, every step's metrics).

    `batches` saved within the epoch has Grain's iterator protocol (`get_state`, `set_state`,
    `start_prefetch`); `on_step(state, k)` runs after step k (0-based within the epoch)."""
    metrics: list[Any] = []
    first = 0
    if within is not None and within.steps:
        within.restore(batches)
        metrics, first = [dict(m) for m in within.metrics], within.steps
    for k, batch in enumerate(batches, first):
        state, m = step(state, batch)
        metrics.append(m)
        if on_step is not None:
            on_step(state, k)
        if within is not None and within.every and (k + 1) % within.every == 0:
            host = [{n: float(v) for n, v in jax.device_get(x).items()} for x in metrics]
            metrics = host  # converted once: later saves reuse them
            within.save(state, k + 1, host, batches)
    return state, metrics


def host_epoch(
    step: Callable[[TrainState, Any], tuple[TrainState, dict]],
    batches: Callable[[int], Iterable[Any]],
    on_step: Callable[[TrainState, int, int], None] | None = None,
) -> Epoch:
    """An epoch fed from the host: `step` over `batches(epoch)`; `{"train_loss": mean loss}`.

    `on_step(state, epoch, k)` runs after micro-batch k (progress, the resume test's kill hook).
    """

    def run(
        state: TrainState, epoch: int, within: InEpoch | None = None
    ) -> tuple[TrainState, dict]:
        def hook(s: TrainState, k: int) -> None:
            if on_step is not None:
                on_step(s, epoch, k)

        state, metrics = run_steps(state, step, batches(epoch), within, hook)
        losses = [float(m["loss"]) for m in metrics]
        return state, {"train_loss": float(np.mean(losses)) if losses else 0.0}

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
    checkpoint_steps: int = 0,
    on_start: Callable[[int], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train (or resume) to `epochs` epochs; the best epoch by `score_key` and its parameters.

    `train_epoch(state, epoch)` returns the new state and its train metrics (floats); `evaluate`
    the development metrics of some parameters; `sharding` lays out a restored state;
    `on_start(first epoch to run)` and `on_epoch(record)` report progress. With
    `checkpoint_steps` > 0 (or a checkpoint within an epoch to resume), a host-fed
    `train_epoch(state, epoch, within)` also saves every that many steps.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "metrics.jsonl"
    mngr = checkpoint_manager(directory / "checkpoints")
    within_dir = directory / IN_EPOCH_DIR
    inner = in_epoch_manager(within_dir) if checkpoint_steps or within_dir.exists() else None
    try:
        history: list[dict] = []
        start = mngr.latest_step() or 0
        if start:
            state = restore_state(mngr, start, state, sharding)
            history = [h for h in restore_history(mngr, start) if h["epoch"] <= start]
        position, at = None, None if inner is None else inner.latest_step()
        if at is not None:
            s, h, pos = restore_in_epoch(inner, at, state, sharding)
            if pos["epoch"] >= start:  # further along than the last epoch saved
                state, history, position, start = s, h, pos, pos["epoch"]
        write_jsonl(log, history)
        if on_start is not None:
            on_start(start)
        best_so_far = max((h[score_key] for h in history), default=-np.inf)
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            if checkpoint_steps or position is not None:
                within = _in_epoch(inner, epoch, history, checkpoint_steps, position, at)
                state, train_rec = train_epoch(state, epoch, within)
                position = None
            else:
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
        for k in [] if inner is None else inner.all_steps():
            inner.delete(k)  # the run is done: nothing to continue within an epoch
        best = mngr.best_step()
        if best is None:
            raise FitError(f"{directory}: no checkpoint to select from ({epochs} epochs)")
        best_params = restore_state(mngr, best, state, sharding).params
    finally:
        mngr.close()
        if inner is not None:
            inner.close()
    return FitResult(best, best_params, history, state)


def _in_epoch(
    inner, epoch: int, history: list[dict], every: int, position: dict | None, at: int | None
) -> InEpoch:
    """The `InEpoch` of `epoch`: saves into `inner`, resumes from `position` (checkpoint `at`)."""
    done = list(history)  # the epochs finished before this one

    def save(state: TrainState, steps: int, metrics: list[dict], batches: Any) -> None:
        pos = {"epoch": epoch, "steps": steps, "metrics": metrics}
        save_in_epoch(inner, int(state.step), state, done, pos, batches)

    def restore(batches: Any) -> None:
        restore_loader(inner, at, batches)

    if position is None:
        return InEpoch(every, 0, [], restore, save)
    return InEpoch(every, position["steps"], position["metrics"], restore, save)
