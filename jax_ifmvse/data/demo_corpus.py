"""The built-in demo corpus: real eSpeak NG speech with rule-based arousal / valence / dominance.

Layout is MSP-Podcast's: `Labels/labels_consensus.csv` (FileName, EmoClass, EmoAct, EmoVal,
EmoDom, SpkrID, Gender, Split_Set) and `Audios/*.wav` (16 kHz mono PCM16, resampled from
eSpeak's 22.05 kHz with soxr). `Labels/demo_controls.csv` records each file's synthesis controls
and `demo_corpus.json` the generation settings.

Rules (utterance i draws everything from `numpy.random.default_rng([seed, i])`; generation runs
in a fresh worker process, because libespeak-ng carries its pitch-flutter phase from call to call,
so a seed gives the same corpus byte for byte):

- Sentiment sigma in {+1 positive, 0 neutral, -1 negative}, balanced over the corpus (a seeded
  permutation of i mod 3); the sentence comes from `sentences_<sentiment>.txt`. When the audio
  is shorter than 2 s a second sentence of the same sentiment is appended; when longer than
  6 s the sentences are drawn again (after 20 tries the audio is cut to 6 s).
- Voice: uniform over `VOICES` (SpkrID is the voice; Gender from the variant: f* = Female).
- Controls, uniform integers: pitch P in 20..80, pitch range R in 10..90, rate S in 130..250
  words/min, volume V in 30..100 (eSpeak units). Scaled to [0, 1]: p = (P - 20) / 60,
  r = (R - 10) / 80, s = (S - 130) / 120, v = (V - 30) / 70.
- arousal   = clip(1 + 6 (0.30 p + 0.20 r + 0.25 s + 0.25 v) + e_a, 1, 7)
- dominance = clip(1 + 6 (0.60 v + 0.40 (1 - p)) + e_d, 1, 7)
- valence   = clip(4 + 2 sigma + 1.5 (r - 0.5) + e_v, 1, 7)
- e_a, e_d, e_v ~ Normal(0, 0.5) independent label noise; labels are rounded to 3 decimals.
- EmoClass: positive H, neutral N, negative A when arousal >= 4 else S.
- Splits: a seeded permutation of the utterances, 60 % Train, 20 % Development, rest Test1.
  Sentences recur across splits (spoken with other voices and prosody); files never do.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np

from jax_ifmvse.config import LABEL_MAX, LABEL_MIN
from jax_ifmvse.data.tts import synthesize
from jax_ifmvse.errors import IfmvseError

VERSION = 1
SAMPLE_RATE = 16000
MIN_SECONDS, MAX_SECONDS = 2.0, 6.0
SENTIMENTS = {"positive": 1, "neutral": 0, "negative": -1}
VOICES = (
    "en-us",
    "en-gb",
    "en-us+f2",
    "en-gb+f3",
    "en-us+m3",
    "en-gb-x-rp+m5",
    "en-gb-scotland+f4",
    "en-029+m2",
    "en-us+f1",
    "en-gb+m1",
)
PITCH, RANGE, RATE, VOLUME = (20, 80), (10, 90), (130, 250), (30, 100)
NOISE_STD = 0.5
SPLIT_FRACTIONS = (("Train", 0.6), ("Development", 0.2))  # the rest is Test1
MARKER = "demo_corpus.json"


class DemoCorpusError(IfmvseError, RuntimeError):
    """The demo corpus cannot be written where asked."""


def sentences(sentiment: str) -> list[str]:
    """The packaged sentence list of one sentiment."""
    text = resources.files("jax_ifmvse.data").joinpath(f"sentences_{sentiment}.txt").read_text()
    return [s.strip() for s in text.splitlines() if s.strip()]


def _unit(x: int, lo_hi: tuple[int, int]) -> float:
    lo, hi = lo_hi
    return (x - lo) / (hi - lo)


def labels_for(sentiment: int, pitch: int, pitch_range: int, rate: int, volume: int, noise):
    """(arousal, valence, dominance) on 1..7 by the module's rules; `noise` is 3 N(0,1) draws."""
    p, r = _unit(pitch, PITCH), _unit(pitch_range, RANGE)
    s, v = _unit(rate, RATE), _unit(volume, VOLUME)
    e = NOISE_STD * np.asarray(noise, np.float64)
    arousal = 1 + 6 * (0.30 * p + 0.20 * r + 0.25 * s + 0.25 * v) + e[0]
    valence = 4 + 2 * sentiment + 1.5 * (r - 0.5) + e[1]
    dominance = 1 + 6 * (0.60 * v + 0.40 * (1 - p)) + e[2]
    return tuple(
        round(float(np.clip(y, LABEL_MIN, LABEL_MAX)), 3) for y in (arousal, valence, dominance)
    )


