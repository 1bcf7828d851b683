"""`ifmvse extract`: fill a feature store from a corpus with pretrained backbones.

The pipeline streams: CPU threads decode and resample audio for the next batches while the
device computes the current one (JAX dispatch is asynchronous, so the host writes batch k while
the device runs batch k+1); batches come from length buckets, so there is one compiled program
per bucket shape, compiled ahead of time and timed; pooling happens on the device, so only
(B, L, D) vectors cross to the host. Each local device takes a slice of every batch through a
mesh `data` axis. A job of many hosts is N stateless shards (`--shard K/N`, see
`featurestore.jobs`): shard k computes its own rows (a pure function of the durations and N)
still missing, writes its own journal files and exits; it never waits for a peer. Whoever runs
the shards (a SLURM array, a Kubernetes Indexed Job, Ray: `jax_ifmvse.ray_engine`) retries them
and then runs `ifmvse store finalize` (`finalize_job`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featurestore import FeatureStore, StoreWriter, create_store, finalize, jobs, write_layer_view
from featurestore.frames import (
    FrameWriter,
    check_disk,
    estimate_bytes,
    finalize_frames,
    missing_frames,
    pending_bytes,
)
from featurestore.jobs import shard_rows, share_order
from jax_ifmvse.backbones import load_backbone
from jax_ifmvse.config import ATTRIBUTES, Config
from jax_ifmvse.data.corpus import load_corpus
from jax_ifmvse.encode import (
    FRAMES_PER_SECOND,
    INPUT_ATTRS,
    ExtractError,
    Extractor,
    backbone_plan,
    batch_plan,
    layer_selection_one,
    make_loader,
    plan_items,
    stats_path_for,
)
from jax_ifmvse.provenance import corpus_record
from jax_ifmvse.report import make_console
from jax_ifmvse.stream import ExtractStats, Streamer


def run_extract(
    corpus: Any,
    backbones: dict[str, Any],
    store_path: str | Path,
    cfg: Config,
    *,
    loader: Callable[[Path], np.ndarray],
    devices: Sequence[Any] | None = None,
    progress: Callable[[str, int, float], None] | None = None,
    on_start: Callable[[str, int, float], None] | None = None,
    shard: tuple[int, int] | None = None,
    retry_failed: str | None = None,
) -> dict[str, ExtractStats]:
    """Fill `store_path` with every backbone's features for the corpus; resumes where it stopped.

    corpus: has `utterances` (id, path, split, arousal/valence/dominance), `abspath(u)` and
    `durations()`; backbones: store name -> loaded Backbone; loader(path) -> float32 16 kHz audio.
    shard: (k, n) computes only shard k's rows still missing and leaves the merge to
    `finalize_job`; None computes every missing row and finalizes. retry_failed: also recompute
    rows recorded as failed ("" all of them, else those whose reason contains it, any case).
    """
    store_path = Path(store_path)
    durations = _create_store(store_path, corpus, cfg)
    ex_cfg, au = cfg.extract, cfg.audio
    utts = corpus.utterances

    def path_of(row: int) -> Path:
        return corpus.abspath(utts[row])

    stats: dict[str, ExtractStats] = {}
    for name, bb in backbones.items():
        bb, layers, max_s, buckets = backbone_plan(bb, cfg)
        attrs = {
            **{k: v for k, v in bb.source_info.items()},
            "pooling": "mean over valid frames",
            "layers_stored": "none" if layers is None else ",".join(map(str, layers)),
            "max_seconds": au.max_seconds,
            "long_audio": au.long_audio,
            # What reproduces this backbone's input (`predict` reads these, not a config).
            "sample_rate": au.sample_rate,
            "normalize": au.normalize,
            **getattr(loader, "attrs", {"normalize": f"custom loader ({au.normalize})"}),
            **({"chunk_min_samples": bb.min_samples} if au.long_audio == "chunk" else {}),
            "compute_dtype": ex_cfg.compute_dtype,
            **({"whisper_window_s": bb.input_seconds} if hasattr(bb, "with_window") else {}),
            "package_version": __import__("jax_ifmvse").__version__,
        }
        _check_resume(store_path, name, attrs)
        frames_layer = None if not ex_cfg.frames else layer_selection_one(ex_cfg.frames, bb)
        frame_writer = None
        if frames_layer is not None:
            frame_writer = _frames_start(
                store_path, name, bb, durations, au, max_s, ex_cfg.frames_merge_gb
            )
        writer = StoreWriter(
            store_path,
            name,
            dim=bb.hidden_size,
            num_layers=None if layers is None else len(layers),
            dtype=ex_cfg.dtype,
            attrs=attrs,
            writer_id="p0" if shard is None else f"shard{shard[0]}of{shard[1]}",
        )
        missing = FeatureStore(store_path).missing(name)
        if retry_failed is not None:
            missing = np.union1d(missing, failed_rows(store_path, name, retry_failed))
        if frame_writer is not None:  # a kill between a row's pooled and frame writes
            missing = np.union1d(missing, missing_frames(store_path, name))
        if shard is None:
            mine = share_order(missing, durations)
        else:  # our rows, from the durations alone, less what is already stored or failed
            mine = shard_rows(durations, *shard)
            mine = mine[np.isin(mine, missing)]
        ex = Extractor(bb, layers, devices, frames_layer)
        st = stats[name] = ExtractStats()
        items = plan_items(durations, mine, max_s, au.long_audio, au.sample_rate, bb.min_samples)
        batches = batch_plan(items, cfg, ex.n_devices, buckets)
        for shape in sorted({b.shape for b in batches}):
            ex.compile(*shape)
        st.shapes = len(ex._compiled)
        if on_start:
            on_start(name, len(mine), float(np.nansum(np.minimum(durations[mine], au.max_seconds))))
        t0 = time.perf_counter()
        streamer = Streamer(
            ex, au, ex_cfg, max_s, min_samples=bb.min_samples,
            replan=lambda new, ex=ex, buckets=buckets: batch_plan(new, cfg, ex.n_devices, buckets),
            frames=frame_writer, leave_io_missing=True,
        )  # fmt: skip
        streamer.run(batches, items, path_of, loader, writer, st, progress, name)
        st.wall_s = time.perf_counter() - t0
        st.compile_s = ex.compile_s

    if shard is None:
        finalize(store_path)
        if ex_cfg.frames:
            for name in backbones:
                finalize_frames(store_path, name)
        if ex_cfg.layer_views:
            derive_layer_views(store_path, ex_cfg.layer_views)
    return stats


def failed_rows(store_path: str | Path, name: str, reason: str = "") -> np.ndarray:
    """Rows of a backbone recorded as failed whose reason contains `reason` (any case)."""
    store = FeatureStore(store_path)
    if name not in store.backbones:
        return np.zeros(0, np.int64)
    want = reason.lower()
    failed = store._view(name).failed
    return np.asarray(sorted(r for r, why in failed.items() if want in why.lower()), np.int64)


def _frames_start(
    store_path: Path, name: str, bb: Any, durations, au, max_s: float, ex_cfg_merge_gb: float = 2.0
):
    """A FrameWriter for one backbone, after printing the size its missing frames need and
    refusing (one line) when the disk lacks it."""
    todo = missing_frames(store_path, name)
    seconds = np.minimum(np.nan_to_num(durations[todo], nan=max_s), max_s)
    data = estimate_bytes(np.ceil(seconds * FRAMES_PER_SECOND), bb.hidden_size)
    merge = int(ex_cfg_merge_gb * 1e9)
    # The peak: every new frame once, plus a merge's copy of what is pending at most (a merge
    # writes the pending batches into a segment before it deletes them).
    waiting = pending_bytes(store_path, name)
    need = data + min(data, merge) + waiting
    free = check_disk(store_path, need)
    print(
        f"{name}: frames of {len(todo)} rows need about {data / 1e9:.2f} GB, {need / 1e9:.2f} GB"
        f" at the merge's peak ({free / 1e9:.1f} GB free)",
        file=sys.stderr,
        flush=True,
    )
    return FrameWriter(store_path, name, bb.hidden_size, merge_bytes=merge)


def _create_store(store_path: Path, corpus: Any, cfg: Config) -> np.ndarray:
    """Create the store for the corpus (or check an existing one); returns the durations."""
    utts = corpus.utterances
    durations = np.asarray(corpus.durations(), dtype=np.float32)
    create_store(
        store_path,
        ids=[u.id for u in utts],
        splits=[u.split for u in utts],
        durations=durations,
        paths=[str(u.path) for u in utts],
        labels={a: np.asarray([getattr(u, a) for u in utts], np.float32) for a in ATTRIBUTES},
        attrs={
            "corpus": str(getattr(corpus, "root", "")),
            "sample_rate": cfg.audio.sample_rate,
            "corpus_record": corpus_record(corpus),  # name, size, label sha256, demo or not
        },
        codes={
            "EmoClass": [getattr(u, "emo_class", None) for u in utts],
            "Gender": [getattr(u, "gender", None) for u in utts],
        },
    )
    return durations


# Extraction settings that may differ per host (they do not change the stored features); every
# other extract.* and audio.* setting must agree. Backbones are compared by name and weights.
_PER_HOST_SETTINGS = (
    "backbones",
    "batch_seconds",
    "max_batch",
    "workers",
    "prefetch",
    "cache_dir",
    "io_retries",
    "io_backoff_s",
    "frames_merge_gb",
)


def job_fingerprint(
    corpus: Any, backbones: dict[str, Any], cfg: Config, num_shards: int
) -> dict[str, Any]:
    """What every shard of a job must agree on: corpus, models, feature settings, count."""
    ids = "\n".join(u.id for u in corpus.utterances).encode()
    fp: dict[str, Any] = {
        "num_shards": int(num_shards),
        "corpus ids": f"{len(corpus.utterances)} ids, sha256 {hashlib.sha256(ids).hexdigest()}",
        "backbone names": ",".join(backbones),
        "package version": __import__("jax_ifmvse").__version__,
    }
    for name, bb in backbones.items():
        info = bb.source_info
        fp[f"backbone {name} sha256"] = info.get("sha256") or f"(none; source {info})"
    for section in ("extract", "audio"):
        sub = getattr(cfg, section)
        for f in dataclasses.fields(sub):
            if not (section == "extract" and f.name in _PER_HOST_SETTINGS):
                fp[f"{section}.{f.name}"] = str(getattr(sub, f.name))
    return fp


def finalize_job(store_path: str | Path) -> tuple[int, list[jobs.Missing], dict | None]:
    """Merge what every shard wrote, derive the job's layer views, retire a completed job.

    Safe while shards still write (the store's lock; later journal files wait for the next
    finalize). Returns (journal files merged, what is missing per backbone, the job record).
    """
    store_path = Path(store_path)
    merged = finalize(store_path)
    for name in FeatureStore(store_path).backbones:  # frames the shards wrote (--frames)
        finalize_frames(store_path, name)
    job = jobs.read_job(store_path)
    views = [tuple(v) for v in (job or {}).get("layer_views", [])]
    if views:
        # A source no shard has written yet (finalize while shards start) comes next time; a
        # source that is no backbone of the job still fails, with derive_layer_views' message.
        have, planned = FeatureStore(store_path).backbones, set(job.get("backbones", []))
        src = {v: v[1].partition(":")[0] for v in views}
        views = [v for v in views if src[v] in have or src[v] not in planned]
    if views:
        derive_layer_views(store_path, views)
    report = jobs.missing_report(store_path, job)
    mine = set((job or {}).get("backbones", []))
    if job is not None and not any(
        len(m.rows) or m.num_frames_missing for m in report if m.backbone in mine
    ):
        jobs.retire_job(store_path)  # done: a new job (other settings, N) may use this store
    return merged, report, job


def derive_layer_views(store_path: str | Path, layer_views: Sequence[tuple[str, str]]) -> None:
    """Add views holding one stored hidden state of another backbone ("src:index"); resumable."""
    store_path = Path(store_path)
    store = FeatureStore(store_path)
    for name, spec in layer_views:
        src, _, idx = spec.partition(":")
        info = store.backbones.get(src)
        if info is None or not idx.strip().lstrip("-").isdigit():
            raise ExtractError(
                f"{store_path}: layer view {name}={spec!r}: expected SOURCE:INDEX"
                f" with SOURCE one of {sorted(store.backbones)}"
            )
        stored = [
            int(x)
            for x in str(info.attrs.get("layers_stored", "none")).split(",")
            if x.strip().lstrip("-").isdigit()
        ]
        if int(idx) not in stored:
            raise ExtractError(
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


def _check_resume(store_path: Path, name: str, attrs: dict[str, Any]) -> None:
    """Refuse to append to a backbone whose stored rows came from a different input."""
    known = FeatureStore(store_path).backbones.get(name) if store_path.exists() else None
    if known is None:
        return
    diff = [
        f"{k} {known.attrs[k]!r} != {attrs.get(k)!r}"
        for k in INPUT_ATTRS
        if k in known.attrs and known.attrs[k] != attrs.get(k)
    ]
    if diff:
        raise ExtractError(
            f"{store_path}: backbone {name!r} was extracted with other input settings "
            f"({'; '.join(diff)}); use another store or backbone name"
        )


def extract_main(
    cfg: Config,
    pairs: dict[str, str],
    store: str,
    shard: tuple[int, int, str] | None = None,
    retry_failed: str | None = None,
) -> dict[str, ExtractStats]:
    """The `ifmvse extract` command: load corpus and backbones, run with progress, summarise.

    shard: (k, n, where it came from) runs shard k of a job of n (`featurestore.jobs`): the
    shard's lock first (one process per shard), then the job's fingerprint, recorded by the
    first shard and checked by every other before anything is written; no finalize.
    """
    from rich.table import Table

    console = make_console(stderr=True)
    with contextlib.ExitStack() as held:
        if shard is not None:
            k, n, where = shard
            console.print(f"shard {k}/{n} (from {where})", highlight=False)
            held.enter_context(jobs.shard_lock(store, k, n))  # before the minutes of loading
            jobs.check_shard_count(store, n, who=f"shard {k}/{n}")
        corpus = load_corpus(cfg.corpus.kind, cfg.corpus.path, cfg.corpus.audio_root or None)
        loaded = {}
        for name, source in pairs.items():
            with console.status(f"loading {name} from {source}"):
                loaded[name] = load_backbone(
                    source,
                    dtype=cfg.extract.compute_dtype,
                    cache_dir=cfg.extract.cache_dir or None,  # None: cache_root()
                )

        def report(st, computed):
            how = "computed" if computed else "read from " + str(stats_path_for(store))
            console.print(
                f"Train statistics ({how}): mean {st.mean:.3g}, std {st.std:.3g} over "
                f"{st.files} files; {len(st.failures)} could not be decoded"
                + "".join(f"\n  {p}: {r}" for p, r in st.failures[:20]),
                highlight=False,
            )

        loader = make_loader(cfg, corpus, stats_path=stats_path_for(store), report=report)
        if shard is not None:
            fp = job_fingerprint(corpus, loaded, cfg, n)
            extra = {
                "num_shards": n,
                "backbones": list(loaded),
                "layer_views": [list(v) for v in cfg.extract.layer_views],
            }
            jobs.record_job(store, fp, extra, who=f"shard {k}/{n}")
        stats = _extract_with_progress(
            corpus, loaded, store, cfg, loader, console, None if shard is None else (k, n),
            retry_failed,
        )  # fmt: skip
    where = "" if shard is None else f" (shard {shard[0]}/{shard[1]})"
    table = Table(title=f"extract -> {store}{where}")
    for col in (
        "backbone",
        "done",
        "failed",
        "silent",
        "short",
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
            str(st.short),
            f"{st.audio_s:.1f}",
            f"{st.wall_s:.1f}",
            f"{st.realtime:.1f}",
            f"{st.padding_fraction:.1%}",
            str(st.shapes),
            f"{st.compile_s:.1f}",
        )
    out = make_console()
    out.print(table)
    for line in unlisted_lines(corpus):
        out.print(line)
    io = {name: st for name, st in stats.items() if st.io_missing}
    if io:
        name, st = next(iter(io.items()))
        row, why = st.io_example
        total = sum(s.io_missing for s in io.values())
        rerun = "rerun this shard" if shard is not None else "rerun the same command"
        raise ExtractError(
            f"{store}{where}: {total} row(s) left missing after I/O errors outlasted"
            f" {cfg.extract.io_retries} retries (first: {name}, {corpus.abspath(corpus.utterances[row])}:"
            f" {why}); {rerun} (or let the scheduler requeue it) to compute them"
        )
    return stats


def _extract_with_progress(
    corpus: Any,
    loaded: dict[str, Any],
    store: str,
    cfg: Config,
    loader: Callable[[Path], np.ndarray],
    console: Any,
    shard: tuple[int, int] | None,
    retry_failed: str | None = None,
) -> dict[str, ExtractStats]:
    """`run_extract` under a progress bar (on a terminal) and, for a shard, a line per backbone."""
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

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

        done: dict[str, list[int]] = {}  # backbone -> [rows done, rows to do]
        last_note = [0.0]

        def note(force: bool = False) -> None:
            """A shard's progress for whoever runs the shards (`STORE.jobs/progress-K.json`)."""
            if shard is None or (not force and time.monotonic() - last_note[0] < 5.0):
                return
            last_note[0] = time.monotonic()
            jobs.write_progress(store, shard[0], {k: tuple(v) for k, v in done.items()})

        def on_start(name: str, n: int, seconds: float) -> None:
            if shard is not None:  # what a rerun of this shard has left to do, in the log
                console.print(
                    f"shard {shard[0]}/{shard[1]}: {name}: {n} rows to compute", highlight=False
                )
            done[name] = [0, n]
            note(force=True)
            tasks[name] = bar.add_task(name, total=n, hours=0.0, xrt=0.0)
            t0[name], audio[name] = time.perf_counter(), 0.0

        def progress(name: str, n: int, seconds: float) -> None:
            done[name][0] += n
            note()
            audio[name] += seconds
            dt = time.perf_counter() - t0[name]
            bar.update(
                tasks[name], advance=n, hours=audio[name] / 3600, xrt=audio[name] / max(dt, 1e-9)
            )

        out = run_extract(
            corpus,
            loaded,
            store,
            cfg,
            loader=loader,
            progress=progress,
            on_start=on_start,
            shard=shard,
            retry_failed=retry_failed,
        )
        note(force=True)
        return out


def unlisted_lines(corpus: Any, show: int = 20) -> list[str]:
    """Summary lines naming the audio files of the corpus folder that are in no split."""
    names = list(getattr(corpus, "unlisted", ()))
    if not names:
        return []
    more = f" and {len(names) - show} more" if len(names) > show else ""
    return [
        f"{len(names)} audio file(s) under the corpus have no label row and are not an official"
        f" unlabelled test set, so they were not extracted: {', '.join(names[:show])}{more}"
    ]
