"""IF-MVSE heads against a plain numpy reading of the paper (eq. 2-6), and the CCC loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from flax.traverse_util import flatten_dict
from tolerances import U32, assert_exceeds, assert_within, chain, two_orders
from tolerances import ccc as ccc_bound

from jax_ifmvse.config import ConfigError, ModelConfig, ScoreSetConfig
from jax_ifmvse.heads import (
    FusionModel,
    HeadConfigError,
    LayerSum,
    MLPHead,
    SingleViewModel,
    build_score_model,
    interactive_attention,
)
from jax_ifmvse.heads.mlp import Linear
from jax_ifmvse.losses import ccc, ccc_loss
from jax_ifmvse.metrics import ccc_np


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _dense(p, x):
    return x @ np.asarray(p["weight"], np.float64).T + np.asarray(p["bias"], np.float64)


def _mlp_np(p, x):
    return _dense(p["fc2"], np.maximum(_dense(p["fc1"], x), 0.0))


def _fusion_np(params, x1, x2):
    """The paper's eq. 2-6 and MLP, written out in numpy from the Flax parameters."""
    f1 = x1.astype(np.float64)  # width already common_dim: no projection
    f2 = _dense(params["view2"]["proj"], x2)  # 24 -> 16
    f_inter = f1 * f2  # eq. 2
    alpha = _sigmoid(np.tanh(f_inter))  # eq. 3
    f1h, f2h = alpha * f1, alpha * f2  # eq. 4
    g = params["gate"]
    p1 = np.tanh(_dense(g["W1p"], f1))  # eq. 5
    p2 = np.tanh(_dense(g["W2p"], f2))
    zp = _sigmoid(_dense(g["Wzp"], np.concatenate([f1, f2], -1)))
    q1 = np.tanh(_dense(g["W1q"], f1h))
    q2 = np.tanh(_dense(g["W2q"], f2h))
    zq = _sigmoid(_dense(g["Wzq"], np.concatenate([f1h, f2h], -1)))
    s = zp * p1 + (1 - zp) * p2 + zq * q1 + (1 - zq) * q2  # eq. 6
    return _mlp_np(params["mlp"]["path0"], s)


def test_fusion_matches_numpy_reading_of_eq_2_to_6():
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=(5, 16)).astype(np.float32)
    x2 = rng.normal(size=(5, 24)).astype(np.float32)
    model = FusionModel(views=("w", "v"), dim=16, hidden=8, dropout=0.5, n_outputs=1)
    feats = {"w": x1, "v": x2}
    params = jax.jit(model.init, static_argnames="train")(jax.random.key(1), feats, train=False)
    params = params["params"]
    assert set(params["gate"]) == {"W1p", "W2p", "Wzp", "W1q", "W2q", "Wzq"}
    assert "view1" not in params and params["view2"]["proj"]["weight"].shape == (16, 24)
    got = np.asarray(model.apply({"params": params}, feats, train=False))
    want = _fusion_np(params, x1, x2)
    # Two orders of <= 8 dot products in sequence (projections, gates, MLP), length <= 24.
    bound = chain(8, 24, np.abs(want).max())
    assert_within(got, want, bound, "fusion")
    assert_exceeds(_fusion_np(params, x1, x2[::-1]), want, bound, "another row's second view")


def test_interactive_attention_shares_alpha():
    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(2, 3, 7))
    h1, h2 = interactive_attention(jnp.asarray(f1), jnp.asarray(f2))
    alpha = _sigmoid(np.tanh(f1 * f2))
    # float32 vs float64: f1, f2 rounded (u each), their product (u), tanh and the sigmoid
    # (conditioning <= 1 on these arguments, each within 2 ulp of its own), the last product
    # and f's rounding (2u): 10u relative, 20u for 2 ulp being up to 2u.
    for h, f in ((h1, f1), (h2, f2)):
        bound = 20 * U32 * np.abs(alpha * f)
        assert_within(h, alpha * f, bound, "interactive attention")
        assert_exceeds(h, _sigmoid(f1 * f2) * f, bound, "alpha without the tanh")
    assert np.all((alpha > 0) & (alpha < 1))


