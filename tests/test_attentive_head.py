"""Score-set heads with `model.pooling: attentive`: frames pooled in the head, padding masked."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jax_ifmvse.config import ModelConfig, ScoreSetConfig, TrainConfig
from jax_ifmvse.heads import HeadConfigError, build_score_model


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
    np.testing.assert_allclose(model.apply({"params": params}, wide, train=False), out, atol=1e-5)
    # Each row alone, cut to its own frames: the same outputs.
    for i in range(5):
        one = {}
        for v in views:
            n = int(mask[v][i].sum())
            one[v], one[f"{v}:mask"] = feats[v][i : i + 1, :n], np.ones((1, n), bool)
        np.testing.assert_allclose(
            model.apply({"params": params}, one, train=False)[0], out[i], atol=1e-5
        )


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
    with pytest.raises(HeadConfigError, match="model.pooling"):
        build_score_model(ScoreSetConfig("S", "mlp", ("a",)), ModelConfig(pooling="max"),
                          {"a": 4}, 1)  # fmt: skip
