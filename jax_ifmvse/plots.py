"""Training plots of one model: loss and development metrics per epoch, predicted against true,
the task 1 confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jax_ifmvse.categories import CLASS_CODES, CLASS_NAMES, N_CLASSES
from jax_ifmvse.config import ATTRIBUTES
from jax_ifmvse.metrics import ccc_np, confusion_matrix, macro_f1


def plot_curves(history: Sequence[dict], path: Path, title: str = "") -> None:
    """Training loss and development CCC per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(ep, [h["train_loss"] for h in history])
    ccc_only = not any(k.startswith("loss_") for k in history[0])
    ax[0].set(xlabel="epoch", ylabel="train loss (1 - CCC)" if ccc_only else "train loss")
    for k in sorted(k for k in history[0] if k.startswith(("dev_ccc", "dev_macro_f1"))):
        ax[1].plot(ep, [h[k] for h in history], label=k)
    ax[1].set(xlabel="epoch", ylabel="development CCC" if ccc_only else "development")
    ax[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_scatter(
    y_true: np.ndarray, y_pred: np.ndarray, targets: Sequence[str], path: Path, title=""
) -> None:
    """Predicted against true development score per attribute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(targets), figsize=(3.3 * len(targets), 3.2), squeeze=False)
    for k, (ax, t) in enumerate(zip(axes[0], targets)):
        ok = np.isfinite(y_true[:, k])
        ax.scatter(y_true[ok, k], y_pred[ok, k], s=4, alpha=0.4)
        lo = float(np.nanmin([y_true[ok, k].min(initial=1), y_pred[:, k].min(initial=1)]))
        hi = float(np.nanmax([y_true[ok, k].max(initial=7), y_pred[:, k].max(initial=7)]))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ccc = ccc_np(y_true[ok, k], y_pred[ok, k]) if ok.sum() > 1 else float("nan")
        ax.set(xlabel=f"true {t}", ylabel=f"predicted {t}", title=f"CCC {float(ccc):.3f}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_confusion(y_true: np.ndarray, y_pred: np.ndarray, path: Path, title: str = "") -> None:
    """Task 1 confusion matrix (rows: true class, columns: predicted), counts and row shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = confusion_matrix(y_true, y_pred, N_CLASSES)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(N_CLASSES):
        for j in range(N_CLASSES):
            if cm[i, j]:
                color = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color=color)
    ticks = np.arange(N_CLASSES)
    ax.set_xticks(ticks, CLASS_CODES)
    ax.set_yticks(ticks, CLASS_CODES)
    ax.set(xlabel="predicted", ylabel="true")
    f1 = macro_f1(y_true, y_pred, N_CLASSES) if len(y_true) else float("nan")
    ax.set_title(f"{title}  macro-F1 {f1:.3f}".strip(), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_timeline(rows: Sequence, path: Path, title: str = "", duration_s: float | None = None):
    """A file's time course: the three attributes per segment over time (gaps where a segment
    is silent or failed), and for task 1 runs the class of each segment as a coloured band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_cat = any(getattr(r, "category", None) for r in rows)
    fig, axes = plt.subplots(
        2 if has_cat else 1, 1, figsize=(10, 3.6 if has_cat else 3.0), sharex=True,
        squeeze=False, gridspec_kw={"height_ratios": [5, 1] if has_cat else [1]},
    )  # fmt: skip
    ax = axes[0, 0]
    colors = ("tab:red", "tab:green", "tab:blue")
    for k, (a, color) in enumerate(zip(ATTRIBUTES, colors, strict=True)):
        # Each segment as a step at its value; NaN (silent, failed) breaks the line.
        t, y = [], []
        for r in rows:
            v = np.nan if r.values is None else r.values[k]
            t += [r.start_s, r.end_s, r.end_s]
            y += [v, v, np.nan]
        ax.plot(t, y, color=color, lw=1.6, label=a)
    for r in rows:
        if "silent" in r.flags:
            ax.axvspan(r.start_s, r.end_s, color="0.85", lw=0)
        elif r.error:
            ax.axvspan(r.start_s, r.end_s, color="mistyrose", lw=0)
    ax.set(ylabel="score (1..7)", ylim=(0.8, 7.2))
    ax.legend(loc="center left", bbox_to_anchor=(1.005, 0.5), fontsize=7)
    ax.set_title(title, fontsize=9)
    if has_cat:
        band = axes[1, 0]
        cmap = plt.get_cmap("tab10")
        seen = {}
        for r in rows:
            if r.category is None:
                continue
            j = CLASS_CODES.index(r.category)
            seen[j] = band.axvspan(r.start_s, r.end_s, color=cmap(j), lw=0)
        band.set_yticks([])
        band.set_ylabel("class", fontsize=8)
        band.legend(
            [seen[j] for j in sorted(seen)], [CLASS_NAMES[j] for j in sorted(seen)],
            loc="center left", bbox_to_anchor=(1.005, 0.5), fontsize=7, frameon=False,
        )  # fmt: skip
    end = duration_s if duration_s else max((r.end_s for r in rows), default=1.0)
    axes[-1, 0].set(xlabel="time (s)", xlim=(0, end))
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")  # the class legend sits right of the band
    plt.close(fig)
