"""The frames merge at corpus size: peak memory against the pending bytes, next to a plain copy.

    python bench/bench_frames_merge.py             # 2.2 GB of pending frames (~3,600 rows)
    python bench/bench_frames_merge.py --gb 0.2    # quick

Rows of 300 frames x 1024 float16 (6 s of WavLM-large at 50 frames/s: 614 KB), written as
`ifmvse extract --frames` writes them: 16-row pending batches (`FrameWriter`). The merge
(`finalize_frames`) runs in a fresh child process; its peak RSS is that child's VmHWM, next to
the VmHWM of a child that only imports the same modules (so the difference is what the merge
holds). Reference in the same run: a plain copy of the same pending bytes into one HDF5 dataset
(read each batch, write it, one at a time). Then a second, small merge (one batch) onto the
merged frames: its time must follow the batch, not the frames already merged. Before the
segments layout the merge held every pending batch at once: peak RSS >= the pending bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

FRAMES, DIM, BATCH = 300, 1024, 16

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
import h5py, numpy as np
from featurestore.frames import finalize_frames, _pending, _read_batch
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
what, store = sys.argv[1], sys.argv[2]
t = time.perf_counter()
if what == "merge":
    finalize_frames(store, "v")
elif what == "copy":
    files = _pending(__import__("pathlib").Path(store), "v")
    total = sum(int(np.load(p)["lengths"].sum()) for p in files)
    with h5py.File(store + ".plain.h5", "w") as f:
        ds = f.create_dataset("data", (total, {dim}), "f2", chunks=(4096, {dim}))
        at = 0
        for p in files:
            data = _read_batch(p)[2]
            ds[at : at + len(data)] = data
            at += len(data)
            del data
print(json.dumps({{"s": time.perf_counter() - t, "hwm": hwm()}}))
"""


def child(what: str, store: Path) -> dict:
    code = CHILD.format(root=str(HERE.parent), dim=DIM)
    out = subprocess.run([sys.executable, "-c", code, what, str(store)], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def write_pending(store: Path, rows: np.ndarray) -> int:
    """Pending batches of `rows` (300 frames each); returns their data bytes."""
    from featurestore.frames import FrameWriter

    w = FrameWriter(store, "v", DIM)
    rng = np.random.default_rng(0)
    block = rng.standard_normal((FRAMES, DIM)).astype(np.float16)
    for s in range(0, len(rows), BATCH):
        r = rows[s : s + BATCH]
        w.write(r, [block + np.float16(i % 7) for i in r])
    return len(rows) * FRAMES * DIM * 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.2, help="pending frame bytes to merge")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    from featurestore import create_store
    from featurestore.frames import pending_bytes, read_frames

    root = Path(tempfile.mkdtemp(prefix="bench-frames-", dir=args.dir))
    try:
        n = int(args.gb * 1e9 / (FRAMES * DIM * 2)) + BATCH
        store = root / "s.h5"
        ids = [f"u{i:06d}" for i in range(n)]
        create_store(store, ids=ids, splits=["Train"] * n, durations=[6.0] * n, paths=ids)
        rows = np.random.default_rng(1).permutation(n - BATCH)  # extraction order: not row order
        data = write_pending(store, rows)
        on_disk = pending_bytes(store, "v")
        base = child("none", store)
        copy = child("copy", store)
        merge = child("merge", store)
        x, lengths = read_frames(store, "v", rows[:3])  # merged rows read back
        assert (lengths == FRAMES).all() and float(x[0, 0, 0]) == float(
            np.float16(np.random.default_rng(0).standard_normal((FRAMES, DIM))[0, 0])
            + np.float16(rows[0] % 7)
        )
        write_pending(store, np.arange(n - BATCH, n))  # one more batch
        small = child("merge", store)
        res = {
            "pending_bytes": on_disk,
            "pending_frame_bytes": data,
            "rows": int(len(rows)),
            "import_only_hwm": base["hwm"],
            "merge_hwm": merge["hwm"],
            "merge_extra_rss": merge["hwm"] - base["hwm"],
            "merge_s": merge["s"],
            "merge_MBps": data / merge["s"] / 1e6,
            "plain_copy_s": copy["s"],
            "plain_copy_hwm": copy["hwm"],
            "one_batch_merge_on_top_s": small["s"],
            "load_avg": os.getloadavg(),
        }
        print(json.dumps(res, indent=1))
        print(
            f"merge of {data / 1e9:.2f} GB pending ({len(rows)} rows, {len(rows) // BATCH} batch"
            f" files): peak RSS {merge['hwm'] / 1e6:.0f} MB ({(merge['hwm'] - base['hwm']) / 1e6:.0f}"
            f" MB over imports alone), {merge['s']:.1f} s = {data / merge['s'] / 1e6:.0f} MB/s;"
            f" plain copy {copy['s']:.1f} s, peak RSS {copy['hwm'] / 1e6:.0f} MB; one more batch"
            f" merged on top: {small['s']:.2f} s"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
