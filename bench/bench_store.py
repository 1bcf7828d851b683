"""The feature store at MSP-Podcast scale, each operation next to plain h5py on the same bytes.

    python bench/bench_store.py            # 161,000 rows: needs ~24 GB free disk, ~15 min
    python bench/bench_store.py --quick    # 4,000 rows, ~1 min

161,000 utterances (84k Train, 32k Development, 45k Test1) interleaved in runs as a sorted
MSP-Podcast label file interleaves them (one podcast's clips together, podcasts of every split
mixed); 4 pooled backbones of widths 1280, 1024, 1024, 1024 (float32) and one layered backbone
25 x 1024 (float16), written as `ifmvse extract` writes: 16-row batches in shuffled row order
through `StoreWriter`. Every operation runs in a fresh child process (peak RSS = that child's own
VmHWM, imports included); peak extra disk = the largest growth of the store's files (main
file, backbone files, temporaries; the journal being merged is not counted) while it runs.
Plain h5py = the same bytes as one contiguous dataset per array, written from one reused buffer
then fsynced (as finalize fsyncs), or read whole into memory. Reads are timed twice each, both
sides cold (the files' pages dropped with posix_fadvise first) and both warm (read just before).
Bench data goes under --dir (default: a temporary directory in /work, else the system temp) and
is removed afterwards. The journals are set up by 8 writer processes without fsync (setup, not
measured: the fsyncs would take most of the run); the one-batch finalize's batch is fsynced.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

POOLED = {"whisper": 1280, "wavlm": 1024, "hubert": 1024, "data2vec": 1024}  # float32
LAYERED = ("wavlm_all", 25, 1024)  # name, layers, width; float16
SPLITS_FULL = {"Train": 84_000, "Development": 32_000, "Test1": 45_000}
BATCH = 16
WRITERS = 8  # journal writers at once (fsync-latency bound; as a multi-host job writes)
TABLE = 1009  # rows of the feature table features are drawn from (row r uses r % TABLE)

TARGET_FINALIZE = 3.0  # x plain write
TARGET_ONE_BATCH_S = 2.0
TARGET_LOAD = 1.5  # x plain read, and peak RSS x returned bytes
TARGET_INSPECT_S = 10.0


# ---------------------------------------------------------------------------------------------
# Data: deterministic, cheap to make, checkable.


def split_counts(quick: bool) -> dict[str, int]:
    """Rows per split (the full corpus, or a 40x smaller one)."""
    return {k: (v // 40 if quick else v) for k, v in SPLITS_FULL.items()}


def create_corpus_store(store: Path, splits: list[str], labels: dict[str, np.ndarray]) -> None:
    """A store with MSP-Podcast-like ids, paths and 2..12-s durations for the given splits."""
    from featurestore import create_store

    n = len(splits)
    ids = [f"MSP-PODCAST_{i:07d}" for i in range(n)]
    create_store(
        store,
        ids=ids,
        splits=splits,
        durations=np.linspace(2, 12, n),
        paths=[f"Audios/{u}.wav" for u in ids],
        labels=labels,
    )


def corpus_splits(counts: dict[str, int], seed: int = 0) -> list[str]:
    """Split of each row: podcasts (runs of 1..60 rows) of random splits, in label-file order."""
    rng = np.random.default_rng(seed)
    left = dict(counts)
    out: list[str] = []
    while sum(left.values()):
        names = [k for k, v in left.items() if v]
        p = np.asarray([left[k] for k in names], float)
        k = names[rng.choice(len(names), p=p / p.sum())]
        run = min(left[k], int(rng.integers(1, 61)))
        out += [k] * run
        left[k] -= run
    return out


@functools.cache
def _table(name: str, dim: int) -> np.ndarray:
    seed = sum(map(ord, name))
    return np.random.default_rng(seed).standard_normal((TABLE, dim)).astype(np.float32)


def pooled_rows(name: str, dim: int, rows: np.ndarray) -> np.ndarray:
    """(B, dim) float32 features of rows (row r: table[r % TABLE] + r / 1e5)."""
    return _table(name, dim)[rows % TABLE] + (rows[:, None] / 1e5).astype(np.float32)


def layered_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pooled (B, D), layers (B, L, D)) float16 of the layered backbone."""
    name, nl, d = LAYERED
    base = pooled_rows(name, d, rows).astype(np.float16)  # (B, D)
    steps = (np.arange(nl, dtype=np.float16) / 8)[None, :, None]  # (1, L, 1)
    return base, base[:, None, :] + steps


