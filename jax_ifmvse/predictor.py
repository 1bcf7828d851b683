"""A warm, in-process predictor: a run's backbones, heads and weights loaded and compiled once.

`ifmvse serve` keeps one `Predictor` for its lifetime; `bench/bench_serve.py` scores clips one
by one through it. Each call goes through the batch path of `ifmvse extract` (the same
`backbone_plan`, `Extractor`, `batch_plan` and `_stream` decode/compute/pool loop, with the
extraction settings the run's store recorded, as `ifmvse predict` uses them), then the run's best
heads and its ensemble weights. Only the feature store is replaced by memory, with the store's
dtype rounding kept, so the numbers equal `ifmvse predict`'s (tested). Batches are padded to a
few fixed sizes per bucket (powers of two), all compiled by `warm_up()`, so no request compiles.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jax_ifmvse.config import ATTRIBUTES
from jax_ifmvse.predict import PredictError, Prediction, _extract_cfg, _run_parts, extraction_plan

SHORT_SECONDS = 0.025  # shorter than one 25-ms analysis frame: the features carry no speech


@dataclasses.dataclass(frozen=True)
class Scored:
    """One file's prediction plus what the server reports about its audio."""

    prediction: Prediction
    duration_s: float | None  # from the file header; None when unreadable
    flags: tuple[str, ...]  # "silent", "short", "cropped"


class _MemoryWriter:
    """Collects what `_stream` would write to a store: features per row, failures per row."""

    def __init__(self, dtype: str):
        self.dtype = np.dtype(dtype)
        self.pooled: dict[int, np.ndarray] = {}
        self.layers: dict[int, np.ndarray] = {}
        self.failed: dict[int, str] = {}
        self.flags: dict[int, str] = {}

    def write(self, indices, pooled, layers=None, flags=None) -> None:
        """Like `StoreWriter.write`: rounded to the store dtype and read back as float32."""
        for k, r in enumerate(np.asarray(indices)):
            self.pooled[int(r)] = np.asarray(pooled[k]).astype(self.dtype).astype(np.float32)
            if layers is not None:
                self.layers[int(r)] = np.asarray(layers[k]).astype(self.dtype).astype(np.float32)
            if flags is not None and flags[k]:
                self.flags[int(r)] = str(flags[k])

    def fail(self, indices, reasons) -> None:
        """Like `StoreWriter.fail`: one reason per row."""
        for r, why in zip(np.asarray(indices), reasons, strict=True):
            self.failed[int(r)] = str(why)


@dataclasses.dataclass
class _Source:
    """One source backbone compiled for its buckets, with the settings the run's store recorded."""

    name: str
    attrs: dict
    cfg: Any  # Config with this backbone's extraction settings
    extractor: Any
    layers: list[int] | None
    max_s: float
    buckets: tuple[float, ...]
    sizes: dict[int, tuple[int, ...]]  # bucket index -> compiled batch sizes


