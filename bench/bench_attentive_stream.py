"""Attentive training streamed from a frame file of real shape: host memory, rows/s, read MB/s.

    python bench/bench_attentive_stream.py                  # 21,000 Train rows, ~12.9 GB on disk
    python bench/bench_attentive_stream.py --quick          # 400 rows, seconds
    python bench/bench_attentive_stream.py --train-steps 0  # the loader pass only

A synthetic frame file in `featurestore.frames`' merged layout (one segment
`STORE.frames/wavlm.seg-bench.h5`: float16 frames, 1024-d, chunks of 4096 frames, and its
index) with rows drawn from MSP-Podcast's length distribution (about 6 s, 1 to 12 s, 50 frames a
second) is written; then, in one run and from a cold page cache
for this file (its pages are evicted with posix_fadvise(DONTNEED) before each pass; `fincore`
shows what stayed cached):
  1. plain h5py: the same file read front to back in blocks of 16,384 frames (the disk's limit
     for this file);
  2. (--direct) our own reader without Grain: the same batches read in order in one thread;
  2. the loader: one epoch of `StreamedFrames.train_stream` (shuffled, length buckets, Grain,
     `--workers`, `--host-memory-gb`), every batch read, padded and handed over, no compute;
  3. training: `--train-steps` steps of the attentive head's jitted train step (the `mlp` score
     set over the view, WavLM-large width) fed by the same stream, with the time the step waited
     for a batch.
Peak host RSS (this process plus Grain's workers, sampled every 20 ms) is printed next to the
bound, and projected to MSP-Podcast's 84,000 Train rows. The data goes under --dir (default a
temporary folder in /work) and is removed afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import load_average, machine_info  # noqa: E402

D = 1024  # WavLM-large
FPS = 50
CHUNK = 4096  # featurestore.frames.CHUNK_FRAMES
MSP_TRAIN = 84_000


def durations(n: int, seed: int = 0) -> np.ndarray:
    """MSP-Podcast-like segment lengths: a gamma of mean 6 s, kept within 1 to 12 s."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.gamma(4.0, 1.5, n), 1.0, 12.0)


def write_frames(store: Path, view: str, lengths: np.ndarray) -> tuple[Path, float]:
    """`featurestore.frames`' merged layout for `view` beside `store` (random float16 frames):
    one segment file (`data`, chunks of 4096 frames) and the index; plus the store's row
    numbers, all the frame reader needs of a store. Returns (segment path, seconds)."""
    frames_dir = store.with_name(store.name + ".frames")
    frames_dir.mkdir(parents=True, exist_ok=True)
    seg = frames_dir / f"{view}.seg-bench.h5"
    n = len(lengths)
    with h5py.File(store, "w") as f:
        f.create_group("utterances").create_dataset("row", data=np.arange(n, dtype=np.int64))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    total = int(lengths.sum())
    pool = np.random.default_rng(1).normal(size=(1 << 16, D)).astype(np.float16)  # 128 MB
    t0 = time.perf_counter()
    with h5py.File(seg, "w") as f:
        ds = f.create_dataset("data", (total, D), np.float16, chunks=(CHUNK, D))
        block = CHUNK * 4
        for s in range(0, total, block):
            e = min(total, s + block)
            k = (s // block) % (len(pool) // block)
            ds[s:e] = pool[k * block : k * block + (e - s)]
    with h5py.File(frames_dir / f"{view}.h5", "w") as f:
        f.attrs["segments"] = json.dumps([seg.name])
        f.create_dataset("segment", data=np.zeros(n, np.int32))
        f.create_dataset("start", data=starts)
        f.create_dataset("length", data=np.asarray(lengths, np.int64))
    os.sync()
    return seg, time.perf_counter() - t0


def evict(path: Path) -> None:
    """Drop this file's pages from the page cache (clean pages only; no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_fraction(path: Path) -> float:
    """Fraction of the file's pages in the page cache (`fincore`), NaN where it is missing."""
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", str(path)],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        return int(out[0]) / max(1, int(out[1]))
    except (OSError, subprocess.CalledProcessError, IndexError, ValueError):
        return float("nan")


class RssPeak:
    """Peak of this process's RSS plus its children's (Grain workers), sampled in a thread."""

    def __init__(self, every: float = 0.02):
        import psutil

        self.proc, self.every, self.peak, self._stop = psutil.Process(), every, 0, False

    def now(self) -> int:
        total = self.proc.memory_info().rss
        for c in self.proc.children(recursive=True):
            with contextlib.suppress(Exception):  # a worker that just exited
                total += c.memory_info().rss
        return total

    def __enter__(self) -> RssPeak:
        self.peak = self.now()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self.now())
            time.sleep(self.every)

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, self.now())


