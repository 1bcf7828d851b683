"""Where a run's training data came from: the corpus record a store keeps and a run copies.

`extract` writes `corpus_record(corpus)` into the store's attrs (`corpus_record`), `train_run`
copies it into RUN/manifest.json (`corpus`), and `predict`, `serve` (`/info`, every `/predict`
answer) and the demo report show it, with one line of warning when the run knows only the
built-in synthetic demo corpus. Stores and runs from before the record say "unknown".
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

DEMO_MARKER = "demo_corpus.json"  # = data.demo_corpus.MARKER (not imported: that pulls in TTS)


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def corpus_record(corpus: Any) -> dict[str, Any]:
    """Name, size, label-file hash and demo-ness of a `data.corpus.Corpus` (what a store keeps)."""
    root = Path(getattr(corpus, "root", "") or ".")
    source = Path(corpus.source) if getattr(corpus, "source", "") else None
    # MSP layout: ROOT/Labels/labels_consensus.csv is named after ROOT; a manifest after itself.
    name = root.name if source is None or source.parent.name == "Labels" else source.name
    return {
        "name": name or str(root),
        "utterances": len(corpus.utterances),
        "labels": None if source is None else str(source),
        "labels_sha256": None if source is None else _sha256(source),
        "demo": (root / DEMO_MARKER).is_file(),
    }


def store_corpus(store: Any) -> dict[str, Any]:
    """The corpus record of a `FeatureStore`; for an older store, what its attrs still tell."""
    rec = store.attrs.get("corpus_record")
    if isinstance(rec, dict):
        return dict(rec)
    root = str(store.attrs.get("corpus", "") or "")
    return {
        "name": Path(root).name if root else "unknown",
        "utterances": len(store.ids),
        "labels": None,
        "labels_sha256": None,
        "demo": None,  # unknown: the store predates the record
    }


def run_corpus(manifest: dict) -> dict[str, Any] | None:
    """The corpus record of a run's manifest; None for runs from before it was recorded."""
    rec = manifest.get("corpus")
    return dict(rec) if isinstance(rec, dict) else None


def describe(record: dict[str, Any] | None) -> str:
    """One line: 'NAME (N utterances, labels sha256 0123456789ab, built-in synthetic demo)'."""
    if record is None:
        return "unknown (the run predates corpus records)"
    sha = record.get("labels_sha256")
    parts = [
        f"{record.get('utterances', '?')} utterances",
        f"labels sha256 {sha[:12]}" if sha else "labels sha256 unknown",
    ]
    demo = record.get("demo")
    parts.append(
        "built-in synthetic demo corpus"
        if demo
        else ("demo or not unknown" if demo is None else "not the demo corpus")
    )
    return f"{record.get('name', 'unknown')} ({', '.join(parts)})"


def demo_warning(record: dict[str, Any] | None, run: str | Path) -> str | None:
    """The one line shown whenever a run trained on the synthetic demo corpus scores audio."""
    if not record or not record.get("demo"):
        return None
    return (
        f"note: {run} was trained on the built-in synthetic demo corpus"
        f" ({record.get('utterances', '?')} eSpeak NG clips); its scores of real speech mean little"
    )
