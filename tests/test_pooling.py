"""Attentive statistics pooling equals a PyTorch copy of the challenge baseline's module."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from tolerances import U32, assert_exceeds, assert_within, chain  # noqa: E402
from torch_reference import BaselineASP  # noqa: E402

from jax_ifmvse.heads.pooling import AttentiveStatisticsPooling, masked_mean  # noqa: E402


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_attentive_pooling_equals_baseline(seed):
    rng = np.random.default_rng(seed)
    b, t, d = 5, 17, 12
    x = rng.normal(size=(b, t, d)).astype(np.float32) * 2.0
    lens = rng.integers(1, t + 1, size=b)
    lens[0] = t
    lens[1] = 1  # one frame: variance 0, clamped
    mask = np.arange(t)[None] < lens[:, None]
    x[~mask] = 1e3  # padding must not leak in
    torch.manual_seed(seed)
    ref = BaselineASP(d)
    want = ref(torch.from_numpy(x), lens.tolist()).detach().numpy()
    params = {
        "sap_linear": {
            "weight": jnp.asarray(ref.sap_linear.weight.detach().numpy()),
            "bias": jnp.asarray(ref.sap_linear.bias.detach().numpy()),
        },
        "attention": jnp.asarray(ref.attention.detach().numpy()),
    }
    got = AttentiveStatisticsPooling().apply({"params": params}, jnp.asarray(x), jnp.asarray(mask))
    assert got.shape == (b, 2 * d)
    # Per row: the linear, tanh, attention, softmax's sum and quotient, the weighted sums of x
    # and x^2 (t terms, d for the dot products); the attention logits' error moves the weights
    # relatively, so values of size max|x| x max(1, max|logit|). The std: sqrt(v) from a
    # variance within vb (its t-term sums of x^2 w): |sqrt a - sqrt b| <= vb / sqrt(b).
    lin = {k: v.detach().numpy() for k, v in ref.sap_linear.state_dict().items()}
    a = (np.tanh(x @ lin["weight"].T + lin["bias"]) @ ref.attention.detach().numpy())[..., 0]
    big = float(np.abs(x[mask]).max()) * max(1.0, float(np.abs(a[mask]).max()))
    mb = chain(6, max(t, d), big)
    vb = chain(7, max(t, d), big * float(np.abs(x[mask]).max()))
    bound = np.concatenate([np.full((b, d), mb), vb / want[:, d:]], 1)
    assert_within(np.asarray(got), want, bound, "attentive pooling vs torch")
    short = mask.copy()
    short[0, int(a[0].argmax())] = False  # the first row's most attended frame left out
    wrong = AttentiveStatisticsPooling().apply(
        {"params": params}, jnp.asarray(x), jnp.asarray(short)
    )
    assert_exceeds(np.asarray(wrong)[0], want[0], bound[0], "pooling, one frame left out")
    # One frame: the variance clamps at 1e-5 (float32: its rounding, halved by the sqrt, and the
    # sqrt's own: 1.5 u of the std); unclamped it would be 0.
    clamp = 1.5 * U32 * np.sqrt(1e-5)
    assert_within(np.asarray(got)[1, d:], np.full(d, np.sqrt(1e-5)), clamp, "std at the clamp")
    assert_exceeds(np.zeros(d), np.full(d, np.sqrt(1e-5)), clamp, "no clamp")


def test_masked_mean_ignores_padding():
    x = jnp.asarray([[[1.0], [3.0], [100.0]]])
    assert float(masked_mean(x, jnp.asarray([[1, 1, 0]]))[0, 0]) == 2.0
