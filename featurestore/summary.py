"""A store's health summary as plain data (for `ifmvse inspect` tables and `--json`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from featurestore.store import SCHEMA_VERSION, FeatureStore


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


# The challenge's splits in pipeline order (jax_ifmvse.data.corpus uses these names too); any
# other split name follows, alphabetically.
SPLIT_ORDER = ("Train", "Development", "Test1", "Test2", "Test3")


def split_order(name: str) -> tuple[int, str]:
    """Sort key: Train, Development, Test1..3 first, then other names alphabetically."""
    return (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER), name)


def summarize(path: str | Path, chunk: int = 4096) -> dict[str, Any]:
    """Corpus size and labels per split, and per backbone provenance, fill state and health."""
    store = FeatureStore(path)
    splits: dict[str, Any] = {}
    for split in sorted(set(store.splits.tolist()), key=split_order):
        rows = store.splits == split
        splits[split] = {
            "utterances": int(rows.sum()),
            "hours": round(float(np.nansum(store.durations[rows])) / 3600, 4),
            "labels": {k: _label_stats(v[rows]) for k, v in store.labels.items()},
        }
    backbones: dict[str, Any] = {}
    for name, info in store.backbones.items():
        filled, failed = store.filled(name), store.failed(name)
        nan_rows, norm_sum, seen = 0, 0.0, 0
        for batch in store.iter_batches(None, [name], chunk):  # bounded memory on big stores
            x = batch.features[name]
            bad = np.isnan(x).reshape(len(x), -1).any(axis=1)
            nan_rows += int(bad.sum())
            norm_sum += float(np.linalg.norm(x[~bad], axis=-1).sum())
            seen += int((~bad).sum())
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
    return {
        "path": str(Path(path).resolve()),
        "schema_version": SCHEMA_VERSION,
        "utterances": store.n,
        "splits": splits,
        "backbones": backbones,
        "failures": [{"id": i, "backbone": b, "reason": r} for i, b, r in store.failures()[:20]],
        "pending_journal_files": store.pending_journal_files,
        "attrs": store.attrs,
    }
