"""Text views train like speech views: configs/winners.yaml (WavLM, Whisper, RoBERTa views,
gender auxiliary, balanced sampling) on a toy store whose text view carries the valence; predict
plans them apart from the speech backbones (scored: tests/test_text_predict.py)."""

from __future__ import annotations

import numpy as np
from tolerances import assert_exceeds, assert_within, weights_sum
from toy_store import write_toy_store

from jax_ifmvse.categories import CLASS_CODES
from jax_ifmvse.config import grid_units, load_config


def test_winners_config_trains_text_views_in_mlp_fusion_and_ensemble(tmp_path):
    from jax_ifmvse.ensemble.run import run_ensemble
    from jax_ifmvse.train import train_run

    rng = np.random.default_rng(0)
    n_train, n_dev, n_test = 96, 32, 16
    n = n_train + n_dev + n_test
    views = {k: rng.normal(size=(n, 12)).astype(np.float32) for k in ("wavlm", "whisper")}
    views["roberta"] = rng.normal(size=(n, 16)).astype(np.float32)  # a text view's own width
    y = 4 + np.tanh(np.stack([views["wavlm"][:, 0], views["roberta"][:, 0],
                              views["whisper"][:, 0]], 1))  # fmt: skip
    codes = np.asarray(CLASS_CODES)[rng.integers(0, 8, n)].astype(object)
    gender = np.where(rng.random(n) > 0.5, "Female", "Male").astype(object)
    splits = ["Train"] * n_train + ["Development"] * n_dev + ["Test1"] * n_test
    write_toy_store(tmp_path / "s.h5", splits, y, views, {"EmoClass": codes, "Gender": gender})
    small = ["model.common_dim=8", "model.hidden=8", "train.epochs=2", "train.batch_size=16",
             "train.learning_rate=1e-3", "train.test_splits=[Test1]"]  # fmt: skip
    cfg = load_config("winners", small)
    assert cfg.train.sampler == "balanced" and "gender" in cfg.train.tasks
    assert ("WR", ("wavlm", "roberta")) in [(s.name, s.views) for s in cfg.model.score_sets]
    # The config's two text score sets (an MLP on the text view, text fused with WavLM): the
    # other four are the same kinds on speech views, which other tests cover.
    cfg = load_config("winners", [*small, "model.score_sets=[{name: R, kind: mlp, views: [roberta]},"
                                  " {name: WR, kind: fusion, views: [wavlm, roberta]}]"])  # fmt: skip
    manifest = train_run(tmp_path / "s.h5", cfg, tmp_path / "RUN")
    assert set(manifest["best"]) == {"R", "WR"}
    assert {v["model"] for s in manifest["best"].values() for v in s.values()} == {"joint"}
    summary = run_ensemble(tmp_path / "RUN", cfg.ensemble)
    weights = summary["attributes"]["valence"]["weights"]
    assert set(weights) == {"R", "WR"}
    bound = weights_sum(len(weights))  # each written with 10 decimals
    assert_within(sum(weights.values()), 1.0, bound, "text ensemble weights sum to 1")
    step = 1.0 / grid_units(cfg.ensemble)[0]
    assert_exceeds(sum(weights.values()) + step, 1.0, bound, "one grid step more")


def test_predict_plans_text_views_apart_from_the_speech_backbones(tmp_path):
    """`extraction_plan` leaves text views to `text_plan` (Whisper + encoder, `text.views`)."""
    from featurestore import StoreWriter, finalize
    from jax_ifmvse.inference import extraction_plan, text_plan

    y = np.full((2, 3), 4.0, np.float32)
    write_toy_store(tmp_path / "s.h5", ["Train", "Development"], y, {"a": np.ones((2, 4))})
    with StoreWriter(tmp_path / "s.h5", "t", dim=4, attrs={"kind": "text", "transcripts": "asr",
                                                          "source": "x"}) as w:  # fmt: skip
        w.write(np.arange(2), np.ones((2, 4), np.float32))
    finalize(tmp_path / "s.h5")
    assert extraction_plan(tmp_path / "s.h5", ["t"]) == ({}, [])
    sources, plan = text_plan(tmp_path / "s.h5", ["a", "t"])
    assert plan == [("t", "t", None)]
    assert sources["t"]["transcripts"] == "asr" and sources["t"]["_dtype"] == "float32"