# ---------------------------------------------------------------------------------------------
# Child operations: each runs in its own process and prints one JSON line.


def _store(d: Path) -> Path:
    return d / "store.h5"


def _evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (they are fsynced, so clean)."""
    for p in paths:
        if p.is_dir():
            _evict(list(p.rglob("*")))
        elif p.exists():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _plain_write(path: Path, shapes: dict[str, tuple[tuple[int, ...], str]]) -> float:
    import h5py

    t0 = time.perf_counter()
    with h5py.File(path, "w") as f:
        for key, (shape, dtype) in shapes.items():
            ds = f.create_dataset(key, shape=shape, dtype=dtype)  # contiguous
            row = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
            step = max(1, (64 << 20) // row)
            buf = np.ones((step, *shape[1:]), dtype)  # one reused buffer: no generation time
            for s in range(0, shape[0], step):
                n = min(step, shape[0] - s)
                ds[s : s + n] = buf[:n]
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
    return time.perf_counter() - t0


def own_peak_rss() -> int:
    """This process's peak resident bytes since its exec (VmHWM), not counting its parent's."""
    # ru_maxrss is no good here: Linux carries the pre-exec high-water mark of the forked child
    # (whose pages are the parent's) across exec, so a child of a 2.7 GB parent (run_all, after
    # the training and serve benches) reports at least 2.7 GB whatever it does. VmHWM belongs to
    # the mm that exec created.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # no /proc (macOS): ru_maxrss, in bytes there

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(op: str, d: Path, args: list[str]) -> dict:
    """Run one operation; returns what the parent records."""
    from featurestore import FeatureStore, StoreWriter, finalize, summarize

    quick = (d / "quick").exists()
    counts = split_counts(quick)
    n = sum(counts.values())
    store = _store(d)
    if op == "create":
        splits = corpus_splits(counts)
        t0 = time.perf_counter()
        create_corpus_store(store, splits, {"arousal": np.linspace(1, 7, n)})
        return {"seconds": time.perf_counter() - t0}
    if op in ("journal-pooled", "journal-layered", "journal-one"):
        k, m = (int(x) for x in (args[0] if args else "0/1").split("/"))
        order = np.random.default_rng(1).permutation(n)
        order = order[:BATCH] if op == "journal-one" else order[k::m]  # writer k of m
        wid = f"p{k}"
        if op != "journal-one":
            # Setup only: ~10 ms per fsync on this shared disk would make 50,000 batch files
            # most of the run; durability of writers is not what this bench measures.
            os.fsync = lambda fd: None
        t0 = time.perf_counter()
        files = 0
        if op == "journal-pooled":
            for name, dim in POOLED.items():
                w = StoreWriter(store, name, dim=dim, attrs={"source": "bench"}, writer_id=wid)
                for s in range(0, len(order), BATCH):
                    r = order[s : s + BATCH]
                    w.write(r, pooled_rows(name, dim, r))
                    files += 1
        else:
            name, nl, dim = LAYERED
            attrs = {"source": "bench", "layers_stored": ",".join(map(str, range(nl)))}
            w = StoreWriter(
                store, name, dim=dim, num_layers=nl, dtype="float16", attrs=attrs, writer_id=wid
            )
            for s in range(0, len(order), BATCH):
                r = order[s : s + BATCH]
                w.write(r, *layered_rows(r))
                files += 1
        return {"seconds": time.perf_counter() - t0, "files": files}
    if op == "finalize":
        t0 = time.perf_counter()
        merged = finalize(store)
        return {"seconds": time.perf_counter() - t0, "files": merged}
    if op == "inspect":
        t0 = time.perf_counter()
        s = summarize(store)
        seconds = time.perf_counter() - t0
        filled = {k: v["filled"] for k, v in s["backbones"].items()}
        return {"seconds": seconds, "ok": all(v == n for v in filled.values())}
    if op == "plain-write":
        kind = args[0]
        if kind == "pooled":
            shapes = {k: ((n, dim), "float32") for k, dim in POOLED.items()}
        else:
            name, nl, dim = LAYERED
            shapes = {"pooled": ((n, dim), "float16"), "layers": ((n, nl, dim), "float16")}
        return {"seconds": _plain_write(d / f"plain-{kind}.h5", shapes)}
    if op == "plain-make":  # the bytes a read returns, as contiguous datasets (untimed)
        kind, rows = args[0], int(args[1])
        if kind == "pooled":
            shapes = {k: ((rows, dim), "float32") for k, dim in POOLED.items()}
        else:
            shapes = {"layers": ((rows, LAYERED[1], LAYERED[2]), "float16")}
        _plain_write(d / f"read-{kind}.h5", shapes)
        return {"seconds": 0.0}
    if op == "plain-read":
        import h5py

        t0 = time.perf_counter()
        with h5py.File(d / f"read-{args[0]}.h5", "r") as f:
            arrays = [f[k][()] for k in f]
        return {"seconds": time.perf_counter() - t0, "bytes": sum(a.nbytes for a in arrays)}
    if op in ("load", "iter"):
        kind, split = args[0], args[1]
        fs = FeatureStore(store)
        names = list(POOLED) if kind == "pooled" else [LAYERED[0]]
        layers = kind == "layered"
        t0 = time.perf_counter()
        if op == "load":
            got = fs.load(split, names, layers=layers, dtype=None)
            parts = [got]
        else:  # iter_batches: consume each batch (a checksum) and keep only the last
            parts, nbytes = [], 0
            for b in fs.iter_batches(split, names, 4096, layers=layers, dtype=None):
                nbytes += sum(x.nbytes for x in b.features.values())
                parts = [b]
        seconds = time.perf_counter() - t0
        got = parts[-1]
        nbytes = sum(x.nbytes for x in got.features.values()) if op == "load" else nbytes
        r = got.indices[:: max(1, len(got.indices) // 50)]
        sel = np.searchsorted(got.indices, r) if op == "load" else np.arange(len(got.indices))
        if op == "iter":
            r = got.indices
        ok = True
        for name in names:
            want = layered_rows(r)[1] if layers else pooled_rows(name, POOLED[name], r)
            ok &= bool(np.array_equal(got.features[name][sel], want))
        return {"seconds": seconds, "bytes": nbytes, "ok": ok}
    if op == "derive":
        from featurestore import write_layer_view

        name, nl, _ = LAYERED
        t0 = time.perf_counter()
        written = write_layer_view(store, "wavlm_l12", name, 12, {"derived_from": name})
        finalize(store)
        seconds = time.perf_counter() - t0
        r = np.arange(0, n, 997)
        got = FeatureStore(store).load(None, ["wavlm_l12"], dtype=None)
        ok = written == n and np.array_equal(
            got.features["wavlm_l12"][np.searchsorted(got.indices, r)], layered_rows(r)[1][:, 12]
        )
        return {"seconds": seconds, "bytes": n * LAYERED[2] * 2, "ok": bool(ok)}
    raise SystemExit(f"unknown op {op}")


# ---------------------------------------------------------------------------------------------
# The parent: runs children, watches their RSS and the store's disk use.


def _store_bytes(d: Path) -> int:
    """Allocated bytes of everything under d except the journal (what a finalize adds)."""
    total = 0
    for root, dirs, files in os.walk(d):
        if root.endswith(".journal"):
            dirs[:] = []
            continue
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total


def run_child(op: str, d: Path, *args: str, procs: int = 1) -> dict:
    """Run one op in a child process (or `procs` writers k/procs at once, as a multi-host job
    would); add wall seconds, peak RSS (bytes, largest child) and peak extra disk (bytes)."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    before = _store_bytes(d)
    t0 = time.perf_counter()
    share = [[f"{k}/{procs}"] for k in range(procs)] if procs > 1 else [[]]
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", op, "--dir", str(d), *args, *extra],
            stdout=subprocess.PIPE,
            env=env,
        )
        for extra in share
    ]
    peak = [before]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _store_bytes(d))
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    results, rss = [], 0
    for proc in children:
        out = proc.stdout.read()
        _, status, _ = os.wait4(proc.pid, 0)
        if status != 0:
            done.set()
            raise SystemExit(f"bench child {op} {args} failed (status {status})")
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
        rss = max(rss, results[-1]["rss"])
    wall = time.perf_counter() - t0
    done.set()
    t.join()
    res = results[0]
    if procs > 1:
        res = {"seconds": wall, "files": sum(r.get("files", 0) for r in results)}
    res["rss"] = rss
    res["disk"] = max(0, peak[0] - before)
    return res


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.0f} MB"


