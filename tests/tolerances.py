"""Tolerances derived from sizes and magnitudes for comparisons between two computation orders.

Every test that compares two float computations of the same maths done in another order (1 vs
several devices, a row alone vs in a padded batch, ours vs PyTorch, streamed vs in memory) or at
another precision (bfloat16 vs float32) takes its bound from here; docs/tolerances.md lists them.

- `two_orders`: a float32 sum or dot product of n terms errs by at most gamma_n = n u / (1 - n u)
  of the sum of the terms' sizes (Higham, Accuracy and Stability of Numerical Algorithms, 3.1),
  so two orders differ by at most 2 gamma_n of it. Worst case: for one reduction (a loss, a
  gradient) whose magnitude the test knows.
- `chain`: a forward pass of `ops` dot products in sequence, each of length <= k, whose values
  have size `scale`. Per dot product, the probabilistic bound of Higham and Mary (SIAM J. Sci.
  Comput. 41(5), 2019): lambda sqrt(k) u of the terms' sizes, except with probability
  <= 2 exp(-lambda^2 / 2) (lambda = 6: 3e-8 per element); the terms' sizes sum to about
  sqrt(k) x `scale` (random weights of size 1/sqrt(k) over inputs of size `scale`), so
  lambda k u scale per op. The ops' roundings are independent, so their errors add in quadrature
  (sqrt(ops)), and so do the two orders' (sqrt(2)); normalised residual layers carry an error
  without amplifying it (first order).
- `bf16_chain`: the same chain with every operand and result rounded to bfloat16 (u = 2^-8;
  CPUs and GPUs accumulate the products in float32): each product's two roundings and the
  result's give sqrt(3) u of `scale` per op (the terms' random-walk sum is `scale`), added in
  quadrature over the ops, at the same lambda.
- `frames_batch_path_bound`: predict vs the batch path for attentive heads on a real backbone's
  frames (T D elements per row): the heads' reverse-mode derivatives g_j (`head_grads`) and
  each element's error as independent mean-zero parts (the encoder's `chain` at its final
  LayerNorm's scale, two float16 roundings within one ulp), summed by Hoeffding's inequality:
  lambda sqrt(sum_j g_j^2 (sigma_j^2 + q_j^2 + q'_j^2)) instead of the worst case.
- `adam_first_update`: AdamW's first update is -lr (g / (|g| + eps) + wd p); a gradient element
  that differs by dg moves it by at most lr eps dg / (max(|g| - dg, 0) + eps)^2 (a gradient that
  is rounding noise is divided by eps), plus the update's and the add's own roundings.
- `adamw_steps`: AdamW over many steps of the same given gradients (no feedback from the
  parameters to the gradients): a running error bound (Higham 3.3) through the recursions.
- `one_pass`: one forward and backward pass in two orders, from the same pass's answer to the
  `nudge`: lambda sqrt(2) k times it (a random one-ulp move vs the worst rounding of k terms).
- `nudge`, `trajectory`: a training trajectory of many Adam steps, where no a-priori bound
  exists (Adam divides rounding noise by sqrt(v) + eps, step after step). The bound is measured
  in the same run from the arithmetic: the reference trajectory once more from its initial
  parameters each moved one ulp up or down at random (`nudge`), and its answer to that times
  lambda (a random rounding pattern vs the worst) times the steps (the orders' roundings
  recur every step) (`trajectory`).
- `float16_storage`, `written`: one rounding to float16 (u_f16 = 2^-11 relative) per storage,
  0.5 10^-d per value written with d decimals; `ccc_perturbed`: a CCC whose values each moved
  by at most that; `probability_sum`: class probabilities' sum; `ccc_moments`: the ensemble
  search's float32 CCC from moments; `search_vs_single`: the search's best vs one score set.
- `cross_entropy`, `mean_std` (with `pairwise_depth`: numpy's pairwise sum's roundings along one
  path), `fft` (Higham, Theorem 24.2, ceil(log2 n) stages) and `log_mel` (the FFT, the power, the
  mel sums, log10 near its clamp and the max - 8 floor): reference implementations in two orders.
- `fft_filter`: an FIR filter applied by FFTs (soxr's resampling stage): the two FFTs, the
  products and the taps' own transform, per output over its block's ||x||_2.
- `f1_orders`: float64 per-class and macro F1 from the same counts, ours vs scikit-learn.

`assert_within(got, want, bound)` checks a comparison; `assert_exceeds(wrong, want, bound)`
checks that a deliberately wrong computation (a missing average, another layer, padding seen)
falls outside the bound, so the bound can still fail a real bug. One-sided (a maximum over a set
that holds the other side's candidate, `search_vs_single`): `assert_not_below`, `assert_below`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

U32 = 2.0**-24  # float32's unit roundoff (24-bit significand)
U_BF16 = 2.0**-8  # bfloat16's unit roundoff (8-bit significand)
U_F16 = 2.0**-11  # float16's unit roundoff (11-bit significand)
U64 = 2.0**-53  # float64's unit roundoff
LAMBDA = 6.0  # Higham-Mary confidence: each element fails with probability <= 2 exp(-18) = 3e-8


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term float sum."""
    assert n * u < 1, (n, u)
    return n * u / (1 - n * u)


