"""Ensemble weight search maximising development CCC (per attribute) or macro-F1 (task 1).

CCC of a linear combination depends only on the means and the covariance matrix of
[S_1..S_K, y], so that (K+1)x(K+1) moment matrix is computed once and every candidate weight
vector is then scored in O(K^2) on the device, in chunks, with candidates generated on the device
from their index (mixed-radix digits on an integer grid of `fine_step` units).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_ifmvse.config import EnsembleConfig, grid_units
from jax_ifmvse.ensemble import EnsembleError
from jax_ifmvse.metrics import ccc_np


@dataclasses.dataclass(frozen=True)
class Grid:
    """Integer lattice of weights in units of `fine_step`: w_k = lo_k + stride * d_k."""

    lo: tuple[int, ...]  # per weight, in units
    size: tuple[int, ...]  # number of values per weight
    stride: int  # units between neighbouring values
    total: int | None  # simplex: weights sum to this many units; None = free weights

    @property
    def n_index(self) -> int:
        """Number of enumerated indices (the simplex fixes the last weight, so it is not enumerated)."""
        free = self.size[:-1] if self.total is not None else self.size
        return math.prod(free)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """Best weights of a coarse-then-fine search and the CCCs along the way."""

    weights: np.ndarray  # (K,) float64
    ccc: float
    coarse_weights: np.ndarray  # (K,)
    coarse_ccc: float
    n_candidates: int  # enumerated indices over both grids (simplex: incl. masked ones)


def coarse_grid(cfg: EnsembleConfig, k: int) -> Grid:
    """The coarse grid 0..1 in `coarse_step` steps for K weights."""
    n, m, _ = grid_units(cfg)
    return Grid((0,) * k, (n // m + 1,) * k, m, n if cfg.simplex else None)


def fine_grid(cfg: EnsembleConfig, center: np.ndarray) -> Grid:
    """The fine grid of `fine_step` steps within +- fine_radius of `center` (int units), in [0, 1]."""
    n, _, r = grid_units(cfg)
    c = np.asarray(center, dtype=np.int64)
    lo = np.maximum(c - r, 0)
    hi = np.minimum(c + r, n)
    return Grid(
        tuple(int(v) for v in lo), tuple(int(v) for v in hi - lo + 1), 1, n if cfg.simplex else None
    )


def grid_candidates(grid: Grid, limit: int | None = None) -> np.ndarray:
    """Valid candidates of a grid as int units (C, K), in the device search's order (last fastest)."""
    k = len(grid.size)
    axes = [
        range(lo, lo + s * grid.stride, grid.stride)
        for lo, s in zip(grid.lo, grid.size, strict=True)
    ]
    out = []
    if grid.total is None:
        it = itertools.product(*axes)
    else:
        last_ok = set(axes[-1])
        it = (
            (*head, grid.total - sum(head))
            for head in itertools.product(*axes[:-1])
            if grid.total - sum(head) in last_ok
        )
    for w in it:
        out.append(w)
        if limit is not None and len(out) >= limit:
            break
    return np.asarray(out, dtype=np.int64).reshape(-1, k)