def _need_bytes(n: int) -> int:
    pooled = n * sum(POOLED.values()) * 4
    layered = n * (LAYERED[1] + 1) * LAYERED[2] * 2
    return int(1.1 * (pooled + 2 * layered)) + (1 << 30)


def _base(where: str | None) -> str | None:
    """The directory bench data goes under (None: the system temp)."""
    return where or ("/work" if os.path.isdir("/work") and os.access("/work", os.W_OK) else None)


def disk_shortfall(quick: bool = False, where: str | None = None) -> str | None:
    """Why the bench's data would not fit on disk (one line), or None when it fits."""
    base = _base(where) or tempfile.gettempdir()
    need = _need_bytes(sum(split_counts(quick).values()))
    free = shutil.disk_usage(base).free
    if free >= need:
        return None
    return f"bench_store: needs about {_gb(need)} free disk under {base}, has {_gb(free)}"


def bench_store(quick: bool = False, where: str | None = None, log=print) -> list[dict]:
    """Run every operation; returns table rows (dicts)."""
    counts = split_counts(quick)
    n = sum(counts.values())
    base = _base(where)
    short = disk_shortfall(quick, where)
    if short:
        raise SystemExit(f"{short}; pass --dir or use --quick")
    need = _need_bytes(n)
    free = shutil.disk_usage(base or tempfile.gettempdir()).free
    d = Path(tempfile.mkdtemp(prefix="ifmvse-bench-store-", dir=base))
    log(f"bench data in {d} (needs about {_gb(need)}, {_gb(free)} free)")
    rows: list[dict] = []
    n_dev = counts["Development"]
    pooled_bytes = n * sum(POOLED.values()) * 4
    layered_bytes = n * (LAYERED[1] + 1) * LAYERED[2] * 2

    def row(op, ours, plain=None, target="", returned=None, note=""):
        r = {"operation": op, "ours_s": ours["seconds"], "rss": ours["rss"], "disk": ours["disk"]}
        r["plain_s"] = None if plain is None else plain["seconds"]
        r["plain_rss"] = None if plain is None else plain["rss"]
        r["returned"] = returned
        r["target"] = target
        r["ok"] = ours.get("ok", True)
        r["note"] = note
        rows.append(r)
        log(_line(r))

    def reads(label, kind, split, nbytes, plain_kind):
        for cache in ("cold", "warm"):
            if cache == "cold":
                _evict([d])
            plain = run_child("plain-read", d, plain_kind)
            if cache == "cold":
                _evict([d])
            ours = run_child("load" if label.startswith("load") else "iter", d, kind, split)
            ratio = ours["seconds"] / plain["seconds"]
            rss_ratio = ours["rss"] / nbytes
            ok = ratio <= TARGET_LOAD and rss_ratio <= TARGET_LOAD
            target = (
                f"<= {TARGET_LOAD}x read, RSS <= {TARGET_LOAD}x returned:"
                f" {'PASS' if ok else 'MISS'}"
            )
            row(f"{label} ({cache})", ours, plain, target, nbytes)

    def finalize_row(what, nbytes, plain):
        fin = run_child("finalize", d)
        ok = fin["seconds"] / plain["seconds"] <= TARGET_FINALIZE
        row(
            f"finalize {what} ({_gb(nbytes)}, {fin['files']:,} files)",
            fin,
            plain,
            f"<= {TARGET_FINALIZE}x write: {'PASS' if ok else 'MISS'}",
        )

    try:
        (d / "quick").touch() if quick else None
        run_child("create", d)
        log("journal: 4 pooled backbones ...")
        j = run_child("journal-pooled", d, procs=WRITERS)
        os.sync()  # the setup's unsynced journal writes are not the finalize's to pay
        row(
            f"journal: 4 pooled backbones, {j['files']:,} batch files ({WRITERS} writers, setup, no fsync)",
            j,
        )
        plain = run_child("plain-write", d, "pooled")
        (d / "plain-pooled.h5").unlink()
        finalize_row("4 pooled backbones", pooled_bytes, plain)
        run_child("plain-make", d, "pooled", str(n_dev))
        dev_pooled = n_dev * sum(POOLED.values()) * 4
        reads(
            'load("Development", 4 pooled) float32', "pooled", "Development", dev_pooled, "pooled"
        )
        (d / "read-pooled.h5").unlink()

        plain = run_child("plain-write", d, "layered")
        (d / "plain-layered.h5").unlink()
        log("journal: layered backbone ...")
        j = run_child("journal-layered", d, procs=WRITERS)
        os.sync()
        row(
            f"journal: 25 x 1024 float16 backbone, {j['files']:,} batch files ({WRITERS} writers, setup, no fsync)",
            j,
        )
        ins = run_child("inspect", d)
        row(
            f"inspect, {j['files']:,} journal files pending",
            ins,
            target=f"< {TARGET_INSPECT_S:.0f} s: {'PASS' if ins['seconds'] < TARGET_INSPECT_S else 'MISS'}",
        )
        run_child("plain-make", d, "layered", str(n_dev))
        dev_layered = n_dev * LAYERED[1] * LAYERED[2] * 2
        reads(
            'iter_batches("Development", layered, 4096), journal pending',
            "layered",
            "Development",
            dev_layered,
            "layered",
        )
        finalize_row("layered backbone", layered_bytes, plain)
        run_child("journal-one", d)
        one = run_child("finalize", d)
        row(
            f"finalize one {BATCH}-row batch (rewriting filled rows) on the full store"
            f" ({_gb(pooled_bytes + layered_bytes)})",
            one,
            target=f"< {TARGET_ONE_BATCH_S:.0f} s: {'PASS' if one['seconds'] < TARGET_ONE_BATCH_S else 'MISS'}",
        )
        ins = run_child("inspect", d)
        row(
            "inspect, finalized",
            ins,
            target=f"< {TARGET_INSPECT_S:.0f} s: {'PASS' if ins['seconds'] < TARGET_INSPECT_S else 'MISS'}",
        )
        reads(
            'load("Development", layered) float16', "layered", "Development", dev_layered, "layered"
        )
        (d / "read-layered.h5").unlink()
        der = run_child("derive", d)
        row(
            f"derive a layer view (1 of 25 hidden states, {n:,} rows, then finalize)",
            der,
            note="memory bounded by 4,096-row chunks",
        )
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return rows


