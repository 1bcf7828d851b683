"""`ifmvse extract`: fill a feature store from a corpus with pretrained backbones.

The pipeline streams: CPU threads decode and resample audio for the next batches while the
device computes the current one (JAX dispatch is asynchronous, so the host writes batch k while
the device runs batch k+1); batches come from length buckets, so there is one compiled program
per bucket shape, compiled ahead of time and timed; pooling happens on the device, so only
(B, L, D) vectors cross to the host. Each local device takes a slice of every batch through a
mesh `data` axis; each process of a multi-host job takes a disjoint share of utterances and
writes its own journal shard of the store, which process 0 merges at the end.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from featurestore import FeatureStore, StoreWriter, create_store, finalize, write_layer_view
from jax_ifmvse.config import ATTRIBUTES, Config
from jax_ifmvse.data.audio import is_silent
from jax_ifmvse.data.buckets import Batch, plan_batches


@dataclasses.dataclass(frozen=True)
class Item:
    """One piece of audio to encode: a whole utterance, or one chunk of a long one."""

    row: int  # store row
    start_s: float  # chunk start in the utterance
    seconds: float  # planned duration (for bucketing)
    chunks: int  # how many items make up this row


@dataclasses.dataclass
class ExtractStats:
    """What a run did, for the closing summary."""

    done: int = 0
    failed: int = 0
    audio_s: float = 0.0
    wall_s: float = 0.0
    compile_s: float = 0.0
    padded_samples: int = 0
    valid_samples: int = 0
    shapes: int = 0
    silent: int = 0

    @property
    def padding_fraction(self) -> float:
        """Fraction of computed samples that were padding."""
        return 1.0 - self.valid_samples / max(self.padded_samples, 1)

    @property
    def realtime(self) -> float:
        """Seconds of audio per second of wall time."""
        return self.audio_s / max(self.wall_s, 1e-9)


def layer_selection(spec: str, num_hidden_states: int) -> list[int] | None:
    """Which hidden states to store as `layers`: None for `last`, all, or listed indices."""
    if spec == "last":
        return None
    if spec == "all":
        return list(range(num_hidden_states))
    try:
        idx = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"--layers {spec!r}: expected last, all or comma-separated indices"
        ) from None
    bad = [i for i in idx if not -num_hidden_states <= i < num_hidden_states]
    if bad or not idx:
        raise ValueError(f"--layers {spec!r}: indices must lie in 0..{num_hidden_states - 1}")
    return [i % num_hidden_states for i in idx]


def plan_items(
    durations: np.ndarray, rows: np.ndarray, max_seconds: float, long_audio: str
) -> list[Item]:
    """Items for the rows to compute: long audio cropped to max_seconds, or cut into chunks."""
    items = []
    for r in rows:
        d = float(durations[r]) if np.isfinite(durations[r]) else max_seconds
        if long_audio == "chunk" and d > max_seconds:
            n = int(np.ceil(d / max_seconds))
            items += [
                Item(int(r), k * max_seconds, min(max_seconds, d - k * max_seconds), n)
                for k in range(n)
            ]
        else:
            items.append(Item(int(r), 0.0, min(d, max_seconds), 1))
    return items


def batch_plan(
    items: Sequence[Item], cfg: Config, multiple: int, bucket_seconds: Sequence[float]
) -> list[Batch]:
    """Length-bucketed batches over items, each bucket's batch size a multiple of `multiple`.

    Rounding up to the device count keeps exactly one (B, T) shape per bucket while every
    device gets an equal slice; the extra rows are dummies (index -1, length 0). A bucket with a
    single, partial batch is trimmed to what it holds: still one shape for that bucket, and
    small corpora do not pay for a full batch of dummies.
    """
    batches = plan_batches(
        [it.seconds for it in items],
        bucket_seconds=bucket_seconds,
        batch_seconds=cfg.extract.batch_seconds,
        max_batch=cfg.extract.max_batch,
        sample_rate=cfg.audio.sample_rate,
    )
    per_bucket = collections.Counter(b.bucket for b in batches)
    out = []
    for b in batches:
        if per_bucket[b.bucket] == 1:
            real = int((b.indices >= 0).sum())
            b = dataclasses.replace(b, indices=b.indices[:real], lengths=b.lengths[:real])
        extra = -len(b.indices) % multiple
        out.append(
            dataclasses.replace(
                b,
                indices=np.pad(b.indices, (0, extra), constant_values=-1),
                lengths=np.pad(b.lengths, (0, extra)),
            )
        )
    return out


class Extractor:
    """One backbone compiled for a set of bucket shapes over a mesh of local devices."""

    def __init__(
        self, backbone: Any, layers: list[int] | None, devices: Sequence[Any] | None = None
    ):
        self.backbone = backbone
        self.layers = layers
        self.mesh = Mesh(np.asarray(devices or jax.local_devices()), ("data",))
        self.n_devices = self.mesh.size
        self._data = NamedSharding(self.mesh, P("data"))
        replicated = NamedSharding(self.mesh, P())
        self.params = jax.device_put(backbone.params, replicated)
        keep = None if layers is None else jnp.asarray(layers)

        def run(params, waves, lengths):
            pooled = backbone.pooled(params, waves, lengths)  # (B, L, D)
            last = pooled[:, -1]  # (B, D)
            return last, (None if keep is None else pooled[:, keep])  # (B, D), (B, L', D)

        self._jit = jax.jit(run, in_shardings=(replicated, self._data, self._data))
        self._compiled: dict[tuple[int, int], Any] = {}
        self.compile_s = 0.0

    def compile(self, batch: int, samples: int) -> None:
        """Compile ahead of time for one (batch, samples) shape and record the time taken."""
        if (batch, samples) in self._compiled:
            return
        t = time.perf_counter()
        w = jax.ShapeDtypeStruct((batch, samples), jnp.float32, sharding=self._data)
        n = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=self._data)
        self._compiled[(batch, samples)] = self._jit.lower(self.params, w, n).compile()
        self.compile_s += time.perf_counter() - t

    def __call__(
        self, waves: np.ndarray, lengths: np.ndarray
    ) -> tuple[jax.Array, jax.Array | None]:
        """Dispatch one padded batch (asynchronously); returns device arrays."""
        key = waves.shape
        self.compile(*key)  # no-op after warm-up: a new shape here would mean a planning bug
        w = jax.device_put(waves, self._data)
        n = jax.device_put(lengths.astype(np.int32), self._data)
        return self._compiled[key](self.params, w, n)


def _load_item(
    loader: Callable[[Path], np.ndarray], path: Path, it: Item, sr: int, max_samples: int
):
    """Decode one item's audio: the cropped utterance or its chunk, or the error message."""
    try:
        audio = loader(path)
    except Exception as e:  # noqa: BLE001 - every failure is recorded as data, never fatal
        return None, str(e)
    start = int(round(it.start_s * sr))
    return audio[start : start + max_samples], None


