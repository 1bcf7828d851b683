"""A crash-safe HDF5 feature store: one corpus, pooled embeddings of any number of backbones.

Why a journal: HDF5 is not crash-safe, so a process killed mid-write can leave a file that no
longer opens. Here the main file `STORE` is never modified in place. Writers put every batch
into its own small file under `STORE.journal/`, written to a temporary name, fsynced and renamed
(an atomic step on POSIX). `finalize` writes a complete new main file beside the old one, renames
it over `STORE` and only then deletes the journal files it merged. A SIGKILL at any moment leaves
either the old or the new main file plus journal files that are merged again idempotently, and
readers always see main + journal. Writers of a multi-host job use distinct `writer_id`s and the
same journal; `finalize` merges all of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

SCHEMA_VERSION = 1
ATTRIBUTES = ("arousal", "valence", "dominance")
_STR = h5py.string_dtype("utf-8")
_FAILURE_DTYPE = np.dtype([("id", _STR), ("backbone", _STR), ("reason", _STR)])
_COPY_ROWS = 2048  # rows per chunk when copying features, so memory stays bounded


class StoreError(ValueError):
    """A store that cannot be used as asked; the message names the file and the reason."""


@dataclasses.dataclass(frozen=True)
class BackboneInfo:
    """What the store knows of one backbone's features."""

    name: str
    dim: int
    num_layers: int | None
    dtype: str
    attrs: dict[str, Any]


@dataclasses.dataclass
class Split:
    """Rows of one split (or the whole store) with features and labels aligned."""

    ids: np.ndarray  # (N,) str
    indices: np.ndarray  # (N,) int64 row numbers in the store
    features: dict[str, np.ndarray]  # name -> (N, D) or (N, L, D) float32
    labels: dict[str, np.ndarray]  # attribute -> (N,) float32, NaN unknown

    def __len__(self) -> int:
        return len(self.ids)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _journal(path: Path) -> Path:
    return path.with_name(path.name + ".journal")


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success fsync it and rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{uuid.uuid4().hex}-{final.name}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _write_json_atomic(final: Path, data: Any) -> None:
    with _atomic_path(final) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))


def _open_h5(path: Path) -> h5py.File:
    """Open an existing store read-only, or raise StoreError naming the file."""
    if not path.exists():
        raise StoreError(f"{path}: no such store")
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        raise StoreError(f"{path}: not an HDF5 file ({str(e).splitlines()[0]})") from None
    version = f.attrs.get("schema_version")
    if version is None or "utterances" not in f:
        f.close()
        raise StoreError(f"{path}: not a jax_ifmvse feature store (no schema_version/utterances)")
    if int(version) != SCHEMA_VERSION:
        f.close()
        raise StoreError(
            f"{path}: unknown store schema version {int(version)} (this code reads {SCHEMA_VERSION})"
        )
    return f


def _open_journal_file(p: Path) -> h5py.File:
    """Open one journal batch file; FileNotFoundError if a finalize removed it meanwhile."""
    try:
        return h5py.File(p, "r", locking=False)
    except FileNotFoundError:
        raise
    except OSError as e:
        # Unlinked between HDF5's stat and open, HDF5 reports "can't retrieve stat info", not
        # ENOENT; the rows are in the new main file by then, so the caller looks again.
        if not p.exists():
            raise FileNotFoundError(p) from None
        raise StoreError(f"{p}: unreadable journal file ({str(e).splitlines()[0]})") from None


def _strings(ds: h5py.Dataset) -> np.ndarray:
    return np.asarray(ds.asstr()[()], dtype=object).astype(str)


