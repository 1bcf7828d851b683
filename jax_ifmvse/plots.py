"""Training plots of one model: loss and development metrics per epoch, predicted against true,
the task 1 confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jax_ifmvse.categories import CLASS_CODES, N_CLASSES
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
