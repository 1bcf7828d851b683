"""`ifmvse extract --shards N --engine ray`: the N shards of a job as Ray tasks, then finalize.

Each task runs one shard (`extract_main` with `shard=(k, n)`) in a Ray worker process of its own
(`max_calls=1`: a fresh process per attempt, so a retried shard starts clean), with the CPUs, GPUs
and memory of `shard_resources` (defaults that never oversubscribe a node; options override).
Ray's CPU count is only a reservation, so the task first binds its process to that many cores
(`cpu_limit.limit_cpus`) before JAX starts its backend. Ray retries a task whose worker died (`max_retries`); the shard's lock and
journal make a retry compute only the rows its dead attempt had not made durable. The driver then
merges the store (`finalize_job`). Without `RAY_ADDRESS`, `ray.init()` starts an embedded local
Ray; with it, the tasks go to that cluster (which must see the store and the package).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from featurestore.jobs import read_progress
from jax_ifmvse.compile_cache import enable_compile_cache
from jax_ifmvse.config import Config
from jax_ifmvse.cpu_limit import limit_cpus
from jax_ifmvse.errors import IfmvseError, first_line
from jax_ifmvse.extract import extract_main, finalize_job

MAX_RETRIES = 3  # attempts after the first, per shard, for a worker that died


class RayEngineError(IfmvseError):
    """Ray is missing, or shards failed under Ray: one line naming them."""


def _shard_task(
    cfg: Config,
    pairs: dict[str, str],
    store: str,
    k: int,
    n: int,
    cwd: str,
    retry_failed: str | None = None,
    cpus: float | None = None,
):
    """One shard in a Ray worker: its summary stats (by backbone)."""
    if cpus is not None:  # before JAX's backend starts: its thread pools are sized then
        cores = limit_cpus(cpus)
        print(f"Ray task {k} of {n}: bound to cores {cores}", file=sys.stderr, flush=True)
    if os.path.isdir(cwd):  # relative paths of the command line mean the driver's folder
        os.chdir(cwd)
    enable_compile_cache()
    return extract_main(
        cfg, pairs, store, shard=(k, n, f"Ray task {k} of {n}"), retry_failed=retry_failed
    )


@dataclasses.dataclass(frozen=True)
class ShardResources:
    """What each shard's Ray task asks for; None: the default from the cluster."""

    cpus: float | None = None
    gpus: float | None = None
    memory_gb: float | None = None