def plain_read(path: Path) -> tuple[int, float]:
    """Every frame read front to back with h5py, 16,384 frames a read: (bytes, seconds)."""
    t0 = time.perf_counter()
    n = 0
    with h5py.File(path, "r", locking=False) as f:
        ds = f["data"]
        buf = np.empty((CHUNK * 4, D), np.float16)
        for s in range(0, ds.shape[0], len(buf)):
            e = min(ds.shape[0], s + len(buf))
            ds.read_direct(buf, np.s_[s:e], np.s_[: e - s])
            n += (e - s) * D * 2
    return n, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=21_000)
    ap.add_argument("--quick", action="store_true", help="400 rows, a few steps")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--host-memory-gb", type=float, default=4.0)
    ap.add_argument("--bucket-window", type=int, default=16)
    ap.add_argument("--train-steps", type=int, default=40, help="steps trained (-1: the epoch)")
    ap.add_argument("--direct", action="store_true", help="also read without Grain (one thread)")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the data under --dir")
    ap.add_argument("--json", type=Path, default=None, help="also write the row here")
    a = ap.parse_args(argv)
    if a.quick:
        a.rows, a.train_steps = 400, 3

    from jax_ifmvse.data.loaders import LoaderSettings, StreamedFrames

    root = Path(a.dir or tempfile.mkdtemp(prefix="bench_attentive_", dir="/work"))
    root.mkdir(parents=True, exist_ok=True)
    store = root / "s.h5"
    row: dict = {"rows": a.rows, "machine": machine_info(), "load_before": load_average()}
    try:
        lengths = np.round(durations(a.rows) * FPS).astype(np.int64)
        index = store.with_name(store.name + ".frames") / "wavlm.h5"
        path = index.with_name("wavlm.seg-bench.h5")
        if a.keep and path.exists() and index.exists():  # kept (--keep --dir) rows: reused
            with h5py.File(index, "r") as f:
                same = np.array_equal(f["length"][()], lengths)
            wsec = float("nan") if same else write_frames(store, "wavlm", lengths)[1]
        else:
            path, wsec = write_frames(store, "wavlm", lengths)
        size = path.stat().st_size
        row |= {
            "frames": int(lengths.sum()),
            "mean_seconds": float(lengths.mean() / FPS),
            "file_gb": size / 1e9,
            "write_mb_s": size / 1e6 / wsec,
        }
        print(f"wrote {a.rows} rows, {size / 1e9:.2f} GB in {wsec:.0f} s", flush=True)

        evict(path)
        row["cached_before_plain"] = cached_fraction(path)
        nbytes, sec = plain_read(path)
        row |= {"plain_mb_s": nbytes / 1e6 / sec, "plain_seconds": sec}
        print(f"plain h5py: {nbytes / 1e6 / sec:.0f} MB/s", flush=True)

        settings = LoaderSettings(
            host_memory_gb=a.host_memory_gb, workers=a.workers, bucket_window=a.bucket_window
        )
        sf = StreamedFrames(store, ["wavlm"], np.arange(a.rows), settings)
        order = np.random.default_rng(2).permutation(a.rows)
        y = np.random.default_rng(3).uniform(0, 1, (a.rows, 3)).astype(np.float32)
        if a.direct:  # our own reader without Grain: the same source, in this thread, in order
            from jax_ifmvse.data.loaders import FrameBatchSource, train_plan

            plan, w = train_plan(order, sf.lengths(), a.batch_size, bucket_window=a.bucket_window)
            src = FrameBatchSource(sf.indexes, sf.rows, plan, w, pad_frames=50)
            evict(path)
            row["cached_before_direct"] = cached_fraction(path)
            t0 = time.perf_counter()
            for i in range(len(src)):
                src[i]
            sec = time.perf_counter() - t0
            real = int(lengths.sum()) * D * 2
            row |= {"direct_rows_s": a.rows / sec, "direct_mb_s": real / 1e6 / sec}
            print(f"direct (no Grain): {a.rows / sec:.0f} rows/s, {real / 1e6 / sec:.0f} MB/s")
        evict(path)
        row["cached_before_loader"] = cached_fraction(path)
        with RssPeak() as rss:
            base = rss.now()
            stream = sf.train_stream(order, a.batch_size, targets={"labels": y}, seed=0)
            row["in_flight_batches"] = stream.buffers.in_flight
            row["largest_batch_mb"] = stream.buffers.batch_bytes / 1e6
            t0 = time.perf_counter()
            rows_seen, padded = 0, 0
            for b in stream:
                rows_seen += int((b["positions"] >= 0).sum())
                padded += b["wavlm"].nbytes
            sec = time.perf_counter() - t0
        real = int(lengths.sum()) * D * 2
        row |= {
            "loader_rows_s": rows_seen / sec,
            "loader_mb_s": real / 1e6 / sec,
            "loader_seconds": sec,
            "padding_overhead": padded / real - 1,
            "rss_base_gb": base / 1e9,
            "rss_peak_gb": rss.peak / 1e9,
            "bound_gb": a.host_memory_gb,
        }
        assert rows_seen == a.rows
        print(
            f"loader: {rows_seen / sec:.0f} rows/s, {real / 1e6 / sec:.0f} MB/s,"
            f" peak RSS {rss.peak / 1e9:.2f} GB (base {base / 1e9:.2f})",
            flush=True,
        )
        if a.train_steps:
            row |= train_steps(sf, order, y, a, path)
        # Per-row state the loader holds (offsets, lengths, rows, plan, labels): what grows with N.
        per_row = 8 + 8 + 8 + 8 + 4 + y[0].nbytes
        row["per_row_bytes"] = per_row
        peak = max(row["rss_peak_gb"], row.get("train_rss_peak_gb", 0.0))
        row["projected_84k_gb"] = peak + (MSP_TRAIN - a.rows) * per_row / 1e9
        row["load_after"] = load_average()
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(row, indent=1, default=str))
    if a.json:
        a.json.write_text(json.dumps(row, indent=1, default=str))
    return row


