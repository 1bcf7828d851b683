"""A crash-safe HDF5 feature store: one corpus, pooled (and layered) embeddings of many backbones.

Layout (schema 2), as plain h5py sees it through `STORE`:
  /utterances/{id,split,duration_s,path,row}  (N,) rows grouped by split (Train, Development,
                                              Test1.. first), so a split is one contiguous range;
                                              `row` is the row number the API uses (the order
                                              `create_store` was given)
  /labels/{arousal,valence,dominance}         (N,) float32, NaN unknown
  /labels/{EmoClass,Gender}                   (N,) str, "" unknown (stores made before task 1
                                              lack them: `set_codes` adds them in place)
  /features/<backbone>/pooled                 (N, D)    external link into STORE.features/<b>.h5
  /features/<backbone>/layers                 (N, L, D) (when stored) ditto
  /features/<backbone>/{filled,flags,norm}    (N,) bool / str / float32 (pooled L2 norm, NaN rows)
  /failures                                   (id, backbone, reason) rows

Why this shape: the main file is small (ids, labels, per-row state) and is only ever replaced by
an atomic rename. Each backbone's features live in their own file with contiguous, preallocated
datasets, created once by an atomic rename and afterwards written only at the rows being merged
(plain `pwrite`s into the dataset's bytes; HDF5 metadata is never touched again), so a merge
costs what its rows cost and nothing else is rewritten.

Why a journal: HDF5 is not crash-safe. Writers put every batch into its own small file under
`STORE.journal/` (a raw binary record, written to a temporary name, fsynced, renamed). `finalize`
writes the journal rows into the backbone files, fsyncs them, renames a new main file (marking
those rows filled) over `STORE`, and only then deletes the journal files it merged. A SIGKILL at
any moment leaves the old or the new main file; rows a killed merge may have half-written are
still in the journal, which readers lay over the backbone files and the next finalize merges
again, idempotently. Readers always see main + journal. Writers of a multi-host job use distinct
`writer_id`s and the same journal; `finalize` merges all of them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime as _dt
import fcntl
import json
import os
import struct
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

SCHEMA_VERSION = 3
READ_VERSIONS = (2, 3)  # schema 2 (per-row state inside the main file) is read; finalize migrates
ATTRIBUTES = ("arousal", "valence", "dominance")
# Per-utterance string labels of labels_consensus.csv: the task 1 class code and the gender.
CODE_LABELS = ("EmoClass", "Gender")
# The challenge's splits in pipeline order (jax_ifmvse.data.corpus uses these names too); any
# other split name follows, alphabetically. Rows are stored in this order.
SPLIT_ORDER = ("Train", "Development", "Test1", "Test2", "Test3")
_STR = h5py.string_dtype("utf-8")
_FAILURE_DTYPE = np.dtype([("id", _STR), ("backbone", _STR), ("reason", _STR)])
_FLAG_BYTES = 64  # a row's comma-separated flags, utf-8, fixed width (written in place)
_READ_BYTES = 64 << 20  # largest single read or write, and the temporary buffer it may need
_PARALLEL_BYTES = 8 << 20  # piece of a large read given to one reader thread
_READ_THREADS = 8  # most reader threads of one large read (fewer when cores are busy)
_MERGE_BYTES = 128 << 20  # journal rows held in memory at once by finalize
_IOV_MAX = 1024  # buffers per vectored write (Linux's IOV_MAX)
_MAGIC = b"IFMVSEJ2"  # journal batch file: magic, u64 header length, JSON header, arrays
_STRUCT_ATTRS = ("dim", "num_layers")  # kept on /features/<b> for readers, not user attrs


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
    features: dict[str, np.ndarray]  # name -> (N, D) or (N, L, D), float32 unless dtype= asked
    labels: dict[str, np.ndarray]  # attribute -> (N,) float32, NaN unknown

    def __len__(self) -> int:
        return len(self.ids)


def split_order(name: str) -> tuple[int, str]:
    """Sort key: Train, Development, Test1..3 first, then other names alphabetically."""
    return (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER), name)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _journal(path: Path) -> Path:
    return path.with_name(path.name + ".journal")


def _data_dir(path: Path) -> Path:
    return path.with_name(path.name + ".features")


def _data_path(path: Path, name: str) -> Path:
    return _data_dir(path) / f"{name}.h5"


def _state_path(path: Path, name: str) -> Path:
    return _data_dir(path) / f"{name}.state.h5"


def _failures_path(path: Path) -> Path:
    return _data_dir(path) / "failures.h5"


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


def _open_h5(path: Path, versions: tuple[int, ...] = READ_VERSIONS) -> h5py.File:
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
    if int(version) not in versions:
        f.close()
        if int(version) < min(versions):
            raise StoreError(
                f"{path}: store schema version {int(version)} (this code reads {SCHEMA_VERSION});"
                f" upgrade it in place with `ifmvse store upgrade {path}`"
            )
        raise StoreError(
            f"{path}: unknown store schema version {int(version)} (this code reads {SCHEMA_VERSION})"
        )
    return f


def _strings(ds: h5py.Dataset) -> np.ndarray:
    return np.asarray(ds.asstr()[()], dtype=object).astype(str)


def _strings_at(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Strings of a string dataset at increasing `rows` only (the rest is not decoded)."""
    if len(rows) == 0:
        return np.zeros(0, object)
    return np.asarray(ds.asstr()[rows], dtype=object)


def _attr_value(v: Any) -> Any:
    return v if isinstance(v, str | int | float | bool) else json.dumps(v)


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str) and v[:1] in "{[":
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(v)
    if isinstance(v, np.generic):
        return v.item()
    return v


def _row_norms(pooled: np.ndarray) -> np.ndarray:
    """(B,) float32 L2 norm of each pooled row, NaN where the row holds a NaN."""
    return np.linalg.norm(np.asarray(pooled, np.float32), axis=-1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Raw reads and writes of whole rows (or one layer of rows) of a contiguous dataset.


def _bytes_of(a: np.ndarray) -> memoryview:
    """A flat byte view of a C-contiguous array (empty arrays included)."""
    if not a.flags.c_contiguous:  # reshape would copy: reads would land in the copy
        raise ValueError("byte view of a non-contiguous array")
    return memoryview(a.reshape(-1).view(np.uint8))


def _pread_into(fd: int, buf: np.ndarray, offset: int, where: Path) -> None:
    mv = _bytes_of(buf)
    done = 0
    while done < len(mv):
        got = os.preadv(fd, [mv[done:]], offset + done)
        if got <= 0:
            raise StoreError(f"{where}: file is truncated (read past its end)")
        done += got


def _pwrite_all(fd: int, buf: np.ndarray, offset: int) -> None:
    mv = _bytes_of(np.ascontiguousarray(buf))
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)


def _runs(pos: np.ndarray, max_rows: int) -> list[tuple[int, int]]:
    """[a, b) ranges of `pos` (sorted) whose values are consecutive, at most max_rows long."""
    if len(pos) == 0:
        return []
    breaks = np.flatnonzero(np.diff(pos) != 1) + 1
    out = []
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(pos)]):
        for s in range(int(a), int(b), max_rows):
            out.append((s, min(int(b), s + max_rows)))
    return out


def _free_cores() -> int:
    """Reader threads for one large read: the cores this process may use that the last
    minute's load left idle, at most _READ_THREADS."""
    cores = len(os.sched_getaffinity(0))
    return max(1, min(_READ_THREADS, int(cores - os.getloadavg()[0])))


