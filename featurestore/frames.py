"""Frame-level features beside a store: float16, ragged (one row of T_i frames per utterance).

What attentive statistics pooling trains on (the baseline pools the frames itself). Layout, all
beside `STORE`:
  STORE.frames/<name>.h5            the index: `segment` (N,) int32 (-1: no frames), `start` and
                                    `length` (N,) int64, API row order; attribute `segments`, the
                                    segment files (JSON list); replaced whole by an atomic rename
  STORE.frames/<name>.seg-*.h5      one per merge: `data` (frames, D) float16, written once in
                                    one sequential pass and never modified
  STORE.frames/<name>/batch-*.npz   pending batches: rows (B,), lengths (B,), dim, data (sum T, D)

A merge costs what its pending batches cost: it streams them, one batch in memory at a time,
into a new segment file, then renames a new index over the old one (N x 20 bytes: 3.2 MB at
161k rows); nothing merged before is read or rewritten. So memory is bounded by one batch and
the index, not by the pending bytes, and extraction merges periodically (`merge_bytes`), keeping
pending files and the merge's disk peak (pending + the segment being written) bounded. An index
written before segments (`data`, `offsets`, `filled` in `<name>.h5`) is read as one segment and
kept, by a hard link, on the next merge.

Crash safety follows the pooled journal's: a writer puts every batch into its own file (written
under a temporary name, fsynced, renamed), so a killed extraction leaves whole batches only;
`missing_frames` lists the rows to do again and `finalize_frames` writes the new segment, renames
the new index into place (the commit) under the store's finalize lock, and only then deletes the
batches it merged and segments no row refers to. Readers list the pending batches before they
read the index, so a merge between the two loses no row. Listing which rows have frames reads
row indices only. This module is numpy + h5py only.

Written by `ifmvse extract --frames LAYER` (`extract.frames`) in the same encoder pass as the
pooled rows; read by training with `model.pooling: attentive` (docs/task1.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from featurestore.store import StoreError, atomic_path, finalize_lock

FRAME_DTYPE = np.float16
CHUNK_FRAMES = 4096  # HDF5 chunk of `data`: 4096 frames x D (8 MB at D = 1024)


def _dir(path: Path) -> Path:
    return path.with_name(path.name + ".frames")


def _merged(path: Path, name: str) -> Path:
    return _dir(path) / f"{name}.h5"


def _pending(path: Path, name: str) -> list[Path]:
    d = _dir(path) / name
    # Names start with the write time: sorted is written order, so a row written again wins.
    return sorted(d.glob("batch-*.npz")) if d.is_dir() else []


@dataclasses.dataclass
class _Index:
    """Where each row's frames are: segment files, and per row (segment, start, length)."""

    segments: list[str]  # file names in the frames folder
    segment: np.ndarray  # (N,) int32, -1: no frames
    start: np.ndarray  # (N,) int64 first frame in its segment
    length: np.ndarray  # (N,) int64 frames
    legacy: bool = False  # the file holds the data itself (written before segments)

    @property
    def filled(self) -> np.ndarray:
        """(N,) bool: rows with merged frames."""
        return self.segment >= 0


def _read_index(path: Path, name: str, n: int) -> _Index:
    """The merged rows' index (empty when nothing is merged)."""
    m = _merged(path, name)
    try:
        f = h5py.File(m, "r", locking=False)
    except FileNotFoundError:
        return _Index([], np.full(n, -1, np.int32), np.zeros(n, np.int64), np.zeros(n, np.int64))
    with f:
        if "offsets" in f:  # written before segments: the file holds the rows itself
            off, filled = f["offsets"][()], f["filled"][()]
            seg = np.where(filled, 0, -1).astype(np.int32)
            return _Index([m.name], seg, off[:-1].astype(np.int64), np.diff(off), legacy=True)
        return _Index(
            json.loads(f.attrs["segments"]), f["segment"][()], f["start"][()], f["length"][()]
        )