def test_dropout_active_only_in_training():
    x = np.ones((4, 16), np.float32)
    model = SingleViewModel(views=("a",), dim=16, hidden=64, dropout=0.5)
    params = model.init(jax.random.key(0), {"a": x}, train=False)["params"]
    ev = [model.apply({"params": params}, {"a": x}, train=False) for _ in range(2)]
    np.testing.assert_array_equal(ev[0], ev[1])
    tr = [
        model.apply({"params": params}, {"a": x}, train=True, rngs={"dropout": jax.random.key(i)})
        for i in range(2)
    ]
    assert not np.allclose(tr[0], tr[1])
    want = _mlp_np(params["mlp"]["path0"], x)
    assert_within(ev[0], want, chain(3, 64, np.abs(want).max()), "MLP")  # fc1, fc2, out


def test_two_branch_mlp_averages_two_separate_paths():
    x = np.random.default_rng(2).normal(size=(6, 16)).astype(np.float32)
    head = MLPHead(hidden=8, dropout=0.5, n_outputs=3, branches=2)
    params = head.init(jax.random.key(0), x, train=False)["params"]
    assert set(params) == {"path0", "path1"}
    assert not np.allclose(params["path0"]["fc1"]["weight"], params["path1"]["fc1"]["weight"])
    want = (_mlp_np(params["path0"], x) + _mlp_np(params["path1"], x)) / 2
    bound = chain(4, 16, np.abs(want).max())  # fc1, fc2, out, the mean of two
    assert_within(head.apply({"params": params}, x, train=False), want, bound, "two paths")
    assert_exceeds(_mlp_np(params["path0"], x), want, bound, "one path")


def test_layer_sum_is_softmax_weighted():
    x = np.random.default_rng(3).normal(size=(2, 4, 5)).astype(np.float32)
    w = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    out = LayerSum().apply({"params": {"layer_weights": w}}, x)
    sm = np.exp(w) / np.exp(w).sum()
    # Softmax (4 terms) then a 4-term weighted sum: each errs by gamma_4 of its terms' sizes.
    magnitude = np.einsum("l,bld->bd", sm, np.abs(x)) * 2
    assert_within(out, np.einsum("l,bld->bd", sm, x), two_orders(4, magnitude), "layer sum")
    # The freshly initialised sum is the plain layer average.
    p = LayerSum().init(jax.random.key(0), x)
    assert_within(LayerSum().apply(p, x), x.mean(1), two_orders(4, np.abs(x).mean(1) * 2), "mean")


def test_layered_view_is_summed_then_projected():
    x = np.random.default_rng(8).normal(size=(3, 5, 12)).astype(np.float32)  # (B, L, D)
    model = SingleViewModel(views=("a",), dim=16, hidden=8, dropout=0.0)
    params = model.init(jax.random.key(0), {"a": x}, train=False)["params"]
    assert params["view1"]["layer_sum"]["layer_weights"].shape == (5,)
    assert params["view1"]["proj"]["weight"].shape == (16, 12)
    w = np.asarray(params["view1"]["layer_sum"]["layer_weights"])
    sm = np.exp(w) / np.exp(w).sum()
    f = _dense(params["view1"]["proj"], np.einsum("l,bld->bd", sm, x))
    got = model.apply({"params": params}, {"a": x}, train=False)
    want = _mlp_np(params["mlp"]["path0"], f)
    assert_within(got, want, chain(5, 16, np.abs(want).max()), "layered")  # sum, proj, MLP


