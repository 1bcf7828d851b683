"""`ifmvse predict`: raw audio files -> arousal, valence, dominance through a trained, ensembled run.

What a run needs to predict (`_run_parts`), which backbones to load and with what input
(`extraction_plan`, `extraction_settings`: the settings the run's store recorded per backbone,
train statistics of `audio.normalize=train` included, never the run's config, which may differ),
the result type and its CSV/JSON writer. The scoring itself lives in one place,
`jax_ifmvse.predictor.Predictor` (the batch path of `extract` with the store in memory, the best
heads, `ensemble.combine`); `predict_files` is one call of it. So a file predicted here gets the
numbers the batch path gives it, fallbacks included: a file without features for some view is
scored from the score sets it has (weights renormalised), and with none from the Train label
mean, flagged in `Prediction.fallback`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from jax_ifmvse.config import ATTRIBUTES, Config, load_config


class PredictError(ValueError):
    """A run or file that cannot be used for prediction; the message names it and the reason."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One file's ensembled attributes (clipped to 1..7 as in the submission file) and, where it
    could not use every score set, why (`error`) and what stood in (`fallback`)."""

    file: str
    values: tuple[float, float, float] | None  # ATTRIBUTES order; None only with no weights at all
    error: str | None = None
    fallback: str = ""  # "" = the full ensemble


def _run_parts(run: Path) -> tuple[dict, Config, dict]:
    """(manifest, run config, ensemble weights per attribute), with one-line errors."""
    mpath = run / "manifest.json"
    if not mpath.exists():
        raise PredictError(f"{mpath}: not found; is {run} a RUN/ directory from `ifmvse train`?")
    manifest = json.loads(mpath.read_text())
    if not manifest.get("complete"):
        raise PredictError(f"{mpath}: training is not complete; rerun `ifmvse train`")
    wpath = run / "ensemble" / "weights.json"
    if not wpath.exists():
        raise PredictError(f"{run}: not ensembled yet; run `ifmvse ensemble {run}` first")
    weights = json.loads(wpath.read_text())
    cfg = load_config(run / "config.yaml")
    return manifest, cfg, weights


def extraction_plan(store_path: Path, views: Sequence[str]) -> tuple[dict, list[tuple[str, str]]]:
    """Per source backbone its recorded attrs, plus the layer views, for the views the heads use."""
    from featurestore import FeatureStore, StoreError

    if not store_path.exists():
        raise PredictError(f"{store_path}: the run's feature store is gone (needed for settings)")
    try:
        infos = FeatureStore(store_path).backbones
    except StoreError as e:
        raise PredictError(str(e)) from None
    sources: dict[str, dict] = {}
    layer_views: list[tuple[str, str]] = []
    for v in views:
        if v not in infos:
            raise PredictError(f"{store_path}: no backbone {v!r} (has: {sorted(infos)})")
        attrs = infos[v].attrs
        if "derived_from" in attrs:
            src = str(attrs["derived_from"])
            layer_views.append((v, f"{src}:{int(attrs['hidden_state'])}"))
            sources[src] = {**infos[src].attrs, "_dtype": infos[src].dtype}
        else:
            sources[v] = {**attrs, "_dtype": infos[v].dtype}
    for name, attrs in sources.items():
        if "source" not in attrs:
            raise PredictError(f"{store_path}: backbone {name!r} records no source to load")
    return sources, layer_views


def input_settings(attrs: dict, where: str) -> tuple[dict, tuple[float, float] | None]:
    """A backbone's recorded input (audio settings, train stats) or a one-line PredictError.

    Only the store's attributes count: the run's config may say something else.
    """
    missing = [k for k in ("max_seconds", "long_audio", "normalize") if k not in attrs]
    if missing:
        raise PredictError(
            f"{where}: records no {', '.join(missing)} (extracted by an older version);"
            " re-extract it to predict with it"
        )
    mode = str(attrs["normalize"])
    if mode not in ("none", "utterance", "train"):
        raise PredictError(f"{where}: input normalisation {mode!r} cannot be reproduced")
    stats = None
    if mode == "train":
        if "normalize_mean" not in attrs or "normalize_std" not in attrs:
            raise PredictError(
                f"{where}: normalize=train without recorded statistics; re-extract it"
            )
        stats = (float(attrs["normalize_mean"]), float(attrs["normalize_std"]))
    audio = {
        "sample_rate": int(attrs.get("sample_rate", 16000)),
        "max_seconds": float(attrs["max_seconds"]),
        "long_audio": str(attrs["long_audio"]),
        "normalize": mode,
    }
    return audio, stats


def extraction_settings(
    cfg: Config, attrs: dict, where: str = "store"
) -> tuple[Config, tuple[float, float] | None]:
    """(config, train stats) reproducing one stored backbone's input: the run's config with the
    recorded extraction and input settings, and the statistics `make_loader` needs for
    normalize=train (the way `Predictor` and anything built on it extract)."""
    audio_settings, stats = input_settings(attrs, where)
    layers = str(attrs.get("layers_stored", "none"))
    audio = dataclasses.replace(cfg.audio, **audio_settings)
    extract = dataclasses.replace(
        cfg.extract,
        layers="last" if layers == "none" else layers,
        dtype=str(attrs["_dtype"]),
        compute_dtype=str(attrs.get("compute_dtype", cfg.extract.compute_dtype)),
        whisper_window_s=float(attrs.get("whisper_window_s", 30.0)),
        layer_views=(),
    )
    return dataclasses.replace(cfg, audio=audio, extract=extract), stats


def predict_files(
    files: Sequence[str | Path], run: str | Path, *, work_dir: str | Path | None = None
) -> list[Prediction]:
    """Ensembled predictions for audio files through the run's backbones, heads and weights.

    One call of a `Predictor` (the path `ifmvse serve` keeps warm); it compiles only the shapes
    these files need. `work_dir` is accepted for older callers and unused: nothing is written.
    """
    from jax_ifmvse.predictor import Predictor

    del work_dir  # features stay in memory (the store's dtype rounding kept)
    return [s.prediction for s in Predictor(run).predict_files(files)]


def write_predictions(preds: Sequence[Prediction], path: str | Path) -> None:
    """CSV (file, arousal, valence, dominance, fallback) or JSON (by the suffix), one row per
    file that has values; `fallback` says what stood in for the full ensemble ("" = nothing)."""
    path = Path(path)
    good = [p for p in preds if p.values is not None]
    if path.suffix.lower() == ".json":
        rows = [
            {"file": p.file, **dict(zip(ATTRIBUTES, p.values, strict=True)), "fallback": p.fallback}
            for p in good
        ]
        path.write_text(json.dumps(rows, indent=2) + "\n")
        return
    if path.suffix.lower() != ".csv":
        raise PredictError(f"{path}: --out must end in .csv or .json")
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["file", *ATTRIBUTES, "fallback"])
        for p in good:
            wr.writerow([p.file, *(repr(v) for v in p.values), p.fallback])
