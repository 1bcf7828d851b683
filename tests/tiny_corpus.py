"""A tiny labelled tone corpus (manifest) for the fine-tuning tests: pitch and loudness carry the labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

SPLITS = ("Train", "Train", "Train", "Development", "Test1")
# Task 1 codes: pitch bands carry the class; X and O rows are kept for task 2, unscored.
CODES = ("A", "A", "S", "S", "H", "H", "N", "N", "X", "O")


def write_tone_corpus(root: Path, n: int = 20, seconds=(0.3, 0.9), sr: int = 16000) -> Path:
    """n noisy tones under root/ and root/m.csv; returns the manifest path."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["path,split,arousal,valence,dominance,EmoClass"]
    for i in range(n):
        d = seconds[0] + (seconds[1] - seconds[0]) * ((i * 7) % n) / max(n - 1, 1)
        f0, amp = 100 + 15 * i, 0.1 + 0.4 * (i % 5) / 4
        t = np.arange(int(d * sr)) / sr
        x = amp * np.sin(2 * np.pi * f0 * t) + 0.02 * rng.standard_normal(len(t))
        sf.write(root / f"u{i:02d}.wav", x.astype(np.float32), sr)
        a, v, dm = 1 + 6 * i / (n - 1), 1 + 3 * (i % 3), 4 + 2 * np.sin(i)
        code = CODES[(i * len(CODES)) // n]
        rows.append(f"u{i:02d}.wav,{SPLITS[i % len(SPLITS)]},{a:.3f},{v:.3f},{dm:.3f},{code}")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    return root / "m.csv"