def moments(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Means (K+1,) and population covariance (K+1, K+1) of [S_1..S_K, y], in float64."""
    z = np.concatenate([np.asarray(scores, np.float64), np.asarray(labels, np.float64)[None]], 0)
    mean = z.mean(axis=1)  # (K+1,)
    zc = z - mean[:, None]  # (K+1, N)
    return mean, zc @ zc.T / z.shape[1]


def ccc_from_moments(w: jax.Array, mean: jax.Array, cov: jax.Array) -> jax.Array:
    """CCC of y with w @ S for each candidate row of w (C, K), from the moments of [S, y]."""
    k = w.shape[-1]
    mu = w @ mean[:k]  # (C,)
    var = jnp.sum((w @ cov[:k, :k]) * w, axis=-1)  # (C,)
    cross = w @ cov[:k, k]  # (C,)
    denom = cov[k, k] + var + (mu - mean[k]) ** 2
    return 2.0 * cross / jnp.maximum(denom, 1e-12)


@jax.jit
def ccc_direct(w: jax.Array, scores: jax.Array, labels: jax.Array) -> jax.Array:
    """CCC of y with w @ S for each candidate, computed from the predictions themselves (checking)."""
    pred = w @ scores  # (C, N)
    mp, mt = pred.mean(-1, keepdims=True), labels.mean()
    cov = ((pred - mp) * (labels - mt)).mean(-1)
    denom = pred.var(-1) + labels.var() + (mp[:, 0] - mt) ** 2
    return 2.0 * cov / jnp.maximum(denom, 1e-12)


@functools.partial(jax.jit, static_argnames=("chunk", "simplex"))
def _best_in_chunk(start, lo, size, stride, total, n_index, unit, mean, cov, *, chunk, simplex):
    """Best (ccc, int weights) among the `chunk` grid indices from `start`; invalid ones are -inf."""
    idx = start + jnp.arange(chunk, dtype=jnp.int32)  # (C,)
    k = lo.shape[0]
    free = k - 1 if simplex else k
    digits, rem = [], idx
    for j in reversed(range(free)):  # last weight varies fastest, as in itertools.product
        digits.append(rem % size[j])
        rem = rem // size[j]
    if free:
        w_int = lo[:free] + jnp.stack(digits[::-1], axis=-1) * stride  # (C, free)
    else:
        w_int = jnp.zeros((chunk, 0), jnp.int32)
    valid = idx < n_index
    if simplex:
        last = total - w_int.sum(-1)  # (C,)
        off = last - lo[-1]
        valid &= (off >= 0) & (off <= (size[-1] - 1) * stride) & (off % stride == 0)
        w_int = jnp.concatenate([w_int, last[:, None]], axis=-1)  # (C, K)
    ccc = ccc_from_moments(w_int.astype(jnp.float32) * unit, mean, cov)
    ccc = jnp.where(valid, ccc, -jnp.inf)
    j = jnp.argmax(ccc)  # first maximum, so ties resolve to the earliest candidate
    return ccc[j], w_int[j]


@functools.partial(jax.jit, static_argnames=("heads", "inner"))
def _best_in_chunk_free(start, lo, size, stride, n_heads, unit, mean, cov, *, heads, inner):
    """Free-weights grid: `heads` values of w_1..w_{K-1} times every value of w_K at once.

    The quadratic form is expanded in the last weight, so the O(K^2) work and the index
    arithmetic are done once per head and each of the `inner` last-weight values costs O(1).
    """
    idx = start + jnp.arange(heads, dtype=jnp.int32)  # (H,)
    k = lo.shape[0]
    digits, rem = [], idx
    for j in reversed(range(k - 1)):
        digits.append(rem % size[j])
        rem = rem // size[j]
    if k > 1:
        h_int = lo[:-1] + jnp.stack(digits[::-1], axis=-1) * stride  # (H, K-1)
    else:
        h_int = jnp.zeros((heads, 0), jnp.int32)
    pos = jnp.arange(inner, dtype=jnp.int32)  # (L,)
    l_int = lo[-1] + pos * stride  # (L,)
    h, last = h_int.astype(jnp.float32) * unit, l_int.astype(jnp.float32) * unit
    m, c, cy = mean[:k], cov[:k, :k], cov[:k, k]
    mu = (h @ m[:-1])[:, None] + last[None] * m[-1]  # (H, L)
    var = (
        jnp.sum((h @ c[:-1, :-1]) * h, axis=-1)[:, None]
        + 2.0 * last[None] * (h @ c[:-1, -1])[:, None]
        + last[None] ** 2 * c[-1, -1]
    )
    cross = (h @ cy[:-1])[:, None] + last[None] * cy[-1]
    ccc = 2.0 * cross / jnp.maximum(cov[k, k] + var + (mu - mean[k]) ** 2, 1e-12)  # (H, L)
    valid = (idx < n_heads)[:, None] & (pos < size[-1])[None]
    ccc = jnp.where(valid, ccc, -jnp.inf).reshape(-1)
    j = jnp.argmax(ccc)  # row-major: same order as itertools.product, first maximum wins
    w_int = jnp.concatenate([h_int[j // inner], l_int[j % inner][None]])
    return ccc[j], w_int


def search_grid(
    grid: Grid, mean: np.ndarray, cov: np.ndarray, unit: float, chunk: int
) -> tuple[np.ndarray, float]:
    """Best int-unit weights (K,) on a grid and their CCC, evaluated on the device in chunks."""
    if grid.total is None:
        return _search_free(grid, mean, cov, unit, chunk)
    n_index = grid.n_index
    chunk = int(chunk)  # one shape for coarse and fine grids: one compilation
    args = (
        jnp.asarray(grid.lo, jnp.int32),
        jnp.asarray(grid.size, jnp.int32),
        jnp.int32(grid.stride),
        jnp.int32(grid.total if grid.total is not None else 0),
        jnp.int32(n_index),
        jnp.float32(unit),
        jnp.asarray(mean, jnp.float32),
        jnp.asarray(cov, jnp.float32),
    )
    # Dispatch every chunk before reading any result back, so the device never waits on the host.
    best = [
        _best_in_chunk(jnp.int32(s), *args, chunk=chunk, simplex=grid.total is not None)
        for s in range(0, n_index, chunk)
    ]
    cccs = np.asarray(jnp.stack([b[0] for b in best]))
    i = int(np.argmax(cccs))
    if not np.isfinite(cccs[i]):
        raise EnsembleError("ensemble: no valid weight candidate on the grid")
    return np.asarray(best[i][1], np.int64), float(cccs[i])


def _search_free(
    grid: Grid, mean: np.ndarray, cov: np.ndarray, unit: float, chunk: int
) -> tuple[np.ndarray, float]:
    """`search_grid` for free weights: chunks of head weights, all last-weight values per head."""
    # Padded shapes, so the coarse and fine grids (11 and <= 21 values by default) share one
    # compilation; the masked padding costs less than a second compile on CPU.
    inner = -(-grid.size[-1] // 32) * 32
    n_heads = math.prod(grid.size[:-1])
    heads = max(int(chunk) // inner, 1)
    args = (
        jnp.asarray(grid.lo, jnp.int32),
        jnp.asarray(grid.size, jnp.int32),
        jnp.int32(grid.stride),
        jnp.int32(n_heads),
        jnp.float32(unit),
        jnp.asarray(mean, jnp.float32),
        jnp.asarray(cov, jnp.float32),
    )
    best = [
        _best_in_chunk_free(jnp.int32(s), *args, heads=heads, inner=inner)
        for s in range(0, n_heads, heads)
    ]
    cccs = np.asarray(jnp.stack([b[0] for b in best]))
    i = int(np.argmax(cccs))
    return np.asarray(best[i][1], np.int64), float(cccs[i])


def search_weights(scores: np.ndarray, labels: np.ndarray, cfg: EnsembleConfig) -> SearchResult:
    """Coarse-then-fine search of weights (K,) maximising CCC(labels, w @ scores); scores (K, N)."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, np.float64)
    if scores.ndim != 2 or labels.shape != scores.shape[1:]:
        raise EnsembleError(f"ensemble: scores {scores.shape} and labels {labels.shape} disagree")
    n, _, _ = grid_units(cfg)
    unit = 1.0 / n
    mean, cov = moments(scores, labels)
    g1 = coarse_grid(cfg, scores.shape[0])
    w1, c1 = search_grid(g1, mean, cov, unit, cfg.chunk)
    g2 = fine_grid(cfg, w1)
    w2, c2 = search_grid(g2, mean, cov, unit, cfg.chunk)
    return SearchResult(w2 * unit, c2, w1 * unit, c1, g1.n_index + g2.n_index)


def search_weights_numpy_loop(
    scores: np.ndarray, labels: np.ndarray, cfg: EnsembleConfig
) -> tuple[np.ndarray, float]:
    """Reference: the same coarse-then-fine search as a plain loop of `ccc_np` over candidates."""
    n, _, _ = grid_units(cfg)

    def best_of(cands: np.ndarray) -> tuple[np.ndarray, float]:
        best_w, best_c = cands[0], -np.inf
        for w in cands:
            c = float(ccc_np(labels, (w / n) @ scores))
            if c > best_c:
                best_w, best_c = w, c
        return best_w, best_c

    w1, _ = best_of(grid_candidates(coarse_grid(cfg, scores.shape[0])))
    w2, c2 = best_of(grid_candidates(fine_grid(cfg, w1)))
    return w2 / n, c2


# Task 1: class weights searched by development macro-F1 on the same grids.


@functools.partial(jax.jit, static_argnames=("n_classes",))
def _macro_f1_of_candidates(
    w: jax.Array, probs: jax.Array, y: jax.Array, n_classes: int
) -> jax.Array:
    """Macro-F1 of argmax(sum_k w_ck P_k) for each candidate row of w (C, K); probs (K, N, J)."""
    mixed = jnp.einsum("ck,knj->cnj", w, probs)  # (C, N, J)
    pred = jax.nn.one_hot(jnp.argmax(mixed, -1), n_classes)  # (C, N, J)
    true = jax.nn.one_hot(y, n_classes)  # (N, J)
    cm = jnp.einsum("nt,cnp->ctp", true, pred)  # (C, J, J) rows true, columns predicted
    tp = jnp.diagonal(cm, axis1=1, axis2=2)
    denom = cm.sum(1) + cm.sum(2)
    f1 = jnp.where(denom > 0, 2 * tp / jnp.maximum(denom, 1), 0.0)
    present = denom > 0  # as sklearn: the mean over classes in y or in the prediction
    return (f1 * present).sum(-1) / jnp.maximum(present.sum(-1), 1)


def _best_candidate(
    cands: np.ndarray, unit: float, probs: np.ndarray, y: np.ndarray, chunk: int
) -> tuple[np.ndarray, float]:
    """Best int-unit candidate (first maximum) of (C, K) by macro-F1, scored on the device."""
    n = probs.shape[1]
    # (C, N, J) float32 per chunk: keep it near 64 MB whatever the split size.
    step = max(1, min(int(chunk), (16 << 20) // max(1, n * probs.shape[2])))
    pj, yj = jnp.asarray(probs, jnp.float32), jnp.asarray(y, jnp.int32)
    pad = -(-len(cands) // step) * step - len(cands)
    allc = np.concatenate([cands, np.repeat(cands[:1], pad, 0)]) if pad else cands
    outs = [
        _macro_f1_of_candidates(
            jnp.asarray(allc[s : s + step] * unit, jnp.float32), pj, yj, probs.shape[2]
        )
        for s in range(0, len(allc), step)
    ]
    f1 = np.asarray(jnp.concatenate(outs))[: len(cands)]
    i = int(np.argmax(f1))
    return cands[i], float(f1[i])


def search_class_weights(
    probs: np.ndarray, y: np.ndarray, cfg: EnsembleConfig
) -> tuple[np.ndarray, float, np.ndarray, float]:
    """Coarse-then-fine weights (K,) maximising macro-F1 of argmax(w @ probs); probs (K, N, J),
    y (N,) class indices. Returns (weights, macro-F1, coarse weights, coarse macro-F1)."""
    n, _, _ = grid_units(cfg)
    unit = 1.0 / n
    k = probs.shape[0]
    w1, f1 = _best_candidate(grid_candidates(coarse_grid(cfg, k)), unit, probs, y, cfg.chunk)
    w2, f2 = _best_candidate(grid_candidates(fine_grid(cfg, w1)), unit, probs, y, cfg.chunk)
    if f2 < f1:  # the fine grid holds the coarse best, so this is only float noise; keep it
        w2, f2 = w1, f1
    return w2 * unit, f2, w1 * unit, f1