def two_orders(n: int, magnitude: float, u: float = U32) -> float:
    """Largest difference of two orders of an n-term sum whose terms' sizes sum to `magnitude`."""
    return 2 * gamma(n, u) * magnitude


def ccc(n: int, offset: float = 3.0, u: float = U32) -> float:
    """Difference of two orders of a CCC (or 1 - CCC) over n rows. Each statistic is an n-term
    sum: the covariance errs by <= gamma_n (var_x + var_y) / 2 (Cauchy-Schwarz), the variances
    by gamma_n of themselves, the means' errors cancel in the deviations to first order and
    enter through (m_x - m_y)^2 with weight `offset` = |m_x - m_y| (|m_x| + |m_y|) / denominator;
    so |dCCC| <= gamma_n (2 + 2 offset) per order."""
    return two_orders(n, 2 + 2 * offset, u)


def chain(ops: int, k: int, scale: float, u: float = U32, lam: float = LAMBDA) -> float:
    """Difference of two orders of `ops` dot products in sequence (length <= k, values of size
    `scale`): lambda k u scale per op, in quadrature over the ops and the two orders."""
    return lam * k * u * np.sqrt(2 * ops) * scale


def bf16_chain(ops: int, scale: float, lam: float = LAMBDA) -> float:
    """Difference between bfloat16 and float32 operands over `ops` dot products in sequence
    (values of size `scale`, float32 accumulation): lambda sqrt(3 ops) u_bf16 scale."""
    return lam * np.sqrt(3 * ops) * U_BF16 * scale


def adam_first_update(
    lr: float, eps: float, g: np.ndarray, dg: np.ndarray, p0: np.ndarray
) -> np.ndarray:
    """Per-element bound on two first AdamW updates of `p0` from gradients g and g +- dg."""
    bound = lr * eps * dg / (np.maximum(np.abs(g) - dg, 0) + eps) ** 2
    return bound + 2 * (8 * U32 * lr + U32 * np.abs(p0))  # ~8 roundings of the update, 1 add


def adamw_steps(
    lr: float, wd: float, grads: np.ndarray, p0: np.ndarray,
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, u: float = U32,
) -> np.ndarray:  # fmt: skip
    """Per-element bound on two implementations of AdamW (torch's decay-then-step, optax's
    decay added to the update) fed the same gradients `grads` (T, ...): a running error bound,
    the exact recursions in float64 and beside them each order's error from the exact. Every
    op rounds by <= u of its result; m = b1 m + (1 - b1) g errs by b1 e_m + 3u (|m| + |g|) (b1's
    own rounding, the products, the sum; torch's lerp alike), v by b2 e_v + 4u (v + g^2); the
    bias correction 1 - b^t by u + (t + 1) u b^t / (1 - b^t) of itself (b rounded to float32,
    raised to t, subtracted: at t = 1, b2 = 0.999 that is 2000 u); then m_hat / (sqrt(v_hat) +
    eps), lr x (it + wd p), and the parameter's decay and add (2u |p|); errors carried forward
    (weight decay shrinks them). Two orders differ by at most twice one order's error."""
    g = np.asarray(grads, np.float64)
    p = np.asarray(p0, np.float64).copy()
    m, v, em, ev, ep = (np.zeros_like(p) for _ in range(5))
    for t, gt in enumerate(g, 1):
        em = b1 * em + 3 * u * (np.abs(m) + np.abs(gt))
        ev = b2 * ev + 4 * u * (v + gt * gt)
        m, v = b1 * m + (1 - b1) * gt, b2 * v + (1 - b2) * gt * gt
        c1, c2 = 1 - b1**t, 1 - b2**t
        rc1, rc2 = (u + (t + 1) * u * b**t / c for b, c in ((b1, c1), (b2, c2)))
        mh, vh = m / c1, v / c2
        e_mh = em / c1 + np.abs(mh) * (rc1 + u)
        rel_vh = np.divide(ev, v, out=np.zeros_like(v), where=v > 0) + rc2 + u
        d = np.sqrt(vh) + eps
        e_d = np.sqrt(vh) * (rel_vh / 2 + u) + u * d
        r = mh / d
        e_r = (e_mh + np.abs(r) * e_d) / d + u * np.abs(r)
        upd = lr * (r + wd * p)
        e_upd = lr * (e_r + wd * ep + 2 * u * wd * np.abs(p)) + 2 * u * np.abs(upd)
        p = p - upd
        ep = ep + e_upd + 2 * u * np.abs(p)
    return 2 * ep


def float16_storage(x, roundings: int = 1) -> np.ndarray:
    """Per-element bound on `roundings` roundings to float16 of values of size |x|: u_f16 |x|
    each (relative, normal range; / (1 - u) as |x| may be the rounded value), + 2^-25 each (half
    of float16's subnormal spacing 2^-24, below 6.1e-5)."""
    return roundings * (U_F16 * np.abs(np.asarray(x, np.float64)) / (1 - U_F16) + 2.0**-25)


