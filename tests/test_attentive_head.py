"""Score-set heads with `model.pooling: attentive`: frames pooled in the head, padding masked."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from tolerances import assert_exceeds, assert_within, chain

from jax_ifmvse.config import ConfigError, ModelConfig, ScoreSetConfig, TrainConfig
from jax_ifmvse.heads import build_score_model


def _frames(rng, n, t_max, d):
    lengths = rng.integers(2, t_max + 1, n)
    x = rng.normal(size=(n, t_max, d)).astype(np.float32)
    mask = np.arange(t_max)[None] < lengths[:, None]
    return x, mask, lengths


@pytest.mark.parametrize("kind,views", [("mlp", ("a",)), ("fusion", ("a", "b"))])
def test_padding_changes_nothing(kind, views):
    rng = np.random.default_rng(0)
    mc = ModelConfig(common_dim=8, hidden=8, dropout=0.0, pooling="attentive")
    model = build_score_model(ScoreSetConfig("S", kind, views), mc, {"a": 6, "b": 6}, 3)
    feats, mask = {}, {}
    for v in views:
        x, m, _ = _frames(rng, 5, 7, 6)
        feats[v], mask[v] = x, m
    batch = {**feats, **{f"{v}:mask": m for v, m in mask.items()}}
    params = model.init(jax.random.key(0), batch, train=False)["params"]
    assert "pool" in params["view1"] and "sap_linear" in params["view1"]["pool"]
    out = model.apply({"params": params}, batch, train=False)  # (5, 3)
    # Longer padding filled with garbage: the same outputs.
    wide = {}
    for v in views:
        x = np.concatenate([feats[v], 1e3 * rng.normal(size=(5, 4, 6)).astype(np.float32)], 1)
        x[~np.concatenate([mask[v], np.zeros((5, 4), bool)], 1)] = 1e3
        wide[v] = x
        wide[f"{v}:mask"] = np.concatenate([mask[v], np.zeros((5, 4), bool)], 1)
    # Two orders of at most 8 dot products in sequence (attention logits, softmax, weighted sum
    # over <= 11 frames, projection, the head's layers), each of length <= 11.
    bound = chain(8, 11, np.abs(out).max())
    got = model.apply({"params": params}, wide, train=False)
    assert_within(got, out, bound, "longer padding")
    seen = {**wide, **{f"{v}:mask": np.ones_like(wide[f"{v}:mask"]) for v in views}}
    assert_exceeds(model.apply({"params": params}, seen, train=False), out, bound, "padding seen")
    # Each row alone, cut to its own frames: the same outputs.
    for i in range(5):
        one = {}
        for v in views:
            n = int(mask[v][i].sum())
            one[v], one[f"{v}:mask"] = feats[v][i : i + 1, :n], np.ones((1, n), bool)
        assert_within(model.apply({"params": params}, one, train=False)[0], out[i], bound, "alone")


def test_attentive_heads_train_on_frames_and_unknown_pooling_is_refused(tmp_path):
    from jax_ifmvse.train import train_model

    rng = np.random.default_rng(1)
    x, m, _ = _frames(rng, 48, 6, 4)
    # A label the frames' spread decides: the weighted standard deviation is one of the outputs.
    y = (1 + 6 * (x.std(1).mean(1) > np.median(x.std(1).mean(1)))).astype(np.float32)[:, None]
    mc = ModelConfig(common_dim=8, hidden=8, dropout=0.0, pooling="attentive")
    model = build_score_model(ScoreSetConfig("S", "mlp", ("a",)), mc, {"a": 4}, 1)
    feats = {"a": x, "a:mask": m}
    tr = ({k: v[:32] for k, v in feats.items()}, y[:32])
    dv = ({k: v[32:] for k, v in feats.items()}, y[32:])
    cfg = TrainConfig(batch_size=16, learning_rate=1e-2, epochs=3, seed=0)
    res = train_model(model, tr, dv, cfg, tmp_path / "m", targets=["arousal"])
    assert len(res.history) == 3 and np.isfinite(res.best_dev_ccc)
    leaves = jax.tree.leaves(res.params["view1"]["pool"])
    assert all(np.isfinite(np.asarray(p)).all() for p in leaves)
    with pytest.raises(ConfigError, match="pooling=.max.: expected one of mean, attentive"):
        ModelConfig(pooling="max")  # the rule lives on the field


def test_attentive_run_learns_a_class_of_the_frame_spread_that_pooled_vectors_hide(tmp_path):
    """Class = whether an utterance's frames vary much: invisible in the mean over frames (the
    stored pooled vector), visible to attentive statistics pooling (its standard deviation)."""
    from toy_store import write_toy_store

    from featurestore.frames import FrameWriter, finalize_frames
    from jax_ifmvse.config import load_config
    from jax_ifmvse.train import train_run

    rng = np.random.default_rng(0)
    n, d = 320, 4
    cls = rng.integers(0, 2, n)
    frames = []
    for i in range(n):
        t = int(rng.integers(8, 16))
        mu = rng.normal(size=d)
        frames.append((mu + (0.2, 2.0)[cls[i]] * rng.normal(size=(t, d))).astype(np.float32))
    pooled = np.stack([f.mean(0) for f in frames])
    splits = ["Train"] * 224 + ["Development"] * 64 + ["Test1"] * 32
    store = tmp_path / "s.h5"
    codes = {"EmoClass": np.asarray(["A", "S"])[cls], "Gender": ["Female"] * n}
    write_toy_store(store, splits, rng.uniform(1, 7, (n, 3)), {"a": pooled}, codes)
    w = FrameWriter(store, "a", d)
    for s in range(0, n, 50):
        w.write(np.arange(s, min(n, s + 50)), frames[s : s + 50])
    finalize_frames(store, "a")

    def best(pooling):
        cfg = load_config(
            None,
            ["model.common_dim=8", "model.hidden=16", "model.dropout=0.0",
             "model.score_sets=[{name: S, kind: mlp, views: [a]}]", f"model.pooling={pooling}",
             "train.tasks=[category]", "train.epochs=15", "train.batch_size=32",
             "train.learning_rate=1e-2", "train.test_splits=[Test1]"],
        )  # fmt: skip
        m = train_run(store, cfg, tmp_path / pooling)
        return m["best"]["S"]["category"]["dev_macro_f1"]

    attentive, mean = best("attentive"), best("mean")
    assert attentive > 0.9 and mean < 0.75, (attentive, mean)
