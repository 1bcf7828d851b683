"""The one in-process prediction path: a run's backbones, heads and weights loaded once.

`ifmvse predict` (`predict.predict_files`, one call), `ifmvse serve` (one `Predictor` for its
lifetime) and `bench/bench_serve.py` all score through `Predictor`. Each call goes through the
batch path of `ifmvse extract` (`jax_ifmvse.encode`'s `backbone_plan`, `Extractor`, `plan_items`,
`batch_plan` and the `Streamer` decode/compute/pool loop, chunking from the decoded audio) with
the input settings the run's store recorded per backbone (`extraction_settings`: source, sample
rate, crop or chunk, waveform normalisation with its train statistics, layers, Whisper window,
compute dtype; never the run's config), then the run's best heads and `ensemble.combine`, so a file missing some view
is scored from the score sets it has, as the batch path scores such rows. A file nothing of
could be heard (refused by `data.audio.probe_audio`'s header checks, the ones `serve` makes, or
failing to decode) gets no values and its reason (`Prediction.error`), or the Train label mean
only when asked for (`fallback="label-mean"`); submissions keep that fallback for every row
(`ensemble`, `fallbacks_<split>.csv`). What was done to each clip (`clip_flags`: cropped,
chunked, short, silent, resampled from N Hz) is computed here once for both commands. Only the
feature store is replaced by memory, with the store's dtype
rounding kept, so the numbers equal the batch path's (tested). Batches are padded to a few fixed
sizes per bucket (powers of two), all compiled by `warm_up()`, so no served request compiles;
a one-off call compiles only the shapes it meets.

`RunPredictor` is the protocol `predict` and `serve` use: `Predictor` (trained heads) and
`finetune.predictor.FinetunedPredictor` (a fine-tuned backbone) implement it.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from jax_ifmvse.backbones import load_backbone
from jax_ifmvse.categories import CLASS_CODES, CLASS_NAMES
from jax_ifmvse.config import ATTRIBUTES
from jax_ifmvse.data.audio import AudioProbe, probe_audio
from jax_ifmvse.data.buckets import bucket_batch_sizes
from jax_ifmvse.data.corpus import Corpus, Utterance
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
)
from jax_ifmvse.ensemble.combine import LABEL_RANGE, combine, combine_probs
from jax_ifmvse.inference import (
    PredictError,
    extraction_plan,
    extraction_settings,
    load_heads,
    load_run,
    text_plan,
)
from jax_ifmvse.provenance import demo_warning, describe, run_corpus
from jax_ifmvse.stream import ExtractStats, Streamer
from jax_ifmvse.text.views import RowText, TextViews

FALLBACKS = ("none", "label-mean")  # what stands in for a file nothing could be heard of


class RunPredictor(Protocol):
    """What `predict` and `serve` need of a run loaded for scoring."""

    ready: bool  # True once `warm_up` has compiled every program

    def warm_up(self) -> float:
        """Compile every scoring program; seconds taken."""
        ...

    def programs(self) -> dict[str, list[list[int]]]:
        """The input shapes compiled, per backbone."""
        ...

    def predict_files(self, files: Sequence[str | Path]) -> list[Scored]:
        """One `Scored` per file, in order."""
        ...

    def info(self) -> dict:
        """What `GET /info` reports."""
        ...


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One file's ensembled attributes (clipped to 1..7 as in the submission file), or why it
    could not be scored (`error`), and what was done to its audio (`duration_s`, `flags`).

    A file that failed has `values=None` unless the Predictor was asked for the Train label
    mean (`fallback="label-mean"`), which then fills `values` and says so in `fallback`. A task 1
    only run (no attribute heads) answers `values=None` for every file: nothing scores them.
    """

    file: str
    values: tuple[float, float, float] | None  # ATTRIBUTES order; None when not scored
    error: str | None = None  # why nothing of the file could be heard (no file name), else None
    fallback: str = ""  # "" = the full ensemble; else what stood in (renormalised, label mean)
    duration_s: float | None = None  # from the file header; None when unreadable
    flags: tuple[str, ...] = ()  # cropped, chunked, short, silent, resampled from N Hz
    note: str | None = None  # a scored file missing some views: which, and why
    # Task 1 (a run with category heads): the ensembled class code, its probability and every
    # class's probability in the baseline's order (Angry..Neutral); None without such heads.
    category: str | None = None
    category_prob: float | None = None
    probabilities: dict[str, float] | None = None
    # A run with text views: the clip's transcript, its flags and language (`RowText.as_dict`);
    # None for a run without text views.
    text: dict[str, Any] | None = None

    def as_dict(self, name: str | None = None) -> dict[str, Any]:
        """The row `predict --out FILE.json` writes and `serve` answers (`name`: the upload's)."""
        values = self.values or (None,) * len(ATTRIBUTES)
        return {
            "file": self.file if name is None else name,
            **dict(zip(ATTRIBUTES, values, strict=True)),
            "duration_s": self.duration_s,
            "flags": list(self.flags),
            "fallback": self.fallback,  # "" = the full ensemble
            "error": self.error,  # None = scored from the file's own audio
            **self.task1(),
            **(self.text or {}),
        }

    def task1(self) -> dict[str, Any]:
        """The task 1 fields of an answer ({} for a run without category heads)."""
        if self.category is None:
            return {}
        return {
            "category": self.category,
            "category_prob": self.category_prob,
            "probabilities": self.probabilities,
        }

    @property
    def failed(self) -> bool:
        """Whether nothing of the file could be heard (its values, if any, are the label mean)."""
        return self.error is not None


