"""Loading a trained run for inference: its manifest, its best heads and its backbones' recorded input.

`load_run` checks that a run is complete and ensembled; `extraction_plan`, `input_settings` and
`extraction_settings` say which speech backbones to load and with what input (the settings the run's store
recorded per backbone, train statistics of `audio.normalize=train` included, never the run's
config, which may differ); `text_plan` lists the text views (transcribed and embedded again by `text.views.TextViews`);
`load_heads` restores every best head as one scorer. `predictor.Predictor`
(the path of `ifmvse predict` and `ifmvse serve`) is built on these.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from featurestore import FeatureStore, StoreError
from jax_ifmvse.categories import N_CLASSES
from jax_ifmvse.config import ATTRIBUTES, Config, load_config
from jax_ifmvse.data.views import load_stats, standardize, view_keys
from jax_ifmvse.errors import IfmvseError, TrainError
from jax_ifmvse.heads.specs import build_model, model_specs, to_corpus_scale
from jax_ifmvse.parallel import data_mesh, make_predict, predict_np
from jax_ifmvse.trainer import optim
from jax_ifmvse.trainer.checkpoints import restore_best
from jax_ifmvse.trainer.rundir import read_finished
from jax_ifmvse.trainer.state import init_state


class PredictError(IfmvseError, ValueError):
    """A run or file that cannot be used for prediction; the message names it and the reason."""


def is_finetune_run(run: str | Path) -> bool:
    """Whether RUN/ was written by `ifmvse finetune` (finetune.json, no manifest.json)."""
    run = Path(run)
    return (run / "finetune.json").is_file() and not (run / "manifest.json").exists()


def run_manifest(run: str | Path) -> dict:
    """A run's manifest, trained heads or fine-tuned backbone, checked as `predict` needs it."""
    run = Path(run)
    if is_finetune_run(run):
        return read_finished(run, "finetune.json", "finetune")
    return load_run(run)[0]


def load_run(run: Path) -> tuple[dict, Config, dict]:
    """(manifest, run config, ensemble weights per attribute), with one-line errors."""
    manifest = read_finished(run, "manifest.json", "train")
    wpath = run / "ensemble" / "weights.json"
    if not wpath.exists():
        raise PredictError(f"{run}: not ensembled yet; run `ifmvse ensemble {run}` first")
    weights = json.loads(wpath.read_text())
    cfg = load_config(run / "config.yaml")
    return manifest, cfg, weights


def extraction_plan(store_path: Path, views: Sequence[str]) -> tuple[dict, list[tuple[str, str]]]:
    """Per source backbone its recorded attrs, plus the layer views, for the views the heads use."""
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
        if _is_text(infos, v):  # transcribed and embedded by `text_plan`'s views
            continue
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


def _is_text(infos: Mapping[str, Any], view: str) -> bool:
    """Whether a store view is a text view, or a layer view derived from one."""
    attrs = infos[view].attrs
    src = attrs.get("derived_from")
    if src is not None and str(src) in infos:
        attrs = infos[str(src)].attrs
    return attrs.get("kind") == "text"


def text_plan(
    store_path: Path, views: Sequence[str]
) -> tuple[dict[str, dict], list[tuple[str, str, int | None]]]:
    """The text views the heads use: per text source its recorded attrs (`_dtype` the store's
    dtype), and per view (view, text source, stored hidden state or None for the pooled last)."""
    infos = FeatureStore(store_path).backbones  # `extraction_plan` checked the store and views
    sources: dict[str, dict] = {}
    plan: list[tuple[str, str, int | None]] = []
    for v in views:
        if not _is_text(infos, v):
            continue
        attrs = infos[v].attrs
        src, k = v, None
        if "derived_from" in attrs:
            src, k = str(attrs["derived_from"]), int(attrs["hidden_state"])
        sources[src] = {**infos[src].attrs, "_dtype": infos[src].dtype}
        plan.append((v, src, k))
    return sources, plan


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