def run_extract(
    corpus: Any,
    backbones: dict[str, Any],
    store_path: str | Path,
    cfg: Config,
    *,
    loader: Callable[[Path], np.ndarray],
    devices: Sequence[Any] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    progress: Callable[[str, int, float], None] | None = None,
    on_start: Callable[[str, int, float], None] | None = None,
    barrier: Callable[[], None] | None = None,
) -> dict[str, ExtractStats]:
    """Fill `store_path` with every backbone's features for the corpus; resumes where it stopped.

    corpus: has `utterances` (id, path, split, arousal/valence/dominance), `abspath(u)` and
    `durations()`; backbones: store name -> loaded Backbone; loader(path) -> float32 16 kHz audio.
    """
    store_path = Path(store_path)
    utts = corpus.utterances
    durations = np.asarray(corpus.durations(), dtype=np.float32)
    create_store(
        store_path,
        ids=[u.id for u in utts],
        splits=[u.split for u in utts],
        durations=durations,
        paths=[str(u.path) for u in utts],
        labels={a: np.asarray([getattr(u, a) for u in utts], np.float32) for a in ATTRIBUTES},
        attrs={"corpus": str(getattr(corpus, "root", "")), "sample_rate": cfg.audio.sample_rate},
    )
    ex_cfg, au = cfg.extract, cfg.audio
    stats: dict[str, ExtractStats] = {}
    for name, bb in backbones.items():
        if hasattr(bb, "with_window") and ex_cfg.whisper_window_s < bb.input_seconds:
            bb = bb.with_window(ex_cfg.whisper_window_s)  # speed option: a shorter padded window
        layers = layer_selection(ex_cfg.layers, bb.num_hidden_states)
        attrs = {
            **{k: v for k, v in bb.source_info.items()},
            "pooling": "mean over valid frames",
            "layers_stored": "none" if layers is None else ",".join(map(str, layers)),
            "max_seconds": au.max_seconds,
            "long_audio": au.long_audio,
            "compute_dtype": ex_cfg.compute_dtype,
            **({"whisper_window_s": bb.input_seconds} if hasattr(bb, "with_window") else {}),
            "package_version": __import__("jax_ifmvse").__version__,
        }
        writer = StoreWriter(
            store_path,
            name,
            dim=bb.hidden_size,
            num_layers=None if layers is None else len(layers),
            dtype=ex_cfg.dtype,
            attrs=attrs,
            writer_id=f"p{process_index}",
        )
        missing = FeatureStore(store_path).missing(name)
        # Interleave by duration so every process gets the same mix of lengths.
        order = missing[np.argsort(durations[missing], kind="stable")]
        mine = order[process_index::process_count]
        ex = Extractor(bb, layers, devices)
        st = stats[name] = ExtractStats()
        # A model with a fixed input window (Whisper's 30 s) costs the same for any length:
        # one bucket at the crop length saves compiles and loses nothing.
        max_s = min(au.max_seconds, bb.input_seconds or np.inf)
        buckets = (
            (max_s,)
            if bb.input_seconds
            else tuple(b for b in au.bucket_seconds if b < max_s) + (max_s,)
        )
        items = plan_items(durations, mine, max_s, au.long_audio)
        batches = batch_plan(items, cfg, ex.n_devices, buckets)
        for shape in sorted({b.shape for b in batches}):
            ex.compile(*shape)
        st.shapes = len(ex._compiled)
        if on_start:
            on_start(name, len(mine), float(np.nansum(np.minimum(durations[mine], au.max_seconds))))
        t0 = time.perf_counter()
        _stream(ex, batches, items, corpus, loader, writer, st, cfg, progress, name, max_s)
        st.wall_s = time.perf_counter() - t0
        st.compile_s = ex.compile_s
    if barrier:
        barrier()
    if process_index == 0:
        finalize(store_path)
        if ex_cfg.layer_views:
            derive_layer_views(store_path, ex_cfg.layer_views)
    return stats


