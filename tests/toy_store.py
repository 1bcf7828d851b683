"""A toy feature store written from arrays, for the training tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from jax_ifmvse.config import ATTRIBUTES


def write_toy_store(
    path: Path,
    splits: Sequence[str],
    labels: np.ndarray,
    views: Mapping[str, np.ndarray],
    codes: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """A finalized store: one row per split entry, labels (N, 3), pooled views {name: (N, D)},
    optional string labels {EmoClass, Gender: (N,)}."""
    from featurestore import StoreWriter, create_store, finalize

    n = len(splits)
    create_store(
        path,
        ids=[f"utt{i:04d}" for i in range(n)],
        splits=list(splits),
        durations=[1.0] * n,
        paths=[f"/x/{i}.wav" for i in range(n)],
        labels=dict(zip(ATTRIBUTES, np.asarray(labels, np.float32).T)),
        codes=codes,
    )
    for name, x in views.items():
        with StoreWriter(path, name, dim=x.shape[1]) as w:
            w.write(np.arange(n), np.asarray(x, np.float32))
    finalize(path)
