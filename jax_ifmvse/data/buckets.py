"""Length bucketing: a small fixed set of (batch, padded length) shapes so jit compiles few programs.

Each bucket b has padded length `bucket_seconds[b] * sample_rate` samples and a fixed batch size
`min(max_batch, floor(batch_seconds / bucket_seconds[b]))`. Every utterance goes to the smallest
bucket that holds it (longer ones to the largest bucket, to be cropped to it), and a bucket's
last partial batch is filled with dummy rows (index -1, length 0). So there is exactly one
(B, T) shape per bucket used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Batch:
    """One padded batch: which utterances, how long each is, and the padded length."""

    indices: np.ndarray  # (B,) int64 utterance indices, -1 for dummy rows
    lengths: np.ndarray  # (B,) int32 valid samples per row, 0 for dummy rows
    padded_len: int  # T, samples
    bucket: int  # index into bucket_seconds

    @property
    def mask(self) -> np.ndarray:
        """(B,) bool: which rows are real utterances."""
        return self.indices >= 0

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.indices), self.padded_len)


def bucket_batch_sizes(
    bucket_seconds: Sequence[float], batch_seconds: float, max_batch: int = 64
) -> list[int]:
    """Fixed batch size per bucket: as many rows as fit in `batch_seconds` of padded audio."""
    return [max(1, min(max_batch, int(batch_seconds // s))) for s in bucket_seconds]


def plan_batches(
    durations_s: Sequence[float],
    *,
    bucket_seconds: Sequence[float],
    batch_seconds: float,
    max_batch: int = 64,
    sample_rate: int = 16000,
    seed: int | None = None,
) -> list[Batch]:
    """Group utterances by duration into fixed-shape padded batches; every index exactly once.

    Unknown (NaN) durations go to the smallest bucket: their file is unreadable and the loader
    reports it. With `seed`, bucket members and batch order are shuffled (for training);
    without, utterances are sorted by duration and batches come bucket by bucket.
    """
    buckets = np.asarray(sorted(bucket_seconds), np.float64)
    if buckets.size == 0 or (buckets <= 0).any():
        raise ValueError(f"bucket_seconds must be positive and non-empty, got {bucket_seconds}")
    if batch_seconds <= 0 or max_batch < 1:
        raise ValueError("batch_seconds and max_batch must be positive")
    d = np.asarray(durations_s, np.float64)
    sizes = bucket_batch_sizes(buckets, batch_seconds, max_batch)
    padded = [int(round(s * sample_rate)) for s in buckets]
    which = np.searchsorted(buckets, np.nan_to_num(d, nan=0.0), side="left")
    which = np.minimum(which, len(buckets) - 1)
    length = np.minimum(np.round(np.nan_to_num(d, nan=0.0) * sample_rate), np.take(padded, which))
    rng = np.random.default_rng(seed) if seed is not None else None
    batches = []
    for b, (size, t) in enumerate(zip(sizes, padded, strict=True)):
        members = np.flatnonzero(which == b)
        if rng is not None:
            members = rng.permutation(members)
        else:
            members = members[np.argsort(d[members], kind="stable")]
        for start in range(0, len(members), size):
            idx = np.full(size, -1, np.int64)
            lens = np.zeros(size, np.int32)
            chunk = members[start : start + size]
            idx[: len(chunk)] = chunk
            lens[: len(chunk)] = length[chunk]
            batches.append(Batch(idx, lens, t, b))
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def padding_fraction(batches: Sequence[Batch]) -> float:
    """Share of padded (B, T) cells that hold no audio (dummy rows count as padding)."""
    total = sum(len(b.indices) * b.padded_len for b in batches)
    valid = sum(int(b.lengths.sum()) for b in batches)
    return 0.0 if total == 0 else 1.0 - valid / total


def pad_batch(
    waves: Sequence[np.ndarray], padded_len: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stack 1-D waves into (B, T) float32 zeros-padded (cropped to T) plus lengths (B,) int32."""
    if len(waves) > batch_size:
        raise ValueError(f"{len(waves)} waves do not fit a batch of {batch_size}")
    x = np.zeros((batch_size, padded_len), np.float32)  # (B, T)
    lengths = np.zeros(batch_size, np.int32)  # (B,)
    for i, w in enumerate(waves):
        n = min(len(w), padded_len)
        x[i, :n] = w[:n]
        lengths[i] = n
    return x, lengths