def _speak(texts, voice, pitch, pitch_range, rate, volume, seed) -> np.ndarray:
    """Synthesize at 16 kHz float32, sentences joined by eSpeak's own sentence pause."""
    wav, sr = synthesize(
        " ".join(texts),
        voice=voice,
        pitch=pitch,
        pitch_range=pitch_range,
        rate=rate,
        volume=volume,
        seed=seed,
    )
    import soxr

    return soxr.resample(wav.astype(np.float32) / 32768.0, sr, SAMPLE_RATE, quality="HQ")


def _utterance(seed: int, i: int, sentiment: str, pool: dict[str, list[str]]) -> dict:
    """Draw one utterance's controls, synthesize it, and label it."""
    rng = np.random.default_rng([seed, i])
    voice = VOICES[rng.integers(len(VOICES))]
    pitch = int(rng.integers(PITCH[0], PITCH[1] + 1))
    pitch_range = int(rng.integers(RANGE[0], RANGE[1] + 1))
    rate = int(rng.integers(RATE[0], RATE[1] + 1))
    volume = int(rng.integers(VOLUME[0], VOLUME[1] + 1))
    noise = rng.standard_normal(3)
    pool_s = pool[sentiment]
    for _ in range(20):
        texts = [pool_s[rng.integers(len(pool_s))]]
        audio = _speak(texts, voice, pitch, pitch_range, rate, volume, i)
        while len(audio) < MIN_SECONDS * SAMPLE_RATE:
            texts.append(pool_s[rng.integers(len(pool_s))])
            audio = _speak(texts, voice, pitch, pitch_range, rate, volume, i)
        if len(audio) <= MAX_SECONDS * SAMPLE_RATE:
            break
    audio = np.clip(audio[: int(MAX_SECONDS * SAMPLE_RATE)], -1.0, 1.0)
    arousal, valence, dominance = labels_for(
        SENTIMENTS[sentiment], pitch, pitch_range, rate, volume, noise
    )
    if sentiment == "positive":
        emo = "H"
    elif sentiment == "neutral":
        emo = "N"
    else:
        emo = "A" if arousal >= 4 else "S"
    variant = voice.partition("+")[2]
    return {
        "audio": audio,
        "EmoClass": emo,
        "EmoAct": arousal,
        "EmoVal": valence,
        "EmoDom": dominance,
        "SpkrID": voice,
        "Gender": "Female" if variant.startswith("f") else "Male",
        "controls": {
            "voice": voice,
            "pitch": pitch,
            "pitch_range": pitch_range,
            "rate": rate,
            "volume": volume,
            "sentiment": sentiment,
            "text": " ".join(texts),
            "seconds": round(len(audio) / SAMPLE_RATE, 3),
        },
    }