@dataclasses.dataclass(frozen=True)
class Scored:
    """One file's prediction plus what the server reports about its audio."""

    prediction: Prediction
    duration_s: float | None  # from the file header; None when unreadable
    flags: tuple[str, ...]  # see `clip_flags`
    failure: str | None = None  # the first backbone's reason when the file failed extraction


def clip_flags(
    duration_s: float, file_rate: int | None, sources: Sequence[Any], stored: set[str]
) -> tuple[str, ...]:
    """What was done to one clip, for `predict` and `serve` alike (sorted, deduplicated).

    `stored` holds what extraction flagged (silent, short); from the header and each source
    backbone's recorded input come cropped / chunked (longer than its max_seconds) and
    "resampled from N Hz" (the file's rate is not the backbone's).
    """
    flags = set(stored)
    for src in sources:
        au = src.cfg.audio
        if duration_s > src.max_s + 1e-6:
            flags.add("cropped" if au.long_audio == "crop" else "chunked")
        if file_rate and int(file_rate) != int(au.sample_rate):
            flags.add(f"resampled from {int(file_rate)} Hz")
    return tuple(sorted(flags))


def _reason(text: str, path: Path) -> str:
    """A decoder's one-line reason without the file's path (the row or the caller names it)."""
    text = " ".join(text.split())
    prefix = f"{path}: "
    if text.startswith(prefix):
        text = text[len(prefix) :]
    return text.replace(f"'{path}'", "the file").replace(str(path), "the file")


class _MemoryWriter:
    """Collects what `Streamer` would write to a store: features, flags and failures per row."""

    def __init__(self, dtype: str):
        self.dtype = np.dtype(dtype)
        self.pooled: dict[int, np.ndarray] = {}
        self.layers: dict[int, np.ndarray] = {}
        self.failed: dict[int, str] = {}
        self.flags: dict[int, str] = {}
        self.frames: dict[int, np.ndarray] = {}  # row -> (T, D) float16 (attentive runs)
        self.frame_sink = _FrameSink(self.frames)

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


class _FrameSink:
    """Collects what `FrameWriter` would store: each row's valid frames, float16 as stored."""

    def __init__(self, frames: dict[int, np.ndarray]):
        self.frames = frames

    def write(self, rows, frames) -> None:
        """Like `FrameWriter.write`: `frames[i]` (T_i, D) of row `rows[i]`."""
        for r, x in zip(np.asarray(rows), frames, strict=True):
            self.frames[int(r)] = np.asarray(x, np.float16)