def derive_layer_views(store_path: str | Path, layer_views: Sequence[tuple[str, str]]) -> None:
    """Add views holding one stored hidden state of another backbone ("src:index"); resumable."""
    store_path = Path(store_path)
    store = FeatureStore(store_path)
    for name, spec in layer_views:
        src, _, idx = spec.partition(":")
        info = store.backbones.get(src)
        if info is None or not idx.strip().lstrip("-").isdigit():
            raise ValueError(
                f"{store_path}: layer view {name}={spec!r}: expected SOURCE:INDEX"
                f" with SOURCE one of {sorted(store.backbones)}"
            )
        stored = [
            int(x)
            for x in str(info.attrs.get("layers_stored", "none")).split(",")
            if x.strip().lstrip("-").isdigit()
        ]
        if int(idx) not in stored:
            raise ValueError(
                f"{store_path}: layer view {name}={spec!r}: hidden state {idx} of"
                f" {src!r} is not stored (stored: {stored or 'none'}; set extract.layers)"
            )
        attrs = {
            **info.attrs,
            "derived_from": src,
            "hidden_state": int(idx),
            "layers_stored": "none",
        }
        # Streams one hidden state in row chunks: memory does not grow with the corpus.
        write_layer_view(store_path, name, src, stored.index(int(idx)), attrs)
    finalize(store_path)


