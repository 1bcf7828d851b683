"""Transcripts beside a feature store: one set per name, crash-safe, resumable, shardable.

Layout, beside `STORE`:
  STORE.transcripts/<name>/source.json   where the set comes from (ASR checkpoint and settings,
                                         or the corpus file), written once
  STORE.transcripts/<name>/*.jsonl       batches: one JSON line per row with row, id, text,
                                         language, avg_logprob, no_speech_prob, flags

Every batch file is written under a temporary name, fsynced and renamed (like the store's
journal), so a killed run leaves whole batches; a rerun does the rows no batch holds. Shards
write their own files (the name carries the writer), and readers take the union, so there is
nothing to merge. Strings do not fit the store's float journal; this sidecar keeps them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.transcripts import records, root, sets
from jax_ifmvse.errors import IfmvseError

FIELDS = ("text", "language", "avg_logprob", "no_speech_prob", "flags")


class TranscriptError(IfmvseError, ValueError):
    """A transcript set or file that cannot be used; one line says why."""


def _write_atomic(final: Path, data: bytes) -> None:
    tmp = final.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex}-{final.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def start(store: str | Path, name: str, source: Mapping[str, Any]) -> Path:
    """Create set `name` with its source record, or check it matches the recorded one."""
    if not name or "/" in name or name.startswith("."):
        raise TranscriptError(f"bad transcript set name {name!r}")
    d = root(store) / name
    known = sets(store).get(name)
    if known is not None:
        diff = [k for k in source if k in known and known[k] != source[k]]
        if diff:
            raise TranscriptError(
                f"{d}: transcript set {name!r} was made with other settings ("
                + "; ".join(f"{k} {known[k]!r} != {source[k]!r}" for k in diff)
                + "); use another --name"
            )
        return d
    d.mkdir(parents=True, exist_ok=True)
    _write_atomic(d / "source.json", json.dumps(dict(source), sort_keys=True).encode())
    return d


def write(store: str | Path, name: str, writer: str, rows: Iterable[Mapping[str, Any]]) -> None:
    """Atomically record one batch of rows (dicts with row, id and `FIELDS`)."""
    lines = []
    for r in rows:
        rec = {"row": int(r["row"]), "id": str(r["id"])}
        for k in FIELDS:
            v = r.get(k, "")
            rec[k] = None if isinstance(v, float) and math.isnan(v) else v
        lines.append(json.dumps(rec, ensure_ascii=False))
    if not lines:
        return
    d = root(store) / name
    _write_atomic(d / f"{writer}-{uuid.uuid4().hex[:12]}.jsonl", ("\n".join(lines) + "\n").encode())


def read(store: str | Path, name: str) -> dict[int, dict[str, Any]]:
    """Row -> record of set `name` (the union of its batch files)."""
    d = root(store) / name
    if not (d / "source.json").is_file():
        known = ", ".join(sets(store)) or "none"
        raise TranscriptError(f"{store}: no transcript set {name!r} (sets: {known})")
    return records(store, name)


def missing(store: str | Path, name: str, n: int) -> np.ndarray:
    """Rows 0..n-1 set `name` does not hold yet."""
    have = np.zeros(n, bool)
    have[list(read(store, name))] = True
    return np.flatnonzero(~have)


def read_corpus_transcripts(path: str | Path, ids: np.ndarray, paths: np.ndarray) -> dict[int, str]:
    """A corpus' own transcripts -> row -> text.

    A CSV with a header naming the utterance (`id`, `FileName` or `file`) and the text
    (`text`, `transcript` or `Transcript`), or a folder of `<id>.txt` / `<audio stem>.txt`
    (MSP-Podcast ships `Transcripts/<file stem>.txt`). Rows a file does not name stay missing.
    """
    path = Path(path)
    by_key: dict[str, int] = {}
    for i, (u, p) in enumerate(zip(ids, paths, strict=True)):
        by_key[str(u)] = i
        by_key[Path(str(p)).stem] = i
        by_key[Path(str(p)).name] = i
    out: dict[int, str] = {}
    if path.is_dir():
        for f in sorted(path.rglob("*.txt")):
            if f.stem in by_key:
                out[by_key[f.stem]] = " ".join(f.read_text(encoding="utf-8").split())
    elif path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            key = next((c for c in ("id", "FileName", "file") if c in cols), None)
            text = next((c for c in ("text", "transcript", "Transcript") if c in cols), None)
            if key is None or text is None:
                raise TranscriptError(
                    f"{path}: needs an id column (id, FileName or file) and a text column"
                    f" (text, transcript or Transcript); header is {cols}"
                )
            for rec in reader:
                k = str(rec[key])
                row = by_key.get(k, by_key.get(Path(k).stem))
                if row is not None:
                    out[row] = " ".join(str(rec[text] or "").split())
    else:
        raise TranscriptError(f"{path}: no such transcript file or folder")
    if not out:
        raise TranscriptError(f"{path}: names none of the store's {len(ids)} utterances")
    return out
