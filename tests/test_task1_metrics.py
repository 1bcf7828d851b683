"""Task 1 metrics and loss: macro-F1 equals scikit-learn's, cross-entropy equals torch's."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import U64, assert_exceeds, assert_within, cross_entropy, f1_orders

from jax_ifmvse.losses import weighted_cross_entropy
from jax_ifmvse.metrics import (
    accuracy,
    bootstrap_macro_f1,
    confusion_matrix,
    macro_f1,
    per_class_f1,
)

sklearn_metrics = pytest.importorskip("sklearn.metrics")  # the dev extra installs it


@pytest.mark.parametrize("seed", range(20))
def test_macro_f1_equals_sklearn_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    k = int(rng.integers(2, 9))  # some of the 8 classes never occur in either array
    t = rng.integers(0, k, n)
    p = np.where(rng.random(n) < 0.4, t, rng.integers(0, k, n))
    if seed % 3 == 0:
        p[:] = rng.integers(0, 8)  # a constant prediction: zero-division classes
    want = sklearn_metrics.f1_score(t, p, average="macro", zero_division=0)
    got = macro_f1(t, p, 8)
    assert_within(got, want, f1_orders(8), "macro-F1 vs sklearn")
    cm = confusion_matrix(t, p, 8)
    absent = cm.sum(0) + cm.sum(1) == 0
    if absent.any() and want > 0:  # the mean over all eight classes counts the absent as 0
        assert_exceeds(per_class_f1(cm).mean(), want, f1_orders(8), "absent classes averaged")
    eight = list(range(8))
    assert_within(
        per_class_f1(cm),
        sklearn_metrics.f1_score(t, p, average=None, labels=eight, zero_division=0),
        f1_orders(1),
        "per-class F1 vs sklearn",
    )
    np.testing.assert_array_equal(cm, sklearn_metrics.confusion_matrix(t, p, labels=eight))
    # An exact integer count over n, one rounding on each side.
    assert_within(accuracy(t, p), sklearn_metrics.accuracy_score(t, p), 2 * U64, "accuracy")


def test_bootstrap_macro_f1_equals_a_loop_over_the_same_resamples():
    rng = np.random.default_rng(1)
    t = rng.integers(0, 8, 120)
    p = np.where(rng.random(120) < 0.5, t, rng.integers(0, 8, 120))
    f1, lo, hi = bootstrap_macro_f1(t, p, 8, n=200, seed=3)
    idx = np.random.default_rng(3).integers(0, 120, size=(200, 120))
    loop = [macro_f1(t[i], p[i], 8) for i in idx]
    want_lo, want_hi = np.quantile(loop, [0.025, 0.975])
    assert f1 == macro_f1(t, p, 8)
    # The same resampled counts, batched vs one at a time: each F1 within f1_orders, and the
    # quantile's linear interpolation between two of them adds a few roundings (4 u).
    bound = f1_orders(8) + 4 * U64
    assert_within([lo, hi], [want_lo, want_hi], bound, "bootstrap interval vs the loop")
    wrong = np.quantile(loop, [0.05, 0.95])  # a 90 % interval
    assert_exceeds(wrong, [want_lo, want_hi], bound, "90 % interval")
    assert lo < f1 < hi


def test_weighted_cross_entropy_equals_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 8)).astype(np.float32) * 3
    y = rng.integers(0, 8, 16)
    y[[2, 5]] = -1  # X / O rows: no loss
    w = rng.random(8).astype(np.float32)
    w[3] = 0.0  # an absent class
    keep = y >= 0
    ref = torch.nn.CrossEntropyLoss(weight=torch.tensor(w))(
        torch.tensor(logits[keep]), torch.tensor(y[keep])
    )
    got = weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(y), jnp.asarray(w))
    bound = cross_entropy(8, int(keep.sum()), logits[keep], float(ref))
    assert_within(float(got), float(ref), bound, "weighted CE vs torch")
    drop = np.flatnonzero(keep)[0]  # a scored row left out
    wrong = weighted_cross_entropy(
        jnp.asarray(np.delete(logits, drop, 0)), jnp.asarray(np.delete(y, drop)), jnp.asarray(w)
    )
    assert_exceeds(float(wrong), float(ref), bound, "weighted CE, one row left out")
    # Padded rows (weight 0) change nothing.
    pad = np.concatenate([logits, rng.normal(size=(4, 8)).astype(np.float32)])
    ypad = np.concatenate([y, rng.integers(0, 8, 4)])
    rw = np.concatenate([np.ones(16), np.zeros(4)]).astype(np.float32)
    got2 = weighted_cross_entropy(
        jnp.asarray(pad), jnp.asarray(ypad), jnp.asarray(w), jnp.asarray(rw)
    )
    assert_within(float(got2), float(ref), bound, "weighted CE with padded rows vs torch")
