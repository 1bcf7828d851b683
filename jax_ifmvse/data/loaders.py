"""Frame batches streamed from the frame file (featurestore.frames) with Grain, host memory bounded.

What attentive pooling trains and evaluates on, without ever holding a split: the epoch's plan
(which rows go in which batch) is a few ints per row, made in the training process; a Grain
`DataLoader` over a random-access source whose record `b` is batch `b` of the plan reads those
rows from the segment files of `STORE.frames/<view>` (rows sorted by segment and offset, so reads go forward; raw `preadv` of the
unfiltered chunks' bytes, h5py for filtered data), pads them to
the batch's longest row rounded up to `pad_frames`, standardizes them, and hands them over through
a bounded prefetch buffer (worker processes with `workers > 0`, else threads of this process).
So reading overlaps compute, and the batches in flight are what `host_memory_gb` allows.

- Training order: the in-memory path's permutation (given as `order`), cut into batches of `B`;
  with `bucket_window > 1`, each window of that many batches is sorted by length before it is cut
  (length buckets: rows of similar length share a batch, so little padding is read or computed)
  and the batches are then shuffled from (seed, epoch). `bucket_window = 1` gives exactly the
  in-memory path's batches. A last partial batch is padded with dummy rows (no frames, weight 0).
- Evaluation order: rows sorted by length, batches of `eval_batch`, predictions put back by row.
- Resume: `BatchStream.get_state()` is Grain's iterator state (JSON bytes) plus the epoch; a
  stream made for the same (seed, epoch) and given it (`state=`, `set_state`) continues with the
  next batch. `trainer.fit` saves it with a checkpoint within an epoch through Grain's Orbax
  handler, which calls `get_state`, `set_state` and `start_prefetch`.

This module imports numpy, h5py and grain only (Grain's worker processes import it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featurestore.frames import merged_frames
from jax_ifmvse.data.views import standardize
from jax_ifmvse.errors import IfmvseError

FRAME_BYTES = 2  # float16 frames


class LoaderError(IfmvseError, ValueError):
    """Frames that cannot be streamed: pending batches, a memory bound too small for a batch."""


@dataclasses.dataclass(frozen=True)
class FrameIndex:
    """Where each store row's frames lie in the segment files of `STORE.frames/<view>`
    (`featurestore.frames`; index read once)."""

    paths: tuple[Path, ...]  # the segment files
    segment: np.ndarray  # (N,) int32 segment of each store row (-1: no frames)
    starts: np.ndarray  # (N,) int64 first frame of each store row in its segment
    lengths: np.ndarray  # (N,) int64 frames per store row (0: no frames)
    dim: int
    # Per segment, unfiltered storage: file byte address of each block of `block` frames
    # (chunks, or one block for contiguous storage), read with os.preadv (no HDF5 lock, so
    # threads read in parallel, 3 to 4x h5py's per-row reads measured); None: filtered data,
    # read through h5py.
    seg_addrs: tuple[np.ndarray | None, ...] = ()
    blocks: tuple[int, ...] = ()

    @property
    def path(self) -> Path:
        """The first segment file (the only one after a single merge)."""
        return self.paths[0]

    @property
    def addrs(self) -> np.ndarray | None:
        """The first segment's block addresses (None: read through h5py)."""
        return self.seg_addrs[0] if self.seg_addrs else None


def frame_index(store_path: str | Path, view: str) -> FrameIndex:
    """The merged frames of `view`: segment files and per-row place; LoaderError when batches
    are pending (streaming reads merged frames only)."""
    store_path = Path(store_path)
    merged = merged_frames(store_path, view)
    if merged.pending:
        raise LoaderError(
            f"{store_path}: {merged.pending} frame batch file(s) of {view!r} are not merged;"
            " finish the extraction (finalize_frames) before streaming"
        )
    if not merged.file.exists():
        raise LoaderError(f"{store_path}: no frames stored for {view!r} ({merged.file} is missing)")
    paths = merged.paths
    addrs, blocks, dim = [], [], 0
    for p in paths:
        with h5py.File(p, "r", locking=False) as f:
            ds = f["data"]
            dim = int(ds.shape[1])
            a, b = _block_addresses(ds)
        addrs.append(a)
        blocks.append(b)
    return FrameIndex(
        paths, merged.segment, merged.start, merged.length, dim, tuple(addrs), tuple(blocks)
    )