def written(decimals: int, magnitude: float = 0.0, u: float = U64) -> float:
    """A value of size `magnitude` written with `decimals` decimals (correctly rounded:
    0.5 10^-decimals) and read back into a float of unit roundoff u (u |value|)."""
    return 0.5 * 10.0**-decimals + u * magnitude


def weights_sum(k: int, decimals: int = 10) -> float:
    """The float64 sum of k ensemble grid weights n_k / n (the division and the unit's product:
    <= 3 u64 |w| each), each written with `decimals` decimals and read back, vs their exact sum
    1: k x `written` + gamma_{k+3} (the k - 1 adds and the weights' own roundings)."""
    return k * written(decimals, 1.0) + gamma(k + 3, U64)


def f1_orders(classes: int, u: float = U64) -> float:
    """Two float64 computations of a per-class or macro F1 from the same integer counts: a
    per-class F1 in [0, 1] is at most 7 roundings away on either side (2 tp / (2 tp + fp + fn)
    is one; precision, recall and their harmonic mean, or sklearn's F-beta form, at most 6),
    and a mean over <= `classes` such values adds gamma_classes on each side."""
    return gamma(7, u) + 2 * gamma(classes, u)


def probability_sum(classes: int, decimals: int | None = None) -> float:
    """How far a row of C class probabilities sums from 1: a float64 softmax (the C quotients
    of the exps by their sum: 1 within gamma_C u64 + u64), each probability stored as float32
    (u32 p_i: u32 in all), summed in float32 (gamma_{C-1}; covers a float64 sum); a weighted
    average of such rows (the ensemble) keeps the bound; written with `decimals`, C x
    0.5 10^-decimals more."""
    out = gamma(classes, U64) + U64 + U32 + gamma(classes - 1)
    return out + (0.0 if decimals is None else classes * written(decimals, 1.0))


def ccc_perturbed(y, p, dy: float, dp: float) -> float:
    """Largest change of CCC(y, p) when every y_i moves by <= dy and every p_i by <= dp (written
    decimals, a float32 rounding, clipping: 1-Lipschitz). Not first order: with e, f the moves
    (std <= max), 2 cov changes by <= 2 (s_y dp + s_p dy + dy dp), the denominator
    D = v_y + v_p + (m_y - m_p)^2 by <= dD = 2 s_y dy + dy^2 + 2 s_p dp + dp^2
    + 2 |m_y - m_p| (dy + dp) + (dy + dp)^2; |dCCC| <= (|d 2cov| + |CCC| dD) / (D - dD)."""
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    sy, sp, dm = y.std(), p.std(), abs(y.mean() - p.mean())
    den = y.var() + p.var() + dm**2
    c = 2 * ((y - y.mean()) * (p - p.mean())).mean() / den
    dn = 2 * (sy * dp + sp * dy + dy * dp)
    dd = 2 * sy * dy + dy**2 + 2 * sp * dp + dp**2 + 2 * dm * (dy + dp) + (dy + dp) ** 2
    assert dd < den, (dd, den)
    return float((dn + abs(c) * dd) / (den - dd))


def ccc_moments(w, mean, cov, u: float = U32) -> float:
    """Bound on the ensemble search's float32 CCC of weights w from moments (w @ m, w C w,
    w @ c_y; float64 moments rounded to float32, weights integer x unit: 2 roundings) minus
    the exact CCC of the same w: each K-term dot product errs by gamma_{K+3} of its terms'
    sizes, w C w by gamma_{2K+5}; d = w @ m - m_y by that + u (|m_y| + |d|), d^2 by
    2 |d| e_d + e_d^2 + u d^2; the denominator's two adds by 2 u of it; then
    |dCCC| <= (2 e_cross + |CCC| e_D) / (D - e_D) + u |CCC| (the quotient)."""
    w, mean, cov = (np.asarray(a, np.float64) for a in (w, mean, cov))
    k = len(w)
    aw = np.abs(w)
    cross, var, d = w @ cov[:k, k], w @ cov[:k, :k] @ w, w @ mean[:k] - mean[k]
    den = cov[k, k] + var + d**2
    c = 2 * cross / den
    e_cross = gamma(k + 3, u) * (aw @ np.abs(cov[:k, k]))
    e_var = gamma(2 * k + 5, u) * (aw @ np.abs(cov[:k, :k]) @ aw)
    e_d = gamma(k + 3, u) * (aw @ np.abs(mean[:k])) + u * (abs(mean[k]) + abs(d))
    e_den = u * cov[k, k] + e_var + 2 * abs(d) * e_d + e_d**2 + u * d**2 + 2 * u * den
    assert e_den < den, (e_den, den)
    return float((2 * e_cross + abs(c) * e_den) / (den - e_den) + u * abs(c))


