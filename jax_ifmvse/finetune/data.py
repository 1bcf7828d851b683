"""Fine-tuning data: a split's rows, length-bucketed fixed-shape batches of decoded audio,
predictions over a split."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jax_ifmvse.categories import class_index
from jax_ifmvse.config import ATTRIBUTES
from jax_ifmvse.data.buckets import Batch, plan_batches
from jax_ifmvse.data.corpus import to_unit


@dataclasses.dataclass
class Rows:
    """The utterances of one split that fine-tuning uses."""

    ids: list[str]
    paths: list[Path]
    durations: np.ndarray  # (N,) seconds from headers
    labels: np.ndarray  # (N, 3) corpus scale, NaN unknown
    classes: np.ndarray | None = None  # (N,) task 1 class index (categories order), -1 unscored


class AudioFeed:
    """Decodes batches on CPU threads (a few ahead), with an in-memory cache when it fits.

    A clip that cannot be decoded is recorded in `failed` and gets weight 0 wherever it falls.
    """

    def __init__(self, loader: Callable, max_samples: int, workers: int, cache: bool):
        self.loader = loader
        self.max_samples = max_samples
        self.pool = cf.ThreadPoolExecutor(max(1, workers))
        self.cache: dict[str, np.ndarray] | None = {} if cache else None
        self.failed: dict[str, str] = {}

    def _one(self, path: Path) -> np.ndarray | None:
        key = str(path)
        if self.cache is not None and key in self.cache:
            return self.cache[key]
        if key in self.failed:
            return None
        try:
            x = np.asarray(self.loader(path), np.float32)[: self.max_samples]
            if len(x) == 0:
                raise ValueError("empty audio")
        except Exception as e:  # noqa: BLE001 - a bad clip is recorded and skipped, never fatal
            self.failed[key] = " ".join(str(e).split()) or type(e).__name__
            return None
        if self.cache is not None:
            self.cache[key] = x
        return x

    def submit(self, rows: Rows, batch: Batch) -> list[cf.Future]:
        """Start decoding one batch's clips."""
        return [
            self.pool.submit(self._one, rows.paths[i]) if i >= 0 else None for i in batch.indices
        ]

    def collect(self, batch: Batch, futs: list) -> tuple[np.ndarray, np.ndarray]:
        """(waves (B, T), lengths (B,)) of a submitted batch; failed and dummy rows are empty."""
        b, t = batch.shape
        waves = np.zeros((b, t), np.float32)
        lengths = np.zeros(b, np.int32)
        for k, f in enumerate(futs):
            x = None if f is None else f.result()
            if x is None:
                continue
            x = x[:t]
            waves[k, : len(x)] = x
            lengths[k] = len(x)
        return waves, lengths

    def batches(self, rows: Rows, plan: Sequence[Batch], ahead: int = 2):
        """Yield (batch, waves, lengths) in plan order, decoding `ahead` batches early."""
        q: collections.deque = collections.deque()
        it = iter(plan)
        for b in it:
            q.append((b, self.submit(rows, b)))
            if len(q) > ahead:
                break
        while q:
            b, futs = q.popleft()
            nxt = next(it, None)
            if nxt is not None:
                q.append((nxt, self.submit(rows, nxt)))
            yield (b, *self.collect(b, futs))

    def close(self) -> None:
        """Stop the decode threads."""
        self.pool.shutdown(wait=True, cancel_futures=True)


class PlanIterator:
    """One epoch's batches in plan order, checkpointable with Grain's iterator protocol
    (`get_state`, `set_state`, `start_prefetch`; `trainer.fit` saves it within an epoch).

    `make(start)` yields the batches of the plan from index `start`; the state is the epoch
    and the next batch's index, so a restored iterator decodes nothing before that batch."""

    def __init__(self, epoch: int, make: Callable[[int], Iterator[Any]]):
        self.epoch, self.make = epoch, make
        self.next = 0
        self._it: Iterator[Any] | None = None

    def __iter__(self) -> PlanIterator:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self._it = self.make(self.next)
        x = next(self._it)
        self.next += 1
        return x

    def get_state(self) -> bytes:
        """The epoch and the next batch's index (JSON)."""
        return json.dumps({"epoch": self.epoch, "next": self.next}).encode()

    def set_state(self, state: bytes) -> None:
        """Continue at the saved batch (before the first `next`)."""
        saved = json.loads(state)
        if saved["epoch"] != self.epoch or self._it is not None:
            raise ValueError(f"batch state of epoch {saved['epoch']} set on epoch {self.epoch}")
        self.next = int(saved["next"])

    def start_prefetch(self) -> None:
        """Nothing to start: decoding begins with the first `next` (the feed reads ahead)."""


