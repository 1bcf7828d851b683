"""The views of a feature store that training and prediction read: rows, labels, statistics.

A view is one store backbone's features for the rows of a split: pooled (N, D), or layered
(N, L, D) when `model.layer_weights` learns a weighted sum over stored hidden states. Layered
views stay float16 as stored (half the memory); they become float32 on the device, inside the
model. Standardisation statistics come from the Train split and travel with a run
(`RUN/view_stats.npz`), so prediction scales features exactly as training did.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.frames import read_frames
from jax_ifmvse.config import ATTRIBUTES, Config
from jax_ifmvse.data.corpus import submission_name
from jax_ifmvse.errors import IfmvseError


class ViewError(IfmvseError, ValueError):
    """A view that cannot be read for training (no filled rows of a split)."""


def ids_sha256(ids: Sequence[str]) -> str:
    """SHA-256 of a store's row ids in order: a run records it to refuse another store."""
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()


def load_views(store, split: str, views: Sequence[str], layer_views: set[str]):
    """(ids, {view: (N, D) or (N, L, D)}, labels (N, 3) corpus scale) of rows filled for all views."""
    # Layered views stay float16 as stored (half the memory; they become float32 on the device,
    # inside the model): Train's (84k, 25, 1024) is 4.3 GB instead of 8.6 GB.
    parts = {
        v: store.load(split, [v], layers=v in layer_views, dtype=None if v in layer_views else "f4")
        for v in views
    }
    common = None
    for p in parts.values():
        common = p.indices if common is None else np.intersect1d(common, p.indices)
    feats = {}
    for v in views:
        p = parts.pop(v)  # one view in memory at a time, never loaded and indexed copies at once
        # common is a subset of p.indices: the same length means the same rows (no copy).
        same = len(p.indices) == len(common)
        feats[v] = p.features[v] if same else p.features[v][np.searchsorted(p.indices, common)]
        del p
    labels = np.stack(
        [store.labels.get(a, np.full(store.n, np.nan, np.float32))[common] for a in ATTRIBUTES], -1
    ).astype(np.float32)  # (N, 3)
    return store.ids[common], feats, labels


def load_all_rows(store, split: str, views: Sequence[str], layer_views: set[str]):
    """Every row of a split: ids, {view: features, zeros where missing}, {view: (N,) have},
    labels (N, 3), and per row why views are missing ("" when none is)."""
    rows = np.sort(store.split_indices(split))
    feats, have = {}, {}
    for v in views:
        # Layered views as stored (float16), as `load_views` reads them for training.
        p = store.load(
            split, [v], layers=v in layer_views, dtype=None if v in layer_views else "f4"
        )
        x = p.features[v]
        feats[v] = np.zeros((len(rows), *x.shape[1:]), x.dtype)
        pos = np.searchsorted(rows, p.indices)
        feats[v][pos] = x
        have[v] = np.zeros(len(rows), bool)
        have[v][pos] = True
        del p, x  # the loaded copy of this view, before the next view is loaded
    failed = {(uid, b): why for uid, b, why in store.failures()}
    ids = store.ids[rows]
    why = []
    for n, uid in enumerate(ids):
        parts = [
            f"no {v} features ({failed.get((str(uid), v), 'not extracted')})"
            for v in views
            if not have[v][n]
        ]
        why.append("; ".join(parts))
    labels = np.stack(
        [store.labels.get(a, np.full(store.n, np.nan, np.float32))[rows] for a in ATTRIBUTES], -1
    ).astype(np.float32)  # (N, 3)
    files = [submission_name(str(store.paths[r]), str(store.ids[r])) for r in rows]
    return ids, feats, have, labels, files, why


def train_label_mean(store, split: str) -> list[float | None]:
    """Mean corpus-scale label per attribute over a split's labelled rows (the last fallback)."""
    rows = store.split_indices(split)
    out = []
    for a in ATTRIBUTES:
        y = store.labels.get(a, np.full(store.n, np.nan, np.float32))[rows].astype(np.float64)
        out.append(float(np.nanmean(y)) if np.isfinite(y).any() else None)
    return out