def _block_addresses(ds: h5py.Dataset) -> tuple[np.ndarray | None, int]:
    """(byte address of each chunk of whole rows, frames per chunk), or (None, 0) where the
    data cannot be read as raw bytes (filters, chunks split across the feature axis)."""
    if ds.dtype != np.float16 or ds.compression or ds.shuffle or ds.fletcher32 or ds.scaleoffset:
        return None, 0
    total = ds.shape[0]
    if ds.chunks is None:
        a = ds.id.get_offset()
        return (None, 0) if a is None else (np.asarray([a], np.int64), max(total, 1))
    block = int(ds.chunks[0])
    if ds.chunks[1] != ds.shape[1] or not hasattr(ds.id, "chunk_iter"):
        return None, 0
    addrs = np.full(-(-total // block), -1, np.int64)

    def put(info) -> None:
        addrs[info.chunk_offset[0] // block] = info.byte_offset

    ds.id.chunk_iter(put)
    return (addrs, block) if (addrs >= 0).all() else (None, 0)


def padded_length(longest: int, pad_frames: int) -> int:
    """Frames a batch is padded to: its longest row rounded up to a multiple of `pad_frames`."""
    return max(1, math.ceil(max(int(longest), 1) / pad_frames)) * pad_frames


# ---------------------------------------------------------------------------------------------
# Plans: which positions go in which batch (positions index the rows given to the stream).


def train_plan(
    order: np.ndarray,
    lengths: np.ndarray,
    batch_size: int,
    *,
    drop_last: bool = False,
    bucket_window: int = 1,
    seed: int = 0,
    epoch: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """One epoch's batches: positions (steps, B), -1 for dummy rows, and 0/1 weights (steps, B).

    `order` is the epoch's order of positions (the in-memory path's permutation); `lengths` (n,)
    the frames of each position (what buckets sort by)."""
    order = np.asarray(order, np.int64)
    n = len(order)
    full, rest = divmod(n, batch_size)
    if bucket_window > 1:
        w, end = bucket_window * batch_size, full * batch_size
        parts = [order[s : min(s + w, end)] for s in range(0, end, w)]
        parts = [p[np.argsort(lengths[p], kind="stable")] for p in parts]
        body = np.concatenate(parts) if parts else order[:0]
        batches = body.reshape(full, batch_size)
        rng = np.random.default_rng([seed, epoch, 0x5EED])
        batches = batches[rng.permutation(full)]
        order = np.concatenate([batches.reshape(-1), order[full * batch_size :]])
    idx = order[: full * batch_size].reshape(full, batch_size)
    weights = np.ones(idx.shape, np.float32)
    if rest and not drop_last:
        last = np.full(batch_size, -1, np.int64)
        last[:rest] = order[full * batch_size :]
        idx = np.concatenate([idx, last[None]])
        weights = np.concatenate([weights, (last >= 0)[None].astype(np.float32)])
    return idx, weights


def eval_plan(lengths: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every position once, sorted by length, in batches of `batch_size` (-1 pads the last)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    steps = max(1, math.ceil(len(order) / batch_size))
    idx = np.full(steps * batch_size, -1, np.int64)
    idx[: len(order)] = order
    idx = idx.reshape(steps, batch_size)
    return idx, (idx >= 0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The Grain source: record b = batch b of a plan.


class FrameBatchSource:
    """Random-access source (Grain's protocol: `__len__`, `__getitem__`) of one plan's batches.

    A batch is {view: (B, T, D) float16 standardized, `view:mask`: (B, T) bool, `weights`: (B,),
    `positions`: (B,) int64, plus each target array gathered at the positions (zeros for dummy
    rows)}. Frame files are opened lazily in whichever process reads (workers included)."""

    def __init__(
        self,
        indexes: Mapping[str, FrameIndex],
        rows: np.ndarray,
        plan: np.ndarray,
        weights: np.ndarray,
        *,
        pad_frames: int,
        stats: Mapping[str, tuple] | None = None,
        targets: Mapping[str, np.ndarray] | None = None,
    ):
        self.indexes = dict(indexes)
        self.rows = np.asarray(rows, np.int64)  # (n,) store rows of the positions
        self.plan, self.weights = np.asarray(plan, np.int64), np.asarray(weights, np.float32)
        self.pad_frames = int(pad_frames)
        self.stats = {v: s for v, s in (stats or {}).items() if v in self.indexes}
        self.targets = {k: np.asarray(v) for k, v in (targets or {}).items()}
        self._files: dict[str, Any] = {}  # view -> h5py.File or raw fd

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}  # open files stay in their process

    def __len__(self) -> int:
        return len(self.plan)

    def __repr__(self) -> str:
        # Grain checks a saved state against repr(source): the same views, rows and plan.
        h = hashlib.sha256(self.rows.tobytes() + self.plan.tobytes()).hexdigest()[:16]
        return f"FrameBatchSource(views={sorted(self.indexes)}, steps={len(self.plan)}, plan={h})"

    def batch_bytes(self, step: int | None = None) -> int:
        """Host bytes of batch `step` (the largest batch without one): frames, masks, extras."""
        steps = range(len(self.plan)) if step is None else [step]
        most = 0
        for s in steps:
            pos = self.plan[s]
            rows = self.rows[pos[pos >= 0]]
            b = len(pos)
            size = b * (8 + 4) + sum(t[:1].nbytes * b for t in self.targets.values())
            for ix in self.indexes.values():
                t = padded_length(ix.lengths[rows].max(initial=0), self.pad_frames)
                size += b * t * (ix.dim * FRAME_BYTES + 1)
            most = max(most, size)
        return most

    def _file(self, view: str, seg: int) -> Any:
        """This process's open segment file of `view`: an h5py file, or an fd for raw reads."""
        key = f"{seg}:{view}"
        if key not in self._files:
            ix = self.indexes[view]
            if ix.seg_addrs[seg] is None:
                self._files[key] = h5py.File(ix.paths[seg], "r", locking=False)
            else:
                self._files[key] = os.open(ix.paths[seg], os.O_RDONLY)
        return self._files[key]

    def _read(self, view: str, x: np.ndarray, i: int, seg: int, start: int, n: int) -> None:
        """Frames start..start+n of segment `seg` of `view` into x[i, :n]."""
        ix, f = self.indexes[view], self._file(view, seg)
        addrs, block = ix.seg_addrs[seg], ix.blocks[seg]
        if addrs is None:
            f["data"].read_direct(x, np.s_[start : start + n], np.s_[i, :n])
            return
        a, end = start, start + n
        while a < end:  # one pread per chunk the row spans
            k = a // block
            b = min(end, (k + 1) * block)
            buf = memoryview(x[i, a - start : b - start]).cast("B")
            where = int(addrs[k]) + (a - k * block) * ix.dim * FRAME_BYTES
            if os.preadv(f, [buf], where) != buf.nbytes:
                raise LoaderError(f"{ix.paths[seg]}: short read at byte {where} (file truncated?)")
            a = b

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        pos = self.plan[step]  # (B,)
        real = pos >= 0
        rows = np.where(real, self.rows[np.maximum(pos, 0)], -1)
        out: dict[str, np.ndarray] = {}
        for v, ix in self.indexes.items():
            lens = np.where(real, ix.lengths[np.maximum(rows, 0)], 0)  # (B,)
            t = padded_length(lens.max(initial=0), self.pad_frames)
            x = np.zeros((len(pos), t, ix.dim), np.float16)  # (B, T, D)
            r0 = np.maximum(rows, 0)
            seg = np.where(real, ix.segment[r0], -1)
            for i in np.lexsort((np.where(real, ix.starts[r0], -1), seg)):
                if lens[i]:  # by segment, ascending file offsets: forward reads
                    self._read(v, x, int(i), int(seg[i]), int(ix.starts[rows[i]]), int(lens[i]))
            if v in self.stats:
                x = standardize({v: x}, self.stats, inplace=True)[v]
            out[v] = x
            out[f"{v}:mask"] = np.arange(t)[None] < lens[:, None]  # (B, T)
        out["weights"] = self.weights[step]
        out["positions"] = pos
        for k, y in self.targets.items():
            g = y[np.maximum(pos, 0)].copy()
            g[~real] = 0
            out[k] = g
        return out

    def close(self) -> None:
        """Close the frame files this process opened."""
        for f in self._files.values():
            with contextlib.suppress(Exception):
                os.close(f) if isinstance(f, int) else f.close()
        self._files.clear()


# ---------------------------------------------------------------------------------------------
# Memory bound and the Grain loader.


@dataclasses.dataclass(frozen=True)
class Buffers:
    """How many batches are in flight: per reading process and in total."""

    processes: int  # Grain worker processes, 1 for reading in threads of this process
    prefetch: int  # Grain's read prefetch per process (batches)
    in_flight: int  # every batch that can exist at once, the one on its way to the device too
    batch_bytes: int  # the largest batch of the plan

    @property
    def peak_bytes(self) -> int:
        return self.in_flight * self.batch_bytes


def plan_buffers(
    batch_bytes: int, host_memory_bytes: float, workers: int, max_prefetch: int = 8
) -> Buffers:
    """Prefetch depth that keeps every batch in flight within `host_memory_bytes`.

    In flight: per process its prefetch buffer, the batch a thread is reading and (workers) one
    in the worker's output buffer; plus two in this process (the batch handed over and the one
    being copied to the devices)."""
    procs = max(1, workers)
    per_proc_fixed = 1 + (1 if workers else 0)
    slots = int(host_memory_bytes // max(batch_bytes, 1))
    prefetch = min(max_prefetch, (slots - 2) // procs - per_proc_fixed)
    if prefetch < 1:
        need = (2 + procs * (1 + per_proc_fixed)) * batch_bytes
        raise LoaderError(
            f"loader.host_memory_gb={host_memory_bytes / 1e9:g} holds {slots} batch(es) of"
            f" {batch_bytes / 1e6:.1f} MB, fewer than {workers} worker(s) need; raise it to"
            f" {need / 1e9:.2f} or lower train.batch_size / loader.workers"
        )
    return Buffers(procs, prefetch, 2 + procs * (prefetch + per_proc_fixed), batch_bytes)


class BatchStream:
    """Iterates one plan's batches through a Grain DataLoader; checkpointable mid-plan."""

    def __init__(
        self,
        source: FrameBatchSource,
        *,
        host_memory_bytes: float,
        workers: int = 0,
        epoch: int = 0,
        state: bytes | None = None,
    ):
        import grain.python as grain

        self.source, self.epoch = source, epoch
        if workers:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags (defaults here)
                flags.FLAGS.mark_as_parsed()
        self.buffers = plan_buffers(source.batch_bytes(), host_memory_bytes, workers)
        self.loader = grain.DataLoader(
            data_source=source,
            sampler=grain.IndexSampler(
                num_records=len(source),
                shard_options=grain.NoSharding(),
                shuffle=False,  # the plan is the order
                num_epochs=1,
                seed=0,
            ),
            worker_count=workers,
            worker_buffer_size=1,
            read_options=grain.ReadOptions(
                num_threads=1 if workers else 2, prefetch_buffer_size=self.buffers.prefetch
            ),
        )
        self._it = iter(self.loader)
        if state is not None:
            self.set_state(state)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def __len__(self) -> int:
        return len(self.source)

    def get_state(self) -> bytes:
        """Where the stream is (the epoch and Grain's state): `state=` of a new stream resumes."""
        g = self._it.get_state()
        return json.dumps({"epoch": self.epoch, "grain": g.decode()}).encode()

    def set_state(self, state: bytes) -> None:
        """Continue where `get_state` was taken (a stream of the same plan and epoch)."""
        saved = json.loads(state)
        if saved["epoch"] != self.epoch:
            raise LoaderError(f"loader state is of epoch {saved['epoch']}, not {self.epoch}")
        self._it.set_state(saved["grain"].encode())

    def start_prefetch(self) -> None:
        """Start reading ahead now (Grain's Orbax handler calls it after a restore)."""
        self._it.start_prefetch()


# ---------------------------------------------------------------------------------------------
# What training holds: frame indexes of a split's rows, and streams over them.


@dataclasses.dataclass(frozen=True)
class LoaderSettings:
    """The `loader` config section's values a stream needs."""

    host_memory_gb: float = 4.0
    workers: int = 0
    bucket_window: int = 1
    pad_frames: int = 50
    eval_batch: int = 64

    @classmethod
    def of(cls, cfg: Any) -> LoaderSettings:
        """From a `LoaderConfig` (or anything with the same fields)."""
        return cls(*(getattr(cfg, f.name) for f in dataclasses.fields(cls)))


class StreamedFrames:
    """The frames of some store rows of some views, streamed: what replaces a padded split.

    `rows` are store rows; positions 0..n-1 index them (and the labels trained with them)."""

    def __init__(
        self,
        store_path: str | Path,
        views: Sequence[str],
        rows: np.ndarray,
        settings: LoaderSettings,
        stats: Mapping[str, tuple] | None = None,
        indexes: Mapping[str, FrameIndex] | None = None,
    ):
        self.store_path = Path(store_path)
        self.views = list(views)
        self.rows = np.asarray(rows, np.int64)
        self.settings = settings
        self.stats = dict(stats or {})
        given = indexes or {}
        self.indexes = {v: given.get(v) or frame_index(self.store_path, v) for v in self.views}

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self, view: str | None = None) -> np.ndarray:
        """(n,) frames per position: of one view, or the most over the views."""
        if view is not None:
            return self.indexes[view].lengths[self.rows]
        return np.max([ix.lengths[self.rows] for ix in self.indexes.values()], axis=0)

    def have(self) -> dict[str, np.ndarray]:
        """{view: (n,) bool} positions with frames of the view."""
        return {v: self.lengths(v) > 0 for v in self.views}

    def subset(self, keep: np.ndarray | None = None, views: Sequence[str] | None = None):
        """The positions `keep` (bool or indices; all when None) of `views` (all when None) as a
        new set; frame indexes are shared, nothing is read."""
        views = self.views if views is None else list(views)
        return StreamedFrames(
            self.store_path, views, self.rows if keep is None else self.rows[keep],
            self.settings, self.stats, self.indexes,
        )  # fmt: skip

    def example(self) -> dict[str, np.ndarray]:
        """One padded row of each view (for initializing a model's parameters)."""
        src = FrameBatchSource(
            self.indexes, self.rows, np.zeros((1, 1), np.int64), np.ones((1, 1), np.float32),
            pad_frames=self.settings.pad_frames, stats=self.stats,
        )  # fmt: skip
        b = src[0]
        src.close()
        return {k: b[k] for k in (*self.views, *(f"{v}:mask" for v in self.views))}

    def stream(
        self,
        plan: np.ndarray,
        weights: np.ndarray,
        *,
        targets: Mapping[str, np.ndarray] | None = None,
        epoch: int = 0,
        state: bytes | None = None,
    ) -> BatchStream:
        """A Grain stream over `plan`'s batches."""
        src = FrameBatchSource(
            self.indexes, self.rows, plan, weights, pad_frames=self.settings.pad_frames,
            stats=self.stats, targets=targets,
        )  # fmt: skip
        return BatchStream(
            src,
            host_memory_bytes=self.settings.host_memory_gb * 1e9,
            workers=self.settings.workers,
            epoch=epoch,
            state=state,
        )

    def train_stream(
        self,
        order: np.ndarray,
        batch_size: int,
        *,
        targets: Mapping[str, np.ndarray] | None = None,
        drop_last: bool = False,
        seed: int = 0,
        epoch: int = 0,
        state: bytes | None = None,
    ) -> BatchStream:
        """One training epoch: `order` (the epoch's permutation of positions) in batches."""
        plan, w = train_plan(
            order, self.lengths(), batch_size, drop_last=drop_last,
            bucket_window=self.settings.bucket_window, seed=seed, epoch=epoch,
        )  # fmt: skip
        return self.stream(plan, w, targets=targets, epoch=epoch, state=state)

    def eval_stream(self, batch_size: int) -> BatchStream:
        """Every position once, sorted by length (put predictions back with `positions`)."""
        plan, w = eval_plan(self.lengths(), batch_size)
        return self.stream(plan, w)
