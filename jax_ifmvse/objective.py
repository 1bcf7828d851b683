"""What a score-set model is trained on and selected by: the loss and metric seam of training.

A model outputs one vector per row (B, n_out), laid out as [attributes | 8 class logits |
2 gender logits], each part present only when its task is trained:
- attributes (task 2): 1 - CCC over the batch per attribute column, averaged (the paper's loss);
  rows whose attribute is unknown are masked out of that column.
- category (task 1): class-weighted cross-entropy with the baseline's weights (total / (8 count),
  0 for an absent class), rows coded X, O or empty masked; selected by development macro-F1.
- gender (auxiliary): unweighted two-class cross-entropy, rows of unknown gender masked.

The loss is the configured weighted sum of the parts. The development score that picks the
best epoch is the mean over the trained main tasks of their metric (mean CCC for attributes,
macro-F1 for category); the gender auxiliary is reported, not selected on.

Fine-tuning uses the same class: the baseline's `train_dim_ser.py` loss is the SUM over the
three attributes of 1 - CCC (`reduction="sum"`, rows masked by the batch's 0/1 `weights`), task 1
its class-weighted cross-entropy. Its development metrics skip rows whose prediction is NaN (a
clip that could not be decoded).

The paper's default head (attributes only) does not use this class: `ccc_mean_loss` keeps its own
1 - CCC path, so the task 2 numbers stay bit-for-bit what they were.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jax_ifmvse.categories import GENDERS, N_CLASSES
from jax_ifmvse.data.corpus import from_unit, to_unit
from jax_ifmvse.losses import ccc_loss, ccc_sum_loss, weighted_cross_entropy
from jax_ifmvse.metrics import accuracy, ccc_np, macro_f1


def softmax_np(logits: np.ndarray) -> np.ndarray:
    """Row softmax in float64, returned as float32 (class probabilities)."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return (z / z.sum(-1, keepdims=True)).astype(np.float32)


