"""A tiny trained and ensembled run (random tiny Whisper, 2-s window) for serve tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
from tiny_models import save_tiny_whisper

SPLITS = ("Train", "Train", "Development", "Test1")
SETS = "[{name: S1, kind: mlp, views: [w]}, {name: S2, kind: fusion, views: [w, w_mid]}]"


def tone(seconds: float, sr: int, f0: float, seed: int) -> np.ndarray:
    """A noisy sine, float32: distinct clips give distinct features."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    x = 0.3 * np.sin(2 * np.pi * f0 * np.arange(n) / sr) + 0.02 * rng.standard_normal(n)
    return x.astype(np.float32)


def build_tiny_run(
    root: Path,
    n: int = 16,
    extra: tuple[str, ...] = (),
    ensemble: bool = True,
    before_train: Callable[[Path], None] | None = None,
) -> tuple[Path, Path]:
    """(RUN/ directory, audio folder) of a 2-epoch run over n labelled tones, ensembled unless
    `ensemble=False`; the store is root/store.h5.

    `extra` config overrides come last (e.g. audio.long_audio=chunk); `before_train(store)`
    adds views after extraction (e.g. `ifmvse transcribe`'s text views).
    """
    from jax_ifmvse.backbones import load_backbone
    from jax_ifmvse.config import load_config
    from jax_ifmvse.data.corpus import load_manifest
    from jax_ifmvse.encode import make_loader
    from jax_ifmvse.ensemble.run import run_ensemble
    from jax_ifmvse.extract import run_extract
    from jax_ifmvse.train import train_run

    save_tiny_whisper(
        root / "tinywhisper", d_model=16, encoder_attention_heads=2, encoder_ffn_dim=32
    )
    audio = root / "audio"
    audio.mkdir()
    # emo_class and gender: task 1 runs (`train.tasks`) use them; others ignore them.
    rows = ["path,split,arousal,valence,dominance,emo_class,gender"]
    for i in range(n):
        sr = (16000, 22050)[i % 2]
        x = tone(0.5 + 2.0 * i / n, sr, 120 + 20 * i, i)
        sf.write(audio / f"u{i:02d}.wav", x, sr)
        rows.append(
            f"u{i:02d}.wav,{SPLITS[i % 4]},{1 + i * 0.35:.3f},{4 + (i % 3):.3f},{7 - i * 0.3:.3f}"
            f",{'ASHN'[(i // 2) % 4]},{('Female', 'Male')[i % 2]}"
        )
    (audio / "m.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(
        None,
        [
            "corpus.kind=manifest",
            f"corpus.path={audio / 'm.csv'}",
            f"extract.cache_dir={root / 'cache'}",
            "audio.max_seconds=2",
            "extract.whisper_window_s=2",
            "extract.batch_seconds=16",
            "extract.layers=1",
            "extract.layer_views={w_mid: 'w:1'}",
            "model.common_dim=8",
            "model.hidden=16",
            f"model.score_sets={SETS}",
            # One model for the three attributes; a joint model (`train.tasks` given) is one
            # already, and the config refuses multitask beside other tasks.
            *(
                ()
                if any(e.startswith("train.tasks=") for e in extra)
                else ("train.multitask=true",)
            ),
            "train.epochs=2",
            "train.batch_size=4",
            "train.learning_rate=1e-2",
            "ensemble.fine_radius=0.05",
            *extra,
        ],
    )
    corpus = load_manifest(audio / "m.csv")
    bb = load_backbone(str(root / "tinywhisper"), cache_dir=root / "cache")
    store = root / "store.h5"
    run_extract(corpus, {"w": bb}, store, cfg, loader=make_loader(cfg, corpus))
    if before_train is not None:
        before_train(store)
    run = root / "run"
    train_run(store, cfg, run)
    if ensemble:
        run_ensemble(run, load_config(run / "config.yaml").ensemble)
    return run, audio