COLUMNS = (
    "operation",
    "ours",
    "plain h5py",
    "ours / plain",
    "peak RSS",
    "peak extra disk",
    "target",
)


def cells(r: dict) -> tuple[str, ...]:
    """A row's table cells."""
    plain = "" if r["plain_s"] is None else f"{r['plain_s']:.2f} s (RSS {_gb(r['plain_rss'])})"
    ratio = "" if r["plain_s"] is None else f"{r['ours_s'] / r['plain_s']:.2f}x"
    rss = _gb(r["rss"])
    if r["returned"]:
        rss += f" ({r['rss'] / r['returned']:.2f}x of {_gb(r['returned'])} returned)"
    target = r["target"] + ("" if r["ok"] else " WRONG CONTENT")
    return (r["operation"], f"{r['ours_s']:.2f} s", plain, ratio, rss, _gb(r["disk"]), target)


def _line(r: dict) -> str:
    return " | ".join(cells(r))


def to_markdown(rows: list[dict], header: str) -> str:
    """The store table as Markdown."""
    out = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(out) + "\n"


def header(quick: bool, seconds: float, load_before, load_after) -> str:
    """Machine line above the table."""
    from common import cores, cpu_model

    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    counts = split_counts(quick)
    return (
        f"Run {when} ({'quick' if quick else 'full'}, {seconds:.0f} s); {cpu_model()},"
        f" {cores()} cores; {sum(counts.values()):,} rows ({', '.join(f'{k} {v:,}' for k, v in counts.items())});"
        f" load average before {tuple(round(x, 2) for x in load_before)}, after"
        f" {tuple(round(x, 2) for x in load_after)} (shared machine: ours and plain h5py run back"
        " to back)."
        + (
            " Quick size: timings are milliseconds and the ~50 MB interpreter dominates RSS, so"
            " the targets (set for the full size) are not meaningful here."
            if quick
            else ""
        )
    )


def main() -> None:
    """Command-line entry: run the store benchmark, print and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4,000 rows instead of 161,000")
    ap.add_argument("--dir", default=None, help="where bench data goes (removed afterwards)")
    ap.add_argument("--out", default=None, help="write the table as Markdown here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        res = child(a.child, Path(a.dir), a.args)
        print(json.dumps({**res, "rss": own_peak_rss()}))
        return
    sys.path.insert(0, str(HERE))
    t0 = time.perf_counter()
    before = os.getloadavg()
    rows = bench_store(a.quick, a.dir)
    md = to_markdown(rows, header(a.quick, time.perf_counter() - t0, before, os.getloadavg()))
    print(md)
    if a.out:
        Path(a.out).write_text(md)


if __name__ == "__main__":
    main()
