"""`ifmvse predict`: raw audio files -> arousal, valence, dominance through a trained, ensembled run.

The files go through exactly the batch path: a temporary corpus and store filled by
`run_extract` with the extraction settings the run's store recorded per backbone (source,
sample rate, max_seconds, long_audio, waveform normalisation and its train statistics, stored
layers, Whisper window, compute dtype; never the run's config, which may differ), then the
run's best heads (`load_heads`), then the ensemble weights (`ensemble.combine`). So a file
predicted here gets the numbers the batch path gives it, fallbacks included: a file without
features for some view is scored from the score sets it has (weights renormalised), and with
none from the Train label mean, flagged in `Prediction.fallback`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

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


def _extract_cfg(cfg: Config, attrs: dict, where: str = "store") -> Config:
    """The run's config with one backbone's recorded extraction and input settings."""
    layers = str(attrs.get("layers_stored", "none"))
    audio_settings, _ = input_settings(attrs, where)
    audio = dataclasses.replace(cfg.audio, **audio_settings)
    extract = dataclasses.replace(
        cfg.extract,
        layers="last" if layers == "none" else layers,
        dtype=str(attrs["_dtype"]),
        compute_dtype=str(attrs.get("compute_dtype", cfg.extract.compute_dtype)),
        whisper_window_s=float(attrs.get("whisper_window_s", 30.0)),
        layer_views=(),
    )
    return dataclasses.replace(cfg, audio=audio, extract=extract)


def extraction_settings(
    cfg: Config, attrs: dict, where: str = "store"
) -> tuple[Config, tuple[float, float] | None]:
    """(config, train stats) reproducing one stored backbone's input: pass both to `make_loader`
    and the config to `run_extract` (the way `predict` and anything built on it extract)."""
    return _extract_cfg(cfg, attrs, where), input_settings(attrs, where)[1]


def predict_files(
    files: Sequence[str | Path], run: str | Path, *, work_dir: str | Path | None = None
) -> list[Prediction]:
    """Ensembled predictions for audio files through the run's backbones, heads and weights."""
    from featurestore import FeatureStore
    from jax_ifmvse.backbones import load_backbone
    from jax_ifmvse.data.corpus import Corpus, Utterance
    from jax_ifmvse.ensemble import LABEL_RANGE, combine
    from jax_ifmvse.extract import derive_layer_views, make_loader, run_extract
    from jax_ifmvse.train import load_all_rows, load_heads

    run = Path(run)
    manifest, cfg, weights = _run_parts(run)
    views = sorted({v for s in cfg.model.score_sets for v in s.views})
    sources, layer_views = extraction_plan(Path(manifest["store"]), views)
    # Every backbone's input as its store recorded it; refused up front, before any work.
    settings = {
        name: extraction_settings(cfg, attrs, f"{manifest['store']}: backbone {name!r}")
        for name, attrs in sources.items()
    }
    names = [s.name for s in cfg.model.score_sets]
    fits = {a: weights["attributes"].get(a) or {} for a in ATTRIBUTES}
    w = {a: fits[a].get("weights") for a in ATTRIBUTES}
    set_ccc = {a: fits[a].get("dev_ccc_per_set") or {} for a in ATTRIBUTES}
    label_mean = manifest.get("train_label_mean") or {}
    score = load_heads(run)

    # Every path relative to "/" keeps the corpus' inside-the-root check meaningful and simple.
    paths = [Path(f).expanduser().absolute() for f in files]
    utts = tuple(
        Utterance(id=f"{i:06d}", path=p.as_posix().lstrip("/"), split="Test1")
        for i, p in enumerate(paths)
    )
    corpus = Corpus(root=Path("/"), utterances=utts, source="ifmvse predict")
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="ifmvse-predict-") as tmp:
        store_path = Path(tmp) / "store.h5"
        for name, attrs in sources.items():
            bcfg, stats = settings[name]
            bb = load_backbone(
                str(attrs["source"]),
                dtype=bcfg.extract.compute_dtype,
                cache_dir=cfg.extract.cache_dir or None,  # None: cache_root()
            )
            recorded = attrs.get("chunk_min_samples")
            if recorded is not None and int(recorded) != bb.min_samples:
                raise PredictError(
                    f"{manifest['store']}: backbone {name!r} dropped chunk tails below"
                    f" {recorded} samples, this version below {bb.min_samples}; re-extract it"
                )
            loader = make_loader(bcfg, corpus, stats=stats)
            run_extract(corpus, {name: bb}, store_path, bcfg, loader=loader)
        if layer_views:
            derive_layer_views(store_path, layer_views)
        store = FeatureStore(store_path)
        ids, feats, have, _, _, why = load_all_rows(store, None, views, set())
        scores = score(feats) if len(ids) else np.zeros((len(names), 0, 3))  # (K, N, 3)
        for k, ss in enumerate(cfg.model.score_sets):
            ok = np.all([have[v] for v in ss.views], axis=0)  # (N,)
            scores[k][~ok] = np.nan  # zeros stood in for the missing features
        if not label_mean and not all(have[v].all() for v in views):
            raise PredictError(
                f"{run / 'manifest.json'}: no train_label_mean for files without features;"
                " rerun `ifmvse train` with this version"
            )
        comb = combine(scores, w, names, label_mean, set_ccc)
    pred = comb.pred  # (N, 3)
    if cfg.corpus.normalize_labels:
        # The heads learnt (y - 1) / 6 of 1..7 ratings; a user asked for ratings, so clip to the
        # scale as the challenge baseline and our submission files do.
        pred = np.clip(pred, *LABEL_RANGE)
    row = {str(i): n for n, i in enumerate(ids)}
    out = []
    for u, f in zip(utts, files, strict=True):
        n = row[u.id]
        values = tuple(float(v) for v in pred[n])
        out.append(
            Prediction(
                str(f),
                None if not np.isfinite(values).any() else values,
                why[n] or None,
                comb.used[n],
            )
        )
    return out


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