def _plan(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Balanced sentiments and 60/20/20 splits, both seeded permutations."""
    rng = np.random.default_rng([seed, -1 & 0xFFFF])
    names = list(SENTIMENTS)
    sentiment = [names[k % 3] for k in rng.permutation(n)]
    order = rng.permutation(n)
    split = ["Test1"] * n
    start = 0
    for name, frac in SPLIT_FRACTIONS:
        stop = start + int(round(frac * n))
        for k in order[start:stop]:
            split[k] = name
        start = stop
    return sentiment, split


def is_complete(path: Path, n: int, seed: int) -> bool:
    """Whether `path` holds a finished demo corpus generated with these settings."""
    try:
        meta = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("n") == n and meta.get("seed") == seed and meta.get("version") == VERSION


def _write_corpus(tmp: Path, n: int, seed: int, progress: Callable[[int, int], None]) -> None:
    """Synthesize and write every file of the corpus into `tmp` (the worker's job)."""
    import soundfile as sf

    (tmp / "Audios").mkdir()
    (tmp / "Labels").mkdir()
    pool = {s: sentences(s) for s in SENTIMENTS}
    sentiment, split = _plan(n, seed)
    rows, controls = [], []
    for i in range(n):
        u = _utterance(seed, i, sentiment[i], pool)
        name = f"demo_{i:05d}.wav"
        sf.write(tmp / "Audios" / name, u["audio"], SAMPLE_RATE, subtype="PCM_16")
        rows.append(
            [name, u["EmoClass"], u["EmoAct"], u["EmoVal"], u["EmoDom"], u["SpkrID"]]
            + [u["Gender"], split[i]]
        )
        controls.append({"FileName": name, **u["controls"]})
        progress(i + 1, n)
    with open(tmp / "Labels" / "labels_consensus.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set"]
        )
        w.writerows(rows)
    with open(tmp / "Labels" / "demo_controls.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(controls[0]))
        w.writeheader()
        w.writerows(controls)
    meta = {"version": VERSION, "n": n, "seed": seed, "sample_rate": SAMPLE_RATE}
    (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def _run_worker(tmp: Path, n: int, seed: int, progress: Callable[[int, int], None] | None):
    """Run `_write_corpus` in a fresh interpreter, relaying its progress lines.

    libespeak-ng keeps its pitch-flutter phase across calls within a process, so only a fresh
    process gives byte-identical audio for a seed whatever this process synthesized before.
    """
    cmd = [sys.executable, "-m", "jax_ifmvse.data.demo_corpus", str(tmp), str(n), str(seed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if progress is not None and line.strip().isdigit():
                progress(int(line), n)
        err = proc.stderr.read()
        if proc.wait() != 0:
            last = (err.strip().splitlines() or ["no error output"])[-1]
            raise DemoCorpusError(f"{tmp}: demo corpus worker failed: {last}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def make_demo_corpus(
    out_dir: str | os.PathLike,
    n: int = 300,
    seed: int = 0,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the demo corpus to `out_dir` atomically (temp folder, then rename); reuse if done."""
    out = Path(out_dir).expanduser().absolute()
    if n < 5:
        raise DemoCorpusError(f"{out}: n={n} is too small (need at least 5 for three splits)")
    if is_complete(out, n, seed):
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DemoCorpusError(
            f"{out}: exists and is not a demo corpus with n={n} seed={seed}; "
            "remove it or choose another folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _run_worker(tmp, n, seed, progress)
        if out.is_dir():
            out.rmdir()  # empty (checked above); rename needs the name free
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_complete(out, n, seed):  # another process finished the same corpus first
            return out
        raise
    return out


def default_demo_corpus(
    cache_dir: str | os.PathLike | None = None, n: int = 300, seed: int = 0
) -> Path:
    """The cached demo corpus `<cache>/demo_corpus-<n>-<seed>`, generated on first use."""
    # The one cache root; lazy: the backbones package imports JAX (`demo-corpus` needs none).
    from jax_ifmvse.backbones.sources import cache_root

    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return make_demo_corpus(root / f"demo_corpus-{n}-{seed}", n=n, seed=seed)


if __name__ == "__main__":  # the generation worker: python -m ... TMP N SEED
    _tmp, _n, _seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    _write_corpus(_tmp, _n, _seed, lambda i, n: print(i, flush=True))
