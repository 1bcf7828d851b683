"""What a small finalize and a split load cost at MSP-Podcast size (161,000 rows), next to h5py.

    python bench/bench_store_batch.py              # 161,000 rows, one 1024-d pooled backbone
    python bench/bench_store_batch.py --rows 20000 # quick

The store holds 161,000 rows (Train 84k, Development 32k, Test1 45k, interleaved in runs as the
MSP-Podcast label file is) with ids, paths, splits, EmoClass and Gender strings and one float32
backbone of width 1024 (660 MB), finalized. Timed, in this process, each 5 times (median):
  - `finalize` of one new 16-row journal batch (what a shard's batch costs to merge), next to
    the reference cost of the same 16 rows as plain h5py: open the backbone file, write them,
    fsync; and a `FeatureStore(...)` open (what a finalize must not pay: it decodes every string);
  - `load("Development", ["wavlm"])` (32,000 x 1024 float32) next to plain h5py reading the same
    rows' bytes from the backbone file (one slice per run of rows), both warm, alternated
    (load, plain, load, ...) 11 times so a busy machine slows both alike; median of each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

DIM, BATCH, REPEAT = 1024, 16, 5


def make_store(path: Path, n: int) -> None:
    from featurestore import StoreWriter, create_store, finalize

    rng = np.random.default_rng(0)
    counts = {"Train": n * 84 // 161, "Development": n * 32 // 161}
    counts["Test1"] = n - sum(counts.values())
    splits = np.concatenate([[k] * v for k, v in counts.items()])
    runs = np.split(np.arange(n), np.arange(7, n, 7))  # podcasts: runs of clips, mixed splits
    splits = np.concatenate([splits[r] for r in rng.permutation(len(runs)) for r in [runs[r]]])
    ids = [f"MSP-PODCAST_{i // 30:04d}_{i % 30:04d}" for i in range(n)]
    create_store(
        path, ids=ids, splits=list(splits), durations=rng.uniform(2, 12, n).astype(np.float32),
        paths=[f"Audios/{u}.wav" for u in ids],
        labels={a: rng.uniform(1, 7, n).astype(np.float32) for a in ("arousal", "valence", "dominance")},
        codes={"EmoClass": list(rng.choice(list("NHSAUDCFO"), n)), "Gender": list(rng.choice(["Male", "Female"], n))},
    )  # fmt: skip
    w = StoreWriter(path, "wavlm", dim=DIM)
    rows = np.arange(n - REPEAT * BATCH)  # the last rows are left for the one-batch finalizes
    for s in range(0, len(rows), 8192):
        r = rows[s : s + 8192]
        w.write(r, np.broadcast_to((r % 997).astype(np.float32)[:, None], (len(r), DIM)))
    finalize(path)


def median_s(f, repeat=REPEAT) -> float:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=161_000)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    from featurestore import FeatureStore, StoreWriter, finalize

    d = Path(tempfile.mkdtemp(prefix="bench-store-batch-", dir=a.dir))
    try:
        store = d / "s.h5"
        print(f"load average at start {tuple(round(x, 1) for x in os.getloadavg())}")
        t = time.perf_counter()
        make_store(store, a.rows)
        print(f"setup {time.perf_counter() - t:.0f} s, {a.rows:,} rows")
        w = StoreWriter(store, "wavlm", dim=DIM)
        left = iter(range(a.rows - REPEAT * BATCH, a.rows, BATCH))

        def one_batch():
            s0 = next(left)
            r = np.arange(s0, s0 + BATCH)
            w.write(r, np.ones((BATCH, DIM), np.float32))
            t0 = time.perf_counter()
            finalize(store)
            return time.perf_counter() - t0

        fin = statistics.median([one_batch() for _ in range(REPEAT)])
        data = store.with_name(store.name + ".features") / "wavlm.h5"

        def plain_write():
            with h5py.File(data, "r+") as f:
                f["pooled"][0:BATCH] = f["pooled"][0:BATCH]
                f.flush()
            fd = os.open(data, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

        plain_w = median_s(plain_write)
        open_s = median_s(lambda: FeatureStore(store))
        fs = FeatureStore(store)
        dev = fs.split_indices("Development")
        pos = np.sort(fs._pos[dev])
        cuts = np.flatnonzero(np.diff(pos) != 1) + 1
        runs = [(int(g[0]), int(g[-1]) + 1) for g in np.split(pos, cuts)]

        def plain_read():
            with h5py.File(data, "r") as f:
                ds = f["pooled"]
                out = np.empty((len(pos), DIM), np.float32)
                at = 0
                for s0, e0 in runs:
                    ds.read_direct(out, np.s_[s0:e0], np.s_[at : at + e0 - s0])
                    at += e0 - s0
            return out

        got = fs.load("Development", ["wavlm"])  # warm both
        plain = plain_read()
        assert np.array_equal(np.sort(got.features["wavlm"][:, 0]), np.sort(plain[:, 0]))
        pairs = [(median_s(lambda: fs.load("Development", ["wavlm"]), 1), median_s(plain_read, 1))
                 for _ in range(11)]  # fmt: skip
        load_s = statistics.median(x for x, _ in pairs)
        read_s = statistics.median(y for _, y in pairs)
        ratio = statistics.median(x / y for x, y in pairs)
        mb = len(dev) * DIM * 4 / 1e6
        print(
            f"finalize one {BATCH}-row batch: {fin:.3f} s (plain h5py write+fsync of the rows:"
            f" {plain_w:.3f} s; FeatureStore open, not paid by finalize: {open_s:.3f} s)"
        )
        print(
            f"load Development ({len(dev):,} rows, {mb:.0f} MB, {len(runs):,} runs in storage):"
            f" {load_s:.3f} s, plain h5py {read_s:.3f} s: {load_s / read_s:.2f}x (median of"
            f" the pairs' ratios {ratio:.2f}x)"
        )
        print(f"load average at end {tuple(round(x, 1) for x in os.getloadavg())}")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
