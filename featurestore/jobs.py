"""Stateless shards of one extraction job: who computes which rows, and the job's one record.

Plain numpy + json + fcntl (never JAX). Extraction needs no collective between processes: every
utterance is independent. So a job of N shards is N processes that never talk to each other:
shard k's rows are a pure function of the corpus durations and N (`shard_of`), filtered to the
rows still missing, and each shard writes its own journal files into the store. The only shared
state is on the filesystem, beside the store, in `STORE.jobs/`:

  job.json           the job's fingerprint (corpus, weights, feature settings, N), written once by
                     an atomic create-exclusive (`os.link` of a complete temporary file): exactly
                     one of many shards starting at once records it, the others compare theirs
  shard-<k>.lock     held (flock) by the process running shard k, released by the OS when it dies
  finished-*.json    the records of jobs that completed (retired by `retire_job`)

A scheduler (SLURM array, Kubernetes Indexed Job, Ray) runs and retries the shards; whoever
merges the journal (`ifmvse store finalize`, under the store's own lock) may do so at any time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.store import FeatureStore, StoreError


class ShardError(StoreError):
    """A shard that cannot run as asked (bad spec, job mismatch, already running): one line."""


def jobs_dir(store: str | Path) -> Path:
    """The directory holding a store's job bookkeeping: `STORE.jobs/`."""
    store = Path(store)
    return store.with_name(store.name + ".jobs")


def job_path(store: str | Path) -> Path:
    """The running job's record: `STORE.jobs/job.json`."""
    return jobs_dir(store) / "job.json"


def share_order(rows: np.ndarray, durations: np.ndarray) -> np.ndarray:
    """Rows sorted by duration (stable), the order in which shards deal them out."""
    rows = np.asarray(rows, np.int64)
    return rows[np.argsort(np.asarray(durations)[rows], kind="stable")]


def shard_of(durations: np.ndarray, n: int) -> np.ndarray:
    """(N,) shard index of every row: rows sorted by duration, dealt out boustrophedon.

    Dealing 0..n-1, n-1..0, 0..n-1 over the duration order gives every shard rows of every
    length and audio totals within two longest utterances of each other. A pure function of the
    durations and n: every shard, the finalize report and a rerun agree without talking.
    """
    d = np.nan_to_num(np.asarray(durations, np.float64), nan=0.0)
    order = share_order(np.arange(len(d)), d)
    pos = np.arange(len(d)) % (2 * n)
    out = np.empty(len(d), np.int64)
    out[order] = np.where(pos < n, pos, 2 * n - 1 - pos)
    return out


def shard_rows(durations: np.ndarray, k: int, n: int) -> np.ndarray:
    """Shard k's rows (of n), in duration order."""
    d = np.nan_to_num(np.asarray(durations, np.float64), nan=0.0)
    mine = np.flatnonzero(shard_of(d, n) == k)
    return share_order(mine, d)


# -- which shard am I -------------------------------------------------------------------------


# (index variable, count variable, index offset variable, index step variable), in the order
# `--shard auto` tries them.
_AUTO_SOURCES = (
    (
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_MIN",
        "SLURM_ARRAY_TASK_STEP",
    ),
    ("JOB_COMPLETION_INDEX", None, None, None),  # Kubernetes Indexed Job: count from --shards
    ("SLURM_PROCID", "SLURM_NTASKS", None, None),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", None, None),
)


