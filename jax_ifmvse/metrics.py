"""Reference metrics in numpy: the challenge's CCC (task 2) and macro-F1 (task 1), bootstrap intervals."""

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


# ---------------------------------------------------------------------------------------------
# Task 1 (categorical): macro-F1, the challenge's metric, and what a report shows next to it.


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) int64 counts: row = true class, column = predicted class."""
    t = np.asarray(y_true, np.int64)
    p = np.asarray(y_pred, np.int64)
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def per_class_f1(cm: np.ndarray) -> np.ndarray:
    """(C,) F1 of each class from a confusion matrix; 0 where precision and recall are undefined."""
    cm = np.asarray(cm, np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    denom = cm.sum(-1) + cm.sum(-2)  # 2 tp + fp + fn
    return np.where(denom > 0, 2.0 * tp / np.where(denom > 0, denom, 1.0), 0.0)


def macro_f1(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, labels: np.ndarray | None = None
) -> float:
    """Unweighted mean of per-class F1, as `sklearn.metrics.f1_score(average="macro")`.

    As scikit-learn, the mean runs over the classes present in y_true or y_pred (or the given
    `labels`); a class in neither would only add an arbitrary 0.
    """
    cm = confusion_matrix(y_true, y_pred, n_classes)
    f1 = per_class_f1(cm)
    if labels is None:
        labels = np.flatnonzero(cm.sum(0) + cm.sum(1) > 0)
    return float(f1[np.asarray(labels)].mean()) if len(labels) else 0.0


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of rows whose predicted class is the true one."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return float((t == p).mean()) if len(t) else float("nan")


def bootstrap_macro_f1(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    n_classes: int,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Macro-F1 and its percentile bootstrap interval: (macro_f1, low, high)."""
    t = np.asarray(y_true, np.int64)
    p = np.asarray(y_pred, np.int64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(t), size=(n, len(t)))  # (n, N) resampled rows
    # One confusion matrix per resample with one bincount: (n, C, C).
    flat = (np.arange(n)[:, None] * n_classes + t[idx]) * n_classes + p[idx]
    cms = np.bincount(flat.ravel(), minlength=n * n_classes * n_classes).reshape(
        n, n_classes, n_classes
    )
    f1 = per_class_f1(cms)  # (n, C)
    present = (cms.sum(1) + cms.sum(2)) > 0  # (n, C)
    samples = (f1 * present).sum(1) / np.maximum(present.sum(1), 1)
    lo, hi = np.quantile(samples, [(1 - level) / 2, 1 - (1 - level) / 2])
    return macro_f1(t, p, n_classes), float(lo), float(hi)