@dataclasses.dataclass
class _Source:
    """One source backbone compiled for its buckets, with the settings the run's store recorded."""

    name: str
    attrs: dict
    cfg: Any  # Config with this backbone's recorded extraction and input settings
    loader: Any  # `encode.Loader` with the recorded normalisation (train statistics included)
    extractor: Any
    layers: list[int] | None
    max_s: float
    min_samples: int
    buckets: tuple[float, ...]
    sizes: dict[int, tuple[int, ...]]  # bucket index -> compiled batch sizes
    frames_t: int = 0  # attentive runs: frames a clip is padded to (one compiled head shape)


def _check_same_checkpoint(loaded: dict, recorded: dict, where: str) -> None:
    """Refuse a reloaded backbone whose weights (sha256) or waveform normalisation differ from
    what extraction recorded: the heads were trained on the recorded one's features."""
    src = recorded.get("source")
    want, got = recorded.get("sha256"), loaded.get("sha256")
    if want is not None and str(want) != str(got):
        raise PredictError(
            f"{where}: source {src} now has sha256 {str(got)[:12]}..., the store recorded"
            f" {str(want)[:12]}...; predictions from other weights than the heads were trained on"
            " would be wrong (restore that checkpoint or re-extract and retrain)"
        )
    if "do_normalize" in recorded:
        want_n, got_n = bool(recorded["do_normalize"]), bool(loaded.get("do_normalize", False))
        if want_n != got_n:
            raise PredictError(
                f"{where}: source {src} now has do_normalize={got_n}, the store recorded"
                f" {want_n} (preprocessor_config.json changed); restore it or re-extract"
            )


