"""Frame-level features beside a store: float16, ragged (one row of T_i frames per utterance).

What attentive statistics pooling trains on (the baseline pools the frames itself). Layout, all
beside `STORE`:
  STORE.frames/<name>.h5            the merged rows: `data` (total frames, D) float16, chunked
                                    along frames so reading rows in order is sequential;
                                    `offsets` (N + 1,) int64 and `filled` (N,) bool, API row order
  STORE.frames/<name>/*.npz         pending batches: rows (B,), lengths (B,), data (sum T, D)

Crash safety follows the pooled journal's: a writer puts every batch into its own file (written
under a temporary name, fsynced, renamed), so a killed extraction leaves whole batches only;
`missing_frames` lists the rows to do again and `finalize_frames` rewrites the merged file under
the store's finalize lock, renames it into place and only then deletes the batches it merged.
Readers see the merged file plus the pending batches. This module is numpy + h5py only.

Written by `ifmvse extract --frames LAYER` (`extract.frames`) in the same encoder pass as the
pooled rows; read by training with `model.pooling: attentive` (docs/task1.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from featurestore.store import FeatureStore, StoreError, atomic_path, finalize_lock

FRAME_DTYPE = np.float16
CHUNK_FRAMES = 4096  # HDF5 chunk of `data`: 4096 frames x D (8 MB at D = 1024)


def _dir(path: Path) -> Path:
    return path.with_name(path.name + ".frames")


def _merged(path: Path, name: str) -> Path:
    return _dir(path) / f"{name}.h5"


def _pending(path: Path, name: str) -> list[Path]:
    d = _dir(path) / name
    return sorted(d.glob("batch-*.npz")) if d.is_dir() else []


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

    def __init__(self, path: str | Path, name: str, dim: int):
        self.path, self.name, self.dim = Path(path), name, int(dim)
        self.n = FeatureStore(self.path).n
        (_dir(self.path) / name).mkdir(parents=True, exist_ok=True)

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
        final = _dir(self.path) / self.name / f"batch-{uuid.uuid4().hex}.npz"
        # A file object: np.savez on a path would append `.npz` to the temporary name.
        with atomic_path(final) as tmp, open(tmp, "wb") as f:
            np.savez(f, rows=rows, lengths=lengths, data=data)
        return final


def _read_batch(p: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(p) as z:
        return z["rows"], z["lengths"], z["data"]


def frames_filled(path: str | Path, name: str) -> np.ndarray:
    """(N,) bool: rows whose frames are stored (merged or pending)."""
    path = Path(path)
    n = FeatureStore(path).n
    filled = np.zeros(n, bool)
    m = _merged(path, name)
    if m.exists():
        with h5py.File(m, "r", locking=False) as f:
            filled |= f["filled"][()]
    for p in _pending(path, name):
        with contextlib.suppress(FileNotFoundError):  # merged away meanwhile: in the new file
            filled[_read_batch(p)[0]] = True
    return filled


def missing_frames(path: str | Path, name: str) -> np.ndarray:
    """Rows without stored frames, in row order: what a resumed extraction does again."""
    return np.flatnonzero(~frames_filled(path, name))


def finalize_frames(path: str | Path, name: str, min_age_s: float = 600.0) -> int:
    """Merge pending frame batches into STORE.frames/<name>.h5 (crash-safe); returns batches.

    Temporary files older than `min_age_s` (left by killed writers) are removed."""
    path = Path(path)
    with finalize_lock(path):
        pending = _pending(path, name)
        if not pending:
            _cleanup(path, name, min_age_s)
            return 0
        n = FeatureStore(path).n
        m = _merged(path, name)
        lengths = np.zeros(n, np.int64)
        filled = np.zeros(n, bool)
        src: dict[int, tuple[int, int]] = {}  # row -> (source, start frame in it); later wins
        sources: list[tuple[np.ndarray, np.ndarray] | h5py.Dataset] = []
        old = h5py.File(m, "r", locking=False) if m.exists() else None
        try:
            dim = None
            if old is not None:
                off, was = old["offsets"][()], old["filled"][()]
                sources.append(old["data"])
                dim = old["data"].shape[1]
                for r in np.flatnonzero(was):
                    src[int(r)] = (0, int(off[r]))
                    lengths[r] = off[r + 1] - off[r]
                filled |= was
            for p in pending:
                rows, lens, data = _read_batch(p)
                dim = data.shape[1] if dim is None else dim
                starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
                k = len(sources)
                sources.append(data)
                for r, s0, ln in zip(rows, starts, lens, strict=True):
                    src[int(r)] = (k, int(s0))
                    lengths[r] = ln
                filled[rows] = True
            offsets = np.concatenate([[0], np.cumsum(np.where(filled, lengths, 0))])
            total = int(offsets[-1])
            with atomic_path(m) as tmp, h5py.File(tmp, "w") as f:
                ds = f.create_dataset(
                    "data",
                    shape=(total, dim or 0),
                    dtype=FRAME_DTYPE,
                    chunks=(max(1, min(CHUNK_FRAMES, total)), dim or 1) if total else None,
                )
                # Rows in order, a bounded block at a time: sequential writes and reads.
                block, held, start = [], 0, 0
                for r in np.flatnonzero(filled):
                    k, s0 = src[int(r)]
                    block.append(sources[k][s0 : s0 + int(lengths[r])])
                    held += int(lengths[r])
                    if held >= CHUNK_FRAMES * 4:
                        x = np.concatenate(block)
                        ds[start : start + len(x)] = x
                        start, block, held = start + len(x), [], 0
                if block:
                    x = np.concatenate(block)
                    ds[start : start + len(x)] = x
                f.create_dataset("offsets", data=offsets.astype(np.int64))
                f.create_dataset("filled", data=filled)
        finally:
            if old is not None:
                old.close()
        for p in pending:  # the merged file is in place: these are redundant now
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        _cleanup(path, name, min_age_s)
        return len(pending)


def _cleanup(path: Path, name: str, min_age_s: float) -> None:
    """Temporary files of killed writers; young ones may belong to a writer still running."""
    now = time.time()
    d = _dir(path) / name
    for p in d.glob(".tmp-*") if d.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):
            if now - p.stat().st_mtime > min_age_s:
                p.unlink()


def read_frames(path: str | Path, name: str, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Frames of `rows` padded to the longest: (B, T_max, D) float16 and lengths (B,) (0 for a
    row without frames, whose frames are all padding)."""
    path = Path(path)
    rows = np.asarray(rows, np.int64)
    got: dict[int, np.ndarray] = {}
    m = _merged(path, name)
    dim = None
    if m.exists():
        with h5py.File(m, "r", locking=False) as f:
            off, filled = f["offsets"][()], f["filled"][()]
            dim = f["data"].shape[1]
            for r in rows[np.argsort(off[rows], kind="stable")]:  # ascending: sequential reads
                if filled[r]:
                    got[int(r)] = f["data"][off[r] : off[r + 1]]
    want = set(rows.tolist())
    for p in _pending(path, name):
        with contextlib.suppress(FileNotFoundError):
            b_rows, lens, data = _read_batch(p)
            dim = data.shape[1]
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
            for r, s0, ln in zip(b_rows, starts, lens, strict=True):
                if int(r) in want:
                    got[int(r)] = data[s0 : s0 + ln]
    lengths = np.asarray([len(got.get(int(r), ())) for r in rows], np.int64)
    t = int(lengths.max()) if len(lengths) else 0
    out = np.zeros((len(rows), t, dim or 0), FRAME_DTYPE)
    for i, r in enumerate(rows):
        if int(r) in got:
            out[i, : lengths[i]] = got[int(r)]
    return out, lengths