def epoch_seed(seed: int, epoch: int) -> int:
    """The data-order seed of one epoch: depends only on (train.seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def plan(rows: Rows, buckets: Sequence[float], size: int, sr: int, seed: int | None):
    """Fixed-size (`size` rows) length-bucketed batches; shuffled when `seed` is given."""
    return plan_batches(
        np.nan_to_num(rows.durations, nan=0.0),
        bucket_seconds=buckets,
        batch_seconds=size * max(buckets),
        max_batch=size,
        sample_rate=sr,
        seed=seed,
    )


def batch_arrays(
    rows: Rows, b: Batch, waves, lengths, normalize: bool, task: str = "attributes"
) -> dict[str, np.ndarray]:
    """The step's input: waves, lengths, labels (training scale) and 0/1 loss weights; task 1:
    class indices instead of labels (X, O, empty: -1 and weight 0)."""
    idx = np.maximum(b.indices, 0)
    if task == "category":
        c = rows.classes[idx].astype(np.int32)  # (B,)
        ok = (b.indices >= 0) & (lengths > 0) & (c >= 0)
        return {
            "waves": waves,
            "lengths": lengths.astype(np.int32),
            "classes": np.where(ok, c, -1).astype(np.int32),
            "weights": ok.astype(np.float32),
        }
    y = rows.labels[idx].astype(np.float32)  # (B, 3)
    ok = (b.indices >= 0) & (lengths > 0) & np.isfinite(y).all(1)
    y = np.where(ok[:, None], y, 1.0 if normalize else 0.0)  # any finite value: weight 0
    y = to_unit(y) if normalize else y
    return {
        "waves": waves,
        "lengths": lengths.astype(np.int32),
        "labels": np.asarray(y, np.float32),
        "weights": ok.astype(np.float32),
    }


def predict_rows(
    predict,
    params,
    rows: Rows,
    feed: AudioFeed,
    buckets,
    size: int,
    sr: int,
    sharding,
    width: int = len(ATTRIBUTES),
) -> np.ndarray:
    """Outputs (N, width) for every row (NaN where the clip failed): attributes on the training
    scale, or task 1 logits."""
    out = np.full((len(rows.ids), width), np.nan, np.float32)
    for b, waves, lengths in feed.batches(rows, plan(rows, buckets, size, sr, None)):
        w = jax.device_put(waves, sharding)
        n = jax.device_put(lengths, sharding)
        pred = np.asarray(predict(params, w, n))
        ok = (b.indices >= 0) & (lengths > 0)
        out[b.indices[ok]] = pred[ok]
    return out


def corpus_rows(corpus: Any, split: str) -> Rows:
    """Rows of one split, with header durations."""
    sub = corpus.split(split)
    return Rows(
        [u.id for u in sub.utterances],
        [corpus.abspath(u) for u in sub.utterances],
        sub.durations(),
        sub.labels(),
        class_index([u.emo_class or "" for u in sub.utterances]),
    )


def usable(rows: Rows, skipped: dict[str, str]) -> Rows:
    """Rows whose header is readable; the others are recorded in `skipped` (path -> reason)."""
    ok = np.isfinite(rows.durations)
    for p, good in zip(rows.paths, ok):
        if not good:
            skipped[str(p)] = "unreadable or corrupt audio (header)"
    keep = np.flatnonzero(ok)
    return Rows(
        [rows.ids[i] for i in keep],
        [rows.paths[i] for i in keep],
        rows.durations[keep],
        rows.labels[keep],
        None if rows.classes is None else rows.classes[keep],
    )


def header_info(files: Sequence[str | Path]) -> tuple[np.ndarray, list[int | None]]:
    """Each file's duration (NaN when unreadable) and sample rate from its header."""
    import soundfile as sf

    out, rates = np.full(len(files), np.nan), [None] * len(files)
    for i, f in enumerate(files):
        try:
            info = sf.info(str(f))
            out[i], rates[i] = info.frames / info.samplerate, int(info.samplerate)
        except Exception:  # noqa: BLE001 - the decode reports it
            continue
    return out, rates