class Predictor:
    """A run ready to score audio files in memory; `warm_up()` compiles every program it uses."""

    def __init__(
        self,
        run: str | Path,
        *,
        max_clips: int = 16,
        fallback: str = "none",
        transcripts: str | Path | None = None,
    ):
        """`transcripts`: the new clips' texts (CSV or folder of .txt) for a run whose text
        views embed the corpus' own transcripts; Whisper runs transcribe instead."""
        if fallback not in FALLBACKS:
            raise PredictError(f"fallback {fallback!r}: must be one of {', '.join(FALLBACKS)}")
        self.fallback = fallback
        self.run = Path(run)
        self.max_clips = max(1, int(max_clips))
        manifest, cfg, weights = load_run(self.run)
        self.cfg = cfg
        self.views = sorted({v for s in cfg.model.score_sets for v in s.views})
        store = manifest["store"]
        sources, self.layer_views = extraction_plan(Path(store), self.views)
        # Text views: the recorded Whisper (or the given corpus texts) and encoders, loaded once.
        text_sources, self.text_views = text_plan(Path(store), self.views)
        self.attentive = cfg.model.pooling == "attentive"
        self.text: TextViews | None = None
        if text_sources:
            if self.attentive:
                raise PredictError(f"{self.run}: attentive heads over text views")
            self.text = TextViews(
                store, text_sources, transcripts=transcripts, batch=self.max_clips,
                cache_dir=cfg.extract.cache_dir or None,
            )  # fmt: skip
        elif transcripts is not None:
            raise PredictError(
                f"--transcripts {transcripts}: {self.run} has no text views to embed them"
            )
        # Every backbone's input as its store recorded it; refused up front, before any work.
        settings = {
            name: extraction_settings(cfg, attrs, f"{store}: backbone {name!r}")
            for name, attrs in sources.items()
        }
        self.names = [s.name for s in cfg.model.score_sets]
        fits = {a: weights["attributes"].get(a) or {} for a in ATTRIBUTES}
        self.weights = {a: fits[a].get("weights") for a in ATTRIBUTES}
        self.set_ccc = {a: fits[a].get("dev_ccc_per_set") or {} for a in ATTRIBUTES}
        self.label_mean = manifest.get("train_label_mean") or {}
        # A task 1 only run has no attribute heads: it scores no attribute (the ensemble's
        # Train label mean would be a guess), so its answers leave them empty.
        self.scores_attributes = "attributes" in (manifest.get("tasks") or ["attributes"])
        self.corpus = run_corpus(manifest)  # None: a run from before corpus records
        cat = weights.get("category")  # task 1 ensemble weights, when the run has them
        self.cat_weights = (
            None if cat is None else np.array([cat["weights"][n] for n in self.names])
        )
        counts = np.asarray(manifest.get("train_class_counts") or np.ones(8), np.float64)
        self.class_prior = counts / counts.sum()
        # One call for all heads: ~5 ms less; class probabilities too (NaN without task 1 heads).
        self.score = load_heads(self.run, fused=True, with_probs=True)
        # Attentive heads pool the frames of one hidden state, computed here in memory as
        # extraction stored them (`extract.frames` of the run's config; crop mode only).
        if self.attentive and self.layer_views:
            raise PredictError(f"{self.run}: attentive heads over derived layer views")
        self.sources: list[_Source] = []
        for name, attrs in sources.items():
            bcfg, stats = settings[name]
            bb = load_backbone(
                str(attrs["source"]),
                dtype=bcfg.extract.compute_dtype,
                cache_dir=cfg.extract.cache_dir or None,  # None: cache_root()
            )
            _check_same_checkpoint(bb.source_info, attrs, f"{store}: backbone {name!r}")
            recorded = attrs.get("chunk_min_samples")
            if recorded is not None and int(recorded) != bb.min_samples:
                raise PredictError(
                    f"{store}: backbone {name!r} dropped chunk tails below {recorded} samples,"
                    f" this version below {bb.min_samples}; re-extract it"
                )
            # The recorded statistics stand in for the training corpus (never read here).
            loader = make_loader(bcfg, None, stats=stats)
            min_samples = bb.min_samples
            frames_layer, frames_t = None, 0
            if self.attentive:
                frames_layer, frames_t = _frames_plan(bb, bcfg, f"{store}: backbone {name!r}")
            bb, layers, max_s, buckets = backbone_plan(bb, bcfg)
            ex = Extractor(bb, layers, frames_layer=frames_layer)
            full = _bucket_sizes(bcfg, buckets, ex.n_devices)
            sizes = {b: _pow2_sizes(n, ex.n_devices) for b, n in enumerate(full)}
            self.sources.append(
                _Source(name, attrs, bcfg, loader, ex, layers, max_s, min_samples, buckets, sizes,
                        frames_t)
            )  # fmt: skip
        self.ready = False
        self.warmup_s: float | None = None
        self._lock = threading.Lock()  # one call at a time: the extractors are not reentrant

    @property
    def corpus_note(self) -> str | None:
        """One line when the run knows only the built-in synthetic demo corpus, else None."""
        return demo_warning(self.corpus, self.run)

    def warm_up(self) -> float:
        """Compile every (batch, samples) program and the heads once; returns seconds taken."""
        t = time.perf_counter()
        for src in self.sources:
            for b, sizes in src.sizes.items():
                samples = int(round(src.buckets[b] * src.cfg.audio.sample_rate))
                for n in sizes:
                    src.extractor.compile(n, samples)
        if self.text is not None:
            self.text.warm_up()
        # The heads compile per row count, so they always see max_clips rows (padded).
        self._heads(self._zeros(1))
        self.ready = True
        self.warmup_s = time.perf_counter() - t
        return self.warmup_s

    def programs(self) -> dict[str, list[list[int]]]:
        """Per source backbone the (batch, samples) shapes compiled; per text source its
        (rows, token width) and Whisper's (batch, token budget)."""
        out = {src.name: [list(k) for k in sorted(src.extractor._compiled)] for src in self.sources}
        return out | (self.text.programs() if self.text is not None else {})

    def _view_shape(self, view: str) -> tuple[int, ...]:
        text = {v: s for v, s, _ in self.text_views}
        if view in text:
            enc = next(e for e in self.text.encoders if e.name == text[view])
            return (enc.encoder.hidden_size,)
        src = self._source_of(view)
        if self.attentive:
            return (src.frames_t, src.extractor.backbone.hidden_size)
        return (src.extractor.backbone.hidden_size,)

    def _zeros(self, n: int) -> dict[str, np.ndarray]:
        """Zero features of n rows as the heads take them (frames, masks all False)."""
        if not self.attentive:
            return {v: np.zeros((n, *self._view_shape(v)), np.float32) for v in self.views}
        out = {v: np.zeros((n, *self._view_shape(v)), np.float16) for v in self.views}
        return out | {f"{v}:mask": np.zeros((n, self._view_shape(v)[0]), bool) for v in self.views}

    def _source_of(self, view: str) -> _Source:
        name = dict(self.layer_views).get(view, view).split(":")[0]
        return next(s for s in self.sources if s.name == name)

    def _heads(self, features: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(K, N, 3) scores and (K, N, 8) class probabilities, the N rows padded to a multiple
        of max_clips (one compiled shape)."""
        n = len(next(iter(features.values())))
        pad = -n % self.max_clips if n else self.max_clips
        padded = {v: np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) for v, x in
                  features.items()}  # fmt: skip
        scores, probs = self.score(padded)
        return scores[:, :n], probs[:, :n]

    @staticmethod
    def _task1(probs: np.ndarray | None) -> dict[str, Any]:
        """Prediction's task 1 fields from one row's ensembled class probabilities (8,)."""
        if probs is None:
            return {}
        j = int(np.argmax(probs))
        return {
            "category": CLASS_CODES[j],
            "category_prob": float(probs[j]),
            "probabilities": dict(zip(CLASS_NAMES, map(float, probs), strict=True)),
        }

    def predict_files(self, files: Sequence[str | Path]) -> list[Scored]:
        """Scores for audio files (clipped to 1..7 as the submission), with duration and flags."""
        with self._lock:
            return self._predict(list(files))

    def predict_audio(self, clips: Sequence[tuple[str, np.ndarray, int]]) -> list[Scored]:
        """Scores for decoded clips (name, samples (T, C) float32 at the rate, rate), each as the
        same samples saved as a file of its own would score (`jax_ifmvse.timeline` cuts them)."""
        clips = list(clips)
        for name, x, sr in clips:
            if np.ndim(x) != 2 or len(x) == 0 or sr <= 0:
                raise PredictError(f"{name}: expected samples (T, C) with T > 0 and a rate > 0")
        probes = [AudioProbe(len(x) / sr, int(sr)) for _, x, sr in clips]
        memory = {_memory_path(k): (np.asarray(x, np.float32), int(sr))
                  for k, (_, x, sr) in enumerate(clips)}  # fmt: skip
        with self._lock:
            return self._score([_memory_path(k) for k in range(len(clips))], probes, memory,
                               names=[c[0] for c in clips])  # fmt: skip

    def _predict(self, files: list[str | Path]) -> list[Scored]:
        if not files:
            return []
        # The header checks `serve` makes of an upload: a file they refuse is never decoded.
        probes = [probe_audio(f) for f in files]
        ok = [i for i, pr in enumerate(probes) if pr.problem is None]
        heard = iter(self._score([files[i] for i in ok], [probes[i] for i in ok]))
        result = []
        for f, pr in zip(files, probes, strict=True):
            if pr.problem is None:
                result.append(next(heard))
                continue
            p = self._failed(str(f), pr.problem, pr.duration_s, ())
            result.append(Scored(p, pr.duration_s, (), None))
        return result

    def _failed(
        self, file: str, why: str, duration_s: float | None, flags: tuple[str, ...]
    ) -> Prediction:
        """A file nothing of could be heard: no values, or the Train label mean when asked for."""
        if self.fallback == "label-mean":
            if self.label_mean:
                mean = np.clip([float(self.label_mean[a]) for a in ATTRIBUTES], *LABEL_RANGE)
                values = tuple(float(v) for v in mean)
                return Prediction(
                    file, values, why, "Train label mean", duration_s=duration_s, flags=flags
                )
            why += f"; {self.run / 'manifest.json'} has no train_label_mean (retrain)"
        return Prediction(file, None, why, "", duration_s=duration_s, flags=flags)

    def _extract(
        self, src: _Source, corpus: Any, durations: np.ndarray, memory: dict | None = None
    ) -> _MemoryWriter:
        """One backbone's features of every file, as `run_extract` would store them."""
        au = src.cfg.audio
        rows = np.arange(len(corpus.utterances))
        items = plan_items(durations, rows, src.max_s, au.long_audio, au.sample_rate,
                           src.min_samples)  # fmt: skip
        writer = _MemoryWriter(str(src.attrs["_dtype"]))
        streamer = Streamer(
            src.extractor, src.cfg.audio, src.cfg.extract, src.max_s,
            min_samples=src.min_samples, replan=lambda new: self._batches(src, new),
            frames=writer.frame_sink if self.attentive else None,
        )  # fmt: skip
        utts = corpus.utterances
        loader = src.loader
        if memory is not None:  # decoded clips: prepared as the loader prepares a file

            def loader(path: Path) -> np.ndarray:
                return src.loader.from_samples(*memory[Path(path)])

        streamer.run(self._batches(src, items), items, lambda r: corpus.abspath(utts[r]),
                     loader, writer, ExtractStats(), None, src.name)  # fmt: skip
        return writer

    def _score(
        self,
        files: list[str | Path],
        probes: list[Any],
        memory: dict | None = None,
        names: list[str] | None = None,
    ) -> list[Scored]:
        """Files whose headers passed (or decoded clips in `memory` by path, reported under
        `names`): extracted, scored by the heads and ensembled."""
        if not files:
            return []
        # Every path relative to "/" keeps the corpus' inside-the-root check meaningful and simple.
        paths = [Path(f).expanduser().absolute() for f in files]
        utts = tuple(
            Utterance(id=f"{i:06d}", path=p.as_posix().lstrip("/"), split="Test1")
            for i, p in enumerate(paths)
        )
        corpus = Corpus(root=Path("/"), utterances=utts, source="ifmvse predict")
        durations = np.asarray([pr.duration_s for pr in probes], np.float32)  # (N,) as extract
        n = len(utts)
        out = {src.name: self._extract(src, corpus, durations, memory) for src in self.sources}
        stored: list[set[str]] = [set() for _ in range(n)]
        for src in self.sources:
            for r, f in out[src.name].flags.items():
                stored[r].update(x for x in f.split(",") if x)
        # Per view: features of every row (zeros where missing, as `train.load_all_rows`).
        feats, have, why = {}, {}, [[] for _ in range(n)]
        layer_of = dict(self.layer_views)
        if self.attentive:
            feats, have = self._frame_features(out, n, why, paths)
        else:
            text_views = {v for v, _, _ in self.text_views}
            for v in self.views:
                if v in text_views:  # `_text_features`
                    continue
                src = self._source_of(v)
                got = out[src.name]
                k = None if v not in layer_of else src.layers.index(int(layer_of[v].split(":")[1]))
                x = np.zeros((n, *self._view_shape(v)), np.float32)  # (N, D)
                have[v] = np.zeros(n, bool)
                for r in range(n):
                    if r in got.pooled:
                        x[r] = got.pooled[r] if k is None else got.layers[r][k]
                        have[v][r] = True
                    else:
                        reason = _reason(got.failed.get(r, "not extracted"), paths[r])
                        why[r].append(f"no {v} features ({reason})")
                feats[v] = x
        texts = None
        if self.text is not None:
            texts = self._text_features(paths, probes, memory, names or files, out, feats, have,
                                        why)  # fmt: skip
        scores, probs = self._heads(feats)
        scores, probs = scores.astype(np.float64), probs.astype(np.float64)  # (K, N, 3), (K, N, 8)
        heard = np.zeros(n, bool)  # (N,) some score set has every view it needs
        for k, ss in enumerate(self.cfg.model.score_sets):
            ok = np.all([have[v] for v in ss.views], axis=0)  # (N,)
            scores[k][~ok] = np.nan  # zeros stood in for the missing features
            probs[k][~ok] = np.nan
            heard |= ok
        comb = combine(scores, self.weights, self.names, self.label_mean, self.set_ccc)
        cat = None
        if self.cat_weights is not None:
            cat = combine_probs(probs, self.cat_weights, self.class_prior)[0]  # (N, 8)
        pred = comb.pred  # (N, 3)
        if self.cfg.corpus.normalize_labels:
            # The heads learnt (y - 1) / 6 of 1..7 ratings; a user asked for ratings, so clip to
            # the scale as the challenge baseline and our submission files do.
            pred = np.clip(pred, *LABEL_RANGE)
        result = []
        for r, f in enumerate(files if names is None else names):
            dur = float(probes[r].duration_s)
            flags = clip_flags(dur, probes[r].sample_rate, self.sources, stored[r])
            failure = next((o.failed[r] for o in out.values() if r in o.failed), None)
            values = tuple(float(v) for v in pred[r]) if self.scores_attributes else None
            if not heard[r]:  # no score set had its views: nothing of the file was heard
                first = _reason(failure, paths[r]) if failure else "; ".join(why[r])
                p = self._failed(str(f), first or "no features", dur, flags)
            elif values is not None and not np.isfinite(values).all():
                p = self._failed(str(f), f"{self.run}: no ensemble weights (rerun ensemble)",
                                 dur, flags)  # fmt: skip
            else:
                note = "; ".join(why[r]) or None
                used = comb.used[r] if values is not None else ""
                p = Prediction(
                    str(f), values, None, used, duration_s=dur, flags=flags, note=note,
                    **self._task1(None if cat is None else cat[r]),
                )  # fmt: skip
            if texts is not None:
                p = dataclasses.replace(p, text=texts[r].as_dict())
            result.append(Scored(p, dur, flags, failure))
        return result

    def _text_features(
        self,
        paths: list[Path],
        probes: list[Any],
        memory: dict | None,
        names: Sequence[str | Path],
        out: dict[str, _MemoryWriter],
        feats: dict[str, np.ndarray],
        have: dict[str, np.ndarray],
        why: list[list[str]],
    ) -> list[RowText]:
        """Each clip's transcript and the text views' vectors of it (into `feats`, `have`,
        `why`), as `ifmvse transcribe` made the stored ones: 16-kHz mono, the first 30 s (or the
        window the transcript set recorded)."""
        from jax_ifmvse.data.audio import load_audio, prepare_audio

        assert self.text is not None
        n = len(paths)
        waves: list[np.ndarray | None] = [None] * n
        failures: list[str | None] = [None] * n
        need_audio = self.text.asr is not None
        for r, path in enumerate(paths if need_audio else ()):
            try:
                if memory is not None:
                    x, sr = memory[path]
                    waves[r] = prepare_audio(x, sr, max_seconds=self.text.window_s)
                else:
                    waves[r] = load_audio(path, max_seconds=self.text.window_s)
            except Exception as e:  # any decoder error: this clip has no transcript
                failed = next((o.failed[r] for o in out.values() if r in o.failed), None)
                failures[r] = _reason(failed or str(e).split("\n")[0], path)
        durations = [float(pr.duration_s) for pr in probes]
        texts = self.text.transcribe(waves, [str(x) for x in names], durations, failures)
        vectors, truncated = self.text.embed(texts)
        texts = [
            dataclasses.replace(t, flags=(*t.flags, "truncated")) if cut else t
            for t, cut in zip(texts, truncated, strict=True)
        ]
        ok = np.asarray([t.text is not None for t in texts])  # (N,)
        for v, src, k in self.text_views:
            last, layers = vectors[src]  # (N, D), (N, L, D) or None
            enc = next(e for e in self.text.encoders if e.name == src)
            x = last if k is None else layers[:, enc.keep.index(k)]
            feats[v] = np.where(ok[:, None], x, 0.0).astype(np.float32)  # (N, D)
            have[v] = ok.copy()
            for r in np.flatnonzero(~ok):
                why[r].append(f"no {v} features ({texts[r].why})")
        return texts

    def _frame_features(
        self, out: dict[str, _MemoryWriter], n: int, why: list[list[str]], paths: list[Path]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Frames of every row padded to the compiled length, their masks, and which rows have
        them (a clip longer than the compiled length pads further: one more program)."""
        feats, have = {}, {}
        for v in self.views:
            src = self._source_of(v)
            got = out[src.name]
            t = max([src.frames_t, *(len(x) for x in got.frames.values())])
            x = np.zeros((n, t, src.extractor.backbone.hidden_size), np.float16)  # (N, T, D)
            mask = np.zeros((n, t), bool)  # (N, T)
            for r in range(n):
                f = got.frames.get(r)
                if f is not None and len(f):
                    x[r, : len(f)], mask[r, : len(f)] = f, True
                else:
                    reason = _reason(got.failed.get(r, "no frames"), paths[r])
                    why[r].append(f"no {v} frames ({reason})")
            feats[v], feats[f"{v}:mask"], have[v] = x, mask, mask.any(1)
        return feats, have

    def _batches(self, src: _Source, items) -> list:
        """`batch_plan`'s bucketed batches, each padded to the smallest compiled size that fits."""
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
        keys = ("source", "resolved_path", "sha256", "model_type", *INPUT_ATTRS, "layers_stored",
                "compute_dtype")  # fmt: skip
        return {
            "run": str(self.run),
            "backbones": {
                s.name: {k: s.attrs[k] for k in keys if k in s.attrs} for s in self.sources
            },
            "layer_views": dict(self.layer_views),
            "score_sets": [
                {"name": s.name, "kind": s.kind, "views": list(s.views)}
                for s in self.cfg.model.score_sets
            ],
            "ensemble_weights": self.weights,
            "train_label_mean": self.label_mean,
            # The training corpus (None: the run predates the record); `corpus_note` is the
            # line every scoring of a run trained on the synthetic demo corpus carries.
            "corpus": self.corpus,
            "corpus_summary": describe(self.corpus),
            "corpus_note": self.corpus_note,
            "programs": self.programs(),
            "warmup_s": self.warmup_s,
            "text": None if self.text is None else self.text.info(),
        }


def _memory_path(k: int) -> Path:
    """The stand-in path of the k-th decoded clip of a `predict_audio` call (never opened)."""
    return Path(f"/ifmvse-memory/clip{k:06d}.wav")


def _frames_plan(bb: Any, cfg: Any, where: str) -> tuple[int, int]:
    """(hidden-state index of the stored frames, frames a clip is padded to) of an attentive run:
    the run's `extract.frames` layer, at most `audio.max_seconds` at 50 frames a second."""
    if cfg.audio.long_audio != "crop":
        raise PredictError(f"{where}: attentive heads need audio.long_audio=crop frames")
    try:
        k = layer_selection_one(cfg.extract.frames or "last", bb)
    except ExtractError as e:
        raise PredictError(f"{where}: {e}") from None
    return k, int(math.ceil(cfg.audio.max_seconds * FRAMES_PER_SECOND))


def _bucket_sizes(cfg: Any, buckets: Sequence[float], multiple: int) -> list[int]:
    """The full batch size of each bucket, as `batch_plan` pads it (a multiple of the devices)."""
    full = bucket_batch_sizes(buckets, cfg.extract.batch_seconds, cfg.extract.max_batch)
    return [n + (-n % multiple) for n in full]


def _pow2_sizes(full: int, multiple: int) -> tuple[int, ...]:
    """Compiled batch sizes up to `full`: multiple * 1, 2, 4, ... and `full` itself."""
    sizes, n = [], multiple
    while n < full:
        sizes.append(n)
        n *= 2
    return (*sizes, full)
