"""A deterministic extraction-like job on a store, killed at random by tests/test_store.py.

Features of row i are a fixed function of i; every 11th row "fails"; the job finalizes every few
batches so kills also land inside finalize's merge and rename. With STORE_JOB_SLOW_MERGE=1 every
write of the merge sleeps and the file `<store>.in-merge` exists while a merge runs, so a test
can aim kills into the merge path and tell where they landed. With STORE_JOB_PROGRESS=1 it prints
`batches N` and then `batch b` after each batch, so a test can kill it mid-job.
"""

import os
import sys
import time
from pathlib import Path

import numpy as np

import featurestore.store as store_mod
from featurestore import FeatureStore, StoreWriter, create_store, finalize

N, DIM, LAYERS, BATCH = 240, 16, 3, 5


def features(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (pooled, layers) for rows."""
    base = np.sin(np.outer(rows + 1, np.arange(1, DIM + 1)) * 0.37).astype(np.float32)  # (B, D)
    layers = np.stack([base * (k + 1) for k in range(LAYERS)], axis=1)  # (B, L, D)
    return base, layers


def slow_merges(path: str) -> None:
    """Make merges slow and visible (see the module docstring)."""
    marker = Path(path + ".in-merge")
    write, merge = store_mod._pwritev_all, store_mod._merge_batches

    def slow_write(*args):
        time.sleep(0.004)
        write(*args)

    def marked_merge(*args):
        marker.touch()
        merge(*args)
        marker.unlink()

    store_mod._pwritev_all, store_mod._merge_batches = slow_write, marked_merge


def main(path: str, writer_id: str = "p0", share: str = "0/1") -> None:
    k, m = (int(x) for x in share.split("/"))
    ids = [f"utt{i:04d}" for i in range(N)]
    splits = ["Train" if i % 5 else "Development" for i in range(N)]
    create_store(
        path,
        ids=ids,
        splits=splits,
        durations=np.linspace(1, 6, N),
        paths=[f"Audios/{u}.wav" for u in ids],
        labels={"arousal": np.linspace(1, 7, N)},
    )
    writer = StoreWriter(
        path, "toy", dim=DIM, num_layers=LAYERS, attrs={"source": "toy-fn"}, writer_id=writer_id
    )
    todo = [i for i in FeatureStore(path).missing("toy") if i % m == k]
    progress = bool(os.environ.get("STORE_JOB_PROGRESS"))
    if progress:
        print(f"batches {-(-len(todo) // BATCH)}", flush=True)
    for b, s in enumerate(range(0, len(todo), BATCH)):
        rows = np.asarray(todo[s : s + BATCH])
        bad = rows % 11 == 0
        if bad.any():
            writer.fail(rows[bad], [f"row {r} is cursed" for r in rows[bad]])
        good = rows[~bad]
        if len(good):
            pooled, layers = features(good)
            writer.write(good, pooled, layers)
        if b % 7 == 6:
            finalize(path)
        if progress:
            print(f"batch {b}", flush=True)
    finalize(path)


if __name__ == "__main__":
    if os.environ.get("STORE_JOB_SLOW_MERGE"):
        slow_merges(sys.argv[1])
    main(*sys.argv[1:])