def load_heads(
    run_dir: str | Path, *, fused: bool = False, with_probs: bool = False
) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """A scorer `features {view: (N, D)} -> (K, N, 3)` corpus-scale scores from best checkpoints.

    `fused=True` runs every head in one jitted call (one dispatch and one transfer instead of one
    per score set and attribute group: what a server scoring a few rows at a time pays for).
    `with_probs=True` makes it return `(scores, probs)`, probs (K, N, 8) the task 1 class
    probabilities in `categories.CLASS_CODES` order (NaN for a run without task 1 heads).
    """
    run = Path(run_dir)
    manifest_path = run / "manifest.json"
    if not manifest_path.exists():
        raise TrainError(
            f"{manifest_path}: not found; is {run} a RUN/ directory from `ifmvse train`?"
        )
    manifest = json.loads(manifest_path.read_text())
    cfg = load_config(run / "config.yaml")
    # Attentive heads score frames {view: (N, T, D) float16, `view:mask`: (N, T)}, standardized
    # in float16 exactly as training's evaluation splits were (`views.frame_views`).
    attentive = cfg.model.pooling == "attentive"
    view_dims = manifest["view_dims"]
    mesh = data_mesh()
    replicated = NamedSharding(mesh, P())
    tx = optim.make_optimizer(cfg.train.learning_rate, cfg.train.weight_decay)  # as train's
    models = []  # (k, cols, model, predict, params, spec)
    for k, ss in enumerate(cfg.model.score_sets):
        for spec in model_specs(cfg):
            tname = spec.name
            cols = [ATTRIBUTES.index(a) for a in spec.attributes]
            model = build_model(cfg, ss, view_dims, spec.n_out)
            like = jax.eval_shape(
                lambda model=model, ss=ss: init_state(
                    model,
                    tx,
                    example_features(manifest, ss.views, attentive),
                    jax.random.key(0),
                )
            )
            ckpt = run / ss.name / tname / "checkpoints"
            best, state = restore_best(ckpt, like, replicated)
            if best is None:
                raise TrainError(f"{run / ss.name / tname}: no checkpoint (was training finished?)")
            params = state.params
            models.append((k, cols, model, make_predict(model), params, spec))
    normalize = cfg.corpus.normalize_labels
    n_sets = len(cfg.model.score_sets)
    stats = load_stats(run / "view_stats.npz")
    all_params = [m[4] for m in models]
    needed = sorted({v for m in models for v in m[2].views})

    def prepared(features: Mapping[str, np.ndarray], views: Sequence[str]) -> dict:
        """The heads' inputs: standardized views (float16 frames stay float16), masks as given."""
        if not attentive:
            return standardize({v: np.asarray(features[v], np.float32) for v in views}, stats)
        out = standardize({v: np.asarray(features[v], np.float16) for v in views}, stats)
        return out | {f"{v}:mask": np.asarray(features[f"{v}:mask"], bool) for v in views}

    def heads(all_params: list, feats: Mapping[str, jax.Array]) -> list[jax.Array]:
        """Every head's raw output (N, n_out) on the standardized views: a pure JAX function."""
        return [
            model.apply(
                {"params": p}, {v: feats[v] for v in view_keys(model.views, attentive)}, train=False
            )
            for (_, _, model, _, _, _), p in zip(models, all_params, strict=True)
        ]

    def attributes(ys: Sequence) -> Any:
        """(K, N, 3) corpus-scale attribute scores (NaN where a set has no attribute head) from
        the heads' raw outputs, numpy or JAX arrays alike (JAX: differentiable)."""
        xp = np if isinstance(ys[0], np.ndarray) else jnp
        col = {}  # (set, attribute) -> (N,)
        for (k, cols, _, _, _, spec), y in zip(models, ys, strict=True):
            obj = spec.objective(cfg)
            if cols:
                a = to_corpus_scale(y if obj is None else obj.parts(y)["attributes"], normalize)
                col |= {(k, c): a[:, j] for j, c in enumerate(cols)}
        nan = xp.full(len(ys[0]), np.nan, np.float32)
        return xp.stack(
            [xp.stack([col.get((k, c), nan) for c in range(3)], -1) for k in range(n_sets)]
        )

    apply_jit = jax.jit(heads)
    rows = NamedSharding(mesh, P("data"))

    def raw(features: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The heads' outputs [(N, n_out)]: one jitted call of `heads` when fused, else one
        chunked call per head (`predict_np`, training's evaluation path)."""
        if not fused:
            return [
                predict_np(predict, params, prepared(features, model.views), mesh)
                for _, _, model, predict, params, _ in models
            ]
        n = len(features[needed[0]])
        size = mesh.devices.size * math.ceil(max(n, 1) / mesh.devices.size)  # rows per device
        part = {
            v: jax.device_put(
                np.concatenate([x, np.zeros((size - n, *x.shape[1:]), x.dtype)]), rows
            )
            for v, x in prepared(features, needed).items()
        }
        return [np.asarray(y)[:n] for y in jax.device_get(apply_jit(all_params, part))]

    def score(features: Mapping[str, np.ndarray]) -> np.ndarray:
        missing = [v for v in needed if v not in features]
        if missing:
            raise TrainError(f"{run}: features for {missing} are needed by its score sets")
        ys = raw(features)
        if not with_probs:
            return attributes(ys)
        probs = np.full((n_sets, len(ys[0]), N_CLASSES), np.nan, np.float32)
        for (k, _, _, _, _, spec), y in zip(models, ys, strict=True):
            if spec.category:
                probs[k] = spec.objective(cfg).outputs(y)["category"]
        return attributes(ys), probs

    def attribute_scores(features: Mapping[str, jax.Array]) -> jax.Array:
        """`score`'s attribute scores as a JAX function of float32 views (its `heads` and
        `attributes`, the views standardized in float32), so tests can differentiate it."""
        return attributes(heads(all_params, standardize(features, stats)))

    score.attribute_scores = attribute_scores
    return score


def example_features(manifest: dict, views: Sequence[str], attentive: bool) -> dict:
    """One zero row of each view as the heads take it (frames and masks when attentive)."""
    if not attentive:
        return {v: jnp.zeros(example_shape(manifest, v), jnp.float32) for v in views}
    dims = manifest["view_dims"]
    out = {v: jnp.zeros((1, 1, dims[v]), jnp.float16) for v in views}
    return out | {f"{v}:mask": jnp.ones((1, 1), bool) for v in views}


def example_shape(manifest: dict, view: str) -> tuple[int, ...]:
    layers = manifest.get("view_layers", {}).get(view)
    dim = manifest["view_dims"][view]
    return (1, layers, dim) if layers else (1, dim)
