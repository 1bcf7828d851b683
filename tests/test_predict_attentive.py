"""`ifmvse predict` and `serve`'s predictor on a run with attentive heads: frames computed from the
backbone in memory and pooled by the trained heads give the run's own Test predictions."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from tiny_run import build_tiny_run

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
    from jax_ifmvse.predict import predict_files
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
    preds = predict_files([audio / k for k in sorted(batch)], run)
    for p, k in zip(preds, sorted(batch), strict=True):
        assert p.error is None and np.isfinite(p.values).all(), p
        # Same frames (float16 as stored; the backbone in another batch shape) and the same
        # float16 standardization: equal up to float32 noise of the batched encoder (see docs).
        np.testing.assert_allclose(p.values, batch[k], atol=1e-4, rtol=0)
    # serve's path: warm_up compiles the one padded frame shape; a request compiles nothing.
    pr = Predictor(run, max_clips=2)
    pr.warm_up()
    compiled = pr.programs()
    again = pr.predict_files([audio / sorted(batch)[0]])[0]
    assert pr.programs() == compiled
    np.testing.assert_allclose(again.prediction.values, batch[sorted(batch)[0]], atol=1e-4)