def test_build_score_model_checks_views_and_outputs():
    cfg = ModelConfig(common_dim=16, hidden=8)
    dims = {"whisper": 20, "wavlm": 16}
    m = build_score_model(ScoreSetConfig("S2", "fusion", ("whisper", "wavlm")), cfg, dims, 3)
    feats = {"whisper": np.zeros((2, 20), np.float32), "wavlm": np.zeros((2, 16), np.float32)}
    params = m.init(jax.random.key(0), feats, train=False)
    assert m.apply(params, feats, train=False).shape == (2, 3)
    with pytest.raises(HeadConfigError, match="S9.*takes 2"):
        build_score_model(ScoreSetConfig("S9", "fusion", ("wavlm",)), cfg, dims, 1)
    with pytest.raises(HeadConfigError, match="hubert"):
        build_score_model(ScoreSetConfig("S5", "mlp", ("hubert",)), cfg, dims, 1)
    with pytest.raises(ConfigError, match="kind='gru': expected one of mlp, fusion"):
        ScoreSetConfig("S1", "gru", ("wavlm",))  # refused when the config is built


def test_ccc_matches_numpy_reference():
    rng = np.random.default_rng(4)
    for _ in range(5):
        t = rng.normal(3, 1.5, size=200).astype(np.float32)
        p = (0.6 * t + rng.normal(0.5, 1.0, size=200)).astype(np.float32)
        assert_within(ccc(jnp.asarray(t), jnp.asarray(p)), ccc_np(t, p), ccc_bound(200), "ccc")
    tk, pk = rng.normal(size=(2, 50, 3)).astype(np.float32)
    assert_within(ccc(tk, pk, axis=0), ccc_np(tk, pk, axis=0), ccc_bound(50), "per column")
    assert_exceeds(ccc(tk, pk + 0.1, axis=0), ccc_np(tk, pk, axis=0), ccc_bound(50), "shifted")


def test_ccc_identical_mirrored_and_masked():
    y = np.random.default_rng(5).uniform(1, 7, size=64).astype(np.float32)
    # A float32 CCC vs its exact value (+-1, loss 0): within the two-order CCC bound.
    b = ccc_bound(64)
    assert_within(float(ccc(y, y)), 1.0, b, "ccc(y, y)")
    assert_exceeds(float(ccc(y, y + 0.1)), 1.0, b, "ccc(y, y + 0.1)")
    assert_within(float(ccc(y, 2 * y.mean() - y)), -1.0, b, "mirrored")
    assert_within(float(ccc_loss(y, y)), 0.0, b, "ccc loss of y, y")
    p = y + np.random.default_rng(6).normal(size=64).astype(np.float32)
    w = (np.arange(64) < 40).astype(np.float32)
    assert_within(ccc(y, p, w), ccc_np(y[:40], p[:40]), ccc_bound(64), "masked")
    assert_exceeds(ccc(y, p), ccc_np(y[:40], p[:40]), ccc_bound(64), "mask ignored")


def test_ccc_loss_gradient_is_finite():
    rng = np.random.default_rng(7)
    t, p = rng.normal(size=(2, 32, 1)).astype(np.float32)
    g = jax.grad(lambda p: ccc_loss(t, p))(p)
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0


def test_linear_flax_init_is_dense_transposed():
    """`param_init="flax"` keeps the old draws: exactly nn.Dense's kernel, transposed."""
    x = np.random.default_rng(3).normal(size=(4, 6)).astype(np.float32)
    key = jax.random.key(5)
    ours = Linear(3, "flax").init(key, x)["params"]
    dense = nn.Dense(3).init(key, x)["params"]
    assert ours["weight"].shape == (3, 6)  # (out, in), as torch.nn.Linear
    np.testing.assert_array_equal(ours["weight"], dense["kernel"].T)  # same initial draws
    np.testing.assert_array_equal(ours["bias"], np.zeros(3))
    got = Linear(3, "flax").apply({"params": ours}, x)
    want = nn.Dense(3).apply({"params": dense}, x)
    # Two orders of a 6-term dot product + bias, per element, of its terms' sizes.
    w = np.asarray(ours["weight"], np.float64)
    bound = two_orders(7, np.abs(x) @ np.abs(w).T + np.abs(np.asarray(ours["bias"])))
    assert_within(got, want, bound, "Linear vs nn.Dense")
    assert_exceeds(got, want[::-1], bound, "rows reversed")