def view_stats(store, split: str, views: Sequence[str], layer_views: set[str]) -> dict:
    """Per-view (mean per dimension, one scale per view or layer) over a split's filled rows."""
    stats = {}
    for v in views:
        n, s1, s2 = 0, 0.0, 0.0
        # In chunks, in float64: a layered view of MSP-Podcast's Train split is ~8 GB in float32.
        for batch in store.iter_batches(split, [v], 4096, layers=v in layer_views):
            x = batch.features[v].astype(np.float64)
            n, s1, s2 = n + len(x), s1 + x.sum(0), s2 + (x * x).sum(0)
        if n == 0:
            raise ViewError(f"{store.path}: no filled rows of {v!r} in split {split!r}")
        mean = s1 / n
        var = np.maximum(s2 / n - mean * mean, 0.0)
        # One scale per view (per layer for layered views), not per dimension: z-scoring each
        # dimension would blow near-constant dimensions up to unit variance. Measured on the demo:
        # Test1 ensemble CCC about 0.55 with this, 0.49 with per-dimension z-scores.
        scale = np.sqrt(var.mean(axis=-1, keepdims=True))
        std = np.broadcast_to(np.maximum(scale, 1e-6), mean.shape)
        stats[v] = (mean.astype(np.float32), std.astype(np.float32))
    return stats


def standardize(
    feats: Mapping[str, np.ndarray], stats: Mapping[str, tuple], inplace: bool = False
) -> dict:
    """z-score the views that have stats; others pass through. float16 views stay float16.

    `inplace=True` overwrites the given arrays (no second copy of a view in memory).
    """
    out = {}
    for v, x in feats.items():
        if v not in stats:
            out[v] = x
        elif x.dtype == np.float16:  # in float32 row chunks: never a float32 copy of the view
            mean, std = stats[v]
            y = x if inplace else np.empty_like(x)
            for s in range(0, len(x), 4096):
                y[s : s + 4096] = (x[s : s + 4096].astype(np.float32) - mean) / std
            out[v] = y
        elif inplace:
            x -= stats[v][0]
            x /= stats[v][1]
            out[v] = x
        else:
            out[v] = (x - stats[v][0]) / stats[v][1]
    return out


def save_stats(path: Path, stats: Mapping[str, tuple]) -> None:
    """Write view statistics to `RUN/view_stats.npz` atomically."""
    tmp = path.with_suffix(".tmp.npz")
    arrays = {f"{v}/{k}": a for v, (m, sd) in stats.items() for k, a in (("mean", m), ("std", sd))}
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_stats(path: Path) -> dict:
    """View statistics saved by `train_run` (empty when the run does not standardize)."""
    if not path.exists():
        return {}
    with np.load(path) as z:
        views = {k.split("/")[0] for k in z.files}
        return {v: (z[f"{v}/mean"], z[f"{v}/std"]) for v in views}


def layered_views(cfg: Config, backbones: Mapping[str, Any]) -> set[str]:
    """The store views read layered (N, L, D): those with stored layers, when the model learns
    a weighted sum over them (`model.layer_weights`)."""
    if not cfg.model.layer_weights:
        return set()
    return {name for name, info in backbones.items() if info.num_layers is not None}


def frame_views(store_path: Path, views: Sequence[str], rows: np.ndarray, stats: Mapping) -> dict:
    """Stored frames of `rows` for `model.pooling=attentive`: {view: (N, T, D) float16, scaled
    with the view's pooled statistics, `view:mask`: (N, T) bool}; a row without frames is all
    padding (mask False)."""
    out = {}
    for v in views:
        x, lengths = read_frames(store_path, v, rows)  # (N, T, D) float16, (N,)
        if v in stats:
            x = standardize({v: x}, stats, inplace=True)[v]
        out[v] = x
        out[f"{v}:mask"] = np.arange(x.shape[1])[None] < lengths[:, None]  # (N, T)
    return out


def view_keys(views: Sequence[str], frames: bool) -> list[str]:
    """The feature keys a score set reads: its views, plus their frame masks when attentive."""
    return [*views, *(f"{v}:mask" for v in views)] if frames else list(views)
