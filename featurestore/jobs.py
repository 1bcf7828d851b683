"""Share bookkeeping of a multi-process extraction job, in the directory `STORE.jobs/<job id>/`.

Plain numpy + json (never JAX). Process 0 writes the job's plan once (`plan.json`, atomic): per
backbone, the rows missing at job start in a fixed order; process k computes every n-th of them
from position k, so no row is left to nobody and none is computed twice, whatever the pace.
Every process then keeps a heartbeat file (`alive-p<k>.json`, a counter rewritten every few
seconds) and, at the end, records `done-p<k>.json` or `failed-p<k>.json`. Peers judge liveness by
whether a counter changes, on their own clock, so hosts' clocks need not agree. Whoever sees every
share done finalizes the store, once, under `finalize.lock` (the store's own journal and lock
are left alone). Needs a filesystem all processes share, as the store's journal already does.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.store import StoreError


class JobError(StoreError):
    """A multi-process job cannot go on (peer lost or failed, plans disagree): one line."""


def jobs_dir(store: str | Path) -> Path:
    """The directory holding a store's job bookkeeping: `STORE.jobs/`."""
    store = Path(store)
    return store.with_name(store.name + ".jobs")


def share_order(missing: np.ndarray, durations: np.ndarray) -> np.ndarray:
    """Missing rows sorted by duration, so every process's every-n-th share mixes all lengths."""
    missing = np.asarray(missing, np.int64)
    return missing[np.argsort(np.asarray(durations)[missing], kind="stable")]