def _gather(
    fd: int,
    where: Path,
    base: int,
    row_shape: tuple[int, ...],
    stored: np.dtype,
    pos: np.ndarray,
    out: np.ndarray,
    dest: np.ndarray,
    layer: int | None = None,
) -> None:
    """out[dest[k]] = dataset row pos[k] (or its `layer`), reading each needed byte once."""
    rowbytes = int(np.prod(row_shape)) * stored.itemsize
    if layer is not None:  # one (D,) slice per row: one small read each
        d = row_shape[-1]
        skip = layer * d * stored.itemsize
        order = np.argsort(pos, kind="stable")
        for s in range(0, len(order), 4096):
            k = order[s : s + 4096]
            buf = np.empty((len(k), d), stored)
            for j, p in enumerate(pos[k]):
                _pread_into(fd, buf[j], base + int(p) * rowbytes + skip, where)
            out[dest[k]] = buf
        return
    order = np.argsort(pos, kind="stable")
    sp, sd = pos[order], dest[order]

    def one(a: int, b: int) -> None:
        d0 = int(sd[a])
        direct = (
            out.dtype == stored
            and int(sd[b - 1]) - d0 == b - a - 1
            and (b - a == 1 or bool((np.diff(sd[a:b]) == 1).all()))
        )
        if direct:  # straight into the caller's array: no second copy
            _pread_into(fd, out[d0 : d0 + b - a], base + int(sp[a]) * rowbytes, where)
        else:
            buf = np.empty((b - a, *row_shape), stored)
            _pread_into(fd, buf, base + int(sp[a]) * rowbytes, where)
            out[sd[a:b]] = buf

    threads = _free_cores()
    if len(pos) * rowbytes < 2 * _PARALLEL_BYTES or threads < 2:
        for a, b in _runs(sp, max(1, _READ_BYTES // max(rowbytes, 1))):
            one(a, b)
        return
    runs = _runs(sp, max(1, _PARALLEL_BYTES // max(rowbytes, 1)))
    # Large reads in parallel pieces when cores are free: preadv releases the GIL, and the
    # kernel's copy and page faults into `out` then run on those cores (h5py reads on one). On
    # busy cores the threads only contend (measured 15 % slower at load 9 on 2 cores).
    with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        for f in [ex.submit(one, a, b) for a, b in runs]:
            f.result()


# ---------------------------------------------------------------------------------------------
# Journal batch files.


@dataclasses.dataclass
class _Batch:
    """One journal batch file: its row numbers and where its arrays lie in the file."""

    path: Path
    indices: np.ndarray  # (B,) API row numbers
    norms: np.ndarray  # (B,) float32
    flags: list[str] | None
    dim: int
    num_layers: int | None
    dtype: np.dtype
    offsets: dict[str, int]  # "pooled"/"layers" -> byte offset (raw files)
    arrays: dict[str, np.ndarray] | None = None  # schema-1 .h5 batch files, read whole

    def row_shape(self, key: str) -> tuple[int, ...]:
        return (self.dim,) if key == "pooled" else (int(self.num_layers or 0), self.dim)

    def read(
        self, key: str, sel: np.ndarray, out: np.ndarray, dest: np.ndarray, layer: int | None
    ) -> None:
        """out[dest] = this file's rows at positions `sel` of `key` (or their `layer`)."""
        if self.arrays is not None:
            x = self.arrays[key][sel]
            out[dest] = x if layer is None else x[:, layer]
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise
        try:
            _gather(
                fd, self.path, self.offsets[key], self.row_shape(key), self.dtype, sel, out,
                dest, layer,
            )  # fmt: skip
        finally:
            os.close(fd)


def _write_batch(
    final: Path,
    indices: np.ndarray,
    pooled: np.ndarray,
    layers: np.ndarray | None,
    flags: list[str] | None,
) -> None:
    header = json.dumps(
        {
            "rows": len(indices),
            "dim": int(pooled.shape[1]),
            "num_layers": None if layers is None else int(layers.shape[1]),
            "dtype": str(pooled.dtype),
            "flags": flags,
        }
    ).encode()
    with _atomic_path(final) as tmp, open(tmp, "wb") as f:
        f.write(_MAGIC + struct.pack("<Q", len(header)) + header)
        f.write(np.ascontiguousarray(indices, np.int64).tobytes())
        f.write(_row_norms(pooled).tobytes())
        f.write(np.ascontiguousarray(pooled).tobytes())
        if layers is not None:
            f.write(np.ascontiguousarray(layers).tobytes())


def _read_batch(p: Path, whole: bool = False) -> _Batch:
    """A journal batch's header and row numbers (with `whole`, its arrays too, in one read);
    FileNotFoundError if a finalize removed it."""
    if p.suffix == ".h5":
        return _read_batch_v1(p)
    try:
        with open(p, "rb") as f:
            data = f.read() if whole else f.read(16)
            if len(data) < 16 or data[:8] != _MAGIC:
                raise StoreError(f"{p}: unreadable journal file (not a journal batch)")
            (hlen,) = struct.unpack("<Q", data[8:16])
            if not whole:
                data += f.read(hlen)
            h = json.loads(data[16 : 16 + hlen])
            n = int(h["rows"])
            if not whole:
                data += f.read(12 * n)
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError, struct.error) as e:
        raise StoreError(f"{p}: unreadable journal file ({type(e).__name__})") from None
    start = 16 + hlen + 12 * n
    if len(data) < start:
        raise StoreError(f"{p}: unreadable journal file (truncated)")
    dtype = np.dtype(h["dtype"])
    dim, layers = int(h["dim"]), h["num_layers"]
    arrays = None
    if whole:
        arrays, at = {}, start
        for key, shape in (("pooled", (n, dim)), ("layers", (n, layers or 0, dim))):
            if key == "layers" and layers is None:
                break
            count = int(np.prod(shape))
            if len(data) < at + count * dtype.itemsize:
                raise StoreError(f"{p}: unreadable journal file (truncated)")
            arrays[key] = np.frombuffer(data, dtype, count, at).reshape(shape)
            at += count * dtype.itemsize
    return _Batch(
        p,
        np.frombuffer(data, np.int64, n, 16 + hlen),
        np.frombuffer(data, np.float32, n, 16 + hlen + 8 * n),
        h["flags"],
        dim,
        layers,
        dtype,
        {"pooled": start, "layers": start + n * dim * dtype.itemsize},
        arrays,
    )


def _read_batch_v1(p: Path) -> _Batch:
    """A schema-1 journal batch (.h5), still merged after `ifmvse store upgrade`."""
    try:
        f = h5py.File(p, "r", locking=False)
    except FileNotFoundError:
        raise
    except OSError as e:
        # Unlinked between HDF5's stat and open, HDF5 reports "can't retrieve stat info", not
        # ENOENT; the rows are in the new main file by then, so the caller looks again.
        if not p.exists():
            raise FileNotFoundError(p) from None
        raise StoreError(f"{p}: unreadable journal file ({str(e).splitlines()[0]})") from None
    with f:
        arrays = {k: f[k][()] for k in ("pooled", "layers") if k in f}
        flags = _strings(f["flags"]).tolist() if "flags" in f else None
        idx = f["indices"][()].astype(np.int64)
    pooled = arrays["pooled"]
    layers = arrays.get("layers")
    return _Batch(
        p,
        idx,
        _row_norms(pooled),
        flags,
        pooled.shape[1],
        None if layers is None else layers.shape[1],
        pooled.dtype,
        {},
        arrays,
    )


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
            names = [e.name for e in os.scandir(d) if not e.name.startswith(".")]
            # Writer names sort in write order, so a row written twice keeps its last value.
            batches[d.name] = [d / x for x in sorted(names) if x.endswith((".rows", ".h5"))]
            failures[d.name] = [d / x for x in sorted(names) if x.endswith(".fail.json")]
    return _Journal(backbones, batches, failures)


# ---------------------------------------------------------------------------------------------
# The main file.


def _write_main(
    tmp: Path,
    *,
    attrs: Mapping[str, Any],
    utterances: Mapping[str, np.ndarray] | None = None,
    labels: Mapping[str, np.ndarray] | None = None,
    copy_from: h5py.File | None = None,
    features: Mapping[str, Mapping[str, Any]] | None = None,
    data_prefix: str = "",
) -> None:
    """Write a complete main file at `tmp` (rows in storage order): tables, and per backbone its
    attrs and external links into its data and state files (`features`: name -> {attrs, dim,
    num_layers}); /failures links to the store's failures file."""
    with h5py.File(tmp, "w") as f:
        for k, v in attrs.items():
            f.attrs[k] = v
        if copy_from is not None:  # unchanged tables: HDF5's own object copy
            copy_from.copy(copy_from["utterances"], f, "utterances")
            copy_from.copy(copy_from["labels"], f, "labels")
        else:
            u = f.create_group("utterances")
            for k, v in (utterances or {}).items():
                if v.dtype.kind in "OUS":
                    u.create_dataset(k, data=np.asarray(v, dtype=object), dtype=_STR)
                else:
                    u.create_dataset(k, data=v)
            lab = f.create_group("labels")
            for k, v in (labels or {}).items():
                if np.asarray(v).dtype.kind in "OUS":  # CODE_LABELS
                    lab.create_dataset(k, data=np.asarray(v, dtype=object), dtype=_STR)
                else:
                    lab.create_dataset(k, data=np.asarray(v, np.float32))
        feats = f.create_group("features")
        for name, b in (features or {}).items():
            g = feats.create_group(name)
            for k, v in b["attrs"].items():
                if k not in _STRUCT_ATTRS:
                    g.attrs[k] = _attr_value(v)
            g.attrs["dim"] = int(b["dim"])
            g.attrs["num_layers"] = -1 if b["num_layers"] is None else int(b["num_layers"])
            for key in ("pooled", "layers") if b["num_layers"] is not None else ("pooled",):
                g[key] = h5py.ExternalLink(f"{data_prefix}{name}.h5", f"/{key}")
            for key in _STATE_KEYS:
                g[key] = h5py.ExternalLink(f"{data_prefix}{name}.state.h5", f"/{key}")
        f["failures"] = h5py.ExternalLink(f"{data_prefix}failures.h5", "/failures")


# Per-row state of a backbone, in STORE.features/<b>.state.h5: contiguous, preallocated, written
# in place at the rows a finalize merges (like the features), so a finalize costs its rows.
_STATE_KEYS = ("filled", "norm", "flags")
_STATE_DTYPES = {
    "filled": np.dtype(np.uint8),
    "norm": np.dtype("<f4"),
    "flags": np.dtype(f"S{_FLAG_BYTES}"),
}


def _encode_flags(flags: Sequence[str], where: Path) -> np.ndarray:
    """Flags as fixed-width utf-8 bytes, or StoreError for one that does not fit."""
    out = np.asarray([str(x).encode() for x in flags], dtype=f"S{_FLAG_BYTES}")
    for x in flags:
        if len(str(x).encode()) > _FLAG_BYTES:
            raise StoreError(f"{where}: flags {x!r} longer than {_FLAG_BYTES} bytes")
    return out


def _write_state_file(
    final: Path,
    n: int,
    filled: np.ndarray | None = None,
    norm: np.ndarray | None = None,
    flags: np.ndarray | None = None,
) -> None:
    """A backbone's state file created whole by an atomic rename (storage order; None: empty)."""
    with _atomic_path(final) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        for key, value in (("filled", filled), ("norm", norm), ("flags", flags)):
            dt = _STATE_DTYPES[key]
            if key == "filled":  # h5py's bool (an int8 enum): plain readers get bool back
                dt = np.dtype(bool)
            elif key == "flags":
                dt = h5py.string_dtype("utf-8", _FLAG_BYTES)
            ds = f.create_dataset(key, shape=(n,), dtype=dt, dcpl=dcpl)
            if value is None:
                value = np.full(n, np.nan, "<f4") if key == "norm" else np.zeros(n, dt)
            if key == "flags":  # utf-8 bytes as they are (h5py converts only ascii from "S")
                buf = np.ascontiguousarray(value, _STATE_DTYPES[key])
                ds.id.write(h5py.h5s.ALL, h5py.h5s.ALL, buf, mtype=ds.id.get_type())
            else:
                ds[...] = value


def _state_offsets(path: Path, name: str) -> dict[str, int]:
    with h5py.File(_state_path(path, name), "r", locking=False) as f:
        return {k: int(f[k].id.get_offset()) for k in _STATE_KEYS}


def _write_state_rows(path: Path, name: str, state: Mapping[str, list[np.ndarray]]) -> None:
    """Mark the storage rows `state["pos"]` filled with their norms, and `state["flag_pos"]`
    with their flags, in place in the backbone's state file (later entries win); fsynced."""
    cols = []
    if state["pos"]:
        pos = np.concatenate(state["pos"])
        cols.append(("filled", pos, np.ones(len(pos), np.uint8)))
        cols.append(("norm", pos, np.concatenate(state["norm"]).astype("<f4")))
    if state["flag_pos"]:
        cols.append(("flags", np.concatenate(state["flag_pos"]), np.concatenate(state["flags"])))
    if not cols:
        return
    offsets = _state_offsets(path, name)
    fd = os.open(_state_path(path, name), os.O_WRONLY)
    try:
        for key, pos, col in cols:
            order = np.argsort(pos, kind="stable")  # equal rows keep journal order: last wins
            pos, col = pos[order], np.ascontiguousarray(col[order])
            size = _STATE_DTYPES[key].itemsize
            for a, b in _runs(pos, max(1, _READ_BYTES // size)):
                _pwrite_all(fd, col[a:b], offsets[key] + int(pos[a]) * size)
        os.fdatasync(fd)  # in place: the data (and block maps), not the mtime
    finally:
        os.close(fd)


def _write_failures(path: Path, failures: Sequence[tuple[str, str, str]]) -> None:
    """The store's failure records, (id, backbone, reason) rows, by an atomic rename."""
    rows = (
        np.array(list(failures), dtype=_FAILURE_DTYPE) if failures else np.zeros(0, _FAILURE_DTYPE)
    )
    with _atomic_path(_failures_path(path)) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("failures", data=rows, maxshape=(None,), chunks=True)


def _storage_order(splits: Sequence[str]) -> np.ndarray:
    """API row of each storage row: rows grouped by split in pipeline order, stable within."""
    keys = sorted(set(splits), key=split_order)
    rank = {s: i for i, s in enumerate(keys)}
    return np.argsort(np.asarray([rank[s] for s in splits], np.int64), kind="stable")


def create_store(
    path: str | Path,
    *,
    ids: Sequence[str],
    splits: Sequence[str],
    durations: Sequence[float],
    paths: Sequence[str],
    labels: Mapping[str, np.ndarray] | None = None,
    attrs: Mapping[str, Any] | None = None,
    codes: Mapping[str, Sequence[str | None]] | None = None,
) -> None:
    """Create a store for a corpus; over an existing store with the same ids it does nothing.

    `codes` are string labels per row (`CODE_LABELS`: EmoClass, Gender; None or "" = unknown).
    """
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
    codes = _check_codes(path, codes, n)
    if not path.exists():
        # Under the store's lock: shards started at the same moment on a store that does not
        # exist yet race here, and exactly one creates it (a second rename over a store that
        # already took a finalize would drop what it merged).
        path.parent.mkdir(parents=True, exist_ok=True)
        with _lock(path):
            if not path.exists():
                _write_new_main(path, ids, splits, durations, paths, labels, attrs, codes)
                return
    existing = FeatureStore(path).ids
    if list(existing) != ids:
        extra = sorted(set(ids) - set(existing))[:3]
        gone = sorted(set(existing) - set(ids))[:3]
        raise StoreError(
            f"{path}: id set conflicts with the store's ({len(existing)} stored, {n} given;"
            f" new e.g. {extra}, absent e.g. {gone}); use another store path"
        )


def _write_new_main(
    path: Path,
    ids: list[str],
    splits: Sequence[str],
    durations: Sequence[float],
    paths: Sequence[str],
    labels: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any] | None,
    codes: Mapping[str, np.ndarray],
) -> None:
    """The main file of a new store, by an atomic rename (`codes`: checked string labels)."""
    n = len(ids)
    splits = [str(s) for s in splits]
    order = _storage_order(splits)  # (N,) API row of each storage row
    main_attrs = {"schema_version": SCHEMA_VERSION, "created": _now()}
    main_attrs.update({k: _attr_value(v) for k, v in (attrs or {}).items()})
    _write_failures(path, [])
    with _atomic_path(path) as tmp:
        _write_main(
            tmp,
            attrs=main_attrs,
            data_prefix=f"{_data_dir(path).name}/",
            utterances={
                "id": np.asarray(ids, dtype=object)[order],
                "split": np.asarray(splits, dtype=object)[order],
                "duration_s": np.asarray(durations, dtype=np.float32)[order],
                "path": np.asarray([str(p) for p in paths], dtype=object)[order],
                "row": order.astype(np.int64),
            },
            labels={
                k: np.asarray(labels[k], np.float32)[order]
                if k in labels
                else np.full(n, np.nan, np.float32)
                for k in ATTRIBUTES
            }
            | {k: v[order] for k, v in codes.items()},
        )


def _check_codes(
    path: Path, codes: Mapping[str, Sequence[str | None]] | None, n: int
) -> dict[str, np.ndarray]:
    """String labels as (N,) object arrays ("" unknown), or StoreError for a bad key or length."""
    out = {}
    for k, v in (codes or {}).items():
        if k not in CODE_LABELS:
            raise StoreError(f"{path}: unknown code label {k!r} (known: {', '.join(CODE_LABELS)})")
        if len(v) != n:
            raise StoreError(f"{path}: label {k} has {len(v)} rows, ids have {n}")
        out[k] = np.asarray(["" if c is None else str(c) for c in v], dtype=object)
    return out


def set_codes(path: str | Path, codes: Mapping[str, Sequence[str | None]]) -> None:
    """Write (or replace) string labels (`CODE_LABELS`, API row order) in an existing store.

    The main file is small: it is copied beside itself, changed, and renamed over the old one
    under the finalize lock, so a kill leaves the old or the new labels, never half of them.
    """
    import shutil

    path = Path(path)
    with _lock(path):
        store = FeatureStore(path)
        arrays = _check_codes(path, codes, store.n)
        with _atomic_path(path) as tmp:
            shutil.copyfile(path, tmp)
            with h5py.File(tmp, "a") as f:
                for k, v in arrays.items():
                    if k in f["labels"]:
                        del f["labels"][k]
                    f["labels"].create_dataset(k, data=v[store._pos.argsort()], dtype=_STR)


# ---------------------------------------------------------------------------------------------
# Writers.


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
            _encode_flags(flags, self.path)  # each fits the state file's width
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
        _write_batch(
            self._name("rows"),
            idx,
            pooled.astype(self.dtype, copy=False),
            None if layers is None else np.asarray(layers).astype(self.dtype, copy=False),
            flags,
        )

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


# ---------------------------------------------------------------------------------------------
# Readers.


@dataclasses.dataclass
class _View:
    """One backbone as seen at one moment: main-file state plus the pending journal batches."""

    info: BackboneInfo
    filled: np.ndarray  # (N,) bool, API order, main file and journal
    failed: dict[int, str]  # API row -> reason, rows not filled
    flags: np.ndarray | None  # (N,) object, API order (only when asked for: 161k strings)
    norm: np.ndarray  # (N,) float32, API order, NaN for NaN rows and rows not filled
    main_filled: np.ndarray  # (N,) bool, API order, main file only
    batches: list[_Batch]
    src: np.ndarray  # (N,) int32 index into batches of the batch holding each row, or -1
    src_pos: np.ndarray  # (N,) int32 position of the row inside that batch


class FeatureStore:
    """Read-only view of a store: the finalized files plus any unmerged journal files."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with _open_h5(self.path) as f:
            u = f["utterances"]
            row = u["row"][()].astype(np.int64)  # (N,) API row of each storage row
            self.n = len(row)
            pos = np.empty(self.n, np.int64)
            pos[row] = np.arange(self.n)
            self._pos = pos  # (N,) storage row of each API row

            def api(x: np.ndarray) -> np.ndarray:
                return x[pos]

            self.ids = api(_strings(u["id"]))
            self.splits = api(_strings(u["split"]))
            self.durations = api(u["duration_s"][()].astype(np.float32))
            self.paths = api(_strings(u["path"]))
            self.labels = {
                k: api(f["labels"][k][()].astype(np.float32))
                for k in ATTRIBUTES
                if k in f["labels"]
            }
            # Task 1 labels ("" unknown); absent in stores made before them (`set_codes`).
            self.codes = {k: api(_strings(f["labels"][k])) for k in CODE_LABELS if k in f["labels"]}
            self.attrs = {k: _attr(v) for k, v in f.attrs.items()}
        self._id_index: dict[str, int] | None = None
        self._views: dict[tuple[str, bool], tuple[tuple, _View]] = {}
        self._offsets: dict[tuple[Path, str], tuple[tuple[int, int], int, tuple[int, ...]]] = {}
        self._split_rows: dict[str, np.ndarray] = {}

    # -- metadata -------------------------------------------------------------------------
    @property
    def backbones(self) -> dict[str, BackboneInfo]:
        """Every backbone the store holds or is being written."""
        # Journal first: finalize renames the new main file in before it deletes registrations,
        # so a backbone is in this listing or in the main file opened after it.
        pending = _list_journal(self.path).backbones
        with _open_h5(self.path) as f:
            out = {name: _info_of(name, g) for name, g in f["features"].items()}
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
        if split not in self._split_rows:
            self._split_rows[split] = np.flatnonzero(self.splits == split)
            self._split_rows[split].setflags(write=False)
        idx = self._split_rows[split]
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
    def _view_in(self, f: h5py.File, journal: _Journal, name: str, flags: bool = False) -> _View:
        """A backbone's state from an open main file and a journal listing (headers only)."""
        want_flags = flags
        pos = self._pos
        g = f["features"].get(name)
        if g is not None:
            info = _info_of(name, g)
            main_filled = g["filled"][()][pos]
            flags = np.asarray(g["flags"].asstr()[()], dtype=object)[pos] if want_flags else None
            norm = g["norm"][()][pos]
        elif name in journal.backbones:
            r = journal.backbones[name]
            info = BackboneInfo(name, r["dim"], r["num_layers"], r["dtype"], r["attrs"])
            main_filled = np.zeros(self.n, bool)
            flags = np.full(self.n, "", dtype=object) if want_flags else None
            norm = np.full(self.n, np.nan, np.float32)
        else:
            raise StoreError(f"{self.path}: no backbone {name!r} (has: {sorted(self.backbones)})")
        norm = np.where(main_filled, norm, np.float32(np.nan)).astype(np.float32)
        failed: dict[int, str] = {}
        for row in f["failures"][()]:
            if row["backbone"].decode() == name:
                failed[int(self.index_of([row["id"].decode()])[0])] = row["reason"].decode()
        filled = main_filled.copy()
        batches = [_read_batch(p) for p in journal.batches.get(name, [])]
        src = np.full(self.n, -1, np.int32)
        src_pos = np.zeros(self.n, np.int32)
        for k, b in enumerate(batches):
            src[b.indices] = k
            src_pos[b.indices] = np.arange(len(b.indices), dtype=np.int32)
            filled[b.indices] = True
            norm[b.indices] = b.norms
            if b.flags is not None and flags is not None:
                flags[b.indices] = b.flags
        for p in journal.failures.get(name, []):
            try:
                rows = json.loads(p.read_text())["rows"]
            except (json.JSONDecodeError, KeyError) as e:
                raise StoreError(f"{p}: unreadable journal file ({type(e).__name__})") from None
            for i, _id, reason in rows:
                failed[int(i)] = reason
        failed = {i: r for i, r in failed.items() if not filled[i]}
        return _View(info, filled, failed, flags, norm, main_filled, batches, src, src_pos)

    def _files_key(self, name: str, journal: _Journal) -> tuple:
        """What a view of `name` was read from: the journal listing and the identity of the
        main, state and failures files. A finalize that writes state in place removes the
        journal files it merged, and every other file it changes is replaced by a rename."""
        stats = []
        for p in (self.path, _state_path(self.path, name), _failures_path(self.path)):
            try:
                st = p.stat()
                stats.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                stats.append(None)
        return (tuple(journal.files), tuple(sorted(journal.backbones)), *stats)

    def _view(self, name: str, flags: bool = False) -> _View:
        """A backbone's state merged over main file and journal, taken once (kept while its
        files stay the same: a split load then reads no per-row state again)."""
        for _ in range(10):
            journal = _list_journal(self.path)
            key = self._files_key(name, journal)
            hit = self._views.get((name, flags))
            if hit is not None and hit[0] == key:
                return dataclasses.replace(hit[1], failed=dict(hit[1].failed))
            try:
                with _open_h5(self.path) as f:
                    view = self._view_in(f, journal, name, flags)
            except FileNotFoundError:
                continue  # a finalize merged and removed journal files under us: look again
            for a in (view.filled, view.norm, view.main_filled, view.src, view.src_pos):
                a.setflags(write=False)  # shared by later calls: nobody may change them
            if view.flags is not None:
                view.flags.setflags(write=False)
            self._views[(name, flags)] = (key, view)
            return dataclasses.replace(view, failed=dict(view.failed))
        raise StoreError(f"{self.path}: journal kept changing while reading; try again")

    def _state(self, name: str) -> tuple[np.ndarray, dict[int, str]]:
        """(filled bool[N], {row: failure reason}) merged over main file and journal."""
        v = self._view(name)
        return v.filled, v.failed

    def filled(self, name: str) -> np.ndarray:
        """bool[N]: rows whose features for `name` are stored."""
        return self._view(name).filled

    def failed(self, name: str) -> np.ndarray:
        """bool[N]: rows recorded as failed for `name` (and not filled since)."""
        out = np.zeros(self.n, bool)
        out[list(self._view(name).failed)] = True
        return out

    def failures(self, name: str | None = None) -> list[tuple[str, str, str]]:
        """(id, backbone, reason) rows, for one backbone or all."""
        names = [name] if name else list(self.backbones)
        return [
            (str(self.ids[i]), b, r) for b in names for i, r in sorted(self._view(b).failed.items())
        ]

    def flags(self, name: str) -> np.ndarray:
        """(N,) str: comma-separated flags of each row for `name` ("" for none or not filled)."""
        return self._view(name, flags=True).flags.astype(str)

    def norms(self, name: str) -> np.ndarray:
        """(N,) float32 L2 norm of each row's pooled features (NaN: not filled or holds NaN)."""
        return self._view(name).norm

    def missing(self, name: str) -> np.ndarray:
        """Row numbers neither filled nor failed for `name` (what a resumed job must compute).

        A backbone nothing was written for yet (not even registered) misses every row.
        """
        if name not in self.backbones:
            return np.arange(self.n)
        v = self._view(name)
        todo = ~v.filled
        todo[list(v.failed)] = False
        return np.flatnonzero(todo)

    # -- features ------------------------------------------------------------------------
    def _read_view(
        self,
        view: _View,
        rows: np.ndarray,
        layers: bool,
        dtype: Any,
        layer: int | None = None,
    ) -> np.ndarray:
        """Features of filled `rows` (API rows, any order) from one view; FileNotFoundError if a
        journal file it lists was merged away meanwhile."""
        info = view.info
        key = "layers" if layers else "pooled"
        stored = np.dtype(info.dtype)
        out_dtype = stored if dtype is None else np.dtype(dtype)
        if layer is not None:
            shape: tuple[int, ...] = (len(rows), info.dim)
        elif layers:
            shape = (len(rows), int(info.num_layers or 0), info.dim)
        else:
            shape = (len(rows), info.dim)
        out = np.empty(shape, out_dtype)
        dest = np.arange(len(rows))
        from_journal = view.src[rows] >= 0
        main = ~from_journal & view.main_filled[rows]
        if main.any():
            path = _data_path(self.path, info.name)
            fd = None
            try:
                fd = os.open(path, os.O_RDONLY)
                st = os.fstat(fd)
                # A dataset's address never moves (merges write into it): read it once per file.
                got = self._offsets.get((path, key))
                if got is None or got[0] != (st.st_ino, st.st_size):
                    with h5py.File(path, "r", locking=False) as f:
                        got = (st.st_ino, st.st_size), int(f[key].id.get_offset()), f[key].shape[1:]
                    self._offsets[(path, key)] = got
                _, base, row_shape = got
            except (OSError, KeyError, TypeError) as e:
                if fd is not None:
                    os.close(fd)
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise StoreError(f"{path}: unreadable backbone file ({msg})") from None
            try:
                _gather(
                    fd, path, int(base), row_shape, stored, self._pos[rows[main]], out,
                    dest[main], layer,
                )  # fmt: skip
            finally:
                os.close(fd)
        if from_journal.any():
            r, d = rows[from_journal], dest[from_journal]
            src = view.src[r]
            order = np.argsort(src, kind="stable")
            ks, starts = np.unique(src[order], return_index=True)
            # Rows grouped by file with one sort (a mask per file was files x rows). Serially:
            # a thread pool over 10,064 pending files (a Development read) measured 18 % faster
            # cold but twice as slow warm (many small GIL-bound copies).
            for k, g in zip(ks, np.split(order, starts[1:]), strict=True):
                view.batches[int(k)].read(key, view.src_pos[r[g]], out, d[g], layer)
        return out

    def _read(
        self,
        name: str,
        rows: np.ndarray,
        layers: bool,
        dtype: Any = np.float32,
        layer: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Features of `rows` for one backbone and a bool mask of which were filled.

        `layer` picks one stored hidden state of a layered backbone ((N, D) out); `dtype=None`
        keeps the stored dtype. Rows not filled come back as zeros.
        """
        rows = np.asarray(rows, np.int64)
        for _ in range(10):
            view = self._view(name)
            self._check_layers(view.info, layers or layer is not None)
            have = view.filled[rows]
            try:
                got = self._read_view(view, rows[have], layers or layer is not None, dtype, layer)
            except FileNotFoundError:
                continue
            out = np.zeros((len(rows), *got.shape[1:]), got.dtype)
            out[have] = got
            return out, have
        raise StoreError(f"{self.path}: journal kept changing while reading; try again")

    def _check_layers(self, info: BackboneInfo, layers: bool) -> None:
        if layers and info.num_layers is None:
            raise StoreError(f"{self.path}: backbone {info.name!r} was stored without layers")

    def _load_rows(
        self, rows: np.ndarray, backbones: Sequence[str], layers: bool, dtype: Any
    ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, _View]]:
        """Rows filled for every backbone, their features, and the views read."""
        views = {name: self._view(name) for name in backbones}
        for v in views.values():
            self._check_layers(v.info, layers)
        keep = np.ones(len(rows), bool)
        for v in views.values():
            keep &= v.filled[rows]
        rows = rows[keep]
        return rows, self._read_views(views, rows, layers, dtype), views

    def _read_views(
        self,
        views: dict[str, _View],
        rows: np.ndarray,
        layers: bool,
        dtype: Any,
        layer: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Features of `rows` (filled in every view) per backbone; a view whose journal file was
        merged away meanwhile is taken again (its rows are in the main file now: filled only
        grows)."""
        feats = {}
        for name in views:
            for _ in range(10):
                try:
                    feats[name] = self._read_view(views[name], rows, layers, dtype, layer)
                    break
                except FileNotFoundError:
                    views[name] = self._view(name)
            else:
                raise StoreError(f"{self.path}: journal kept changing while reading; try again")
        return feats

    def load(
        self,
        split: str | None,
        backbones: Sequence[str],
        layers: bool = False,
        dtype: Any = np.float32,
    ) -> Split:
        """Load a split into memory; only rows filled for every requested backbone are kept.

        Features come back as `dtype` (float32 by default; None keeps the stored dtype, so
        float16 layered features stay float16). Rows are in ascending row order.
        """
        rows, feats, _ = self._load_rows(self.split_indices(split), backbones, layers, dtype)
        return Split(
            ids=self.ids[rows],
            indices=rows,
            features=feats,
            labels={k: v[rows] for k, v in self.labels.items()},
        )

    def iter_batches(
        self,
        split: str | None,
        backbones: Sequence[str],
        batch_size: int,
        layers: bool = False,
        dtype: Any = np.float32,
    ) -> Iterator[Split]:
        """Iterate over a split in batches of rows (memory bounded by the batch size).

        The journal is listed once per call. Rows come in storage order: ascending within a
        split, splits in pipeline order when `split` is None.
        """
        rows = self.split_indices(split)
        rows = rows[np.argsort(self._pos[rows], kind="stable")]
        views = {name: self._view(name) for name in backbones}
        for v in views.values():
            self._check_layers(v.info, layers)
        for s in range(0, len(rows), batch_size):
            r = rows[s : s + batch_size]
            keep = np.ones(len(r), bool)
            for v in views.values():
                keep &= v.filled[r]
            r = r[keep]
            feats = self._read_views(views, r, layers, dtype)
            yield Split(self.ids[r], r, feats, {k: v[r] for k, v in self.labels.items()})


def _info_of(name: str, g: h5py.Group) -> BackboneInfo:
    """BackboneInfo of a finalized backbone from its /features/<name> group."""
    attrs = {k: _attr(v) for k, v in g.attrs.items() if k not in _STRUCT_ATTRS}
    layers = int(g.attrs["num_layers"])
    return BackboneInfo(
        name, int(g.attrs["dim"]), None if layers < 0 else layers, str(attrs["dtype"]), attrs
    )


# ---------------------------------------------------------------------------------------------
# finalize and upgrade.


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock so two finalizers never race (released if the process dies)."""
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _data_file_problem(
    final: Path, want: dict[str, tuple[int, ...]], dtype: str, offsets: dict | None = None
) -> str | None:
    """Why an existing backbone file cannot take merges (None when it can; then `offsets`, if
    given, gets each dataset's (byte offset, row shape, dtype))."""
    try:
        with h5py.File(final, "r", locking=False) as f:
            for k, s in want.items():
                if k not in f:
                    return f"no /{k} dataset"
                ds = f[k]
                if ds.shape != s or ds.dtype != dtype:
                    return f"/{k} is {ds.dtype} {ds.shape}, expected {dtype} {s}"
                off = ds.id.get_offset()
                if off is None:
                    return f"/{k} is not contiguous"
                if offsets is not None:
                    offsets[k] = (int(off), ds.shape[1:], ds.dtype)
    except OSError as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def _ensure_data_file(
    path: Path, name: str, n: int, dim: int, layers: int | None, dtype: str, known: bool
) -> dict[str, tuple[int, tuple[int, ...], np.dtype]]:
    """The backbone's data file, created whole (contiguous, preallocated) by an atomic rename;
    returns its datasets' (byte offset, row shape, dtype).

    A backbone the main file already knows (`known`) has rows only its file holds: that file
    must exist and be usable, else StoreError (recreating it empty would silently turn its
    filled rows into zeros). Only a new backbone's file is (re)created.
    """
    final = _data_path(path, name)
    want = {"pooled": (n, dim)} | ({} if layers is None else {"layers": (n, layers, dim)})
    if known and not final.exists():
        raise StoreError(f"{final}: backbone file is missing; the journal is kept")
    if final.exists():
        offsets: dict = {}
        problem = _data_file_problem(final, want, dtype, offsets)
        if problem is None:
            return offsets  # known, or a new backbone's file from a killed finalize: reuse
        if known:
            raise StoreError(f"{final}: unreadable backbone file ({problem}); the journal is kept")
    with _atomic_path(final) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["backbone"] = name
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        # Space reserved now (its address never moves, so merges can pwrite into it), never
        # filled: the file stays sparse until rows arrive.
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        for k, s in want.items():
            f.create_dataset(k, shape=s, dtype=dtype, dcpl=dcpl)
    return _data_offsets(path, name)


def _ensure_state_file(path: Path, name: str, n: int, known: bool) -> None:
    """The backbone's state file, created empty by an atomic rename when the backbone is new
    (a known backbone's state file must exist and be usable, else StoreError)."""
    final = _state_path(path, name)
    if final.exists():
        try:
            with h5py.File(final, "r", locking=False) as f:
                ok = all(
                    k in f
                    and f[k].shape == (n,)
                    and f[k].dtype.itemsize == _STATE_DTYPES[k].itemsize
                    and f[k].id.get_offset() is not None
                    for k in _STATE_KEYS
                )
        except OSError:
            ok = False
        if ok:
            return
        if known:
            raise StoreError(f"{final}: unreadable state file; the journal is kept")
    elif known:
        raise StoreError(f"{final}: state file is missing; the journal is kept")
    _write_state_file(final, n)


def _migrate_v2(path: Path) -> None:
    """Move a schema-2 store's per-row state and failures out of its main file (once; crash-safe:
    the new files are complete before the new main file that links them is renamed in)."""
    with _open_h5(path) as src:
        features = {}
        for name, g in src["features"].items():
            info = _info_of(name, g)
            _write_state_file(
                _state_path(path, name),
                len(g["filled"]),
                filled=g["filled"][()],
                norm=g["norm"][()],
                flags=_encode_flags(_strings(g["flags"]), path),
            )
            features[name] = {"attrs": info.attrs, "dim": info.dim, "num_layers": info.num_layers}
        _write_failures(
            path,
            [
                (r["id"].decode(), r["backbone"].decode(), r["reason"].decode())
                for r in src["failures"][()]
            ],
        )
        with _atomic_path(path) as tmp:
            _write_main(
                tmp,
                attrs={**dict(src.attrs), "schema_version": SCHEMA_VERSION, "migrated": _now()},
                copy_from=src,
                features=features,
                data_prefix=f"{_data_dir(path).name}/",
            )


def _data_offsets(path: Path, name: str) -> dict[str, tuple[int, tuple[int, ...], np.dtype]]:
    with h5py.File(_data_path(path, name), "r", locking=False) as f:
        return {
            k: (int(f[k].id.get_offset() or 0), f[k].shape[1:], f[k].dtype)
            for k in ("pooled", "layers")
            if k in f
        }


def _scatter(fd: int, base: int, rowbytes: int, pos: np.ndarray, rows: np.ndarray) -> None:
    """Write rows (B, ...) at storage positions pos (sorted) in runs of adjacent rows."""
    for a, b in _runs(pos, max(1, _READ_BYTES // max(rowbytes, 1))):
        _pwrite_all(fd, rows[a:b], base + int(pos[a]) * rowbytes)


def _pwritev_all(fd: int, iov: list[memoryview], offset: int) -> None:
    done = os.pwritev(fd, iov, offset)
    total = sum(len(m) for m in iov)
    if done < total:  # a short write (rare on regular files): finish it plainly
        _pwrite_all(fd, np.frombuffer(b"".join(iov)[done:], np.uint8), offset + done)


def _merge_batches(
    path: Path,
    name: str,
    spos: np.ndarray,
    batches: list[Path],
    state: dict,
    offsets: dict[str, tuple[int, tuple[int, ...], np.dtype]],
) -> None:
    """Write journal rows into the backbone's data file in storage order; collect their storage
    positions, norms and flags into `state` lists (in journal order: the last value wins). Rows adjacent in storage go out in one vectored write straight from the journal
    buffers (no gathered copy); memory is bounded by _MERGE_BYTES of journal at a time."""
    fd = os.open(_data_path(path, name), os.O_WRONLY)
    try:
        i = 0
        while i < len(batches):
            group: list[_Batch] = []
            held = 0
            while i < len(batches) and (not group or held < _MERGE_BYTES):
                b = _read_batch(batches[i], whole=True)  # each file opened and read once
                group.append(b)
                held += sum(a.nbytes for a in (b.arrays or {}).values())
                i += 1
            api = np.concatenate([b.indices for b in group])
            which = np.concatenate([np.full(len(b.indices), k) for k, b in enumerate(group)])
            at = np.concatenate([np.arange(len(b.indices)) for b in group])
            pos = spos[api]
            order = np.argsort(pos, kind="stable")  # a row written twice keeps its last value
            pos_s, which_s, at_s = pos[order], which[order].tolist(), at[order].tolist()
            for key, (base, shape, dt) in offsets.items():
                rowbytes = int(np.prod(shape)) * dt.itemsize
                mvs = [_bytes_of(np.ascontiguousarray(b.arrays[key])) for b in group]
                for a, e in _runs(pos_s, _IOV_MAX):
                    iov = [
                        mvs[which_s[k]][at_s[k] * rowbytes : (at_s[k] + 1) * rowbytes]
                        for k in range(a, e)
                    ]
                    _pwritev_all(fd, iov, base + int(pos_s[a]) * rowbytes)
            state["pos"].append(pos)
            state["norm"].append(np.concatenate([b.norms for b in group]))
            for b in group:
                if b.flags is not None:
                    state["flag_pos"].append(spos[b.indices])
                    state["flags"].append(_encode_flags(b.flags, b.path))
        os.fdatasync(fd)  # in place: the data (and block maps), not the mtime
    finally:
        os.close(fd)


# The frame files beside a store (featurestore.frames) follow the same two rules.
atomic_path = _atomic_path
finalize_lock = _lock


def finalize(path: str | Path) -> int:
    """Merge every journal file into the store (crash-safe); returns the journal files merged.

    Rows are written in place into the backbone's data file, then its state file (filled, norm,
    flags), each fsynced, before the journal files go: a kill leaves them in the journal, which
    readers lay over the files and the next finalize merges again. The main file is rewritten
    only to register a new backbone (and once to migrate a schema-2 store); the failures file
    only when failure records change.
    """
    path = Path(path)
    with _lock(path):
        journal = _list_journal(path)
        with _open_h5(path) as f:
            in_main = set(f["features"])
            version = int(f.attrs["schema_version"])
        if not journal.files and not (set(journal.backbones) - in_main):
            _cleanup_tmp(path)
            return 0
        if version < SCHEMA_VERSION:
            _migrate_v2(path)
        with _open_h5(path) as src:
            # Row numbers only: no id, split or path string is decoded (161k rows: 0.4 s).
            api_row = src["utterances"]["row"][()].astype(np.int64)
            n = len(api_row)
            spos = np.empty(n, np.int64)  # (N,) storage row of each API row
            spos[api_row] = np.arange(n)
            main_fails = [
                (r["id"].decode(), r["backbone"].decode(), r["reason"].decode())
                for r in src["failures"][()]
            ]
            names = sorted(in_main | set(journal.backbones))
            failures = [x for x in main_fails if x[1] not in names]
            new: dict[str, dict] = {}
            for name in names:
                touched = (
                    name not in in_main or journal.batches.get(name) or journal.failures.get(name)
                )
                if not touched:
                    failures += [x for x in main_fails if x[1] == name]
                    continue
                if name in in_main:
                    info = _info_of(name, src["features"][name])
                else:
                    r = journal.backbones[name]
                    info = BackboneInfo(name, r["dim"], r["num_layers"], r["dtype"], r["attrs"])
                    new[name] = {
                        "attrs": {
                            **info.attrs,
                            "dtype": info.dtype,
                            "pooling": info.attrs.get("pooling", "mean over valid frames"),
                        },
                        "dim": info.dim,
                        "num_layers": info.num_layers,
                    }
                known = name in in_main
                offsets = _ensure_data_file(
                    path, name, n, info.dim, info.num_layers, info.dtype, known
                )
                _ensure_state_file(path, name, n, known)
                state: dict[str, list[np.ndarray]] = {
                    "pos": [],
                    "norm": [],
                    "flag_pos": [],
                    "flags": [],
                }
                _merge_batches(path, name, spos, journal.batches.get(name, []), state, offsets)
                _write_state_rows(path, name, state)
                # Failure records by id: the failures file's, then the journal's; a row filled
                # now clears them. Only the ids of the rows merged now are read.
                merged = np.unique(np.concatenate(state["pos"] or [np.zeros(0, np.int64)]))
                failed = {i: r for i, b, r in main_fails if b == name}
                if failed and len(merged):
                    now = set(_strings_at(src["utterances"]["id"], merged).tolist())
                    failed = {i: r for i, r in failed.items() if i not in now}
                if journal.failures.get(name):
                    with h5py.File(_state_path(path, name), "r", locking=False) as sf:
                        filled = sf["filled"][()]  # (N,) storage order: N bytes
                    for p in journal.failures.get(name, []):
                        for i, uid, reason in json.loads(p.read_text())["rows"]:
                            if not filled[spos[int(i)]]:
                                failed[str(uid)] = reason
                failures += sorted(((i, name, r) for i, r in failed.items()), key=lambda x: x[0])
            if sorted(failures) != sorted(main_fails):
                _write_failures(path, failures)
            if new:
                features = {
                    name: {
                        "attrs": (i := _info_of(name, src["features"][name])).attrs,
                        "dim": i.dim,
                        "num_layers": i.num_layers,
                    }
                    for name in in_main
                } | new
                with _atomic_path(path) as tmp:
                    _write_main(
                        tmp,
                        attrs=dict(src.attrs),
                        copy_from=src,
                        features=dict(sorted(features.items())),
                        data_prefix=f"{_data_dir(path).name}/",
                    )
        # The rows are in the files, the main file lists every backbone: the merged journal
        # files are now redundant.
        _unlink_all(journal.files)
        # Registrations last: merged into the main file's /features.
        _unlink_all([_journal(path) / "backbones" / f"{name}.json" for name in journal.backbones])
        _cleanup_tmp(path)
        return len(journal.files)


def _unlink(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        p.unlink()


def _unlink_all(paths: Sequence[Path]) -> None:
    """Delete files, many at once: one unlink was measured at ~2 ms on this box's disk (40,000
    journal files: 80 s one by one, ~22x less with 16 threads)."""
    if len(paths) < 64:
        for p in paths:
            _unlink(p)
        return
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        list(ex.map(_unlink, paths))


def _cleanup_tmp(path: Path, min_age_s: float = 600.0) -> None:
    """Remove temporaries left by killed writers (never a finished journal file).

    Journal temporaries younger than `min_age_s` may belong to a live writer, so they stay; the
    main file's and the backbone files' temporaries are only ever made under the finalize lock.
    """
    root = _journal(path)
    now = time.time()
    for p in list(root.rglob(".tmp-*")) if root.exists() else []:
        with contextlib.suppress(FileNotFoundError):
            if now - p.stat().st_mtime > min_age_s:
                p.unlink()
    for p in [*path.parent.glob(f".tmp-*-{path.name}"), *_data_dir(path).glob(".tmp-*")]:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def upgrade(path: str | Path) -> bool:
    """Rewrite an older store in the current layout (crash-safe); False if already current.

    Backbone files are written first under temporary names; the new main file replaces the old
    one by one rename, so a kill leaves the old store intact. Pending schema-1 journal files
    stay and are merged by the next finalize. A schema-2 store keeps its backbone files and
    only has its per-row state moved out of the main file (what finalize also does once).
    """
    path = Path(path)
    with _lock(path):
        with _open_h5(path, versions=(1, *READ_VERSIONS)) as src:
            version = int(src.attrs["schema_version"])
        if version == SCHEMA_VERSION:
            return False
        if version == 2:
            _migrate_v2(path)
            _cleanup_tmp(path)
            return True
        with _open_h5(path, versions=(1,)) as src:
            u = src["utterances"]
            splits = _strings(u["split"])
            order = _storage_order(list(splits))  # API row of each storage row
            n = len(order)
            spos = np.empty(n, np.int64)
            spos[order] = np.arange(n)
            utter = {k: (_strings(u[k]) if k != "duration_s" else u[k][()]) for k in u}
            utter = {k: np.asarray(v)[order] for k, v in utter.items()}
            utter["row"] = order.astype(np.int64)
            labels = {k: src["labels"][k][()][order] for k in src["labels"]}
            features: dict[str, dict] = {}
            for name, g in src["features"].items():
                num_layers = g["layers"].shape[1] if "layers" in g else None
                dim, dtype = g["pooled"].shape[1], str(g["pooled"].dtype)
                final = _data_path(path, name)
                with contextlib.suppress(FileNotFoundError):
                    final.unlink()  # a killed upgrade's; ours is written whole below
                offsets = _ensure_data_file(path, name, n, dim, num_layers, dtype, known=False)
                fd = os.open(final, os.O_WRONLY)
                norm = np.full(n, np.nan, np.float32)
                try:
                    step = max(
                        1, _MERGE_BYTES // (g["pooled"].dtype.itemsize * dim * (num_layers or 1))
                    )
                    for s in range(0, n, step):  # API-contiguous blocks, scattered to storage
                        p = spos[s : s + step]
                        o = np.argsort(p, kind="stable")
                        for key, (base, shape, dt) in offsets.items():
                            block = g[key][s : s + step]
                            _scatter(fd, base, int(np.prod(shape)) * dt.itemsize, p[o], block[o])
                            if key == "pooled":
                                norm[p] = _row_norms(block)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                filled = g["filled"][()][order]
                flags = (
                    _strings(g["flags"])[order] if "flags" in g else np.full(n, "", dtype=object)
                )
                _write_state_file(
                    _state_path(path, name),
                    n,
                    filled=filled,
                    norm=np.where(filled, norm, np.float32(np.nan)),
                    flags=_encode_flags(flags, path),
                )
                features[name] = {
                    "attrs": {k: _attr(v) for k, v in g.attrs.items()},
                    "dim": dim,
                    "num_layers": num_layers,
                }
            _write_failures(
                path,
                [
                    (r["id"].decode(), r["backbone"].decode(), r["reason"].decode())
                    for r in src["failures"][()]
                ],
            )
            attrs = {**dict(src.attrs), "schema_version": SCHEMA_VERSION, "upgraded": _now()}
            with _atomic_path(path) as tmp:
                _write_main(
                    tmp,
                    attrs=attrs,
                    utterances=utter,
                    labels=labels,
                    features=features,
                    data_prefix=f"{_data_dir(path).name}/",
                )
        _cleanup_tmp(path)
        return True


def write_layer_view(
    path: str | Path,
    name: str,
    src: str,
    layer: int,
    attrs: Mapping[str, Any],
    chunk: int = 4096,
) -> int:
    """Journal backbone `name` = stored layer position `layer` of `src`, in row chunks (memory
    bounded by `chunk` rows, whatever the corpus size); rows already done are skipped and rows
    `src` failed on fail with its reason. Returns rows written; the caller finalizes."""
    store = FeatureStore(path)
    info = store.backbones[src]
    writer = StoreWriter(path, name, dim=info.dim, dtype=info.dtype, attrs=attrs)
    todo = store.missing(name)  # neither filled nor failed for the view yet
    view = store._view(src)
    store._check_layers(view.info, True)
    rows = todo[view.filled[todo]]
    rows = rows[np.argsort(store._pos[rows], kind="stable")]  # storage order: sequential reads
    # One view (journal listing and headers) for every chunk, not one per chunk; _read_views
    # takes it again only if a finalize merged a journal file it lists.
    views = {src: view}
    for s in range(0, len(rows), chunk):
        r = rows[s : s + chunk]
        writer.write(r, store._read_views(views, r, True, None, layer)[src])  # (B, D)
    bad = [int(r) for r in todo if int(r) in view.failed]
    if bad:
        writer.fail(np.asarray(bad), [view.failed[r] for r in bad])
    return len(rows)