def _stream(ex, batches, items, corpus, loader, writer, st, cfg, progress, name, max_s) -> None:
    """Decode ahead on CPU threads, compute on device, write results as they come back."""
    sr = cfg.audio.sample_rate
    max_samples = int(round(max_s * sr))
    utts = corpus.utterances
    pending_rows: dict[int, list] = {}  # row -> chunk results for chunked long audio
    failed_rows: set[int] = set()

    def decode(batch: Batch):
        """Queue every item's decode on the pool now; the main thread collects them later."""
        its = [items[i] for i in batch.indices if i >= 0]
        futs = [
            pool.submit(_load_item, loader, corpus.abspath(utts[it.row]), it, sr, max_samples)
            for it in its
        ]
        return batch, its, futs

    def flush(job):
        its, lengths, (last, sel) = job
        last = np.asarray(last)  # blocks until the device is done with this batch
        sel = None if sel is None else np.asarray(sel)
        rows, pooled, lay = [], [], []
        for k, it in enumerate(its):
            if lengths[k] == 0:
                continue
            if it.chunks == 1:
                rows.append(it.row)
                pooled.append(last[k])
                lay.append(None if sel is None else sel[k])
                continue
            parts = pending_rows.setdefault(it.row, [])
            parts.append((lengths[k], last[k], None if sel is None else sel[k]))
            if len(parts) == it.chunks:  # all chunks in: length-weighted mean of chunk means
                w = np.asarray([p[0] for p in parts], np.float64)
                w /= w.sum()
                rows.append(it.row)
                pooled.append(sum(wi * p[1] for wi, p in zip(w, parts)))
                lay.append(None if sel is None else sum(wi * p[2] for wi, p in zip(w, parts)))
                del pending_rows[it.row]
        if rows:
            writer.write(np.asarray(rows), np.stack(pooled), None if sel is None else np.stack(lay))
            st.done += len(rows)
        if progress:
            progress(name, len(rows), float(sum(lengths)) / sr)

    with cf.ThreadPoolExecutor(max(1, cfg.extract.workers)) as pool:
        ahead: collections.deque = collections.deque()
        todo: Iterator[Batch] = iter(batches)
        for b in todo:
            ahead.append(decode(b))
            if len(ahead) >= max(1, cfg.extract.prefetch):
                break
        in_flight = None
        while ahead:
            batch, its, futs = ahead.popleft()
            results = [f.result() for f in futs]
            nxt = next(todo, None)
            if nxt is not None:
                ahead.append(decode(nxt))
            size, samples = batch.shape
            waves = np.zeros((size, samples), np.float32)  # (B, T)
            lengths = np.zeros(size, np.int64)  # (B,)
            bad_rows, reasons = [], []
            for k, (it, (audio, err)) in enumerate(zip(its, results)):
                if err is not None or audio is None or len(audio) == 0:
                    if it.row not in failed_rows:
                        failed_rows.add(it.row)
                        bad_rows.append(it.row)
                        reasons.append(err or "empty audio")
                    continue
                audio = audio[:samples]  # a header that under-reported the length
                waves[k, : len(audio)] = audio
                lengths[k] = len(audio)
                st.silent += int(is_silent(audio))
            if bad_rows:
                writer.fail(np.asarray(bad_rows), reasons)
                st.failed += len(bad_rows)
            for k, it in enumerate(its):  # a failed chunk fails its whole utterance
                if it.row in failed_rows:
                    lengths[k] = 0
            st.padded_samples += waves.size
            st.valid_samples += int(lengths.sum())
            st.audio_s += float(lengths.sum()) / sr
            job = (its, lengths, ex(waves, lengths))  # dispatched; runs while we flush the last
            if in_flight is not None:
                flush(in_flight)
            in_flight = job
        if in_flight is not None:
            flush(in_flight)