def train_steps(sf, order, y, a, path) -> dict:
    """`a.train_steps` steps of the attentive head fed by the stream: rows/s and waits."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jax_ifmvse.config import ModelConfig, ScoreSetConfig, TrainConfig
    from jax_ifmvse.heads import build_score_model
    from jax_ifmvse.parallel import data_mesh
    from jax_ifmvse.train import init_state, make_optimizer, make_train_step

    mesh = data_mesh()
    model = build_score_model(
        ScoreSetConfig("S", "mlp", ("wavlm",)), ModelConfig(pooling="attentive"), {"wavlm": D}, 3
    )
    tx = make_optimizer(TrainConfig())
    # Replicated on the mesh as the step returns it: a state on one device would come back
    # with another sharding, and the second step would compile again.
    state = jax.device_put(
        init_state(model, tx, sf.example(), jax.random.key(0)), NamedSharding(mesh, P())
    )
    step = jax.jit(make_train_step(model, tx, jax.random.key(1)), donate_argnums=0)
    shard = NamedSharding(mesh, P("data"))
    keys = ("wavlm", "wavlm:mask")
    evict(path)
    out = {"train_cached_before": cached_fraction(path)}
    with RssPeak() as rss:
        stream = sf.train_stream(order, a.batch_size, targets={"labels": y}, seed=0)
        n = len(stream) if a.train_steps < 0 else min(a.train_steps, len(stream))
        waited, rows, t0, shapes = 0.0, 0, time.perf_counter(), set()
        for _ in range(n):
            w0 = time.perf_counter()
            b = next(stream)
            waited += time.perf_counter() - w0
            batch = {
                "features": {k: b[k] for k in keys},
                "labels": b["labels"],
                "weights": b["weights"],
            }
            shapes.add(b["wavlm"].shape)
            state, m = step(state, jax.device_put(batch, shard))
            rows += int((b["positions"] >= 0).sum())
        jax.block_until_ready(state)
        sec = time.perf_counter() - t0
    return out | {
        "train_steps": n,
        "train_rows_s": rows / sec,
        "train_wait_fraction": waited / sec,
        "train_shapes": len(shapes),
        "train_rss_peak_gb": rss.peak / 1e9,
        "train_loss_finite": bool(np.isfinite(float(m["loss"]))),
    }


if __name__ == "__main__":
    main()
