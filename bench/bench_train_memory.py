"""Peak memory of training a fusion model with a layered view over MSP-Podcast's full Train split.

    python bench/bench_train_memory.py            # 84k Train + 32k Dev: ~7 GB disk, ~15 min
    python bench/bench_train_memory.py --quick    # 40x fewer rows, ~15 s
    python bench/bench_train_memory.py --scale 0.25   # a quarter of the rows

A synthetic store of the real shape (84,000 Train and 32,000 Development rows; the pooled
Whisper view, 1280 float32, and a layered view, 25 x 1024 float16, as `bench_store.py` makes
them) is written through `StoreWriter` and finalized; then one child process runs the real
`train_run` on it with `model.layer_weights: true` and one fusion score set over both views
(multitask, 1 epoch: 2,600 steps at batch 32), as `ifmvse train` would. The child's peak RSS
(its own VmHWM, imports and the XLA CPU "device" memory included: on CPU the device is host memory)
is printed next to the bytes of Train's layered array, with the RSS peak seen inside each step of
`train_run` (sampled every 20 ms) to show where the peak comes from. Not part of `run_all.py`.
Data goes under --dir (default: a temporary folder in /work) and is removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_store import LAYERED, layered_rows, own_peak_rss, pooled_rows  # noqa: E402
from common import load_average, machine_info  # noqa: E402

POOLED = ("whisper", 1280)  # float32
SPLITS_FULL = {"Train": 84_000, "Development": 32_000}
WRITE_ROWS = 2048  # rows per journal batch (setup only; fewer, larger files)
GB = 1e9


def split_counts(scale: float) -> dict[str, int]:
    """Rows per split: MSP-Podcast's Train and Development times `scale`."""
    return {k: max(64, round(v * scale)) for k, v in SPLITS_FULL.items()}


def layered_bytes(rows: int) -> int:
    """Bytes of a (rows, L, D) float16 layered array."""
    _, nl, d = LAYERED
    return rows * nl * d * 2


def build_store(store: Path, counts: dict[str, int]) -> float:
    """Create the store, write both backbones in large journal batches, finalize; seconds."""
    from bench_store import create_corpus_store

    from featurestore import StoreWriter, finalize

    t0 = time.perf_counter()
    n = sum(counts.values())
    splits = [k for k, v in counts.items() for _ in range(v)]
    rng = np.random.default_rng(0)
    labels = {a: rng.uniform(1, 7, n) for a in ("arousal", "valence", "dominance")}
    create_corpus_store(store, splits, labels)
    os.fsync = lambda fd: None  # setup only: durability of the writer is not measured here
    name, dim = POOLED
    w = StoreWriter(store, name, dim=dim, attrs={"source": "bench"})
    for s in range(0, n, WRITE_ROWS):
        r = np.arange(s, min(n, s + WRITE_ROWS))
        w.write(r, pooled_rows(name, dim, r))
    name, nl, dim = LAYERED
    attrs = {"source": "bench", "layers_stored": ",".join(map(str, range(nl)))}
    w = StoreWriter(store, name, dim=dim, num_layers=nl, dtype="float16", attrs=attrs)
    for s in range(0, n, WRITE_ROWS):
        r = np.arange(s, min(n, s + WRITE_ROWS))
        w.write(r, *layered_rows(r))
    finalize(store)
    return time.perf_counter() - t0


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(store: Path, out: Path) -> dict:
    """Run `train_run` on the store; peak RSS overall and inside each of its steps."""
    from jax_ifmvse import train
    from jax_ifmvse.config import load_config

    phases: dict[str, int] = {}
    entry: dict[str, int] = {}  # RSS when a step is first entered
    stack: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss = _rss()
            for p in stack:
                phases[p] = max(phases.get(p, 0), rss)
            time.sleep(0.02)

    def watched(name: str, fn):
        @functools.wraps(fn)
        def run(*a, **k):
            rss = _rss()
            entry.setdefault(name, rss)
            phases[name] = max(phases.get(name, 0), rss)
            stack.append(name)
            try:
                return fn(*a, **k)
            finally:
                phases[name] = max(phases.get(name, 0), _rss())
                stack.remove(name)

        return run

    for name in ("view_stats", "load_all_rows", "load_views", "standardize", "train_model"):
        setattr(train, name, watched(name, getattr(train, name)))
    make_epoch, device_put = train.make_train_epoch, train.jax.device_put
    train.make_train_epoch = lambda *a, **k: watched("train_epoch", make_epoch(*a, **k))
    train.predict_rows = watched("predict_rows", train.predict_rows)
    train.jax.device_put = watched("device_put", device_put)
    layered, pooled = LAYERED[0], POOLED[0]
    cfg = load_config(
        "paper",
        [
            "model.layer_weights=true",
            "train.multitask=true",
            "train.epochs=1",
            "train.test_splits=[]",
            f"model.score_sets=[{{name: S, kind: fusion, views: [{pooled}, {layered}]}}]",
        ],
    )
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    manifest = train.train_run(store, cfg, out)
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    hist = [
        json.loads(x) for x in (out / "S" / "multitask" / "metrics.jsonl").read_text().splitlines()
    ]
    vmhwm = own_peak_rss()
    return {
        # Linux updates VmHWM lazily (at unmaps and exits; /proc adds the current RSS when read),
        # so a peak freed since may be missing from it: a VmRSS sample above it was seen in CI
        # (1,026,277,376 vs 1,026,080,768 bytes). The peak is the larger of the two measurements.
        "peak_rss": max(vmhwm, *phases.values()),
        "peak_vmhwm": vmhwm,
        "phases": phases,
        "entry": entry,
        "seconds": seconds,
        "epoch_seconds": hist[-1]["seconds"],
        "steps": hist[-1]["step"],
        "dev_ccc": hist[-1]["dev_ccc"],
        "complete": manifest["complete"],
    }