class Predictor:
    """A run ready to score audio files in memory; `warm_up()` compiles every program it uses."""

    def __init__(self, run: str | Path, *, max_clips: int = 16):
        from jax_ifmvse.backbones import load_backbone
        from jax_ifmvse.extract import Extractor, backbone_plan
        from jax_ifmvse.train import load_heads

        self.run = Path(run)
        self.max_clips = max(1, int(max_clips))
        manifest, cfg, weights = _run_parts(self.run)
        if cfg.audio.normalize == "train":
            raise PredictError(
                f"{self.run}: audio.normalize=train needs the training corpus; unsupported"
            )
        self.cfg = cfg
        views = sorted({v for s in cfg.model.score_sets for v in s.views})
        sources, self.layer_views = extraction_plan(Path(manifest["store"]), views)
        self.views = views
        self.names = [s.name for s in cfg.model.score_sets]
        self.weights = {a: (weights["attributes"].get(a) or {}).get("weights") for a in ATTRIBUTES}
        self.score = load_heads(self.run)
        self.sources: list[_Source] = []
        for name, attrs in sources.items():
            bcfg = _extract_cfg(cfg, attrs)
            bb = load_backbone(
                str(attrs["source"]),
                dtype=bcfg.extract.compute_dtype,
                cache_dir=Path(cfg.extract.cache_dir).expanduser(),
            )
            bb, layers, max_s, buckets = backbone_plan(bb, bcfg)
            ex = Extractor(bb, layers)
            full = _bucket_sizes(bcfg, buckets, ex.n_devices)
            sizes = {b: _pow2_sizes(n, ex.n_devices) for b, n in enumerate(full)}
            self.sources.append(_Source(name, attrs, bcfg, ex, layers, max_s, buckets, sizes))
        self.ready = False
        self.warmup_s: float | None = None
        self._lock = threading.Lock()  # one call at a time: the extractors are not reentrant

    def warm_up(self) -> float:
        """Compile every (batch, samples) program and the heads once; returns seconds taken."""
        t = time.perf_counter()
        for src in self.sources:
            for b, sizes in src.sizes.items():
                samples = int(round(src.buckets[b] * src.cfg.audio.sample_rate))
                for n in sizes:
                    src.extractor.compile(n, samples)
        # The heads compile per row count, so they always see max_clips rows (padded).
        self._heads({v: np.zeros((1, *self._view_shape(v)), np.float32) for v in self.views})
        self.ready = True
        self.warmup_s = time.perf_counter() - t
        return self.warmup_s

    def programs(self) -> dict[str, list[list[int]]]:
        """Per source backbone the (batch, samples) shapes compiled."""
        return {
            src.name: [list(k) for k in sorted(src.extractor._compiled)] for src in self.sources
        }

    def _view_shape(self, view: str) -> tuple[int, ...]:
        src = self._source_of(view)
        return (src.extractor.backbone.hidden_size,)

    def _source_of(self, view: str) -> _Source:
        name = dict(self.layer_views).get(view, view).split(":")[0]
        return next(s for s in self.sources if s.name == name)

    def _heads(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """(K, N, 3) scores, the N rows padded to a multiple of max_clips (one compiled shape)."""
        n = len(next(iter(features.values())))
        pad = -n % self.max_clips if n else self.max_clips
        padded = {v: np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) for v, x in
                  features.items()}  # fmt: skip
        return self.score(padded)[:, :n]

    def predict_files(self, files: Sequence[str | Path]) -> list[Scored]:
        """Scores for audio files (clipped to 1..7 as `ifmvse predict`), with duration and flags."""
        with self._lock:
            return self._predict(list(files))

    def _predict(self, files: list[str | Path]) -> list[Scored]:
        from jax_ifmvse.data.audio import is_silent
        from jax_ifmvse.data.corpus import Corpus, Utterance
        from jax_ifmvse.ensemble import LABEL_RANGE, apply_weights
        from jax_ifmvse.extract import ExtractStats, _stream, make_loader, plan_items

        if not files:
            return []
        paths = [Path(f).expanduser().absolute() for f in files]
        utts = tuple(
            Utterance(id=f"{i:06d}", path=p.as_posix().lstrip("/"), split="Test1")
            for i, p in enumerate(paths)
        )
        corpus = Corpus(root=Path("/"), utterances=utts, source="ifmvse serve")
        durations = np.asarray(corpus.durations(), np.float32)
        rows = np.arange(len(utts))
        feats: dict[str, dict[int, np.ndarray]] = {}
        layers: dict[str, dict[int, np.ndarray]] = {}
        errors: dict[int, str] = {}
        flags: dict[int, set[str]] = {r: set() for r in rows}
        for src in self.sources:
            base = make_loader(src.cfg, corpus)
            silent: dict[Path, bool] = {}

            def loader(path: Path, base=base, silent=silent) -> np.ndarray:
                x = base(path)
                silent[path] = silent.get(path, True) and is_silent(x)
                return x

            au = src.cfg.audio
            items = plan_items(durations, rows, src.max_s, au.long_audio)
            batches = self._batches(src, items)
            writer = _MemoryWriter(str(src.attrs["_dtype"]))
            _stream(
                src.extractor, batches, items, corpus, loader, writer, ExtractStats(),
                src.cfg, None, src.name, src.max_s,
            )  # fmt: skip
            feats[src.name], layers[src.name] = writer.pooled, writer.layers
            for r, why in writer.failed.items():
                errors.setdefault(r, why)
            for r in rows:
                p = corpus.abspath(utts[r])
                if silent.get(p):
                    flags[r].add("silent")
                if au.long_audio == "crop" and durations[r] > src.max_s + 1e-6:
                    flags[r].add("cropped")
                if durations[r] < SHORT_SECONDS:
                    flags[r].add("short")
            for r, f in writer.flags.items():
                flags[r].update(x for x in f.split(",") if x)
        good = [
            r for r in rows if r not in errors and all(r in feats[s.name] for s in self.sources)
        ]
        out: list[Scored] = []
        pred = np.zeros((0, 3))
        if good:
            views = {}
            for v in self.views:
                spec = dict(self.layer_views).get(v)
                if spec is None:
                    views[v] = np.stack([feats[v][r] for r in good])  # (N, D)
                else:
                    src_name, idx = spec.split(":")
                    src = next(s for s in self.sources if s.name == src_name)
                    k = src.layers.index(int(idx))
                    views[v] = np.stack([layers[src_name][r][k] for r in good])  # (N, D)
            pred = apply_weights(self._heads(views), self.weights, self.names)  # (N, 3)
            if self.cfg.corpus.normalize_labels:
                pred = np.clip(pred, *LABEL_RANGE)  # ratings, clipped as `ifmvse predict` does
        at = {r: i for i, r in enumerate(good)}
        for r, f in enumerate(files):
            dur = float(durations[r]) if np.isfinite(durations[r]) else None
            if r in at:
                vals = tuple(float(v) for v in pred[at[r]])
                p = Prediction(str(f), vals)
            else:
                p = Prediction(str(f), None, errors.get(r, "no features computed"))
            out.append(Scored(p, dur, tuple(sorted(flags[r]))))
        return out

    def _batches(self, src: _Source, items) -> list:
        """`batch_plan`'s bucketed batches, each padded to the smallest compiled size that fits."""
        from jax_ifmvse.extract import batch_plan

        out = []
        for b in batch_plan(items, src.cfg, src.extractor.n_devices, src.buckets):
            real = int((b.indices >= 0).sum())
            size = next(s for s in src.sizes[b.bucket] if s >= real)
            keep = b.indices[b.indices >= 0], b.lengths[b.indices >= 0]
            out.append(
                dataclasses.replace(
                    b,
                    indices=np.pad(keep[0], (0, size - real), constant_values=-1),
                    lengths=np.pad(keep[1], (0, size - real)),
                )
            )
        return out

    def info(self) -> dict:
        """What `GET /info` reports about the run: backbones, score sets, weights, programs."""
        return {
            "run": str(self.run),
            "backbones": {
                s.name: {
                    k: s.attrs[k]
                    for k in (
                        "source",
                        "resolved_path",
                        "sha256",
                        "model_type",
                        "max_seconds",
                        "long_audio",
                        "layers_stored",
                        "whisper_window_s",
                        "compute_dtype",
                    )
                    if k in s.attrs
                }  # fmt: skip
                for s in self.sources
            },
            "layer_views": dict(self.layer_views),
            "score_sets": [
                {"name": s.name, "kind": s.kind, "views": list(s.views)}
                for s in self.cfg.model.score_sets
            ],
            "ensemble_weights": self.weights,
            "programs": self.programs(),
            "warmup_s": self.warmup_s,
        }


def _bucket_sizes(cfg: Any, buckets: Sequence[float], multiple: int) -> list[int]:
    """The full batch size of each bucket, as `batch_plan` pads it (a multiple of the devices)."""
    from jax_ifmvse.data.buckets import bucket_batch_sizes

    full = bucket_batch_sizes(buckets, cfg.extract.batch_seconds, cfg.extract.max_batch)
    return [n + (-n % multiple) for n in full]


def _pow2_sizes(full: int, multiple: int) -> tuple[int, ...]:
    """Compiled batch sizes up to `full`: multiple * 1, 2, 4, ... and `full` itself."""
    sizes, n = [], multiple
    while n < full:
        sizes.append(n)
        n *= 2
    return (*sizes, full)
