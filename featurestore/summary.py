"""A store's health summary as plain data (for `ifmvse inspect` tables and `--json`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from featurestore.frames import has_frames
from featurestore.store import SCHEMA_VERSION, SPLIT_ORDER, FeatureStore, split_order

__all__ = ["SPLIT_ORDER", "left_out", "left_out_lines", "split_order", "summarize"]


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
    states: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (filled, failed)
    for name, info in store.backbones.items():
        view = store._view(name)
        filled = view.filled
        failed = np.zeros(store.n, bool)
        failed[list(view.failed)] = True
        states[name] = (filled, failed)
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
    views = list(store.backbones)
    with_frames = [v for v in views if has_frames(store.path, v)]
    by_split = left_out(store, views, states=states)
    if with_frames:
        frame_split = left_out(store, with_frames, frames=True, states=states)
    for name in views:
        backbones[name]["left_out"] = {s: r["why"].get(name, {}) for s, r in by_split.items()}
        if name in with_frames:
            for s, r in frame_split.items():
                got = r["why"].get(name, {}).get("no frames")
                if got:
                    backbones[name]["left_out"][s]["no frames"] = got
    return {
        "path": str(Path(path).resolve()),
        "schema_version": int(store.attrs.get("schema_version", SCHEMA_VERSION)),
        "utterances": store.n,
        "splits": splits,
        "backbones": backbones,
        "failures": failures[:20],
        "pending_journal_files": store.pending_journal_files,
        "attrs": store.attrs,
    }


def left_out(
    path: str | Path | FeatureStore,
    views: list[str],
    frames: bool = False,
    states: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per split: rows, rows left out (lacking any view) and why, per view: failed (recorded),
    no features (not extracted yet), no frames (`frames`: filled rows without stored frames).

    `states` gives views' (filled, failed) already read (the journal is listed once)."""
    from featurestore.frames import frames_filled

    store = path if isinstance(path, FeatureStore) else FeatureStore(path)
    usable = np.ones(store.n, bool)
    why: dict[str, dict[str, np.ndarray]] = {}
    known = store.backbones if states is None else {}
    for v in views:
        if states is not None and v in states:
            filled, failed = states[v]
        elif v in known:
            view = store._view(v)
            filled = view.filled
            failed = np.zeros(store.n, bool)
            failed[list(view.failed)] = True
        else:
            filled, failed = np.zeros(store.n, bool), np.zeros(store.n, bool)
        why[v] = {"failed": failed, "no features": ~filled & ~failed}
        ok = filled
        if frames:
            why[v]["no frames"] = filled & ~frames_filled(store.path, v)
            ok = ok & ~why[v]["no frames"]
        usable &= ok
    out: dict[str, dict[str, Any]] = {}
    for split in sorted(set(store.splits.tolist()), key=split_order):
        rows = store.splits == split
        reasons = {
            v: {k: int((m & rows).sum()) for k, m in r.items() if (m & rows).any()}
            for v, r in why.items()
        }
        out[split] = {
            "rows": int(rows.sum()),
            "left_out": int((rows & ~usable).sum()),
            "why": {v: r for v, r in reasons.items() if r},
        }
    return out


def left_out_lines(report: dict[str, dict[str, Any]]) -> list[str]:
    """One line per split with rows left out: how many and why, per view."""
    lines = []
    for split, r in report.items():
        if not r["left_out"]:
            continue
        why = "; ".join(
            f"{v}: " + ", ".join(f"{n} {k}" for k, n in ks.items()) for v, ks in r["why"].items()
        )
        lines.append(f"{split}: {r['left_out']} of {r['rows']} rows left out ({why})")
    return lines
