"""A run directory: the settings check of a rerun, atomic JSON writes, the complete flag and
its one reader (`read_finished`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flax.traverse_util import flatten_dict

from jax_ifmvse.config import same_settings
from jax_ifmvse.errors import RunError


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    """Write one JSON object per line, atomically."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON object as a line."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def changed_settings(old: Any, new: dict, default: dict) -> list[str]:
    """What differs between a recorded fingerprint and `new` ("key old -> new"; [] when
    `config.same_settings` holds: a key added since, at its default, is no change)."""
    if isinstance(old, dict) and same_settings(old, new, default):
        return []
    before = flatten_dict(old, sep=".") if isinstance(old, dict) and old else {}
    now = flatten_dict(new, sep=".")
    base = flatten_dict(default, sep=".") if default else {}
    was = {k: before.get(k, base.get(k)) for k in sorted(set(before) | set(now))}
    diff = [f"{k} {v!r} -> {now.get(k)!r}" for k, v in was.items() if v != now.get(k)]
    return diff or ["(structure)"]


def check_rerun(
    manifest_path: str | Path,
    fingerprint: dict,
    default: dict,
    error: type[Exception],
    *,
    key: str | None = None,
) -> None:
    """Refuse to resume into a RUN/ whose manifest records other settings.

    The recorded fingerprint is `manifest[key]`, or without `key` the manifest's entries named by
    `fingerprint`'s keys; `default` is the fingerprint of the default config (see `same_settings`).
    """
    path = Path(manifest_path)
    if not path.exists():
        return
    old = json.loads(path.read_text())
    recorded = old.get(key, {}) if key else {k: old.get(k) for k in fingerprint}
    diff = changed_settings(recorded, fingerprint, default)
    if diff:
        raise error(
            f"{path}: this RUN/ was made from another store or config, with other settings "
            f"({'; '.join(diff[:3])}); use another --out or the same settings"
        )


def mark_complete(manifest_path: str | Path, manifest: dict, **fields: Any) -> dict:
    """Set `complete` (and `fields`) in the manifest and write it: the run's last write."""
    manifest.update(complete=True, **fields)
    write_json(manifest_path, manifest)
    return manifest


def read_finished(run: str | Path, manifest: str, command: str) -> dict:
    """RUN/`manifest` of a finished `ifmvse <command>` run; a `RunError` naming the file, what
    is wrong and the one fix (run the command into this RUN/: it resumes) otherwise."""
    path = Path(run) / manifest
    advice = f"run `ifmvse {command} --out {run}` with its config to make or finish it"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: not found, not an `ifmvse {command}` RUN/; {advice}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: unreadable ({type(e).__name__}); {advice}") from None
    if not isinstance(data, dict) or not data.get("complete"):
        raise RunError(f"{path}: the run is not finished; {advice}")
    return data
