"""A store's health summary as plain data (for `ifmvse inspect` tables and `--json`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from featurestore.store import SCHEMA_VERSION, SPLIT_ORDER, FeatureStore, split_order

__all__ = ["SPLIT_ORDER", "split_order", "summarize"]


def _label_stats(v: np.ndarray) -> dict[str, Any]:
    known = v[~np.isnan(v)]
    if known.size == 0:
        return {"count": 0}
    return {
        "count": int(known.size),
        "mean": round(float(known.mean()), 4),
        "std": round(float(known.std()), 4),
        "min": round(float(known.min()), 4),
        "max": round(float(known.max()), 4),
    }


def summarize(path: str | Path) -> dict[str, Any]:
    """Corpus size and labels per split, and per backbone provenance, fill state and health.

    Health comes from the per-row norms the store keeps (main file and journal headers), so no
    feature is read: seconds on a full corpus, journal pending or not.
    """
    store = FeatureStore(path)
    splits: dict[str, Any] = {}
    for split in sorted(set(store.splits.tolist()), key=split_order):
        rows = store.splits == split
        splits[split] = {
            "utterances": int(rows.sum()),
            "hours": round(float(np.nansum(store.durations[rows])) / 3600, 4),
            "labels": {k: _label_stats(v[rows]) for k, v in store.labels.items()},
        }
        if "EmoClass" in store.codes:  # task 1: rows per code ("" = none), absent in old stores
            codes, counts = np.unique(store.codes["EmoClass"][rows].astype(str), return_counts=True)
            splits[split]["classes"] = {str(c): int(n) for c, n in zip(codes, counts)}
    backbones: dict[str, Any] = {}
    failures: list[dict[str, str]] = []
    for name, info in store.backbones.items():
        view = store._view(name)
        filled = view.filled
        failed = np.zeros(store.n, bool)
        failed[list(view.failed)] = True
        norm = view.norm[filled]  # NaN where a row's pooled features hold a NaN
        bad = np.isnan(norm)
        nan_rows, seen = int(bad.sum()), int((~bad).sum())
        norm_sum = float(norm[~bad].astype(np.float64).sum())
        attrs = info.attrs
        backbones[name] = {
            "source": attrs.get("source", "?"),
            "width": info.dim,
            "layers": info.num_layers,
            "dtype": info.dtype,
            "filled": int(filled.sum()),
            "missing": int((~filled & ~failed).sum()),
            "failed": int(failed.sum()),
            "nan_rows": nan_rows,
            "mean_norm": round(norm_sum / seen, 4) if seen else None,
            "attrs": attrs,
        }
        failures += [
            {"id": str(store.ids[i]), "backbone": name, "reason": r}
            for i, r in sorted(view.failed.items())
        ]
    return {
        "path": str(Path(path).resolve()),
        "schema_version": SCHEMA_VERSION,
        "utterances": store.n,
        "splits": splits,
        "backbones": backbones,
        "failures": failures[:20],
        "pending_journal_files": store.pending_journal_files,
        "attrs": store.attrs,
    }
