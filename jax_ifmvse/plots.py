"""Training plots of one model: loss and development CCC per epoch, predicted against true."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jax_ifmvse.metrics import ccc_np


def plot_curves(history: Sequence[dict], path: Path, title: str = "") -> None:
    """Training loss and development CCC per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(ep, [h["train_loss"] for h in history])
    ax[0].set(xlabel="epoch", ylabel="train loss (1 - CCC)")
    for k in sorted(k for k in history[0] if k.startswith("dev_ccc")):
        ax[1].plot(ep, [h[k] for h in history], label=k)
    ax[1].set(xlabel="epoch", ylabel="development CCC")
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
