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

import collections
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


# (rank variable, world size variable) of the launchers `--shard auto` reads after a SLURM
# array and a Kubernetes Indexed Job, in this order.
_RANK_SOURCES = (
    ("SLURM_PROCID", "SLURM_NTASKS"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),  # Open MPI
    ("PMI_RANK", "PMI_SIZE"),  # MPICH, Intel MPI, Hydra
)
_ARRAY = "SLURM_ARRAY_TASK_"


def _int_var(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ShardError(f"--shard auto: {name}={env[name]!r} is not an integer") from None


def _slurm_array(env: Mapping[str, str], shards: int | None) -> tuple[int, int, str]:
    """(index, count, where) of a SLURM array task: (ID - MIN) / STEP of COUNT tasks.

    Any range maps onto shards 0..N-1 (`--array=1-16`, `10-40:10`, `0-15%4`); COUNT and MAX are
    checked against each other and against `shards`, so an array that is not N evenly stepped
    tasks (a list such as `3,11`, a range of another size) is refused rather than run wrong.
    """
    got = {v: _int_var(env, _ARRAY + v) for v in ("ID", "MIN", "MAX", "STEP", "COUNT")
           if _ARRAY + v in env}  # fmt: skip
    task, lo, step = got["ID"], got.get("MIN", 0), got.get("STEP", 1)
    named = ", ".join(f"{_ARRAY}{v}={x}" for v, x in got.items())
    if step < 1 or task < lo or (task - lo) % step:
        raise ShardError(f"--shard auto: {named}: the task id is not MIN + k * STEP")
    count = got.get("COUNT")
    if "MAX" in got:
        span = (got["MAX"] - lo) // step + 1
        if (got["MAX"] - lo) % step or (count is not None and span != count):
            raise ShardError(
                f"--shard auto: {named}: not one evenly stepped range (COUNT tasks from MIN to"
                " MAX by STEP); submit --array=0-N-1 (any start, step or %throttle) or give"
                " --shard K/N"
            )
        count = span if count is None else count
    if count is None:
        count = shards
        if count is None:
            raise ShardError(f"--shard auto: {named}: no SLURM_ARRAY_TASK_COUNT; give --shards N")
    if shards is not None and count != int(shards):
        raise ShardError(
            f"--shard auto: the SLURM array has {count} tasks ({named}) but --shards says"
            f" {shards}; submit an array of {shards} tasks (e.g. --array=0-{int(shards) - 1}) or"
            " rerun single shards with --shard K/N"
        )
    where = f"{_ARRAY}ID={task}, {_ARRAY}COUNT={count}"
    if lo:
        where += f", {_ARRAY}MIN={lo}"
    if step != 1:
        where += f", {_ARRAY}STEP={step}"
    return (task - lo) // step, count, where


def parse_shard(
    spec: str, shards: int | None = None, env: Mapping[str, str] | None = None
) -> tuple[int, int, str]:
    """(index, count, where they came from) for `--shard K/N` or `--shard auto`.

    auto reads, in this order: a SLURM array task ((SLURM_ARRAY_TASK_ID - MIN) / STEP of
    COUNT tasks, checked against MAX), a Kubernetes Indexed Job (JOB_COMPLETION_INDEX, count
    from `shards`, which must equal the Job's completions), SLURM tasks (SLURM_PROCID of
    SLURM_NTASKS), Open MPI (OMPI_COMM_WORLD_RANK of OMPI_COMM_WORLD_SIZE), MPICH (PMI_RANK of
    PMI_SIZE). `shards`, when given, must equal the count found; a mismatch is one line naming
    the variables and their values.
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
    elif _ARRAY + "ID" in env:
        k, n, where = _slurm_array(env, shards)
    elif "JOB_COMPLETION_INDEX" in env:
        k = _int_var(env, "JOB_COMPLETION_INDEX")
        if shards is None:
            raise ShardError(
                f"--shard auto: JOB_COMPLETION_INDEX={k} is set but not the shard count; give"
                " --shards N (the Job's completions)"
            )
        n, where = int(shards), f"JOB_COMPLETION_INDEX={k}, --shards {shards}"
        if k >= n:
            raise ShardError(
                f"--shard auto: JOB_COMPLETION_INDEX={k} but --shards {shards}: the Indexed Job's"
                f" completions must equal --shards (need 0 <= K < N)"
            )
    else:
        found = [(r, n) for r, n in _RANK_SOURCES if r in env]
        if not found:
            raise ShardError(
                "--shard auto: no scheduler variables found (SLURM_ARRAY_TASK_ID,"
                " JOB_COMPLETION_INDEX, SLURM_PROCID, OMPI_COMM_WORLD_RANK, PMI_RANK); give"
                " --shard K/N"
            )
        rank_var, size_var = found[0]
        k = _int_var(env, rank_var)
        if size_var not in env:
            raise ShardError(f"--shard auto: {rank_var} is set but not {size_var}")
        n = _int_var(env, size_var)
        where = f"{rank_var}={k}, {size_var}={n}"
        if shards is not None and int(shards) != n:
            raise ShardError(
                f"--shard auto: {where} gives {n} shards, --shards says {shards}; launch"
                f" {shards} tasks or give --shards {n}"
            )
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


def write_progress(store: str | Path, k: int, done: Mapping[str, tuple[int, int]]) -> None:
    """Shard k's progress, {backbone: (rows done, rows to do)}, in `STORE.jobs/progress-K.json`
    (replaced atomically; read by a driver such as the Ray engine)."""
    d = jobs_dir(store)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".tmp-{uuid.uuid4().hex}-progress"
    tmp.write_text(json.dumps({"shard": k, "done": {b: list(v) for b, v in done.items()}}))
    os.replace(tmp, d / f"progress-{k}.json")


def read_progress(store: str | Path, n: int) -> dict[int, dict[str, tuple[int, int]]]:
    """Every shard's last recorded progress (shards that have not started are absent)."""
    out = {}
    for k in range(n):
        try:
            rec = json.loads((jobs_dir(store) / f"progress-{k}.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        out[k] = {b: (int(v[0]), int(v[1])) for b, v in rec.get("done", {}).items()}
    return out


@dataclasses.dataclass(frozen=True)
class Missing:
    """One backbone's state after a finalize: rows done, failed (by reason) and missing (rows
    neither filled nor failed; filled rows without frames), with the shards they belong to."""

    backbone: str
    rows: np.ndarray  # (M,) rows neither filled nor failed
    total: int
    shards: tuple[int, ...]  # shards of `rows`; empty when no sharded job is recorded
    done: int = 0
    failed: tuple[tuple[str, int], ...] = ()  # (reason kind, rows), most common first
    frames: np.ndarray | None = None  # (F,) filled rows without frames; None: no frames stored
    frame_shards: tuple[int, ...] = ()

    @property
    def num_failed(self) -> int:
        """Rows recorded as failed."""
        return sum(n for _, n in self.failed)

    @property
    def num_frames_missing(self) -> int:
        """Filled rows whose frames are not stored (0 when the backbone stores no frames)."""
        return 0 if self.frames is None else len(self.frames)


def reason_kind(reason: str) -> str:
    """A failure reason without its details ("not audio or corrupt (Format ...)" -> its kind)."""
    return reason.split(" (")[0].split(": ")[0].strip() or "(no reason)"


def _has_frames(store: Path, name: str, job: Mapping[str, Any] | None) -> bool:
    from featurestore.frames import has_frames

    wanted = bool((job or {}).get("fingerprint", {}).get("extract.frames", ""))
    return has_frames(store, name) or (wanted and name in (job or {}).get("backbones", []))


def missing_report(store: str | Path, job: Mapping[str, Any] | None = None) -> list[Missing]:
    """What each backbone (the job's and the store's) has done, failed and still misses."""
    from featurestore.frames import frames_filled

    s = FeatureStore(store)
    job = read_job(store) if job is None else job
    names = list(s.backbones)
    n = None
    if job is not None:
        names += [b for b in job.get("backbones", []) if b not in names]
        n = int(job.get("num_shards", 0)) or None
    owner = None if n is None else shard_of(s.durations, n)

    def shards_of(rows: np.ndarray) -> tuple[int, ...]:
        return () if owner is None else tuple(sorted({int(x) for x in owner[rows]}))

    out = []
    for name in names:
        if name in s.backbones:
            v = s._view(name)
            filled, failed = v.filled, v.failed
        else:
            filled, failed = np.zeros(s.n, bool), {}
        todo = ~filled
        todo[list(failed)] = False
        rows = np.flatnonzero(todo)
        kinds = collections.Counter(reason_kind(r) for r in failed.values())
        frames = None
        if _has_frames(Path(store), name, job):
            frames = np.flatnonzero(filled & ~frames_filled(store, name))
        out.append(
            Missing(
                name,
                rows,
                s.n,
                shards_of(rows),
                done=int(filled.sum()),
                failed=tuple(kinds.most_common()),
                frames=frames,
                frame_shards=() if frames is None else shards_of(frames),
            )
        )
    return out


@dataclasses.dataclass(frozen=True)
class TranscriptsMissing:
    """One transcript set's state: rows transcribed (and how many of them flagged, by flag),
    failed (by reason), missing (no record), with the shards the missing rows belong to."""

    name: str
    rows: np.ndarray  # (M,) rows no batch file holds
    total: int
    shards: tuple[int, ...]
    num_shards: int | None
    done: int = 0
    flagged: tuple[tuple[str, int], ...] = ()  # (flag, rows) among the done rows
    failed: tuple[tuple[str, int], ...] = ()  # (reason kind, rows)

    @property
    def num_failed(self) -> int:
        """Rows recorded as failed."""
        return sum(n for _, n in self.failed)


def transcripts_report(
    store: str | Path, job: Mapping[str, Any] | None = None
) -> list[TranscriptsMissing]:
    """Per transcript set beside the store: done, flagged, failed and missing rows by shard (N
    from the job record, else from the sets' `shardKofN` writers)."""
    from featurestore import transcripts as tx

    names = list(tx.sets(store))
    if not names:
        return []
    s = FeatureStore(store)
    job = read_job(store) if job is None else job
    out = []
    for name in names:
        recs = tx.records(store, name)
        n = int((job or {}).get("num_shards", 0)) or tx.writer_shards(store, name)
        have = np.zeros(s.n, bool)
        have[[r for r in recs if 0 <= r < s.n]] = True
        rows = np.flatnonzero(~have)
        failed = collections.Counter(
            reason_kind(str(r["flags"]).partition(":")[2]) for r in recs.values() if tx.is_failed(r)
        )
        flagged = collections.Counter(
            f
            for r in recs.values()
            if not tx.is_failed(r)
            for f in str(r.get("flags") or "").split(",")
            if f
        )
        shards = (
            ()
            if n is None or not len(rows)
            else tuple(sorted({int(x) for x in shard_of(s.durations, n)[rows]}))
        )
        out.append(
            TranscriptsMissing(
                name,
                rows,
                s.n,
                shards,
                n,
                done=len(recs) - sum(failed.values()),
                flagged=tuple(sorted(flagged.items())),
                failed=tuple(failed.most_common()),
            )
        )
    return out


def _failed_text(m: Missing | TranscriptsMissing, top: int = 3) -> str:
    shown = ", ".join(f"{k} {n}" for k, n in m.failed[:top])
    more = f", {len(m.failed) - top} more reasons" if len(m.failed) > top else ""
    return f"{m.num_failed} failed ({shown}{more})"


def _of(shards: tuple[int, ...], n: int | None) -> str:
    if not shards:
        return ""
    return f" (shard{'s' if len(shards) > 1 else ''} {','.join(map(str, shards))} of {n})"


def report_lines(report: list[Missing], num_shards: int | None) -> list[str]:
    """One line per backbone: done, failed by reason, missing rows and frames by shard."""
    lines = []
    for m in report:
        parts = []
        if len(m.rows):
            parts.append(f"{len(m.rows)} of {m.total} rows missing{_of(m.shards, num_shards)}")
        if m.num_frames_missing:
            parts.append(
                f"{m.num_frames_missing} rows without frames{_of(m.frame_shards, num_shards)}"
            )
        state = "; ".join(parts) if parts else "complete"
        tail = [f"{m.done} done"]
        if m.num_failed:
            tail.append(_failed_text(m))
        if m.frames is not None:
            tail.append(f"frames of {m.done - m.num_frames_missing}")
        lines.append(f"{m.backbone}: {state}: {', '.join(tail)}")
    return lines


def transcript_lines(report: list[TranscriptsMissing]) -> list[str]:
    """One line per transcript set: done (flagged by flag), failed by reason, missing by shard."""
    lines = []
    for t in report:
        state = (
            f"{len(t.rows)} of {t.total} rows missing{_of(t.shards, t.num_shards)}"
            if len(t.rows)
            else "complete"
        )
        flags = ", ".join(f"{k} {n}" for k, n in t.flagged)
        tail = [f"{t.done} done" + (f" ({flags})" if flags else "")]
        if t.num_failed:
            tail.append(_failed_text(t))
        lines.append(f"transcripts {t.name}: {state}: {', '.join(tail)}")
    return lines


def incomplete(
    report: list[Missing], allow_failed: int = 0, transcripts: list[TranscriptsMissing] = ()
) -> bool:
    """Whether anything is missing (rows, frames, transcripts) or more rows failed than allowed
    (per backbone and per transcript set)."""
    return any(
        len(m.rows) or m.num_frames_missing or m.num_failed > allow_failed for m in report
    ) or any(len(t.rows) or t.num_failed > allow_failed for t in transcripts)


def missing_line(
    store: str | Path,
    report: list[Missing],
    num_shards: int | None,
    allow_failed: int = 0,
    transcripts: list[TranscriptsMissing] = (),
) -> str:
    """One line: per backbone the missing rows and frames, per transcript set the missing rows,
    failures past `allow_failed`, and the shards to rerun."""
    parts = []
    for m in report:
        if len(m.rows):
            parts.append(
                f"{m.backbone} {len(m.rows)} of {m.total} rows missing{_of(m.shards, num_shards)}"
            )
        if m.num_frames_missing:
            parts.append(
                f"{m.backbone} {m.num_frames_missing} rows without frames"
                f"{_of(m.frame_shards, num_shards)}"
            )
        if m.num_failed > allow_failed:
            parts.append(f"{m.backbone} {_failed_text(m)}, more than --allow-failed {allow_failed}")
    for t in transcripts:
        if len(t.rows):
            parts.append(
                f"transcripts {t.name} {len(t.rows)} of {t.total} rows missing"
                f"{_of(t.shards, t.num_shards)}"
            )
        if t.num_failed > allow_failed:
            parts.append(
                f"transcripts {t.name} {_failed_text(t)}, more than --allow-failed {allow_failed}"
            )
    rerun = sorted({k for m in report for k in (*m.shards, *m.frame_shards)})
    tail = f"; rerun --shard K/{num_shards} for K in {','.join(map(str, rerun))}" if rerun else ""
    for t in transcripts:
        if t.shards:
            tail += (
                f"; rerun transcribe --name {t.name} --shard K/{t.num_shards} for K in"
                f" {','.join(map(str, t.shards))}"
            )
    if any(m.num_failed > allow_failed for m in report):
        tail += "; extract --retry-failed [REASON] recomputes failed rows"
    return f"{store}: incomplete: {'; '.join(parts)}{tail}"