def _write_atomic(final: Path, data: bytes) -> None:
    """Write to a temporary name beside `final`, fsync, rename: readers see old or new, whole."""
    tmp = final.with_name(f".tmp-{uuid.uuid4().hex}-{final.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class Job:
    """One process's handle on a job: its plan, heartbeats, done/failed records, finalization."""

    def __init__(self, store: str | Path, job_id: str, process_id: int, plan: Mapping[str, Any]):
        self.store = Path(store)
        self.id = job_id
        self.dir = jobs_dir(self.store) / job_id
        self.process_id = int(process_id)
        self.num_processes = int(plan["num_processes"])
        self.plan = plan
        self._beats = 0
        self._seen: dict[int, tuple[Any, float]] = {}  # peer -> (last counter seen, when)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peer_timeout = 60.0
        self._every = 0.0  # heartbeat interval, set by start()
        self._checked = -np.inf

    @classmethod
    def create(
        cls,
        store: str | Path,
        num_processes: int,
        order: Mapping[str, np.ndarray],
        fingerprint: Mapping[str, Any] | None = None,
    ) -> tuple[str, str]:
        """Write a new job's plan (process 0, once); returns (job id, sha256 of plan.json)."""
        job_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
        d = jobs_dir(store) / job_id
        d.mkdir(parents=True)
        plan = {
            "num_processes": int(num_processes),
            "order": {k: [int(r) for r in v] for k, v in order.items()},
            "fingerprint": dict(fingerprint or {}),
        }
        blob = json.dumps(plan, sort_keys=True).encode()
        _write_atomic(d / "plan.json", blob)
        return job_id, hashlib.sha256(blob).hexdigest()

    @classmethod
    def open(cls, store: str | Path, job_id: str, process_id: int, sha256: str) -> Job:
        """Read the plan process 0 wrote; JobError if absent or not the one it announced."""
        p = jobs_dir(store) / job_id / "plan.json"
        try:
            blob = p.read_bytes()
        except FileNotFoundError:
            raise JobError(
                f"{p}: job plan not found; is {Path(store).parent} a filesystem every process"
                " shares?"
            ) from None
        if hashlib.sha256(blob).hexdigest() != sha256:
            raise JobError(f"{p}: job plan differs from the one process 0 announced")
        return cls(store, job_id, process_id, json.loads(blob))

    def rows(self, backbone: str) -> np.ndarray:
        """This process's share of a backbone's rows (every n-th of the planned order)."""
        order = np.asarray(self.plan["order"].get(backbone, []), np.int64)
        return order[self.process_id :: self.num_processes]

    # -- liveness -------------------------------------------------------------------------

    def _marker(self, kind: str, k: int) -> Path:
        return self.dir / f"{kind}-p{k}.json"

    def beat(self) -> None:
        """Rewrite this process's heartbeat counter."""
        self._beats += 1
        _write_atomic(
            self._marker("alive", self.process_id),
            json.dumps({"beat": self._beats, "pid": os.getpid()}).encode(),
        )

    def start(self, peer_timeout: float, interval: float | None = None) -> Job:
        """Start the heartbeat thread; a peer whose counter stands still `peer_timeout` is lost."""
        self.peer_timeout = float(peer_timeout)
        every = self._every = interval or max(0.2, min(5.0, self.peer_timeout / 6))
        self.beat()
        now = time.monotonic()
        for k in range(self.num_processes):
            self._seen.setdefault(k, (None, now))

        def loop() -> None:
            while not self._stop.wait(every):
                with contextlib.suppress(OSError):  # a full disk shows up in the writes instead
                    self.beat()

        self._thread = threading.Thread(target=loop, name="ifmvse-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the heartbeat thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def done(self) -> set[int]:
        """Processes that recorded their share done."""
        return {k for k in range(self.num_processes) if self._marker("done", k).exists()}

    def check(self) -> None:
        """Raise JobError if a peer recorded a failure or its heartbeat stood still too long."""
        now = time.monotonic()
        if now - self._checked < self._every / 2:
            return  # called per batch: look at the shared filesystem only a few times a beat
        self._checked = now
        done = self.done()
        for k in range(self.num_processes):
            if k == self.process_id or k in done:
                continue
            failed = _read_json(self._marker("failed", k))
            if failed is not None:
                raise JobError(
                    f"process {k} failed: {failed.get('error', '?')}; rows written so far are"
                    " kept, rerun the same command to complete the store"
                )
            beat = (_read_json(self._marker("alive", k)) or {}).get("beat")
            last, since = self._seen.get(k, (None, now))
            if beat != last:
                self._seen[k] = (beat, now)
            elif now - since > self.peer_timeout:
                raise JobError(
                    f"process {k} lost (no heartbeat in {self.dir} for {now - since:.0f} s);"
                    " rows written so far are kept, rerun the same command to complete the store"
                )

    def fail(self, error: str) -> None:
        """Record that this process stopped with `error`, so peers stop at once, not on timeout."""
        with contextlib.suppress(OSError):
            _write_atomic(
                self._marker("failed", self.process_id),
                json.dumps({"error": error.splitlines()[0] if error else "?"}).encode(),
            )

    def finish(
        self,
        summary: Mapping[str, Any],
        finalize: Callable[[], None],
        poll: float | None = None,
    ) -> bool:
        """Record this share done, wait while live peers work, then finalize once; True if here.

        The wait has no deadline: a peer that keeps its heartbeat may take minutes longer. A
        lost or failed peer raises JobError (our share stays recorded as done).
        """
        _write_atomic(self._marker("done", self.process_id), json.dumps(summary).encode())
        every = poll or max(0.2, min(2.0, self.peer_timeout / 10))
        while len(self.done()) < self.num_processes:
            self.check()
            time.sleep(every)
        with self._lock():
            if (self.dir / "finalized.json").exists():
                return False
            finalize()
            _write_atomic(
                self.dir / "finalized.json",
                json.dumps({"by": self.process_id, "at": time.time()}).encode(),
            )
            return True

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.dir / "finalize.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def remove_finished_jobs(store: str | Path, keep: str | None = None) -> int:
    """Delete the directories of finalized jobs (except `keep`); returns how many."""
    n = 0
    root = jobs_dir(store)
    for d in sorted(root.iterdir()) if root.exists() else []:
        if d.name != keep and (d / "finalized.json").exists():
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


def job_status(store: str | Path) -> list[dict[str, Any]]:
    """Each job directory's state: id, processes, which shares are done or failed, finalized."""
    out = []
    root = jobs_dir(store)
    for d in sorted(root.iterdir()) if root.exists() else []:
        plan = _read_json(d / "plan.json")
        if plan is None:
            continue
        n = int(plan["num_processes"])
        out.append(
            {
                "job": d.name,
                "num_processes": n,
                "done": [k for k in range(n) if (d / f"done-p{k}.json").exists()],
                "failed": {
                    k: (_read_json(d / f"failed-p{k}.json") or {}).get("error", "?")
                    for k in range(n)
                    if (d / f"failed-p{k}.json").exists()
                },
                "finalized": (d / "finalized.json").exists(),
            }
        )
    return out
