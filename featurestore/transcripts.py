"""Plain reader of the transcript sets beside a store (numpy and json only).

`STORE.transcripts/<name>/source.json` records where a set comes from; `*.jsonl` batch files
hold one JSON line per row (row, id, text, language, avg_logprob, no_speech_prob, flags), each
file written whole and renamed by `jax_ifmvse.text.transcripts`, named after its writer
(`shardKofN-...` for shard K of N). Readers take the union, later files winning.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_SHARD_WRITER = re.compile(r"^shard(\d+)of(\d+)-")


def root(store: str | Path) -> Path:
    """The folder holding a store's transcript sets."""
    store = Path(store)
    return store.with_name(store.name + ".transcripts")


def sets(store: str | Path) -> dict[str, dict[str, Any]]:
    """Every transcript set of a store: name -> its source record."""
    base = root(store)
    if not base.is_dir():
        return {}
    return {
        d.name: json.loads((d / "source.json").read_text())
        for d in sorted(base.iterdir())
        if (d / "source.json").is_file()
    }


def records(store: str | Path, name: str) -> dict[int, dict[str, Any]]:
    """Row -> record of set `name` (the union of its batch files; {} for no batch yet)."""
    out: dict[int, dict[str, Any]] = {}
    for p in sorted((root(store) / name).glob("*.jsonl")):
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                out[int(rec["row"])] = rec
    return out


def writer_shards(store: str | Path, name: str) -> int | None:
    """N of the `shardKofN` writers of set `name` (None: no sharded writer, or mixed N)."""
    seen = {
        int(m.group(2))
        for p in (root(store) / name).glob("*.jsonl")
        if (m := _SHARD_WRITER.match(p.name))
    }
    return seen.pop() if len(seen) == 1 else None


def is_failed(rec: dict[str, Any]) -> bool:
    """Whether a record says its row could not be transcribed (flags "failed: reason")."""
    return str(rec.get("flags") or "").startswith("failed")