def test_linear_torch_init_draws_as_torch_nn_linear():
    """Default init: weight and bias U(-1/sqrt(in), 1/sqrt(in)), the same law as nn.Linear's."""
    fan_in, fan_out = 1024, 512
    x = np.zeros((1, fan_in), np.float32)
    p = Linear(fan_out).init(jax.random.key(0), x)["params"]
    w, b = np.asarray(p["weight"], np.float64), np.asarray(p["bias"], np.float64)
    bound = 1 / np.sqrt(fan_in)
    assert w.shape == (fan_out, fan_in) and b.shape == (fan_out,)
    # Bounds: nothing beyond 1/sqrt(fan_in) (1/sqrt(fan_out) would be 1.41x wider), tails reached.
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.999 * bound
    assert np.abs(b).max() <= bound and np.abs(b).max() > 0.95 * bound
    # Moments of U(-a, a): mean 0, variance a^2/3, kurtosis 1.8 (a normal's is 3).
    n = w.size
    assert abs(w.mean()) < 4 * bound / np.sqrt(3 * n)
    assert w.var() == pytest.approx(bound**2 / 3, rel=0.01)
    assert np.mean(w**4) / w.var() ** 2 == pytest.approx(1.8, abs=0.02)
    assert b.var() == pytest.approx(bound**2 / 3, rel=0.2)
    # The same law as torch's own draws (two-sample Kolmogorov-Smirnov, weights and biases).
    torch.manual_seed(0)
    ref = torch.nn.Linear(fan_in, fan_out)
    tw, tb = ref.weight.detach().numpy().ravel(), ref.bias.detach().numpy()
    assert scipy.stats.ks_2samp(w.ravel()[:200_000], tw[:200_000]).pvalue > 1e-3
    assert scipy.stats.ks_2samp(b, tb).pvalue > 1e-3
    # ... and not LeCun-normal's law (the test can tell the two apart).
    flax_w = Linear(fan_out, "flax").init(jax.random.key(0), x)["params"]["weight"]
    assert scipy.stats.ks_2samp(np.ravel(flax_w)[:200_000], tw[:200_000]).pvalue < 1e-6


@pytest.mark.parametrize("kind", ["mlp", "fusion"])
def test_model_init_reaches_every_linear(kind):
    """`model.init` sets every Linear of a score model: torch bounds per layer, or flax's zeros."""
    dims = {"a": 40, "b": 24}
    ss = ScoreSetConfig("S", kind, ("a", "b")[: 1 if kind == "mlp" else 2])
    feats = {v: np.zeros((2, dims[v]), np.float32) for v in ss.views}
    params = {}
    for init in ("torch", "flax"):
        m = build_score_model(ss, ModelConfig(common_dim=32, hidden=16, init=init), dims, 1)
        params[init] = flatten_dict(m.init(jax.random.key(0), feats, train=False)["params"])
    linears = [k[:-1] for k in params["torch"] if k[-1] == "weight"]
    assert len(linears) == (2 + 1 if kind == "mlp" else 2 + 2 + 6)  # fc1, fc2, proj(s), gate
    for path in linears:
        w, b = params["torch"][(*path, "weight")], params["torch"][(*path, "bias")]
        bound = 1 / np.sqrt(w.shape[1])
        assert np.abs(w).max() <= bound and np.abs(b).max() <= bound, path
        assert np.abs(b).max() > 0.3 * bound, path  # biases drawn, not zero
        np.testing.assert_array_equal(params["flax"][(*path, "bias")], 0.0)
        assert not np.allclose(w, params["flax"][(*path, "weight")]), path
    with pytest.raises(ConfigError, match="init='xavier': expected one of torch, flax"):
        ModelConfig(init="xavier")  # refused when the config is built
