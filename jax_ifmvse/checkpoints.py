"""Orbax checkpoints of one model: the manager (latest + best by development CCC) and restores.

One `CheckpointManager` per model under `<model dir>/checkpoints`, saving each epoch with two
items, `state` (step, params, opt_state) and `history` (every epoch's metrics so far). Its
preservation policy keeps the latest checkpoint (resume) and the best by development CCC
(`best_step()`, used for predictions); everything else is deleted.
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
