"""Benchmark: `predict --segments` over an hour of audio, streamed, against the same segments
scored as separate files (the way a user cuts a recording today), in bounded host memory.

    python bench/bench_timeline.py --run RUN               # an hour, and 5 minutes for memory
    python bench/bench_timeline.py --quick                 # a tiny random run, 2 min and 30 s
    python bench/bench_timeline.py --run RUN --minutes 20  # shorter

The long file is eSpeak NG sentences with pauses (and 30 s of silence every 10 minutes), 16 kHz
PCM_16 WAV. Each measurement runs in a child process that reports its own peak resident memory
(VmHWM) and its resident memory once the run is loaded and compiled: (1) decode only, the floor
of the streaming pass (soundfile blocks cut into segments, nothing scored); (2) the timeline,
decoded as a stream and scored in batches of segments (`timeline.timeline_file`); (3) the same
segments cut out as WAV files (timed apart) and scored in one `Predictor.predict_files` call, as
`ifmvse predict seg*.wav` does; the largest difference between (2) and (3) is printed too;
(4) the timeline of a short file, to show peak memory does not grow with the file's length.
Compilation is done by `warm_up()` before the clock starts in every child.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))


def _status(key: str) -> float:
    """A /proc/self/status memory line (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_long(path: Path, seconds: float, sr: int = 16000) -> None:
    """Write `seconds` of spoken sentences with pauses as PCM_16 WAV, block by block."""
    import soundfile as sf

    from jax_ifmvse.data.tts import synthesize

    texts = [
        ("I am so happy to see you again, this is wonderful news for all of us.", 70),
        ("The quarterly numbers were flat and the meeting ran late again.", 45),
        ("Stop it right now, I told you not to touch that!", 60),
        ("Well, I suppose we could try the other road tomorrow morning.", 50),
    ]
    clips = []
    for text, pitch in texts:
        x, rate = synthesize(text, pitch=pitch)
        import soxr

        clips.append(soxr.resample(x.astype(np.float32) / 32768, rate, sr).astype(np.float32))
    rng = np.random.default_rng(0)
    n_total, done, k = int(seconds * sr), 0, 0
    with sf.SoundFile(path, "w", sr, 1, subtype="PCM_16") as f:
        while done < n_total:
            if done // (600 * sr) != (done + len(clips[0])) // (600 * sr):
                piece = np.zeros(30 * sr, np.float32)  # a 30-s silence every 10 minutes
            else:
                pause = np.zeros(int(rng.uniform(0.3, 1.5) * sr), np.float32)
                piece = np.concatenate([clips[k % len(clips)], pause])
                k += 1
            piece = piece[: n_total - done]
            f.write(piece)
            done += len(piece)


# The example timeline of docs/timeline.md: four 30-s stretches spoken as the demo corpus' rules
# label them (docs/msp-podcast.md: arousal rises with pitch, range, rate and volume; valence with
# the sentence's sentiment), with 8 s of silence between the second and third.
STORY = (
    ("neutral", dict(pitch=35, pitch_range=30, rate=150, volume=50)),  # calm, neutral
    ("positive", dict(pitch=75, pitch_range=85, rate=230, volume=95)),  # excited, happy
    ("negative", dict(pitch=65, pitch_range=80, rate=240, volume=100)),  # loud, angry
    ("negative", dict(pitch=22, pitch_range=15, rate=135, volume=35)),  # slow, quiet, sad
)


def make_story(path: Path, seconds_each: float = 30.0, sr: int = 16000) -> None:
    """The example recording: the four stretches of `STORY`, 8 s of silence after the second."""
    import soundfile as sf
    import soxr

    from jax_ifmvse.data.demo_corpus import sentences
    from jax_ifmvse.data.tts import synthesize

    parts = []
    for k, (sentiment, voice) in enumerate(STORY):
        got, n = [], 0
        for j, text in enumerate(sentences(sentiment) * 4):
            x, rate = synthesize(text, seed=j, **voice)
            x = soxr.resample(x.astype(np.float32) / 32768, rate, sr).astype(np.float32)
            got += [x, np.zeros(int(0.4 * sr), np.float32)]
            n += len(x) + int(0.4 * sr)
            if n >= seconds_each * sr:
                break
        parts.append(np.concatenate(got)[: int(seconds_each * sr)])
        if k == 1:
            parts.append(np.zeros(8 * sr, np.float32))
    sf.write(path, np.concatenate(parts), sr, subtype="PCM_16")


def example(run: Path, png: Path) -> None:
    """Write the docs' example timeline of `make_story` scored by `run`."""
    from jax_ifmvse.plots import plot_timeline
    from jax_ifmvse.predict import open_predictor
    from jax_ifmvse.timeline import Segmentation, timeline_file

    wav = png.with_suffix(".wav")
    make_story(wav)
    rows, summary = timeline_file(open_predictor(run), wav, Segmentation())
    title = f"example recording (make_story), run {run.parent.name}/{run.name}"
    plot_timeline(rows, png, title, summary["duration_s"])
    wav.unlink()
    print(json.dumps(summary, indent=1))


def child(args) -> None:
    """One measurement in this process; prints one JSON line."""
    from jax_ifmvse.predictor import Predictor
    from jax_ifmvse.timeline import (
        Decode,
        Segmentation,
        cut_segments,
        plan_file,
        timeline_file,
    )

    out: dict = {"what": args.child}
    if args.child == "decode":
        t = time.perf_counter()
        plan = plan_file(args.audio, Segmentation(window_s=args.window_s, hop_s=args.window_s))
        n = sum(len(b) for b in cut_segments(plan, 16, Decode()))
        out.update(wall_s=time.perf_counter() - t, segments=n)
    else:
        pred = Predictor(args.run, max_clips=16)
        pred.warm_up()
        out["rss_loaded_mib"] = _status("VmRSS")
        out["hwm_loaded_mib"] = _status("VmHWM")
        seg = Segmentation(window_s=args.window_s)
        if args.child == "stream":
            t = time.perf_counter()
            rows, summary = timeline_file(pred, args.audio, seg)
            out.update(wall_s=time.perf_counter() - t, segments=len(rows))
            values = [r.values for r in rows]
        else:  # files: cut out first (timed apart), then one predict_files call
            import soundfile as sf

            seg = seg.resolved(pred)
            tmp = Path(tempfile.mkdtemp(prefix="bench-timeline-", dir=args.tmp))
            t = time.perf_counter()
            plan = plan_file(args.audio, seg)
            files = []
            for batch in cut_segments(plan, 16, Decode()):
                for c in batch:
                    files.append(tmp / f"seg{c.index:06d}.wav")
                    sf.write(files[-1], c.samples, plan.sample_rate, subtype="PCM_16")
            out["cut_s"] = time.perf_counter() - t
            t = time.perf_counter()
            scored = pred.predict_files(files)
            out.update(wall_s=time.perf_counter() - t, segments=len(files))
            values = [s.prediction.values for s in scored]
            for f in files:
                f.unlink()
            os.rmdir(tmp)
        np.save(args.values, np.array([v if v is not None else (np.nan,) * 3 for v in values]))
    out["hwm_mib"] = _status("VmHWM")
    print(json.dumps(out), flush=True)


def run_child(what: str, audio: Path, run: Path | None, window_s: float, tmp: Path) -> dict:
    """Run one measurement in a fresh process; its JSON line."""
    cmd = [sys.executable, __file__, "--child", what, "--audio", str(audio), "--window-s",
           str(window_s), "--values", str(tmp / f"{what}-{audio.stem}.npy"), "--tmp", str(tmp)]  # fmt: skip
    if run is not None:
        cmd += ["--run", str(run)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "USE_TORCH": "0"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    from common import cores, cpu_model, load_average

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="A trained, ensembled RUN/ (default: --quick's)")
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--short-minutes", type=float, default=5.0)
    ap.add_argument("--window-s", type=float, default=None, help="Default: the run's window")
    ap.add_argument("--quick", action="store_true", help="A tiny random run, 2 min and 0.5 min")
    ap.add_argument("--tmp", type=Path, default=None, help="Folder for the audio (default /tmp)")
    ap.add_argument("--example", type=Path, help="Only write the docs' example timeline PNG")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--audio", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--values", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.example:
        return example(args.run, args.example)
    tmp = Path(tempfile.mkdtemp(prefix="bench-timeline-", dir=args.tmp))
    run = args.run
    if args.quick:
        args.minutes, args.short_minutes = 2.0, 0.5
    if run is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_run import build_tiny_run

        run, _ = build_tiny_run(tmp / "tiny")
    if args.window_s is None:
        from jax_ifmvse.predictor import Predictor
        from jax_ifmvse.timeline import default_window

        args.window_s = default_window(Predictor(run))
    long, short = tmp / "long.wav", tmp / "short.wav"
    make_long(long, args.minutes * 60)
    make_long(short, args.short_minutes * 60)
    before = load_average()
    rows = {}
    for what, audio in (("decode", long), ("stream", long), ("files", long), ("stream", short)):
        key = f"{what}-{audio.stem}"
        rows[key] = run_child(what, audio, run, args.window_s, tmp)
        print(key, rows[key], file=sys.stderr, flush=True)
    after = load_average()
    a = np.load(tmp / "stream-long.npy")
    b = np.load(tmp / "files-long.npy")
    diff = float(np.nanmax(np.abs(a - b))) if a.shape == b.shape else float("nan")
    audio_s = args.minutes * 60
    print(f"\n{cpu_model()}, {cores()} cores; run {run}; window {args.window_s:g} s;"
          f" load average before {tuple(round(x, 2) for x in before)},"
          f" after {tuple(round(x, 2) for x in after)}\n")  # fmt: skip
    print("| what | audio | segments | wall s | x real time | peak RSS MiB | RSS loaded MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    names = {
        "decode-long": "decode and cut only (floor)",
        "stream-long": "**timeline, streamed**",
        "files-long": "same segments as files, one `predict_files`",
        "stream-short": "timeline, streamed (short file)",
    }
    for key, r in rows.items():
        secs = audio_s if key.endswith("long") else args.short_minutes * 60
        wall = r["wall_s"]
        extra = f" (+{r['cut_s']:.1f} s cutting)" if "cut_s" in r else ""
        print(f"| {names[key]} | {secs / 60:g} min | {r['segments']} | {wall:.1f}{extra} |"
              f" {secs / wall:.1f} | {r['hwm_mib']:.0f} | {r.get('rss_loaded_mib', float('nan')):.0f} |")  # fmt: skip
    print(f"\nlargest |streamed - separate files| over all segments: {diff:.2e}")


if __name__ == "__main__":
    main()