def make_loader(cfg: Config, corpus: Any) -> Callable[[Path], np.ndarray]:
    """Audio loader for the config: 16 kHz mono float32, cropped or whole, normalized."""
    from jax_ifmvse.data.audio import load_audio, normalize, train_stats

    au = cfg.audio
    max_s = None if au.long_audio == "chunk" else au.max_seconds
    stats = None
    if au.normalize == "train":
        train = [corpus.abspath(u) for u in corpus.utterances if u.split == cfg.train.train_split]
        mean, std, _ = train_stats(train, sample_rate=au.sample_rate, max_seconds=au.max_seconds)
        stats = (mean, std)

    def load(path: Path) -> np.ndarray:
        x = load_audio(path, sample_rate=au.sample_rate, max_seconds=max_s)
        return normalize(x, au.normalize, stats)

    return load


def extract_main(
    cfg: Config,
    pairs: dict[str, str],
    store: str,
    coordinator: str | None = None,
    num_processes: int = 1,
    process_id: int = 0,
) -> dict[str, ExtractStats]:
    """The `ifmvse extract` command: load corpus and backbones, run with progress, summarise."""
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table

    from jax_ifmvse.backbones import load_backbone
    from jax_ifmvse.data.corpus import load_corpus
    from jax_ifmvse.report import make_console

    barrier = None
    if coordinator or num_processes > 1:
        from jax.experimental import multihost_utils

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
        barrier = lambda: multihost_utils.sync_global_devices("ifmvse-extract")  # noqa: E731
    console = make_console(stderr=True)
    corpus = load_corpus(cfg.corpus.kind, cfg.corpus.path)
    loaded = {}
    for name, source in pairs.items():
        with console.status(f"loading {name} from {source}"):
            loaded[name] = load_backbone(
                source,
                dtype=cfg.extract.compute_dtype,
                cache_dir=Path(cfg.extract.cache_dir).expanduser(),
            )
    loader = make_loader(cfg, corpus)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} utt"),
        TextColumn("{task.fields[hours]:.2f} h audio"),
        TextColumn("{task.fields[xrt]:.1f}x RT"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        tasks: dict[str, Any] = {}
        t0: dict[str, float] = {}
        audio: dict[str, float] = {}

        def on_start(name: str, n: int, seconds: float) -> None:
            tasks[name] = bar.add_task(name, total=n, hours=0.0, xrt=0.0)
            t0[name], audio[name] = time.perf_counter(), 0.0

        def progress(name: str, n: int, seconds: float) -> None:
            audio[name] += seconds
            dt = time.perf_counter() - t0[name]
            bar.update(
                tasks[name], advance=n, hours=audio[name] / 3600, xrt=audio[name] / max(dt, 1e-9)
            )

        stats = run_extract(
            corpus,
            loaded,
            store,
            cfg,
            loader=loader,
            process_index=process_id,
            process_count=num_processes,
            progress=progress,
            on_start=on_start,
            barrier=barrier,
        )
    table = Table(title=f"extract -> {store} (process {process_id}/{num_processes})")
    for col in (
        "backbone",
        "done",
        "failed",
        "silent",
        "audio s",
        "wall s",
        "x real-time",
        "padding",
        "shapes",
        "compile s",
    ):
        table.add_column(col, justify="left" if col == "backbone" else "right")
    for name, st in stats.items():
        table.add_row(
            name,
            str(st.done),
            str(st.failed),
            str(st.silent),
            f"{st.audio_s:.1f}",
            f"{st.wall_s:.1f}",
            f"{st.realtime:.1f}",
            f"{st.padding_fraction:.1%}",
            str(st.shapes),
            f"{st.compile_s:.1f}",
        )
    make_console().print(table)
    return stats