def ccc_mean_loss(pred: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    """The paper's task 2 loss of a head: mean over columns of 1 - CCC of `labels` (B, K),
    rows weighted by the batch's 0/1 `weights`; no logs."""
    return ccc_loss(batch["labels"], pred, batch.get("weights")), {}


def dev_ccc(y_true: np.ndarray, y_pred: np.ndarray) -> list[float]:
    """Per-column CCC on the rows whose label is known and prediction finite."""
    out = []
    for k in range(y_true.shape[1]):
        ok = np.isfinite(y_true[:, k]) & np.isfinite(y_pred[:, k])
        out.append(float(ccc_np(y_true[ok, k], y_pred[ok, k])) if ok.sum() > 1 else float("nan"))
    return out


@dataclasses.dataclass(frozen=True)
class Objective:
    """Loss of a batch and development metrics of an epoch for one model's tasks."""

    attributes: tuple[str, ...] = ()
    category: bool = False
    gender: bool = False
    class_weights: tuple[float, ...] | None = None  # (8,); None = every class weighs 1
    attributes_weight: float = 1.0
    category_weight: float = 1.0
    gender_weight: float = 0.1
    normalize: bool = True  # attributes trained on (y - 1) / 6
    reduction: str = "mean"  # of 1 - CCC over the attributes; "sum": the fine-tuning baseline's

    @property
    def n_out(self) -> int:
        """Width of the model's output vector."""
        return len(self.attributes) + N_CLASSES * self.category + len(GENDERS) * self.gender

    def parts(self, pred):
        """{task: its columns of pred (B, n_out)}."""
        out, c = {}, 0
        for name, width, on in (
            ("attributes", len(self.attributes), bool(self.attributes)),
            ("category", N_CLASSES, self.category),
            ("gender", len(GENDERS), self.gender),
        ):
            if on:
                out[name] = pred[:, c : c + width]
                c += width
        return out

    def targets(self, labels: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Device-ready training targets from {attributes (N, K) corpus scale, category (N,),
        gender (N,)} (class indices, -1 unknown); the batch keys `loss` reads."""
        out = {}
        if self.attributes:
            y = np.asarray(labels["attributes"], np.float32)
            known = np.isfinite(y)
            y = to_unit(y) if self.normalize else y
            out["labels"] = np.where(known, y, 0.0).astype(np.float32)  # NaN * 0 would be NaN
            out["label_mask"] = known.astype(np.float32)
        if self.category:
            out["classes"] = np.asarray(labels["category"], np.int32)
        if self.gender:
            out["gender"] = np.asarray(labels["gender"], np.int32)
        return out

    def loss(self, pred: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
        """Weighted sum of the task losses on a batch, and each part (for the logs).

        Batch keys: `labels` (B, K) training scale and optionally `label_mask` (B, K) 0/1,
        `classes` (B,) class indices (-1 none), `gender` (B,), `weights` (B,) 0/1 row weights.
        """
        w = batch.get("weights")  # (B,) 0/1: padded rows of a last partial batch weigh 0
        p = self.parts(pred)
        logs, total = {}, jnp.zeros((), jnp.float32)
        if self.attributes:
            m = batch.get("label_mask")  # (B, K); without it `weights` mark the known rows
            m = w if m is None else (m if w is None else m * w[:, None])
            ccc_fn = ccc_sum_loss if self.reduction == "sum" else ccc_loss
            logs["loss_attributes"] = ccc_fn(batch["labels"], p["attributes"], m)
            total += self.attributes_weight * logs["loss_attributes"]
        if self.category:
            cw = None if self.class_weights is None else jnp.asarray(self.class_weights)
            logs["loss_category"] = weighted_cross_entropy(p["category"], batch["classes"], cw, w)
            total += self.category_weight * logs["loss_category"]
        if self.gender:
            logs["loss_gender"] = weighted_cross_entropy(p["gender"], batch["gender"], None, w)
            total += self.gender_weight * logs["loss_gender"]
        return total, logs

    def outputs(self, pred: np.ndarray) -> dict[str, np.ndarray]:
        """Model output (N, n_out) -> {attributes (N, K) corpus scale, category (N, 8)
        probabilities, gender (N, 2) probabilities}."""
        p = self.parts(np.asarray(pred))
        out = {}
        if "attributes" in p:
            a = p["attributes"]
            out["attributes"] = from_unit(a, clip=False) if self.normalize else a
        for k in ("category", "gender"):
            if k in p:
                out[k] = softmax_np(p[k])
        return out

    def dev_metrics(self, labels: Mapping[str, np.ndarray], pred: np.ndarray) -> dict[str, float]:
        """Development metrics of one epoch, with `dev_score` (what picks the best epoch)."""
        o = self.outputs(pred)
        rec: dict[str, float] = {}
        main = []
        if self.attributes:
            per = dev_ccc(np.asarray(labels["attributes"]), o["attributes"])
            rec["dev_ccc"] = float(np.nanmean(per)) if np.isfinite(per).any() else -1.0
            rec.update({f"dev_ccc_{a}": c for a, c in zip(self.attributes, per, strict=True)})
            main.append(rec["dev_ccc"])
        if self.category:
            y = np.asarray(labels["category"])
            ok = (y >= 0) & np.isfinite(o["category"]).all(-1)
            yp = o["category"].argmax(-1)
            rec["dev_macro_f1"] = macro_f1(y[ok], yp[ok], N_CLASSES) if ok.any() else 0.0
            rec["dev_accuracy"] = accuracy(y[ok], yp[ok]) if ok.any() else 0.0
            main.append(rec["dev_macro_f1"])
        if self.gender:
            g = np.asarray(labels["gender"])
            ok = g >= 0
            rec["dev_gender_accuracy"] = (
                accuracy(g[ok], o["gender"].argmax(-1)[ok]) if ok.any() else float("nan")
            )
        rec["dev_score"] = float(np.mean(main))
        return rec
