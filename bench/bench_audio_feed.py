"""Fine-tuning's audio feed against the same batches through Grain: rows/s both ways.

    python bench/bench_audio_feed.py            # 1,200 clips of 1 to 6 s (16 kHz WAV)
    python bench/bench_audio_feed.py --quick    # 48 clips, seconds

A synthetic corpus of WAV files (16 kHz, or `--sample-rate` for files that must be resampled)
is written; one epoch's length-bucketed plan (`finetune.data.plan`, `audio.bucket_seconds` of
the fine-tuning config, 8 rows a batch) is read in one run, every way with the same decode
(`encode.Loader`: read, resample, crop):
  1. plain: every file decoded in plan order in one thread (one core's decode rate);
  2. `AudioFeed` (what fine-tuning uses): the clips of a batch decoded in `--threads` threads, a
     few batches ahead;
  3. Grain, threads: a `grain.DataLoader` over a random-access source whose record b decodes
     batch b of the plan, `--threads` read threads of this process, prefetch of 2 per thread;
  4. Grain, processes: the same with `--threads` worker processes.
Rows/s of each next to the plain rate times the cores used (the CPU limit: decoding is
CPU-bound). The files stay in the page cache after writing (warm reads: the decode, not the
disk, is measured). Round 1 of each way is a warm-up; the best of `--rounds` more is kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import load_average, machine_info  # noqa: E402


class AudioBatchSource:
    """Grain's random-access protocol over one plan: record b = (waves (B, T), lengths (B,))."""

    def __init__(self, paths, plan, loader, max_samples: int):
        self.paths, self.plan, self.loader, self.max_samples = paths, plan, loader, max_samples

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, b: int):
        batch = self.plan[b]
        n, t = batch.shape
        waves, lengths = np.zeros((n, t), np.float32), np.zeros(n, np.int32)
        for k, i in enumerate(batch.indices):
            if i >= 0:
                x = np.asarray(self.loader(self.paths[i]), np.float32)[: min(t, self.max_samples)]
                waves[k, : len(x)], lengths[k] = x, len(x)
        return waves, lengths


def write_corpus(root: Path, n: int, sr: int, seed: int = 0) -> tuple[list[Path], np.ndarray]:
    """n WAV files of 1 to 6 s (uniform) of noise; (paths, durations in seconds)."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    dur = rng.uniform(1.0, 6.0, n)
    paths = []
    for i, d in enumerate(dur):
        p = root / f"c{i:05d}.wav"
        sf.write(p, (0.1 * rng.standard_normal(int(d * sr))).astype(np.float32), sr)
        paths.append(p)
    return paths, dur


def bench_audio_feed(
    n: int = 1200, threads: int = 2, rounds: int = 2, sample_rate: int = 16000, keep: bool = False
) -> dict:
    """Rows/s of the four ways over one epoch's plan."""
    import grain.python as grain

    from jax_ifmvse.config import load_config
    from jax_ifmvse.encode import make_loader
    from jax_ifmvse.finetune.data import AudioFeed, Rows, epoch_seed, plan

    cfg = load_config("finetune", ["audio.normalize=none"])
    sr, max_s = cfg.audio.sample_rate, cfg.audio.max_seconds
    loader = make_loader(cfg, None)
    root = Path(
        tempfile.mkdtemp(
            prefix="bench_audio_feed_", dir="/work" if Path("/work").is_dir() else None
        )
    )
    try:
        paths, dur = write_corpus(root, n, sample_rate)
        rows = Rows([p.stem for p in paths], paths, dur, np.ones((n, 3)))
        order = plan(rows, cfg.audio.bucket_seconds, 8, sr, epoch_seed(0, 0))
        max_samples = int(round(max_s * sr))

        def plain() -> int:
            return sum(len(loader(paths[i])) > 0 for b in order for i in b.indices if i >= 0)

        def feed() -> int:
            f = AudioFeed(loader, max_samples, threads, cache=False)
            try:
                return sum(int((ln > 0).sum()) for _, _, ln in f.batches(rows, order))
            finally:
                f.close()

        def grain_way(workers: int):
            def run() -> int:
                dl = grain.DataLoader(
                    data_source=AudioBatchSource(paths, order, loader, max_samples),
                    sampler=grain.IndexSampler(
                        len(order), grain.NoSharding(), shuffle=False, num_epochs=1, seed=0
                    ),  # fmt: skip
                    worker_count=workers,
                    worker_buffer_size=2,
                    read_options=grain.ReadOptions(
                        num_threads=1 if workers else threads, prefetch_buffer_size=2 * threads
                    ),
                )
                return sum(int((ln > 0).sum()) for _, ln in dl)

            return run

        if threads:
            from absl import flags

            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
        ways = {"plain": plain, "feed": feed, "grain_threads": grain_way(0),
                "grain_processes": grain_way(threads)}  # fmt: skip
        out: dict = {"n": n, "threads": threads, "sample_rate": sample_rate,
                     "audio_s": float(dur.sum()), "batches": len(order)}  # fmt: skip
        for name, fn in ways.items():
            best = np.inf
            for r in range(rounds + 1):
                t0 = time.perf_counter()
                got = fn()
                dt = time.perf_counter() - t0
                if r:
                    best = min(best, dt)
            assert got == n, (name, got)
            out[f"{name}_rows_s"] = n / best
        out["limit_rows_s"] = out["plain_rows_s"] * threads  # every core decoding
        out["load_average"] = load_average()
        out["machine"] = machine_info()
        return out
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def report(r: dict) -> str:
    """The result as a few lines."""
    lines = [f"{r['n']} clips ({r['audio_s']:.0f} s of audio at {r['sample_rate']} Hz), "
             f"{r['batches']} batches, {r['threads']} threads/processes"]  # fmt: skip
    for k in ("plain", "feed", "grain_threads", "grain_processes", "limit"):
        lines.append(f"  {k:16s} {r[f'{k}_rows_s']:8.1f} rows/s")
    lines.append(f"  load average {r['load_average']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sample-rate", type=int, default=16000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    r = bench_audio_feed(48 if a.quick else a.n, a.threads, 1 if a.quick else a.rounds,
                         a.sample_rate)  # fmt: skip
    print(report(r))
    if a.json:
        a.json.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