def shard_resources(nodes: list[dict], asked: ShardResources) -> dict[str, float]:
    """Ray task options per shard that never oversubscribe a node.

    GPUs: one per shard when the cluster has GPUs. CPUs: the node's cores shared by the shards
    that fit on it (its GPUs; on CPU nodes one shard, since JAX on CPU runs on every core, so
    shards x threads never exceed the node's cores). Memory: reserved only when asked for. Each
    option given is used as is, after checking that one shard fits on some node.
    """
    alive = [nd.get("Resources", {}) for nd in nodes if nd.get("Alive", True)]
    cpus = max((r.get("CPU", 0.0) for r in alive), default=1.0)
    gpus = max((r.get("GPU", 0.0) for r in alive), default=0.0)
    mem = max((r.get("memory", 0.0) for r in alive), default=0.0)
    g = asked.gpus if asked.gpus is not None else (1.0 if gpus else 0.0)
    per_node = int(gpus // g) if g and gpus else 1
    c = asked.cpus if asked.cpus is not None else max(1.0, float(int(cpus // max(per_node, 1))))
    out = {"num_cpus": c, "num_gpus": g}
    if asked.memory_gb is not None:
        out["memory"] = asked.memory_gb * 1e9
    checks = (
        ("CPUs", "--ray-cpus", c, cpus),
        ("GPUs", "--ray-gpus", g, gpus),
        ("bytes of memory", "--ray-memory-gb", out.get("memory", 0.0), mem),
    )
    for what, flag, want, have in checks:
        if want > have:
            raise RayEngineError(
                f"Ray: each shard asks for {want:g} {what} but the largest node has {have:g};"
                f" no shard could start (lower {flag})"
            )
    return out


def _progress_line(store: str, n: int, done: set[int], t0: float) -> str:
    """One line: each shard's rows done of its rows to do (all backbones), finished shards."""
    prog = read_progress(store, n)
    parts = []
    for k in range(n):
        if k in done:
            parts.append(f"{k}:done")
        elif k in prog:
            d = sum(v[0] for v in prog[k].values())
            t = sum(v[1] for v in prog[k].values())
            parts.append(f"{k}:{d}/{t}")
        else:
            parts.append(f"{k}:waiting")
    return f"[{time.monotonic() - t0:.0f} s] shards {' '.join(parts)}"


def run_ray(
    cfg: Config,
    pairs: dict[str, str],
    store: str,
    n: int,
    max_retries: int = MAX_RETRIES,
    resources: ShardResources = ShardResources(),
    retry_failed: str | None = None,
    report: Callable[[str], None] | None = print,
    every_s: float = 30.0,
) -> dict[int, Any]:
    """Run shards 0..n-1 as Ray tasks, finalize in the driver; per shard, its stats.

    Each task asks for `shard_resources` (CPUs, GPUs, memory); the driver reports every shard's
    progress (rows done of rows to do, from `STORE.jobs/progress-K.json`) every `every_s` and
    each shard as it ends. RayEngineError after the finalize if a shard failed for good (its
    error, or its worker died more than `max_retries` times): rows written so far are kept;
    rerun to complete.
    """
    try:
        import ray
    except ImportError:
        raise RayEngineError(
            "--engine ray: Ray is not installed; pip install 'jax_ifmvse[ray]'"
        ) from None
    report = report or (lambda line: None)
    started = not ray.is_initialized()
    if started:
        ray.init()  # RAY_ADDRESS, when set, points it at a cluster; else a local Ray starts
    try:
        opts = shard_resources(ray.nodes(), resources)
        report(
            f"Ray: {n} shards, each {opts['num_cpus']:g} CPU, {opts['num_gpus']:g} GPU"
            + (f", {opts['memory'] / 1e9:g} GB" if "memory" in opts else "")
        )
        task = ray.remote(
            **opts,
            max_retries=max_retries,
            retry_exceptions=False,  # a user error (bad setting, other job) fails the same again
            max_calls=1,
        )(_shard_task)
        cwd = os.getcwd()
        c = opts["num_cpus"]
        refs = {
            task.remote(cfg, pairs, str(store), k, n, cwd, retry_failed, c): k for k in range(n)
        }
        stats: dict[int, Any] = {}
        failed: dict[int, str] = {}
        t0 = last = time.monotonic()
        waiting = list(refs)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1, timeout=every_s)
            for ref in ready:
                k = refs[ref]
                try:
                    stats[k] = ray.get(ref)
                    report(f"shard {k}/{n} done after {time.monotonic() - t0:.0f} s")
                except ray.exceptions.RayTaskError as e:
                    failed[k] = first_line(e.cause if e.cause is not None else e)
                except ray.exceptions.RayError as e:  # worker died on every attempt, node lost
                    failed[k] = f"{type(e).__name__} after {max_retries + 1} attempts"
                if k in failed:
                    report(f"shard {k}/{n} failed: {failed[k]}")
            if waiting and time.monotonic() - last >= every_s:
                last = time.monotonic()
                report(_progress_line(str(store), n, set(stats) | set(failed), t0))
    finally:
        if started:
            ray.shutdown()
    if Path(store).exists():
        finalize_job(store)
    if failed:
        k, why = next(iter(sorted(failed.items())))
        raise RayEngineError(
            f"{store}: Ray shards {sorted(failed)} of {n} failed (shard {k}: {why}); rows"
            " written so far are kept, rerun the same command to complete the store"
        )
    return stats
