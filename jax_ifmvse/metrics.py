"""Reference metrics in numpy: the challenge's CCC (population variances) and bootstrap intervals."""

from __future__ import annotations

import numpy as np


def ccc_np(y_true: np.ndarray, y_pred: np.ndarray, axis: int = -1) -> np.ndarray:
    """Concordance correlation coefficient with population (ddof=0) variances, along `axis`."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    mt, mp = t.mean(axis=axis, keepdims=True), p.mean(axis=axis, keepdims=True)
    cov = ((t - mt) * (p - mp)).mean(axis=axis)
    vt, vp = t.var(axis=axis), p.var(axis=axis)
    denom = vt + vp + (np.squeeze(mt, axis) - np.squeeze(mp, axis)) ** 2
    return 2.0 * cov / np.maximum(denom, 1e-12)


def bootstrap_ccc(
    y_true: np.ndarray, y_pred: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """CCC and its percentile bootstrap interval: (ccc, low, high)."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(t), size=(n, len(t)))  # (n, N) resampled rows
    samples = ccc_np(t[idx], p[idx], axis=-1)
    lo, hi = np.quantile(samples, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(ccc_np(t, p)), float(lo), float(hi)
