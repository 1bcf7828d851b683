"""Orbax checkpoints of one model: the manager (latest + best by development score) and restores.

One `CheckpointManager` per model under `<model dir>/checkpoints`, saving an epoch with two
items, `state` (step, params, opt_state) and `history` (every epoch's metrics so far), and its
development score as the metric `dev_score` (older checkpoints recorded `dev_ccc`). Its
preservation policy keeps the latest checkpoint (resume) and the best by that score
(`best_step()`, used for predictions); everything else is deleted.

Within an epoch (`fit`'s `checkpoint_steps`), a second manager under `<model dir>/
checkpoints_in_epoch` keeps the latest save only, numbered by the optimizer step, with four
items: `state`, `history`, `position` (the epoch, its steps done and their metrics) and `loader`,
the batch iterator's state written by Grain's Orbax handler (`grain.checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding


def _dev_metric(metrics: dict) -> float:
    # dev_score: a model trained with an `Objective` (task 1, joint); dev_ccc: the paper's.
    return float(metrics["dev_score"] if "dev_score" in metrics else metrics["dev_ccc"])


def checkpoint_manager(directory: Path) -> ocp.CheckpointManager:
    """One manager per model keeping the latest and the best-development checkpoint."""
    policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [
            ocp.checkpoint_managers.LatestN(n=1),
            ocp.checkpoint_managers.BestN(get_metric_fn=_dev_metric, n=1),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        best_fn=_dev_metric,
        best_mode="max",
        enable_async_checkpointing=False,  # the next epoch donates the state buffers
        create=True,
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save_checkpoint(
    mngr: ocp.CheckpointManager, step: int, state: Any, history: list[dict], score: float
) -> None:
    """Save `state` and `history` as checkpoint `step`, with its development score."""
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)
        ),
        metrics={"dev_score": score},
    )


IN_EPOCH_DIR = "checkpoints_in_epoch"  # beside `checkpoints/` in a model's directory


def saved_within_epoch(model_dir: Path) -> bool:
    """Whether `model_dir` holds a save within an epoch (a resume continues from it)."""
    d = Path(model_dir) / IN_EPOCH_DIR
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def in_epoch_manager(directory: Path) -> ocp.CheckpointManager:
    """The manager of saves within an epoch: the latest one only."""
    import grain.checkpoint  # noqa: F401 - registers Grain's handler for the `loader` item

    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, enable_async_checkpointing=False, create=True
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save_in_epoch(
    mngr: ocp.CheckpointManager,
    step: int,
    state: Any,
    history: list[dict],
    position: dict,
    loader: Any,
) -> None:
    """Save a state within an epoch: `position` (JSON) and `loader`'s iterator state with it."""
    import grain.checkpoint as gc

    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            history=ocp.args.JsonSave(history),
            position=ocp.args.JsonSave(position),
            loader=gc.CheckpointSave(loader),
        ),
    )


def restore_in_epoch(
    mngr: ocp.CheckpointManager, step: int, like: Any, sharding
) -> tuple[Any, list[dict], dict]:
    """(state laid out like `like`, history, position) of save `step` within an epoch."""
    out = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(like, sharding)),
            history=ocp.args.JsonRestore(),
            position=ocp.args.JsonRestore(),
        ),
    )
    return out["state"], list(out["history"]), dict(out["position"])


def restore_loader(mngr: ocp.CheckpointManager, step: int, loader: Any) -> None:
    """Set the fresh batch iterator `loader` to where save `step` left its epoch."""
    import grain.checkpoint as gc

    mngr.restore(step, args=ocp.args.Composite(loader=gc.CheckpointRestore(loader)))


def latest_step(directory: Path) -> int:
    """The latest checkpoint's step in `directory` (0 without one)."""
    mngr = checkpoint_manager(directory)
    try:
        return mngr.latest_step() or 0
    finally:
        mngr.close()


def restore_best(directory: Path, like: Any, sharding) -> tuple[int | None, Any]:
    """(best step, its `state` laid out like `like`) of the manager in `directory`; (None, None)
    without a checkpoint."""
    mngr = checkpoint_manager(directory)
    try:
        best = mngr.best_step()
        return best, None if best is None else restore_state(mngr, best, like, sharding)
    finally:
        mngr.close()


def _abstract(state: Any, sharding: NamedSharding) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def restore_state(mngr: ocp.CheckpointManager, step: int, like: Any, sharding) -> Any:
    """The `state` item of checkpoint `step`, laid out like `like` with `sharding`."""
    out = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(like, sharding)))
    )
    return out["state"]


def restore_history(mngr: ocp.CheckpointManager, step: int) -> list[dict]:
    """The per-epoch metrics saved with checkpoint `step`."""
    return list(
        mngr.restore(step, args=ocp.args.Composite(history=ocp.args.JsonRestore()))["history"]
    )