@dataclasses.dataclass(frozen=True)
class MergedFrames:
    """Where the merged frames of one backbone lie, for readers that read the files directly."""

    file: Path  # the merged index file (absent when nothing is merged)
    paths: tuple[Path, ...]  # segment files, in the index's segment order
    segment: np.ndarray  # (N,) int32, -1: no merged frames
    start: np.ndarray  # (N,) int64 first frame in its segment
    length: np.ndarray  # (N,) int64 frames, 0 where the row has none merged
    pending: int  # journal batch files not merged yet


def merged_frames(path: str | Path, name: str) -> MergedFrames:
    """The merged frames' layout of backbone `name` and how many batches wait to be merged."""
    path = Path(path)
    index = _read_index(path, name, len(_api_rows(path)))
    return MergedFrames(
        _merged(path, name),
        tuple(_dir(path) / seg for seg in index.segments),
        index.segment,
        index.start,
        np.where(index.filled, index.length, 0).astype(np.int64),
        len(_pending(path, name)),
    )


def _batch_rows(p: Path) -> tuple[np.ndarray, np.ndarray]:
    """A pending batch's rows and lengths, without reading its frames."""
    with np.load(p) as z:
        return z["rows"], z["lengths"]


def _batch_dim(p: Path) -> int:
    with np.load(p) as z:
        return int(z["dim"]) if "dim" in z.files else int(z["data"].shape[1])


def _read_batch(p: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(p) as z:
        return z["rows"], z["lengths"], z["data"]


def pending_bytes(path: str | Path, name: str) -> int:
    """Bytes of the pending frame batches of `name` (what the next merge reads and writes)."""
    total = 0
    for p in _pending(Path(path), name):
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size
    return total


def has_frames(path: str | Path, name: str) -> bool:
    """Whether frames of `name` are stored or being written beside the store."""
    return _merged(Path(path), name).exists() or (_dir(Path(path)) / name).is_dir()


def estimate_bytes(frames: Sequence[int] | np.ndarray, dim: int, layers: int = 1) -> int:
    """Bytes the frames of rows with these frame counts take as float16 (data only)."""
    return int(np.sum(np.asarray(frames, np.int64))) * int(dim) * int(layers) * 2


def check_disk(path: str | Path, need: int) -> int:
    """Free bytes where the frames go; StoreError (one line) when fewer than `need`."""
    path = Path(path)
    d = _dir(path)
    probe = d if d.exists() else path.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise StoreError(
            f"{d}: frames need {need / 1e9:.1f} GB, only {free / 1e9:.1f} GB free; free some"
            " space or store fewer layers"
        )
    return free


class FrameWriter:
    """Writes frame batches of one view (`name`) of the store at `path`, one file per batch."""

    def __init__(
        self, path: str | Path, name: str, dim: int, merge_bytes: int | None = None
    ) -> None:
        self.path, self.name, self.dim = Path(path), name, int(dim)
        self.n = len(_api_rows(self.path))
        (_dir(self.path) / name).mkdir(parents=True, exist_ok=True)
        # Merge the pending batches (all writers') whenever this many bytes of ours wait.
        self.merge_bytes, self._since_merge = merge_bytes, 0
        self.merges = 0

    def write(self, rows: Sequence[int], frames: Sequence[np.ndarray]) -> Path:
        """One batch: `frames[i]` (T_i, D) of store row `rows[i]`; returns the batch file."""
        rows = np.asarray(rows, np.int64)
        if len(rows) != len(frames):
            raise ValueError(f"{len(rows)} rows but {len(frames)} frame arrays")
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n):
            raise StoreError(f"{self.path}: frame rows outside 0..{self.n - 1}")
        bad = [f.shape for f in frames if f.ndim != 2 or f.shape[1] != self.dim]
        if bad:
            raise StoreError(
                f"{self.path}: frames of {self.name} must be (T, {self.dim}), got {bad[0]}"
            )
        lengths = np.asarray([len(f) for f in frames], np.int64)
        data = (
            np.concatenate(frames).astype(FRAME_DTYPE)
            if len(frames)
            else np.zeros((0, self.dim), FRAME_DTYPE)
        )
        final = _dir(self.path) / self.name / f"batch-{time.time_ns():020d}-{uuid.uuid4().hex}.npz"
        # A file object: np.savez on a path would append `.npz` to the temporary name.
        with atomic_path(final) as tmp, open(tmp, "wb") as f:
            np.savez(f, rows=rows, lengths=lengths, dim=np.int64(self.dim), data=data)
        self._since_merge += data.nbytes
        if self.merge_bytes is not None and self._since_merge >= self.merge_bytes:
            if finalize_frames(self.path, self.name, wait=False) is not None:
                self.merges += 1
            self._since_merge = 0  # another writer is merging: it takes ours too
        return final