def search_vs_single(k: int, coarse, mean, cov, n: int) -> float:
    """How far the grid search's best float32 CCC from moments may lie below `ccc_np` of score
    set k alone (n rows), whose one-hot weight e_k the coarse grid holds. The coarse best w1 beat
    e_k in float32 (each within `ccc_moments` of its exact CCC); the fine grid holds w1 and scores
    it again at another place of the batch (2 `ccc_moments(w1)`: the two float32 values may lie
    on either side of the exact one); the fine best beat that; ccc_np is another float64 order
    (`ccc(n, u=U64)`). `coarse`: w1 (K,), or every coarse candidate (C, K) where the search does
    not say which it chose (the largest of their bounds)."""
    mean = np.asarray(mean, np.float64)
    one_hot = np.eye(len(mean) - 1)[k]
    w1 = max(ccc_moments(w, mean, cov) for w in np.atleast_2d(np.asarray(coarse, np.float64)))
    return ccc_moments(one_hot, mean, cov) + 2 * w1 + ccc(n, u=U64)


def nudge(tree, seed: int = 0):
    """Every floating element of a (JAX) tree moved one ulp up or down, signs at random: the
    largest change one rounding decision makes (one ulp is between u and 2u of the value);
    traceable, so a jitted initializer can call it."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
    out = []
    for key, x in zip(keys, leaves, strict=False):
        if jnp.issubdtype(x.dtype, jnp.floating):
            up = jax.random.bernoulli(key, shape=x.shape)
            x = jnp.nextafter(x, jnp.where(up, jnp.inf, -jnp.inf).astype(x.dtype))
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def one_pass(spread, k: int, lam: float = LAMBDA):
    """Difference of two computation orders of one forward (and backward) pass whose values'
    rounding-sized answer is `spread`: how far the same pass (same order) lands when the
    parameters are `nudge`d. The nudge moves a dot product of k terms t by about u ||t||_2
    (each term by >= u of itself, random signs; every op with parameters is moved at once, as
    every op rounds at once); another order's rounding moves it by at most Higham-Mary's
    lambda sqrt(k) u sum |t| <= lambda k u ||t||_2 (Cauchy-Schwarz), each of two orders
    independently (sqrt 2). So lambda sqrt(2) k spreads, k the longest dot product (for a
    weight's gradient: the rows x frames it sums over)."""
    return lam * np.sqrt(2) * k * np.asarray(spread)


def trajectory(spread: float, steps: int, lam: float = LAMBDA) -> float:
    """Difference of two computation orders of a `steps`-step training trajectory, from `spread`:
    how far the same trajectory (same order, same machine) lands when its initial parameters
    are `nudge`d. The nudge moves every parameter by what one rounding decision can (one ulp),
    so every forward value and gradient of the first step moves by rounding-sized amounts as
    the two orders' roundings move them, and the nudged run shows the same amplification: Adam
    dividing rounding noise in small gradients by sqrt(v) + eps, the dynamics carrying it on.
    The two orders inject such differences at every step instead of once: to first order their
    effects add (`steps`; a later step's travels fewer steps); and the nudge's signs are random,
    the orders' roundings may line up: Higham-Mary's lambda, the factor between a random sum's
    typical size and a bound that fails with probability <= 3e-8. A same-run measurement with
    a stated factor, not a worst case: `one_pass`'s per-pass k (the worst rounding of k terms
    vs a random one-ulp move) is left out, as over many Adam steps the amplification the nudge
    shows dominates (measured: 0 to 0.4 of this bound) and with k the bound would pass a run at
    a 1 % different learning rate; each use checks that a wrong run lands outside it."""
    return steps * lam * spread


def folded_linear(w, b, x, mean, std, dm=0.0, ds=0.0) -> np.ndarray:
    """(B, H) bound on a Linear (w (H, d), b) with a standardization folded in (w' = w / s,
    b' = b - w' m in float64, stored as float32) on raw x (B, d) in float32, vs the original on
    z = (x - m) / s computed in float32 from a mean and std off by <= dm, ds (float32 sums).
    The folded side: its roundings (gamma_{d+2}: d products, the sum, the weights' rounding)
    of the terms' sizes |w'| |x| + |b'|, which are |x| / s times larger than the result (50 / 0.01
    cancels): the bound needs the folded layer's magnitude. The original side: z errs by
    (dm + u |x - m|) / s + |z| ds / s + u |z|, carried by |w|, + gamma_{d+1} (|w| |z| + |b|)."""
    w, b, x = (np.asarray(a, np.float64) for a in (w, b, x))
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    d = w.shape[1]
    wf = w / std[None, :]
    bf = b - wf @ mean
    e_got = gamma(d + 2) * (np.abs(x) @ np.abs(wf).T + np.abs(bf))
    z = (x - mean) / std
    dz = (dm + U32 * np.abs(x - mean)) / std + np.abs(z) * ds / std + U32 * np.abs(z)
    e_want = dz @ np.abs(w).T + gamma(d + 1) * (np.abs(z) @ np.abs(w).T + np.abs(b))
    return e_got + e_want


def max_diff(got, want) -> float:
    """Largest absolute difference of two arrays (NaN where both are NaN counts as equal)."""
    a, b = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    same_nan = np.isnan(a) & np.isnan(b)
    return float(np.max(np.where(same_nan, 0.0, np.abs(a - b)), initial=0.0))


def assert_within(got, want, bound, what: str = "") -> None:
    """`got` equals `want` within `bound` (a number or a per-element array)."""
    a, b = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    over = np.abs(a - b) - np.asarray(bound)
    assert not np.isnan(a - b).any() or (np.isnan(a) == np.isnan(b)).all(), what
    worst = float(np.nanmax(over, initial=-np.inf))
    _report("within", what, max_diff(a, b), bound)
    assert worst <= 0, (
        f"{what}: differs by {max_diff(a, b):.3g}, bound {np.max(bound, initial=0):.3g}"
    )


def assert_exceeds(wrong, want, bound, what: str = "") -> None:
    """A deliberately wrong computation differs from `want` by more than `bound`."""
    d = max_diff(wrong, want)
    _report("exceeds", what, d, bound)
    assert d > np.max(bound, initial=0), (
        f"{what}: a wrong computation differs by only {d:.3g} <= {bound}"
    )


def assert_not_below(got, floor, bound, what: str = "") -> None:
    """`got` is at least `floor` - `bound` (one-sided: a maximum over a set that holds the floor's
    candidate, computed in another order)."""
    short = float(np.max(np.asarray(floor, np.float64) - np.asarray(got, np.float64)))
    _report("not below", what, max(short, 0.0), bound)
    assert short <= np.max(bound), f"{what}: {short:.3g} below, bound {np.max(bound):.3g}"


def assert_below(wrong, floor, bound, what: str = "") -> None:
    """A deliberately wrong computation lies below `floor` - `bound` (what `assert_not_below`
    would fail)."""
    short = float(np.min(np.asarray(floor, np.float64) - np.asarray(wrong, np.float64)))
    _report("below", what, short, bound)
    assert short > np.max(bound), f"{what}: a wrong computation is only {short:.3g} below"


def encoder_ops(layers: int, front: int) -> int:
    """Dot products in sequence through a transformer encoder: `front` (convolutions,
    projections) + 8 per layer (q/k/v, scores, attention x values, output, two layer norms, two
    feed-forward) + the pooling mean."""
    return front + 8 * layers + 1


def _report(kind: str, what: str, diff: float, bound) -> None:
    """With IFMVSE_TOLERANCE_REPORT set, print each comparison's difference next to its bound
    (pytest -s): how the table in docs/tolerances.md was measured."""
    if os.environ.get("IFMVSE_TOLERANCE_REPORT"):
        print(
            f"TOLERANCE {kind} {what}: diff {diff:.3g} bound {float(np.max(bound, initial=0)):.3g}"
        )


def head_gain(score, features: dict, h: float = 1e-3) -> dict:
    """Per view, the (K, N, 3) sums over input elements j of |d score / d x_j| (central
    differences of step h x the view's largest value; the heads are piecewise smooth) and of
    |d score / d x_j| |x_j| (the size of the linearised terms). `score` maps {view: (N, ...)}
    to (K, N, 3); a measured magnitude, not an expected value."""
    out = {}
    for v, x in features.items():
        if v.endswith(":mask") or x.dtype == bool:
            continue
        flat = x.reshape(len(x), -1)
        step = h * float(np.abs(x).max())
        gain, terms = 0.0, 0.0
        for j in range(flat.shape[1]):
            pm, ys = [], []
            for sign in (1, -1):
                y = flat.copy()
                y[:, j] += sign * step  # rounded to x's dtype (float16 frames): the step taken
                ys.append(y[:, j].astype(np.float64))
                pm.append(np.asarray(score(features | {v: y.reshape(x.shape)}), np.float64))
            d = np.abs(pm[0] - pm[1]) / (ys[0] - ys[1])[None, :, None]  # (K, N, 3)
            gain = gain + d
            terms = terms + d * np.abs(flat[:, j])[None, :, None]
        out[v] = (gain, terms)
    return out


def batch_path_bound(
    run, score, features: dict, part: str = "scores", h: float = 1e-3
) -> np.ndarray:
    """(N, 3) bound on predict (each clip's backbone alone) vs the batch path (padded batches,
    stored): per view, every feature element differs by at most the tiny 2-layer Whisper's
    `chain` bound (3 front ops, k 240, the features' largest size) plus, in a float16 store,
    one ulp (2 u_f16 |x|: the rounding can fall on either side); the heads carry that by their
    measured gain sum_j |d score / d x_j| (the standardization's 1 / std included), and round
    on their own by Higham-Mary's lambda sqrt(k) u per dot product of the linearised terms'
    sizes sum_j |d score / d x_j| |x_j| over 8 ops in sequence (standardize, layer sum,
    projection, gate, fc1, fc2, de-standardize, ensemble), two orders in quadrature; the
    ensemble adds |w|-weighted score sets; clipping to 1..7 shrinks differences. `score`
    returns (scores (K, N, 3), probs (K, N, 8)); part="probs" bounds task 1's ensembled class
    probabilities (weights normalised to their sum, written with 6 decimals: + 5e-7)."""
    from jax_ifmvse.config import load_config

    cfg = load_config(Path(run) / "config.yaml")
    u_store = U_F16 if cfg.extract.dtype == "float16" else 0.0
    idx = {"scores": 0, "probs": 1}[part]
    gains = head_gain(lambda f: score(f)[idx], features, h)
    k = max(max(x.shape[-1] for x in features.values()), 240)
    stats = _view_stats(run)
    per_set = 0.0
    for v, (gain, terms) in gains.items():
        x = np.abs(features[v]).astype(np.float64)
        delta = chain(encoder_ops(2, 3), 240, float(x.max())) + 2 * u_store * float(x.max())
        if features[v].dtype == np.float16:  # attentive frames: stored and standardized in f16
            m = float(np.abs(stats[f"{v}/mean"]).max()) if f"{v}/mean" in stats else 0.0
            # the store's rounding may flip (2 u |x|); so may (x - m) / s's, 2 u |x - m| in x
            delta += 2 * U_F16 * float(x.max()) + 2 * U_F16 * (float(x.max()) + m)
        per_set = per_set + gain * delta + _heads_roundoff(k, terms)
    return _ensembled(run, per_set, part)


def _ensembled(run, per_set: np.ndarray, part: str = "scores") -> np.ndarray:
    """(N, 3) (or (N, 8) probabilities) bound on the ensemble of K score sets each within
    per_set (K, N, 3): |w|-weighted sums (the best set per row: any of them, weight 1)."""
    from jax_ifmvse.config import ATTRIBUTES

    fits = json.loads((Path(run) / "ensemble" / "weights.json").read_text())
    names = fits["score_sets"]
    if part == "probs":
        w = np.array([fits["category"]["weights"][nm] for nm in names])
        wk = np.abs(w) / abs(w.sum())
        return (wk[:, None, None] * per_set).sum(0) + 5e-7  # (N, 8)
    out = np.zeros(per_set.shape[1:])  # (N, 3)
    for a, attr in enumerate(ATTRIBUTES):
        w = fits["attributes"][attr]["weights"]  # None: the best set per row (any of them)
        wk = np.array([1.0 if w is None else abs(w[nm]) for nm in names])
        out[:, a] = (wk[:, None] * per_set[:, :, a]).sum(0)
    return out


def head_grads(scores, features: dict):
    """The heads' reverse-mode derivatives: yields (set i, attribute a, {view: d score / d x
    (N, T, D) float64}) for `scores`, a JAX function {view: (N, T, D) float32, masks} ->
    (K, N, 3) (`load_heads(...).attribute_scores`: the scorer's heads with the float16
    roundings left out). Rows are independent, so one vjp per (set, attribute) gives every row's derivatives:
    3 K backward passes, where central differences (`head_gain`) take 2 T D head calls."""
    import jax
    import jax.numpy as jnp

    views = [v for v in features if not v.endswith(":mask") and features[v].dtype != bool]
    masks = {v: jnp.asarray(x) for v, x in features.items() if v not in views}
    x = {v: jnp.asarray(features[v], jnp.float32) for v in views}
    y = jax.eval_shape(lambda x: scores(x | masks), x)

    @jax.jit  # one compiled forward and backward (eager vjp dispatches op by op)
    def pull(x, masks, cotangent):
        return jax.vjp(lambda x: scores(x | masks), x)[1](cotangent)[0]

    for i in range(y.shape[0]):
        for a in range(y.shape[2]):
            g = pull(x, masks, jnp.zeros(y.shape, y.dtype).at[i, :, a].set(1.0))
            yield i, a, {v: np.asarray(g[v], np.float64) for v in views}


def frames_batch_path_bound(
    run, scores, features: dict, ln: tuple, layers: int, front: int, k: int
) -> np.ndarray:
    """(N, 3) bound on predict vs the batch path for attentive heads on a real backbone's
    float16 frames x (N, T, D), whose last op is a LayerNorm x = gamma z + beta (`ln`): the
    T D elements' errors summed as independent roundings, not as worst cases (576,000 of them
    for whisper-tiny.en's 1500 x 384: the worst case sum_j |g_j| max_j delta_j cannot fail).

    To first order the score moves by sum_j g_j e_j, g_j = d score / d x_j (`head_grads`; the
    standardization's 1 / std included). Higham-Mary model every rounding as an independent,
    mean-zero bounded variable, so each error is sub-Gaussian; `chain` is lambda sigma, sigma
    its scale. Element j = (t, d) has three independent parts: (1) the backbone's two orders:
    z is the LayerNorm's output (RMS 1 over d), so z_j errs by `chain(encoder_ops(layers,
    front), k, max(|z_j|, 1))` (terms of at least the RMS size, larger in whisper's outlier
    dimensions), carried by |gamma_d|, + gamma z + beta's own two roundings per order
    (4 u |x_j|): sigma_j; (2) the float16 store's rounding, which may fall on either side:
    within one ulp q_j = 2 u_f16 |x_j|, mean zero, so sub-Gaussian with scale q_j (Hoeffding's
    lemma); (3) the float16 standardization's likewise, q'_j = 2 u_f16 |x_j - mean_d| in x's
    units. Hoeffding's inequality for the independent sum: |sum_j g_j e_j| <= lambda
    sqrt(sum_j g_j^2 (sigma_j^2 + q_j^2 + q'_j^2)) except with probability <= 2 exp(-lambda^2 /
    2) (3e-8 at lambda 6), the confidence `chain` takes per element. The assumption is the one
    `chain` makes for its ops (sqrt(ops)): the errors are independent; one early rounding that
    attention carries into many frames would add linearly, so each use checks that a wrong
    file lands outside. The heads' own rounding: lambda sqrt(k) u sqrt(16) sum_j |g_j| |x_j|
    (8 ops, two orders); score sets ensembled by |w| (`_ensembled`)."""
    gamma_ln, beta_ln = (np.asarray(a, np.float64) for a in ln)
    stats = _view_stats(run)
    k_heads = max(max(x.shape[-1] for x in features.values()), k)
    var, size = {}, {}
    for v, x16 in features.items():
        if v.endswith(":mask") or x16.dtype == bool:
            continue
        x = np.asarray(x16, np.float64)  # (N, T, D)
        z = (x - beta_ln) / gamma_ln
        sigma = chain(encoder_ops(layers, front), k, 1.0) * np.maximum(np.abs(z), 1.0)
        sigma = sigma * np.abs(gamma_ln) / LAMBDA + 4 * U32 * np.abs(x)
        m = np.asarray(stats[f"{v}/mean"], np.float64).reshape(-1) if f"{v}/mean" in stats else 0
        q, q2 = 2 * U_F16 * np.abs(x), 2 * U_F16 * np.abs(x - m)
        var[v], size[v] = sigma**2 + q**2 + q2**2, np.abs(x)
    n = len(next(iter(size.values())))
    per_set = {}
    for i, a, grads in head_grads(scores, features):
        out = per_set.setdefault(i, np.zeros((n, 3)))
        for v, g in grads.items():
            sd = np.sqrt((g * g * var[v]).reshape(n, -1).sum(1))
            terms = (np.abs(g) * size[v]).reshape(n, -1).sum(1)
            out[:, a] += LAMBDA * sd + _heads_roundoff(k_heads, terms)
    return _ensembled(run, np.stack([per_set[i] for i in sorted(per_set)]))


def heads_rounding(score, features: dict, ops: int = 8) -> np.ndarray:
    """(K, N, C) bound on two orders of the heads alone on the same inputs (another batch):
    Higham-Mary's lambda sqrt(k) u per dot product of the linearised terms' sizes
    sum_j |d score / d x_j| |x_j| (`head_gain`), over `ops` in sequence, two orders in
    quadrature (k the widest input)."""
    k = max(x.shape[-1] for x in features.values())
    terms = sum(t for _, t in head_gain(score, features).values())
    return _heads_roundoff(k, terms, ops)


def _heads_roundoff(k: int, terms, ops: int = 8):
    """lambda sqrt(k) u per dot product of terms of size `terms`, `ops` in sequence, two orders
    in quadrature: the heads' own rounding."""
    return LAMBDA * np.sqrt(k) * U32 * np.sqrt(2 * ops) * terms


def _view_stats(run) -> dict:
    """The run's standardization statistics (view_stats.npz), or {} where it has none."""
    path = Path(run) / "view_stats.npz"
    return np.load(path) if path.exists() else {}


def cross_entropy(classes: int, rows: int, logits, loss: float) -> float:
    """Difference of two orders of a class-weighted cross-entropy mean (torch's
    sum_i w_i nll_i / sum_i w_i, w_i >= 0) of `rows` rows of `classes` logits: each row's
    log-softmax z_y - log sum_j exp(z_j) (z = x - max x) errs by gamma_{C+4} of
    |z_y| + log-sum + 1 (the exps' relative u, their C-term sum, the log's absolute error of
    the sum's relative one, the subtractions); the weighted mean of the positive nll by
    gamma_{2n+2} of itself (two n-term sums and the quotient). Twice, for the two orders."""
    x = np.asarray(logits, np.float64)
    z = x - x.max(1, keepdims=True)
    lse = np.log(np.exp(z).sum(1))
    row = gamma(classes + 4) * (float(np.abs(z).max()) + float(lse.max()) + 1)
    return 2 * (row + gamma(2 * rows + 2) * abs(loss))


def pairwise_depth(n: int) -> int:
    """Roundings along one path of numpy's pairwise float sum of n contiguous terms: blocks of
    <= 128 summed by 8 accumulators (<= 16 adds each, 3 to combine them, <= 7 for a remainder),
    then one add per halving above 128; Higham's gamma_depth of sum |x_i| bounds its error."""
    return 26 + max(0, int(np.ceil(np.log2(max(n, 1) / 128))))


def mean_std(x, u: float = U64, n_terms: int | None = None) -> tuple[float, float]:
    """Difference of two orders of the mean and the (ddof 0) std of the values x: the mean's
    n-term sum (`n_terms` the roundings along one path, n for a sequential sum) by
    gamma of mean|x|, the variance (s2 / n - mean^2 or two-pass) by gamma of mean(x^2) + 2 |mean|
    e_mean, the std by that over the std (|sqrt a - sqrt b| <= |a - b| / sqrt b) + u; twice."""
    x = np.asarray(x, np.float64)
    k = len(x) if n_terms is None else n_terms
    e_m = gamma(k + 1, u) * float(np.abs(x).mean())
    e_v = gamma(k + 3, u) * float((x * x).mean()) + 2 * abs(float(x.mean())) * e_m
    s = float(x.std())
    return 2 * e_m, 2 * (e_v / s + u * s)


def fft(n: int, u: float = U32) -> float:
    """Normwise relative error of a float FFT of length n: Higham's Theorem 24.2 for
    Cooley-Tukey, ||y_hat - y||_2 / ||y||_2 <= t eta / (1 - t eta) over t = ceil(log2 n) stages,
    eta = mu + gamma_4 (sqrt 2 + mu), the twiddle factors within mu = u; a mixed-radix length
    taken at the next power of two's stages. Each coefficient errs by at most this x ||y||_2 =
    this x sqrt(n) ||x||_2 (Parseval)."""
    t = int(np.ceil(np.log2(n)))
    eta = u + gamma(4, u) * (np.sqrt(2) + u)
    return t * eta / (1 - t * eta)


def fft_filter(n: int, h, dh=0.0, u: float = U32) -> float:
    """One float order of an FIR filter by length-n FFTs vs exact taps h: per output / ||x||_2."""
    # Overlap-save on blocks of n inputs x: y_hat = IFFT(FFT(x) H_hat) / n with H_hat the float
    # FFT of the float taps, i.e. the exact circular convolution with taps h_hat plus roundings.
    # h_hat - h: the taps' rounding (u |h|), their uncertainty dh, their FFT (`fft`(n), Higham
    # 24.2), so by Parseval ||h_hat - h||_2 <= t = (u + f (1 + u)) ||h||_2 + ||dh||_2 and an
    # output moves by <= t ||x||_2 (Cauchy-Schwarz). Roundings: the forward and the inverse FFT
    # within f normwise, each complex product within sqrt 2 gamma_2 (Higham 3.5), |H_hat| <=
    # G + sqrt(n) t (G = max |DFT(h)|): every output within ((1 + f)^2 (1 + sqrt 2 gamma_2) - 1)
    # (G + sqrt(n) t) ||x||_2.
    h = np.asarray(h, np.float64)
    f = fft(n, u)
    t = (u + f * (1 + u)) * np.linalg.norm(h) + np.linalg.norm(dh)
    g = float(np.abs(np.fft.rfft(h, n)).max()) + np.sqrt(n) * t
    return ((1 + f) ** 2 * (1 + np.sqrt(2) * gamma(2, u)) - 1) * g + t


def log_mel(frames, filters, u: float = U32) -> tuple[np.ndarray, np.ndarray]:
    """Whisper's log-mel of windowed frames (B, F, n) in float64 and per element the difference
    bound of two float32 orders of it, (B, M, F) each: per frame every FFT coefficient within
    e = `fft`(n) sqrt(n) ||x||_2, the power |y|^2 within 2 |y| e + e^2, the mel sums of
    nonnegative terms within filters @ that + (gamma_{K} + 2u) mel (K bins; filters rounded);
    twice for two orders; log10 of the clamp max(mel, 1e-10) over the interval it may take
    (its conditioning 1 / (mel ln 10) bounded where mel - dmel stays above the clamp); the
    floor max - 8: 1-Lipschitz, an element below both floors takes the max's error, else the
    larger of its own and the max's; (log + 4) / 4, 4 more roundings."""
    x = np.asarray(frames, np.float64)
    n = x.shape[-1]
    w = np.asarray(filters, np.float64)  # (K, M)
    y = np.abs(np.fft.rfft(x, axis=-1))  # (B, F, K)
    e = fft(n, u) * np.sqrt(n) * np.linalg.norm(x, axis=-1, keepdims=True)  # (B, F, 1)
    mel = (y * y) @ w  # (B, F, M)
    dmel = 2 * ((2 * y * e + e * e) @ w + (gamma(w.shape[0], u) + 2 * u) * mel)
    log = np.log10(np.maximum(mel, 1e-10))
    hi = np.log10(np.maximum(mel + dmel, 1e-10))
    lo = np.log10(np.maximum(mel - dmel, 1e-10))
    d = np.maximum(hi - log, log - lo) + 4 * u * np.abs(log)  # (B, F, M)
    top = log.max(axis=(1, 2), keepdims=True)
    d_at = np.take_along_axis(d.reshape(len(d), -1), log.reshape(len(d), -1).argmax(1)[:, None], 1)
    cand = log + d >= top - d_at[:, :, None]  # elements that may be either side's max
    d_top = np.where(cand, d, 0).max(axis=(1, 2), keepdims=True)
    floor = top - 8.0
    below = log + d < floor - d_top
    out = np.maximum(log, floor)
    bound = np.where(below, d_top, np.maximum(d, d_top)) / 4 + 4 * u * np.abs((out + 4) / 4)
    return np.swapaxes((out + 4) / 4, 1, 2), np.swapaxes(bound, 1, 2)