def _int_var(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ShardError(f"--shard auto: {name}={env[name]!r} is not an integer") from None


def parse_shard(
    spec: str, shards: int | None = None, env: Mapping[str, str] | None = None
) -> tuple[int, int, str]:
    """(index, count, where they came from) for `--shard K/N` or `--shard auto`.

    auto reads, in this order: a SLURM array (SLURM_ARRAY_TASK_ID less SLURM_ARRAY_TASK_MIN,
    over SLURM_ARRAY_TASK_COUNT; with `shards`, the task id itself of `shards`), a Kubernetes
    Indexed Job (JOB_COMPLETION_INDEX, count from `shards`), SLURM tasks (SLURM_PROCID of
    SLURM_NTASKS), Open MPI (OMPI_COMM_WORLD_RANK of OMPI_COMM_WORLD_SIZE). For the last two,
    `shards`, when given, must equal the count found.
    """
    env = os.environ if env is None else env
    if spec != "auto":
        k_s, sep, n_s = spec.partition("/")
        try:
            k, n = int(k_s), int(n_s)
        except ValueError:
            raise ShardError(f"--shard {spec!r}: expected K/N (e.g. 0/16) or auto") from None
        where = f"--shard {spec}"
        if not sep:
            raise ShardError(f"--shard {spec!r}: expected K/N (e.g. 0/16) or auto")
        if shards is not None and int(shards) != n:
            raise ShardError(f"--shard {spec}: --shards says {shards}")
    else:
        for index_var, count_var, min_var, step_var in _AUTO_SOURCES:
            if index_var not in env:
                continue
            k = _int_var(env, index_var)
            if count_var is None:
                if shards is None:
                    raise ShardError(
                        f"--shard auto: {index_var} is set but not the shard count; give"
                        " --shards N (the Job's completions)"
                    )
                n, where = int(shards), f"{index_var}={k}, --shards {shards}"
            elif min_var and shards is not None:
                # A SLURM array with --shards N: the array ids are the shard numbers, so a
                # rerun of some shards (`sbatch --array=3,11`) keeps its numbering.
                n, where = int(shards), f"{index_var}={k}, --shards {shards}"
            else:
                if count_var not in env:
                    raise ShardError(f"--shard auto: {index_var} is set but not {count_var}")
                n = _int_var(env, count_var)
                where = f"{index_var}={k}, {count_var}={n}"
            if min_var and min_var in env and shards is None:
                lo = _int_var(env, min_var)
                step = _int_var(env, step_var) if step_var in env else 1
                if lo:
                    where += f", {min_var}={lo}"
                if step != 1:
                    where += f", {step_var}={step}"
                if (k - lo) % max(step, 1):
                    raise ShardError(f"--shard auto: {index_var}={k} is not on the array's step")
                k = (k - lo) // max(step, 1)
            break
        else:
            raise ShardError(
                "--shard auto: no scheduler variables found (SLURM_ARRAY_TASK_ID,"
                " JOB_COMPLETION_INDEX, SLURM_PROCID, OMPI_COMM_WORLD_RANK); give --shard K/N"
            )
        if shards is not None and int(shards) != n:
            raise ShardError(f"--shard auto: {where} gives {n} shards, --shards says {shards}")
    if n < 1 or not 0 <= k < n:
        raise ShardError(f"{where}: shard index {k} of {n}: need 0 <= K < N")
    return k, n, where


# -- one process per shard --------------------------------------------------------------------


@contextlib.contextmanager
def shard_lock(store: str | Path, k: int, n: int) -> Iterator[Path]:
    """Hold `STORE.jobs/shard-<k>.lock` while shard k runs; ShardError if another process does.

    flock: the OS releases it when the holder dies (SIGKILL, node loss with a local lock
    manager), so a retried shard never waits on a stale lock.
    """
    d = jobs_dir(store)
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"shard-{k}.lock"
    fh = open(p, "a+")  # noqa: SIM115 - held open for the whole run
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise ShardError(
                f"{p}: shard {k}/{n} is already running ({holder}); one process per shard"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}")
        fh.flush()
        yield p
    finally:
        fh.close()  # closing releases the lock


# -- the job's record -------------------------------------------------------------------------


def first_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """The first field (sorted) whose values differ between two fingerprints, or None."""
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return key, a.get(key, "(absent)"), b.get(key, "(absent)")
    return None


def read_job(store: str | Path) -> dict[str, Any] | None:
    """The running job's record, or None when no job is recorded."""
    p = job_path(store)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ShardError(f"{p}: unreadable job record ({e})") from None


def record_job(
    store: str | Path, fingerprint: Mapping[str, Any], extra: Mapping[str, Any], who: str
) -> bool:
    """Record this job's fingerprint once, or check ours against the one recorded.

    Returns True when this call recorded it. The record appears whole and at most once: a
    complete, fsynced temporary file is hard-linked to `job.json` (link fails if it exists).
    ShardError names the first differing field.
    """
    d = jobs_dir(store)
    d.mkdir(parents=True, exist_ok=True)
    final = job_path(store)
    record = {"fingerprint": dict(fingerprint), **dict(extra), "recorded_by": who}
    record["recorded_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tmp = d / f".tmp-{uuid.uuid4().hex}-job.json"
    won = False
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(record, indent=1, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, final)
            won = True
        except FileExistsError:
            pass
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    if won:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return True
    theirs = read_job(store)
    if theirs is None:  # retired between our link and our read: record ours instead
        return record_job(store, fingerprint, extra, who)
    diff = first_difference(theirs.get("fingerprint", {}), dict(fingerprint))
    if diff is not None:
        raise _disagree(store, *diff, who)
    return False


def check_shard_count(store: str | Path, n: int, who: str) -> None:
    """Fail fast (before loading models) when the recorded job has another shard count."""
    theirs = read_job(store)
    recorded = None if theirs is None else theirs.get("fingerprint", {}).get("num_shards")
    if recorded is not None and int(recorded) != int(n):
        raise _disagree(store, "num_shards", recorded, n, who)


def _disagree(store: str | Path, field: str, a: Any, b: Any, who: str) -> ShardError:
    return ShardError(
        f"shards disagree on {field}: the job recorded in {job_path(store)} has {a}, {who} has"
        f" {b} (every shard runs the same command; a new job needs another store)"
    )


def retire_job(store: str | Path) -> Path | None:
    """Move a completed job's record aside (`finished-<time>.json`), so another job may start."""
    final = job_path(store)
    if not final.exists():
        return None
    dest = final.with_name(f"finished-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}.json")
    with contextlib.suppress(FileNotFoundError):
        os.replace(final, dest)
        return dest
    return None


@dataclasses.dataclass(frozen=True)
class Missing:
    """Rows of one backbone neither filled nor failed, and the shards they belong to."""

    backbone: str
    rows: np.ndarray  # (M,) row numbers
    total: int
    shards: tuple[int, ...]  # empty when no sharded job is recorded


def missing_report(store: str | Path, job: Mapping[str, Any] | None = None) -> list[Missing]:
    """What each backbone (the job's and the store's) still misses, by shard of the job."""
    s = FeatureStore(store)
    job = read_job(store) if job is None else job
    names = list(s.backbones)
    n = None
    if job is not None:
        names += [b for b in job.get("backbones", []) if b not in names]
        n = int(job.get("num_shards", 0)) or None
    owner = None if n is None else shard_of(s.durations, n)
    out = []
    for name in names:
        rows = s.missing(name)
        shards = () if owner is None else tuple(sorted({int(x) for x in owner[rows]}))
        out.append(Missing(name, rows, s.n, shards))
    return out


def missing_line(store: str | Path, report: list[Missing], num_shards: int | None) -> str:
    """One line: the missing rows per backbone and the shards to rerun."""
    parts = []
    for m in report:
        if len(m.rows):
            where = ""
            if m.shards:
                where = f" (shard{'s' if len(m.shards) > 1 else ''} "
                where += ",".join(map(str, m.shards)) + f" of {num_shards})"
            parts.append(f"{m.backbone} {len(m.rows)} of {m.total} rows missing{where}")
    rerun = sorted({k for m in report for k in m.shards})
    tail = f"; rerun --shard K/{num_shards} for K in {','.join(map(str, rerun))}" if rerun else ""
    return f"{store}: incomplete: {'; '.join(parts)}{tail}"