def _api_rows(path: Path) -> np.ndarray:
    """(N,) the store's rows, from the row numbers alone (no strings decoded)."""
    with h5py.File(path, "r", locking=False) as f:
        return f["utterances"]["row"][()]


def _listing(
    path: Path, name: str, n: int
) -> tuple[np.ndarray, list[tuple[Path, np.ndarray]], _Index]:
    """(pending-filled (N,) bool, [(batch, rows)], index): batches listed before the index, so a
    merge in between (index renamed, then batches deleted) loses no row."""
    pend = np.zeros(n, bool)
    batches = []
    for p in _pending(path, name):
        with contextlib.suppress(FileNotFoundError):  # merged meanwhile: in the index read next
            rows = _batch_rows(p)[0]
            pend[rows] = True
            batches.append((p, rows))
    return pend, batches, _read_index(path, name, n)


def frames_filled(path: str | Path, name: str) -> np.ndarray:
    """(N,) bool: rows whose frames are stored (merged or pending); reads row indices only."""
    path = Path(path)
    pend, _, index = _listing(path, name, len(_api_rows(path)))
    return pend | index.filled


def missing_frames(path: str | Path, name: str) -> np.ndarray:
    """Rows without stored frames, in row order: what a resumed extraction does again."""
    return np.flatnonzero(~frames_filled(path, name))


@contextlib.contextmanager
def _try_lock(path: Path, wait: bool):
    """The store's finalize lock; with wait=False, None at once when another process holds it."""
    if wait:
        with finalize_lock(path):
            yield True
        return
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def finalize_frames(
    path: str | Path, name: str, min_age_s: float = 600.0, wait: bool = True
) -> int | None:
    """Merge pending frame batches into a new segment (crash-safe); returns the batches merged,
    or None when `wait=False` and another process holds the store's lock.

    Streams: one pending batch in memory at a time, written in one sequential pass; the old
    segments are not read. Temporary files older than `min_age_s` (killed writers) are removed.
    """
    path = Path(path)
    with _try_lock(path, wait) as got:
        if not got:
            return None
        pending = _pending(path, name)
        if not pending:
            _cleanup(path, name, min_age_s)
            return 0
        n = len(_api_rows(path))
        index = _read_index(path, name, n)
        d = _dir(path)
        listed = [(p, *_batch_rows(p)) for p in pending]
        last = np.full(n, -1, np.int64)  # the batch each row's frames come from: the last one
        for k, (_, rows, _) in enumerate(listed):
            last[rows] = k
        total = sum(int(lens[last[rows] == k].sum()) for k, (_, rows, lens) in enumerate(listed))
        dim = _batch_dim(pending[0])
        seg_name = f"{name}.seg-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.h5"
        segments = list(index.segments)
        if index.legacy:  # keep the old rows under a segment name before the index replaces it
            old = f"{name}.seg-00000000000000000000-legacy.h5"
            with contextlib.suppress(FileExistsError):
                os.link(_merged(path, name), d / old)
            segments = [old]
        seg_no = len(segments)
        segment, start, length = index.segment.copy(), index.start.copy(), index.length.copy()
        with atomic_path(d / seg_name) as tmp, h5py.File(tmp, "w") as f:
            ds = f.create_dataset(
                "data",
                shape=(total, dim),
                dtype=FRAME_DTYPE,
                chunks=(max(1, min(CHUNK_FRAMES, total)), dim) if total else None,
            )
            at = 0
            for k, (p, rows, lens) in enumerate(listed):
                win = last[rows] == k
                if not win.any():
                    continue  # every row of it written again later
                data = _read_batch(p)[2]  # (sum T, D): one batch in memory
                starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
                if not win.all():
                    data = np.concatenate([data[a : a + b] for a, b in zip(starts[win], lens[win])])
                ds[at : at + len(data)] = data
                r, ln = rows[win], lens[win]
                segment[r] = seg_no
                start[r] = at + np.concatenate([[0], np.cumsum(ln)[:-1]])
                length[r] = ln
                at += len(data)
                del data
        segments.append(seg_name)
        # Segments no row refers to any more (every row written again) are dropped.
        used = np.unique(segment[segment >= 0])
        remap = np.full(len(segments), -1, np.int32)
        remap[used] = np.arange(len(used), dtype=np.int32)
        segment = np.where(segment >= 0, remap[np.maximum(segment, 0)], -1).astype(np.int32)
        kept = [segments[i] for i in used]
        with atomic_path(_merged(path, name)) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["segments"] = json.dumps(kept)
            f.create_dataset("segment", data=segment)
            f.create_dataset("start", data=start)
            f.create_dataset("length", data=length)
        for p in pending:  # the new index is in place: these are redundant now
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        for gone in set(segments) - set(kept):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d / gone)
        _cleanup(path, name, min_age_s)
        return len(pending)