def create_store(
    path: str | Path,
    *,
    ids: Sequence[str],
    splits: Sequence[str],
    durations: Sequence[float],
    paths: Sequence[str],
    labels: Mapping[str, np.ndarray] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> None:
    """Create a store for a corpus; over an existing store with the same ids it does nothing."""
    path = Path(path)
    ids = [str(i) for i in ids]
    n = len(ids)
    if len(set(ids)) != n:
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise StoreError(f"{path}: duplicate utterance id {dup!r}")
    for name, col in (("splits", splits), ("durations", durations), ("paths", paths)):
        if len(col) != n:
            raise StoreError(f"{path}: {name} has {len(col)} rows, ids have {n}")
    labels = dict(labels or {})
    for k, v in labels.items():
        if k not in ATTRIBUTES:
            raise StoreError(f"{path}: unknown label {k!r} (known: {', '.join(ATTRIBUTES)})")
        if len(v) != n:
            raise StoreError(f"{path}: label {k} has {len(v)} rows, ids have {n}")
    if path.exists():
        with _open_h5(path) as f:
            existing = _strings(f["utterances/id"])
        if list(existing) != ids:
            extra = sorted(set(ids) - set(existing))[:3]
            gone = sorted(set(existing) - set(ids))[:3]
            raise StoreError(
                f"{path}: id set conflicts with the store's ({len(existing)} stored, {n} given;"
                f" new e.g. {extra}, absent e.g. {gone}); use another store path"
            )
        return
    with _atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["created"] = _now()
        for k, v in (attrs or {}).items():
            f.attrs[k] = v if isinstance(v, str | int | float | bool) else json.dumps(v)
        u = f.create_group("utterances")
        u.create_dataset("id", data=np.asarray(ids, dtype=object), dtype=_STR)
        u.create_dataset("split", data=np.asarray(list(splits), dtype=object), dtype=_STR)
        u.create_dataset("duration_s", data=np.asarray(durations, dtype=np.float32))
        u.create_dataset("path", data=np.asarray(list(paths), dtype=object), dtype=_STR)
        lab = f.create_group("labels")
        for k in ATTRIBUTES:
            v = labels.get(k)
            lab.create_dataset(
                k, data=np.full(n, np.nan, np.float32) if v is None else np.asarray(v, np.float32)
            )
        f.create_group("features")
        f.create_dataset("failures", shape=(0,), maxshape=(None,), dtype=_FAILURE_DTYPE)


class StoreWriter:
    """Appends one backbone's features to a store through atomic journal files."""

    def __init__(
        self,
        path: str | Path,
        backbone: str,
        *,
        dim: int,
        num_layers: int | None = None,
        dtype: str = "float32",
        attrs: Mapping[str, Any] | None = None,
        writer_id: str = "p0",
    ):
        self.path = Path(path)
        if dtype not in ("float32", "float16"):
            raise StoreError(f"{self.path}: dtype must be float32 or float16, got {dtype!r}")
        if not backbone or "/" in backbone or backbone.startswith("."):
            raise StoreError(f"{self.path}: bad backbone name {backbone!r}")
        store = FeatureStore(self.path)
        self.n = store.n
        self.ids = store.ids
        self.backbone = backbone
        self.dim, self.num_layers, self.dtype = int(dim), num_layers, dtype
        self.writer_id = writer_id
        known = store.backbones.get(backbone)
        if known is not None:
            if (known.dim, known.num_layers, known.dtype) != (self.dim, num_layers, dtype):
                raise StoreError(
                    f"{self.path}: backbone {backbone!r} is stored with width {known.dim}, layers "
                    f"{known.num_layers}, {known.dtype}; cannot append width {self.dim}, layers "
                    f"{num_layers}, {dtype}"
                )
        else:
            info = {
                "dim": self.dim,
                "num_layers": num_layers,
                "dtype": dtype,
                "attrs": {"created": _now(), **dict(attrs or {})},
            }
            _write_json_atomic(_journal(self.path) / "backbones" / f"{backbone}.json", info)
        self._dir = _journal(self.path) / "batches" / backbone
        self._count = 0

    def _name(self, kind: str) -> Path:
        self._count += 1
        return (
            self._dir
            / f"{self.writer_id}-{os.getpid()}-{self._count:07d}-{uuid.uuid4().hex[:8]}.{kind}"
        )

    def _check_indices(self, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise StoreError(f"{self.path}: row index out of range 0..{self.n - 1}")
        if len(np.unique(idx)) != len(idx):
            raise StoreError(f"{self.path}: repeated row index in one batch")
        return idx

    def write(
        self,
        indices: np.ndarray,
        pooled: np.ndarray,
        layers: np.ndarray | None = None,
        flags: Sequence[str] | None = None,
    ) -> None:
        """Atomically record features for rows `indices`: pooled (B, D), layers (B, L, D).

        `flags` gives one string per row: comma-separated names such as "silent", "short" or
        "cropped" ("" for none); they are kept per backbone and read back with `flags(name)`.
        """
        idx = self._check_indices(indices)
        if flags is not None:
            flags = [str(x) for x in flags]
            if len(flags) != len(idx):
                raise StoreError(f"{self.path}: {len(idx)} rows but {len(flags)} flags")
        pooled = np.asarray(pooled)
        if pooled.shape != (len(idx), self.dim):
            raise StoreError(
                f"{self.path}: pooled batch for {self.backbone!r} has shape {pooled.shape},"
                f" expected ({len(idx)}, {self.dim})"
            )
        if (layers is None) != (self.num_layers is None):
            raise StoreError(
                f"{self.path}: layers given/omitted inconsistently for {self.backbone!r}"
            )
        if layers is not None and np.shape(layers) != (len(idx), self.num_layers, self.dim):
            raise StoreError(
                f"{self.path}: layers batch has shape {np.shape(layers)}, expected"
                f" ({len(idx)}, {self.num_layers}, {self.dim})"
            )
        with _atomic_path(self._name("h5")) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("indices", data=idx)
            f.create_dataset("pooled", data=pooled.astype(self.dtype))
            if layers is not None:
                f.create_dataset("layers", data=np.asarray(layers).astype(self.dtype))
            if flags is not None:
                f.create_dataset("flags", data=np.asarray(flags, dtype=object), dtype=_STR)

    def fail(self, indices: np.ndarray, reasons: Sequence[str]) -> None:
        """Atomically record rows that could not be computed, with one reason each."""
        idx = self._check_indices(indices)
        if len(reasons) != len(idx):
            raise StoreError(f"{self.path}: {len(idx)} failed rows but {len(reasons)} reasons")
        rows = [[int(i), str(self.ids[i]), str(r)] for i, r in zip(idx, reasons)]
        _write_json_atomic(self._name("fail.json"), {"backbone": self.backbone, "rows": rows})

    def close(self) -> None:
        """Nothing is buffered: every write is already durable."""

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclasses.dataclass
class _Journal:
    """A listing of journal files taken at one moment."""

    backbones: dict[str, dict]
    batches: dict[str, list[Path]]
    failures: dict[str, list[Path]]

    @property
    def files(self) -> list[Path]:
        out = [p for ps in self.batches.values() for p in ps]
        return out + [p for ps in self.failures.values() for p in ps]


def _list_journal(path: Path) -> _Journal:
    root = _journal(path)
    backbones: dict[str, dict] = {}
    batches: dict[str, list[Path]] = {}
    failures: dict[str, list[Path]] = {}
    for p in sorted((root / "backbones").glob("[!.]*.json")):
        try:
            backbones[p.stem] = json.loads(p.read_text())
        except FileNotFoundError:
            continue  # merged into the main file by a finalize since the glob
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{p}: unreadable journal registration ({e})") from None
    bdir = root / "batches"
    if bdir.exists():
        for d in sorted(bdir.iterdir()):
            batches[d.name] = sorted(d.glob("[!.]*.h5"))
            failures[d.name] = sorted(d.glob("[!.]*.fail.json"))
    return _Journal(backbones, batches, failures)


class FeatureStore:
    """Read-only view of a store: the finalized file plus any unmerged journal files."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with _open_h5(self.path) as f:
            u = f["utterances"]
            self.ids = _strings(u["id"])
            self.splits = _strings(u["split"])
            self.durations = u["duration_s"][()].astype(np.float32)
            self.paths = _strings(u["path"])
            self.labels = {
                k: f["labels"][k][()].astype(np.float32) for k in ATTRIBUTES if k in f["labels"]
            }
            self.attrs = {k: _attr(v) for k, v in f.attrs.items()}
        self.n = len(self.ids)
        self._id_index: dict[str, int] | None = None

    # -- metadata -------------------------------------------------------------------------
    @property
    def backbones(self) -> dict[str, BackboneInfo]:
        """Every backbone the store holds or is being written."""
        out: dict[str, BackboneInfo] = {}
        # Journal first: finalize renames the new main file in before it deletes registrations,
        # so a backbone is in this listing or in the main file opened after it.
        pending = _list_journal(self.path).backbones
        with _open_h5(self.path) as f:
            for name, g in f["features"].items():
                layers = g["layers"].shape[1] if "layers" in g else None
                attrs = {k: _attr(v) for k, v in g.attrs.items()}
                out[name] = BackboneInfo(
                    name, int(g["pooled"].shape[1]), layers, str(g["pooled"].dtype), attrs
                )
        for name, info in pending.items():
            out.setdefault(
                name,
                BackboneInfo(name, info["dim"], info["num_layers"], info["dtype"], info["attrs"]),
            )
        return out

    @property
    def pending_journal_files(self) -> int:
        """Journal files not yet merged by `finalize`."""
        return len(_list_journal(self.path).files)

    def split_indices(self, split: str | None) -> np.ndarray:
        """Row numbers of a split (all rows for None), or StoreError if the split is unknown."""
        if split is None:
            return np.arange(self.n)
        idx = np.flatnonzero(self.splits == split)
        if idx.size == 0:
            known = sorted(set(self.splits.tolist()))
            raise StoreError(f"{self.path}: no rows in split {split!r} (splits: {known})")
        return idx

    def index_of(self, ids: Sequence[str]) -> np.ndarray:
        """Row numbers of the given ids, or StoreError naming the first unknown one."""
        if self._id_index is None:
            self._id_index = {u: i for i, u in enumerate(self.ids)}
        try:
            return np.asarray([self._id_index[str(u)] for u in ids], dtype=np.int64)
        except KeyError as e:
            raise StoreError(f"{self.path}: unknown utterance id {e.args[0]!r}") from None

    # -- state of rows -------------------------------------------------------------------
    def _state_in(
        self, f: h5py.File, journal: _Journal, name: str
    ) -> tuple[np.ndarray, dict[int, str]]:
        """(filled bool[N], {row: failure reason}) from an open main file and a journal listing."""
        filled = np.zeros(self.n, bool)
        failed: dict[int, str] = {}
        if name in f["features"]:
            filled |= f["features"][name]["filled"][()]
        for row in f["failures"][()]:
            if row["backbone"].decode() == name:
                failed[int(self.index_of([row["id"].decode()])[0])] = row["reason"].decode()
        for p in journal.batches.get(name, []):
            with _open_journal_file(p) as b:
                filled[b["indices"][()]] = True
        for p in journal.failures.get(name, []):
            for i, _id, reason in json.loads(p.read_text())["rows"]:
                failed[int(i)] = reason
        return filled, {i: r for i, r in failed.items() if not filled[i]}

    def _state(self, name: str) -> tuple[np.ndarray, dict[int, str]]:
        """(filled bool[N], {row: failure reason}) merged over main file and journal."""
        for _ in range(10):
            journal = _list_journal(self.path)
            try:
                with _open_h5(self.path) as f:
                    return self._state_in(f, journal, name)
            except FileNotFoundError:
                continue  # a finalize merged and removed journal files under us: look again
        raise StoreError(f"{self.path}: journal kept changing while reading; try again")

    def filled(self, name: str) -> np.ndarray:
        """bool[N]: rows whose features for `name` are stored."""
        return self._state(name)[0]

    def failed(self, name: str) -> np.ndarray:
        """bool[N]: rows recorded as failed for `name` (and not filled since)."""
        out = np.zeros(self.n, bool)
        out[list(self._state(name)[1])] = True
        return out

    def failures(self, name: str | None = None) -> list[tuple[str, str, str]]:
        """(id, backbone, reason) rows, for one backbone or all."""
        names = [name] if name else list(self.backbones)
        return [
            (str(self.ids[i]), b, r) for b in names for i, r in sorted(self._state(b)[1].items())
        ]

    def flags(self, name: str) -> np.ndarray:
        """(N,) str: comma-separated flags of each row for `name` ("" for none or not filled)."""
        for _ in range(10):
            journal = _list_journal(self.path)
            out = np.full(self.n, "", dtype=object)
            try:
                with _open_h5(self.path) as f:
                    g = f["features"].get(name)
                    if g is not None and "flags" in g:
                        out[:] = _strings(g["flags"])
                    for p in journal.batches.get(name, []):
                        with _open_journal_file(p) as b:
                            if "flags" in b:
                                out[b["indices"][()]] = _strings(b["flags"])
                return out.astype(str)
            except FileNotFoundError:
                continue
        raise StoreError(f"{self.path}: journal kept changing while reading; try again")

    def missing(self, name: str) -> np.ndarray:
        """Row numbers neither filled nor failed for `name` (what a resumed job must compute)."""
        filled, failed = self._state(name)
        todo = ~filled
        todo[list(failed)] = False
        return np.flatnonzero(todo)

    # -- features ------------------------------------------------------------------------
    def _read(self, name: str, rows: np.ndarray, layers: bool) -> tuple[np.ndarray, np.ndarray]:
        """Features of `rows` (sorted) for one backbone and a bool mask of which were filled."""
        info = self.backbones.get(name)
        if info is None:
            raise StoreError(f"{self.path}: no backbone {name!r} (has: {sorted(self.backbones)})")
        if layers and info.num_layers is None:
            raise StoreError(f"{self.path}: backbone {name!r} was stored without layers")
        key = "layers" if layers else "pooled"
        shape = (len(rows), info.num_layers, info.dim) if layers else (len(rows), info.dim)
        pos = np.full(self.n, -1, np.int64)
        pos[rows] = np.arange(len(rows))
        for _ in range(10):
            journal = _list_journal(self.path)
            out = np.zeros(shape, np.float32)
            have = np.zeros(len(rows), bool)
            try:
                with _open_h5(self.path) as f:
                    if name in f["features"]:
                        g = f["features"][name]
                        filled = g["filled"][()]
                        for s in range(0, len(rows), _COPY_ROWS):
                            r = rows[s : s + _COPY_ROWS]
                            lo, hi = int(r[0]), int(r[-1]) + 1
                            block = g[key][lo:hi]  # contiguous read, then pick rows in memory
                            out[s : s + len(r)] = block[r - lo]
                            have[s : s + len(r)] = filled[r]
                for p in journal.batches.get(name, []):
                    with _open_journal_file(p) as b:
                        bi = b["indices"][()]
                        sel = pos[bi] >= 0
                        if sel.any():
                            out[pos[bi[sel]]] = b[key][()][sel]
                            have[pos[bi[sel]]] = True
                return out, have
            except FileNotFoundError:
                continue
        raise StoreError(f"{self.path}: journal kept changing while reading; try again")

    def load(self, split: str | None, backbones: Sequence[str], layers: bool = False) -> Split:
        """Load a split into memory; only rows filled for every requested backbone are kept."""
        rows = np.sort(self.split_indices(split))
        feats: dict[str, np.ndarray] = {}
        keep = np.ones(len(rows), bool)
        for name in backbones:
            feats[name], have = self._read(name, rows, layers)
            keep &= have
        return Split(
            ids=self.ids[rows[keep]],
            indices=rows[keep],
            features={k: v[keep] for k, v in feats.items()},
            labels={k: v[rows[keep]] for k, v in self.labels.items()},
        )

    def iter_batches(
        self, split: str | None, backbones: Sequence[str], batch_size: int, layers: bool = False
    ) -> Iterator[Split]:
        """Iterate over a split in batches of rows (memory bounded by the batch size)."""
        rows = np.sort(self.split_indices(split))
        for s in range(0, len(rows), batch_size):
            r = rows[s : s + batch_size]
            feats, keep = {}, np.ones(len(r), bool)
            for name in backbones:
                feats[name], have = self._read(name, r, layers)
                keep &= have
            yield Split(
                self.ids[r[keep]],
                r[keep],
                {k: v[keep] for k, v in feats.items()},
                {k: v[r[keep]] for k, v in self.labels.items()},
            )


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str) and v[:1] in "{[":
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(v)
    if isinstance(v, np.generic):
        return v.item()
    return v


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock so two finalizers never race (released if the process dies)."""
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def finalize(path: str | Path) -> int:
    """Merge every journal file into the main HDF5 file atomically; returns files merged."""
    path = Path(path)
    with _lock(path):
        journal = _list_journal(path)
        store = FeatureStore(path)
        if not journal.files and not (set(journal.backbones) - set(_main_backbones(path))):
            _cleanup_tmp(path)
            return 0
        with _open_h5(path) as src, _atomic_path(path) as tmp, h5py.File(tmp, "w") as dst:
            for k, v in src.attrs.items():
                dst.attrs[k] = v
            src.copy(src["utterances"], dst, "utterances")
            src.copy(src["labels"], dst, "labels")
            feats = dst.create_group("features")
            names = sorted(set(src["features"]) | set(journal.backbones))
            failures: list[tuple[str, str, str]] = []
            for name in names:
                filled, failed = store._state_in(src, journal, name)
                if name in src["features"]:
                    g_src = src["features"][name]
                    g = feats.create_group(name)
                    for k, v in g_src.attrs.items():
                        g.attrs[k] = v
                    for key in ("pooled", "layers"):
                        if key in g_src:
                            ds = g.create_dataset(
                                key, shape=g_src[key].shape, dtype=g_src[key].dtype, chunks=True
                            )
                            for s in range(0, store.n, _COPY_ROWS):
                                ds[s : s + _COPY_ROWS] = g_src[key][s : s + _COPY_ROWS]
                else:
                    info = journal.backbones[name]
                    g = feats.create_group(name)
                    for k, v in {
                        **info["attrs"],
                        "dtype": info["dtype"],
                        "pooling": info["attrs"].get("pooling", "mean over valid frames"),
                    }.items():
                        g.attrs[k] = v if isinstance(v, str | int | float | bool) else json.dumps(v)
                    g.create_dataset(
                        "pooled", shape=(store.n, info["dim"]), dtype=info["dtype"], chunks=True
                    )
                    if info["num_layers"] is not None:
                        g.create_dataset(
                            "layers",
                            shape=(store.n, info["num_layers"], info["dim"]),
                            dtype=info["dtype"],
                            chunks=True,
                        )
                flags = (
                    _strings(g_src["flags"]).astype(object)
                    if name in src["features"] and "flags" in src["features"][name]
                    else np.full(store.n, "", dtype=object)
                )
                for p in journal.batches.get(name, []):
                    with _open_journal_file(p) as b:
                        idx = b["indices"][()]
                        order = np.argsort(idx)
                        for key in ("pooled", "layers"):
                            if key in b:
                                g[key][idx[order]] = b[key][()][order]
                        if "flags" in b:
                            flags[idx] = _strings(b["flags"])
                g.create_dataset("filled", data=filled)
                g.create_dataset("flags", data=flags, dtype=_STR)
                failures += [(str(store.ids[i]), name, r) for i, r in sorted(failed.items())]
            fails = (
                np.array(failures, dtype=_FAILURE_DTYPE)
                if failures
                else np.zeros(0, _FAILURE_DTYPE)
            )
            dst.create_dataset("failures", data=fails, maxshape=(None,), chunks=True)
            dst.attrs["finalized"] = _now()
        # The new main file is in place; the merged journal files are now redundant.
        for p in journal.files:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        for name in journal.backbones:  # merged into the main file's /features
            with contextlib.suppress(FileNotFoundError):
                (_journal(path) / "backbones" / f"{name}.json").unlink()
        _cleanup_tmp(path)
        return len(journal.files)


def _main_backbones(path: Path) -> list[str]:
    with _open_h5(path) as f:
        return list(f["features"])


def _cleanup_tmp(path: Path, min_age_s: float = 600.0) -> None:
    """Remove temporaries left by killed writers (never a finished journal file).

    Journal temporaries younger than `min_age_s` may belong to a live writer, so they stay; the
    main file's temporaries are only ever made under the finalize lock we hold.
    """
    root = _journal(path)
    now = time.time()
    for p in list(root.rglob(".tmp-*")) if root.exists() else []:
        with contextlib.suppress(FileNotFoundError):
            if now - p.stat().st_mtime > min_age_s:
                p.unlink()
    for p in path.parent.glob(f".tmp-*-{path.name}"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
