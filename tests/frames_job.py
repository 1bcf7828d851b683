"""A deterministic frame-extraction-like job, killed at random by tests/test_frames.py.

Row i has 3 + (7 i mod 23) frames that are a fixed function of i; the job writes the rows
`missing_frames` lists, in batches, and finalizes every few batches (so kills land inside the
merge too), then once at the end.
"""

import sys
import time

import numpy as np

from featurestore import create_store
from featurestore.frames import FrameWriter, finalize_frames, missing_frames

N, DIM, BATCH = 120, 6, 4


def frames(i: int) -> np.ndarray:
    t = 3 + (7 * i) % 23
    return np.sin(np.outer(np.arange(t) + i, np.arange(1, DIM + 1)) * 0.1).astype(np.float32)


def main(path: str) -> None:
    ids = [f"u{i:03d}" for i in range(N)]
    create_store(path, ids=ids, splits=["Train"] * N, durations=[1.0] * N, paths=ids)
    w = FrameWriter(path, "v", DIM)
    todo = missing_frames(path, "v")
    for k, s in enumerate(range(0, len(todo), BATCH)):
        rows = todo[s : s + BATCH]
        w.write(rows, [frames(int(r)) for r in rows])
        time.sleep(0.05)
        if k % 5 == 4:
            finalize_frames(path, "v")
    finalize_frames(path, "v")


if __name__ == "__main__":
    main(sys.argv[1])
