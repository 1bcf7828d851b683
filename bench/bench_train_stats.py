"""Fine-tuning's start at corpus size: the `audio.normalize: train` statistics over 84,000 files.

    python bench/bench_train_stats.py               # 84,000 files of 0.25 s (about 700 MB)
    python bench/bench_train_stats.py --files 5000  # quick

Writes a manifest corpus of short 16-kHz WAVs (one of every 1,000 corrupt), then times, in one
process each as a command start would: the first start (`make_loader` with the run's
statistics file: one parallel pass, one process per CPU), a resume (the statistics read back
from the file), and, as references in the same run, the old single-thread pass (one process)
and a plain read of the same bytes (the disk/page-cache limit of any pass). Deletes the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
from jax_ifmvse.config import load_config
from jax_ifmvse.data.corpus import load_corpus
from jax_ifmvse.encode import make_loader
mode, manifest, run = sys.argv[1:4]
cfg = load_config("finetune", ["corpus.kind=manifest", f"corpus.path={{manifest}}"])
corpus = load_corpus("manifest", manifest, None)
t1 = time.perf_counter()
seen = {{}}
def report(st, computed):
    seen.update(failures=len(st.failures), files=st.files, computed=computed, mean=st.mean)
if mode == "single":
    from jax_ifmvse.data.audio import compute_train_stats
    train = [corpus.abspath(u) for u in corpus.utterances if u.split == "Train"]
    st = compute_train_stats(train, workers=1)
    report(st, True)
else:
    make_loader(cfg, corpus, stats_path=f"{{run}}/normalize_stats.json", report=report)
t2 = time.perf_counter()
print(json.dumps({{"mode": mode, "corpus_s": t1 - t0, "stats_s": t2 - t1, **seen}}))
"""


def write_corpus(root: Path, n: int, seconds: float) -> Path:
    """n WAVs (int16, 16 kHz) of `seconds` each, every 1000th corrupt; the manifest path."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    rows = ["path,split,arousal,valence,dominance"]
    x = (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
    for i in range(n):
        sub = root / f"{i // 1000:03d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        p = sub / f"u{i:06d}.wav"
        if i % 1000 == 999:
            p.write_bytes(b"RIFF\x00\x00not audio")
        else:
            sf.write(p, np.roll(x, i) * (1 + (i % 7) / 7), 16000, subtype="PCM_16")
        rows.append(f"{p.relative_to(root)},Train,4,4,4")
    for i in range(20):  # a Development split, as the fine-tuning config needs
        p = root / f"dev{i}.wav"
        sf.write(p, x, 16000, subtype="PCM_16")
        rows.append(f"{p.name},Development,4,4,4")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    return root / "m.csv"


def plain_read(root: Path) -> tuple[float, int]:
    """Seconds and bytes to read every file once (no decoding)."""
    t0, total = time.perf_counter(), 0
    for d, _, names in os.walk(root):
        for name in names:
            if name.endswith(".wav"):
                total += len(Path(d, name).read_bytes())
    return time.perf_counter() - t0, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=84_000)
    ap.add_argument("--seconds", type=float, default=0.25)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(dir=args.dir, prefix="train_stats_"))
    try:
        t0 = time.perf_counter()
        manifest = write_corpus(scratch / "corpus", args.files, args.seconds)
        print(f"wrote {args.files} files in {time.perf_counter() - t0:.0f} s", flush=True)
        read_s, nbytes = plain_read(scratch / "corpus")
        out = {"files": args.files, "seconds_each": args.seconds, "cpus": os.cpu_count(),
               "plain_read_s": round(read_s, 2), "bytes": nbytes}  # fmt: skip
        child = CHILD.format(root=str(HERE.parent))
        run = scratch / "run"
        for mode in ("first", "resume", "single"):
            r = subprocess.run(
                [sys.executable, "-c", child, mode, str(manifest), str(run)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            res = json.loads(r.stdout.strip().splitlines()[-1])
            out[mode] = {k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()}
            print(json.dumps(out[mode]), flush=True)
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