def bench_train_memory(scale: float = 1.0, where: str | None = None, log=print) -> dict:
    """Build the store, train in a child process, remove the data; returns the measurements."""
    counts = split_counts(scale)
    need = int((layered_bytes(sum(counts.values())) + sum(counts.values()) * 1280 * 4) * 2.2)
    base = Path(where) if where else Path("/work") if Path("/work").is_dir() else None
    d = Path(tempfile.mkdtemp(prefix="bench_train_memory_", dir=base))
    try:
        free = shutil.disk_usage(d).free
        if free < need:
            raise SystemExit(f"{d}: needs {need / GB:.1f} GB free disk, has {free / GB:.1f} GB")
        store = d / "store.h5"
        log(f"building store: {counts} rows in {d}")
        build_s = build_store(store, counts)
        log(f"store built in {build_s:.0f} s")
        load_before = load_average()
        env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
        cmd = [sys.executable, __file__, "--child", str(store), str(d / "RUN")]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"training child failed:\n{res.stderr[-4000:]}")
        out = json.loads(res.stdout.strip().splitlines()[-1])
        load_after = load_average()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    out.update(
        counts=counts,
        train_layered_bytes=layered_bytes(counts["Train"]),
        dev_layered_bytes=layered_bytes(counts["Development"]),
        build_seconds=build_s,
        load_before=load_before,
        load_after=load_after,
    )
    return out


def report(r: dict) -> str:
    """The measurement as text."""
    m = machine_info()
    lines = [
        f"machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores; load average "
        f"{r['load_before'][0]:.2f} before, {r['load_after'][0]:.2f} after",
        f"rows: {r['counts']}; layered view 25 x 1024 float16, pooled whisper 1280 float32",
        f"Train layered array: {r['train_layered_bytes'] / GB:.2f} GB "
        f"(Development {r['dev_layered_bytes'] / GB:.2f} GB)",
        f"peak RSS of the training process: {r['peak_rss'] / GB:.2f} GB "
        f"({r['peak_rss'] / r['train_layered_bytes']:.2f} x Train's layered array)",
        "RSS inside each step of train_run: when first entered, peak while running",
        *(
            f"  {k:14s} {r['entry'][k] / GB:6.2f} GB {v / GB:6.2f} GB"
            for k, v in r["phases"].items()
        ),
        f"train_run: {r['seconds']:.0f} s ({r['steps']} steps, epoch {r['epoch_seconds']:.0f} s "
        f"incl. the dev evaluation); store built in {r['build_seconds']:.0f} s",
    ]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(Path(sys.argv[2]), Path(sys.argv[3]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="40x fewer rows (--scale 0.025)")
    ap.add_argument("--scale", type=float, default=1.0, help="rows = MSP-Podcast's x scale")
    ap.add_argument("--dir", default=None, help="where to put the bench data (removed after)")
    args = ap.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        print(report(bench_train_memory(0.025 if args.quick else args.scale, args.dir)))


if __name__ == "__main__":
    main()