def _cleanup(path: Path, name: str, min_age_s: float) -> None:
    """Temporary files of killed writers; young ones may belong to a writer still running."""
    now = time.time()
    for d in (_dir(path) / name, _dir(path)):
        for p in d.glob(".tmp-*") if d.is_dir() else ():
            with contextlib.suppress(FileNotFoundError):
                if now - p.stat().st_mtime > min_age_s:
                    p.unlink()


def read_frames(path: str | Path, name: str, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Frames of `rows` padded to the longest: (B, T_max, D) float16 and lengths (B,) (0 for a
    row without frames, whose frames are all padding)."""
    path = Path(path)
    rows = np.asarray(rows, np.int64)
    n = len(_api_rows(path))
    for _ in range(10):
        try:
            return _read_frames(path, name, rows, n)
        except FileNotFoundError:
            continue  # a merge removed a segment or batch between listing and reading
    raise StoreError(f"{path}: frames of {name} kept changing while reading; try again")


def _read_frames(path: Path, name: str, rows: np.ndarray, n: int):
    got: dict[int, np.ndarray] = {}
    _, batches, index = _listing(path, name, n)
    dim = None
    want = set(rows.tolist())
    from_batch = {}
    for k, (_, b_rows) in enumerate(batches):  # the last batch holding a row wins
        for r in b_rows.tolist():
            if r in want:
                from_batch[r] = k
    merged = np.asarray([r for r in rows.tolist() if r not in from_batch and index.segment[r] >= 0],
                        np.int64)  # fmt: skip
    for s in np.unique(index.segment[merged]) if len(merged) else ():
        mine = merged[index.segment[merged] == s]
        mine = mine[np.argsort(index.start[mine], kind="stable")]  # ascending: sequential reads
        with h5py.File(_dir(path) / index.segments[int(s)], "r", locking=False) as f:
            ds = f["data"]
            dim = ds.shape[1]
            for r in mine.tolist():
                got[r] = ds[index.start[r] : index.start[r] + index.length[r]]
    for k in sorted(set(from_batch.values())):
        b_rows, lens, data = _read_batch(batches[k][0])
        dim = data.shape[1]
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        for r, s0, ln in zip(b_rows.tolist(), starts, lens, strict=True):
            if from_batch.get(r) == k:
                got[r] = data[s0 : s0 + ln]
    if dim is None and index.segments:
        with h5py.File(_dir(path) / index.segments[0], "r", locking=False) as f:
            dim = f["data"].shape[1]
    lengths = np.asarray([len(got.get(int(r), ())) for r in rows], np.int64)
    t = int(lengths.max()) if len(lengths) else 0
    out = np.zeros((len(rows), t, dim or 0), FRAME_DTYPE)
    for i, r in enumerate(rows):
        if int(r) in got:
            out[i, : lengths[i]] = got[int(r)]
    return out, lengths
