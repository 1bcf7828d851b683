"""`ifmvse extract --shards N --engine ray`: the N shards of a job as Ray tasks, then finalize.

Each task runs one shard (`extract_main` with `shard=(k, n)`) in a Ray worker process of its own
(`max_calls=1`: a fresh process per attempt, so a retried shard starts clean), one GPU each when
the cluster has GPUs. Ray retries a task whose worker died (`max_retries`); the shard's lock and
journal make a retry compute only the rows its dead attempt had not made durable. The driver then
merges the store (`finalize_job`). Without `RAY_ADDRESS`, `ray.init()` starts an embedded local
Ray; with it, the tasks go to that cluster (which must see the store and the package).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jax_ifmvse.compile_cache import enable_compile_cache
from jax_ifmvse.config import Config
from jax_ifmvse.errors import IfmvseError, first_line
from jax_ifmvse.extract import extract_main, finalize_job

MAX_RETRIES = 3  # attempts after the first, per shard, for a worker that died


class RayEngineError(IfmvseError):
    """Ray is missing, or shards failed under Ray: one line naming them."""


def _shard_task(cfg: Config, pairs: dict[str, str], store: str, k: int, n: int, cwd: str):
    """One shard in a Ray worker: its summary stats (by backbone)."""
    if os.path.isdir(cwd):  # relative paths of the command line mean the driver's folder
        os.chdir(cwd)
    enable_compile_cache()
    return extract_main(cfg, pairs, store, shard=(k, n, f"Ray task {k} of {n}"))


def run_ray(
    cfg: Config, pairs: dict[str, str], store: str, n: int, max_retries: int = MAX_RETRIES
) -> dict[int, Any]:
    """Run shards 0..n-1 as Ray tasks, finalize in the driver; per shard, its stats.

    RayEngineError after the finalize if a shard failed for good (its error, or its worker
    died more than `max_retries` times): rows written so far are kept; rerun to complete.
    """
    try:
        import ray
    except ImportError:
        raise RayEngineError(
            "--engine ray: Ray is not installed; pip install 'jax_ifmvse[ray]'"
        ) from None
    started = not ray.is_initialized()
    if started:
        ray.init()  # RAY_ADDRESS, when set, points it at a cluster; else a local Ray starts
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        task = ray.remote(
            num_cpus=1,
            num_gpus=1 if gpus else 0,
            max_retries=max_retries,
            retry_exceptions=False,  # a user error (bad setting, other job) fails the same again
            max_calls=1,
        )(_shard_task)
        cwd = os.getcwd()
        refs = [task.remote(cfg, pairs, str(store), k, n, cwd) for k in range(n)]
        stats: dict[int, Any] = {}
        failed: dict[int, str] = {}
        for k, ref in enumerate(refs):
            try:
                stats[k] = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                failed[k] = first_line(e.cause if e.cause is not None else e)
            except ray.exceptions.RayError as e:  # worker died on every attempt, node lost
                failed[k] = f"{type(e).__name__} after {max_retries + 1} attempts"
    finally:
        if started:
            ray.shutdown()
    if Path(store).exists():
        finalize_job(store)
    if failed:
        k, why = next(iter(failed.items()))
        raise RayEngineError(
            f"{store}: Ray shards {sorted(failed)} of {n} failed (shard {k}: {why}); rows"
            " written so far are kept, rerun the same command to complete the store"
        )
    return stats
