"""`ifmvse predict` and `serve`'s predictor on a run with attentive heads: frames computed from the
backbone in memory and pooled by the trained heads give the run's own Test predictions."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from tiny_run import build_tiny_run
from tolerances import assert_exceeds, assert_within, batch_path_bound

from jax_ifmvse.config import ATTRIBUTES

ATTENTIVE = (
    "extract.frames=last",
    "model.pooling=attentive",
    "model.layer_weights=false",
    "model.score_sets=[{name: S1, kind: mlp, views: [w]}]",
)


@pytest.fixture(scope="module")
def attentive_run(tmp_path_factory):
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("predict_attentive")
    run, audio = build_tiny_run(root, extra=ATTENTIVE)
    return run, audio


def test_predict_scores_an_attentive_run_as_its_test_predictions(attentive_run):
    from jax_ifmvse.predict import open_predictor
    from jax_ifmvse.predictor import Predictor

    run, audio = attentive_run
    with open(run / "ensemble" / "Test1.csv") as f:  # unclipped; predict clips to 1..7
        batch = {
            r["FileName"]: np.clip([float(r[a]) for a in ATTRIBUTES], 1.0, 7.0)
            for r in csv.DictReader(f)
        }
    assert len(batch) == 4
    scores = np.load(run / "scores" / "Test1.npz")["scores"]  # (K, N, 3)
    assert np.isfinite(scores).all()  # every Test1 clip was scored from its stored frames
    pred = open_predictor(run)  # what `predict_files` opens
    seen = []  # the heads' inputs (measured for the bound's magnitudes only)
    score = pred.score
    pred.score = lambda f: seen.append(f) or score(f)
    preds = [s.prediction for s in pred.predict_files([audio / k for k in sorted(batch)])]
    # Same frames (float16 as stored; the backbone in another batch shape) and the same
    # float16 standardization: the batched encoder's rounding, float16 flips, the heads' gain.
    bound = batch_path_bound(run, score, seen[0], h=0.05)[: len(batch)]
    for p, k, b in zip(preds, sorted(batch), bound, strict=True):
        assert p.error is None and np.isfinite(p.values).all(), p
        assert_within(p.values, batch[k], b, f"attentive predict vs batch path {k}")
    assert_exceeds(preds[1].values, batch[sorted(batch)[0]], bound[0], "another file")
    # serve's path: warm_up compiles the one padded frame shape; a request compiles nothing.
    pr = Predictor(run, max_clips=2)
    pr.warm_up()
    compiled = pr.programs()
    again = pr.predict_files([audio / sorted(batch)[0]])[0]
    assert pr.programs() == compiled
    assert_within(again.prediction.values, batch[sorted(batch)[0]], bound[0], "serve's path")


@pytest.mark.parametrize("fused", [False, True])
def test_attribute_scores_are_the_heads_as_a_jax_function(attentive_run, fused):
    """`load_heads(...).attribute_scores` (what `tolerances.head_grads` differentiates: the
    scorer's own heads and attribute scaling, on frames standardized in float32 instead of
    float16) scores frames as the scorer does, within the float16 rounding its gradient bounds."""
    import jax.numpy as jnp
    from tolerances import LAMBDA, U32, U_F16, head_grads

    from jax_ifmvse.data.views import load_stats
    from jax_ifmvse.inference import load_heads

    run, _ = attentive_run
    score = load_heads(run, fused=fused)
    mean, std = load_stats(run / "view_stats.npz")["w"]
    rng = np.random.default_rng(0)
    n, t, d = 3, 7, len(mean)
    x = (mean + std * rng.normal(size=(n, t, d))).astype(np.float16)  # (N, T, D) frames
    mask = np.arange(t)[None] < np.array([[7], [4], [1]])  # (N, T): rows of 7, 4, 1 frames
    f = {"w": x, "w:mask": mask}
    want = score(f)  # (K, N, 3)
    got = np.asarray(score.attribute_scores({"w": jnp.asarray(x, jnp.float32), "w:mask": mask}))
    # score rounds z = (x - mean) / std to float16 (u_f16 |x - mean| in x's units per element);
    # attribute_scores does not: sum_j |g_j| u_f16 |x_j - mean| to first order, + both sides'
    # own roundings (8 ops, two orders of the linearised terms, as `heads_rounding`).
    bound = np.zeros_like(got, np.float64)
    xs = np.asarray(x, np.float64)
    for i, a, g in head_grads(score.attribute_scores, f):
        ag = np.abs(g["w"])
        rounding = LAMBDA * np.sqrt(d) * U32 * np.sqrt(16) * (ag * np.abs(xs)).sum((1, 2))
        bound[i, :, a] = (ag * U_F16 * np.abs(xs - mean)).sum((1, 2)) + rounding
    assert_within(got, want, bound, "attribute_scores vs the heads")
    assert_exceeds(got[:, ::-1], want, bound, "rows reversed")
