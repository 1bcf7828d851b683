"""Ensemble weight search (paper eq. 7, Y = sum_i w_i S_i) maximising development CCC.

CCC of a linear combination depends only on the means and the covariance matrix of
[S_1..S_K, y], so that (K+1)x(K+1) moment matrix is computed once and every candidate weight
vector is then scored in O(K^2) on the device, in chunks, with candidates generated on the device
from their index (mixed-radix digits on an integer grid of `fine_step` units).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import itertools
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_ifmvse.categories import CLASS_CODES, CLASS_NAMES, N_CLASSES
from jax_ifmvse.config import ATTRIBUTES, ConfigError, EnsembleConfig
from jax_ifmvse.data.corpus import LABEL_MAX, LABEL_MIN
from jax_ifmvse.errors import IfmvseError
from jax_ifmvse.metrics import ccc_np

SUBMISSION_COLUMNS = ("EmoAct", "EmoVal", "EmoDom")  # challenge order == ATTRIBUTES order
LABEL_RANGE = (LABEL_MIN, LABEL_MAX)  # the corpus scale, one definition in data/corpus.py


class EnsembleError(IfmvseError, ValueError):
    """A run directory or score file that cannot be ensembled (one-line message)."""


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


def grid_units(cfg: EnsembleConfig) -> tuple[int, int, int]:
    """(units in 1.0, coarse stride, fine radius), all in `fine_step` units; checks divisibility."""

    def ratio(a: float, b: float, what: str) -> int:
        r = a / b
        if b <= 0 or abs(r - round(r)) > 1e-6 or round(r) < 0:
            raise ConfigError(f"ensemble: {what} must be a non-negative multiple of fine_step={b}")
        return int(round(r))

    if cfg.fine_step <= 0 or abs(1.0 / cfg.fine_step - round(1.0 / cfg.fine_step)) > 1e-6:
        raise ConfigError(f"ensemble: fine_step={cfg.fine_step} must divide 1.0 evenly")
    n = ratio(1.0, cfg.fine_step, "1.0")
    m = ratio(cfg.coarse_step, cfg.fine_step, "coarse_step")
    r = ratio(cfg.fine_radius, cfg.fine_step, "fine_radius")
    if m == 0 or n % m:
        raise ConfigError(f"ensemble: coarse_step={cfg.coarse_step} must divide 1.0 evenly")
    return n, m, r


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


# ---------------------------------------------------------------------------------------------
# RUN/ directory: scores in, weights + predictions + submission + chart out.


def load_scores(path: Path) -> dict[str, np.ndarray]:
    """Read one RUN/scores/<split>.npz, checking the fields and shapes the ensemble needs."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise EnsembleError(f"{path}: cannot read score file ({e})") from None
    missing = {"ids", "scores", "score_sets"} - set(data)
    if missing:
        raise EnsembleError(f"{path}: missing field(s) {sorted(missing)}")
    s, ids = data["scores"], data["ids"]
    if s.ndim != 3 or s.shape[1] != len(ids) or s.shape[0] != len(data["score_sets"]):
        raise EnsembleError(
            f"{path}: scores shape {s.shape} does not match (K={len(data['score_sets'])},"
            f" N={len(ids)}, 3)"
        )
    attrs = tuple(str(a) for a in data.get("attributes", ATTRIBUTES))
    if attrs != ATTRIBUTES or s.shape[2] != len(ATTRIBUTES):
        raise EnsembleError(f"{path}: attributes {attrs} are not {ATTRIBUTES}")
    if "labels" in data and data["labels"].shape != (len(ids), len(ATTRIBUTES)):
        raise EnsembleError(f"{path}: labels shape {data['labels'].shape} is not (N, 3)")
    return data


def read_manifest(run: Path) -> dict:
    """RUN/manifest.json as a dict (one-line error when missing or not JSON)."""
    p = run / "manifest.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise EnsembleError(f"{p}: not found; is {run} a training run directory?") from None
    except json.JSONDecodeError as e:
        raise EnsembleError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _fit_attribute(dev: dict, a: int, cfg: EnsembleConfig) -> dict[str, Any]:
    """Search weights for attribute column `a` on the dev scores; sets without scores get weight 0."""
    names = [str(s) for s in dev["score_sets"]]
    s = dev["scores"][:, :, a].astype(np.float64)  # (K, N)
    y = dev["labels"][:, a].astype(np.float64)  # (N,)
    labelled = np.isfinite(y)
    active = [k for k in range(len(names)) if np.isfinite(s[k, labelled]).any()]
    rows = labelled & np.isfinite(s[active]).all(axis=0) if active else labelled
    per_set = {
        nm: (float(ccc_np(y[rows], s[k, rows])) if k in active and rows.any() else None)
        for k, nm in enumerate(names)
    }
    if not active or rows.sum() < 2:
        # No weights: `combine` scores this attribute from the best set per row, so rank the sets
        # on the labelled rows each has (the common rows are too few to rank them on).
        own = [labelled & np.isfinite(s[k]) for k in range(len(names))]
        per_set = {
            nm: (float(ccc_np(y[m], s[k, m])) if m.sum() >= 2 else None)
            for k, (nm, m) in enumerate(zip(names, own, strict=True))
        }
        return {
            "weights": None,
            "dev_ccc": None,
            "dev_ccc_per_set": per_set,
            "n_dev": int(rows.sum()),
        }
    res = search_weights(s[active][:, rows], y[rows], cfg)
    w = np.zeros(len(names))
    w[active] = res.weights
    return {
        "weights": {nm: round(float(v), 10) for nm, v in zip(names, w, strict=True)},
        "dev_ccc": res.ccc,
        "dev_ccc_check": float(ccc_np(y[rows], w[active] @ s[active][:, rows])),
        "coarse_weights": {
            nm: float(v)
            for nm, v in zip([names[k] for k in active], res.coarse_weights, strict=True)
        },
        "coarse_dev_ccc": res.coarse_ccc,
        "dev_ccc_per_set": per_set,
        "n_dev": int(rows.sum()),
        "n_candidates": res.n_candidates,
    }


def apply_weights(
    scores: np.ndarray, weights: dict[str, dict | None], names: list[str]
) -> np.ndarray:
    """Ensembled predictions (N, 3) from scores (K, N, 3); NaN where an attribute has no weights."""
    out = np.full(scores.shape[1:], np.nan)
    for a, attr in enumerate(ATTRIBUTES):
        w = weights.get(attr)
        if w is None:
            continue
        vec = np.array([w[nm] for nm in names])
        used = vec != 0
        out[:, a] = vec[used] @ scores[used, :, a].astype(np.float64)
    return out


FALLBACK_COLUMNS = ("FileName", "reason", "used")


@dataclasses.dataclass(frozen=True)
class Combined:
    """Ensembled predictions of every row, and how each row that could not use them all was made."""

    pred: np.ndarray  # (N, 3) ATTRIBUTES order, unclipped; NaN only for attributes with no weights
    used: list[str]  # per row: "" for the full ensemble, else what stood in for it
    kinds: dict[str, int]  # fallback counts: renormalised, best_set, label_mean


def combine(
    scores: np.ndarray,
    weights: dict[str, dict | None],
    names: list[str],
    label_mean: dict[str, float | None],
    set_ccc: dict[str, dict[str, float | None]] | None = None,
) -> Combined:
    """`apply_weights` for every row, with fallbacks where some score sets have no score (NaN).

    A row missing a weighted set is scored from the weighted sets it has, their weights scaled
    to the same sum (renormalised); if it has none of them, from the available set with the best
    development CCC (`set_ccc`); with no score at all, from `label_mean` (the Train label mean).
    An attribute with no weights (too few usable development rows) is scored in every row from
    the available set with the best development CCC, else from `label_mean`.
    """
    k, n, _ = scores.shape
    pred = np.full((n, len(ATTRIBUTES)), np.nan)
    notes: list[dict[str, str]] = [{} for _ in range(n)]
    kinds = {"renormalised": 0, "best_set": 0, "label_mean": 0}

    def note(i: int, attr: str, text: str, kind: str) -> None:
        notes[i][attr] = text
        notes[i].setdefault("_kind", kind)
        if kind == "label_mean" or notes[i]["_kind"] == "renormalised":
            notes[i]["_kind"] = kind  # a row counts once, under its weakest fallback

    def best_set_or_mean(i: int, a: int, s: np.ndarray, ranked: list[int], why: str) -> None:
        """Row i of attribute a from the first of `ranked` it has a score from, else the mean."""
        attr = ATTRIBUTES[a]
        j = next((j for j in ranked if np.isfinite(s[j, i])), None)
        if j is not None:
            pred[i, a] = s[j, i]
            note(i, attr, f"{names[j]} ({why})", "best_set")
        else:
            m = label_mean.get(attr)
            pred[i, a] = np.nan if m is None else m
            note(i, attr, "Train label mean", "label_mean")

    for a, attr in enumerate(ATTRIBUTES):
        w = weights.get(attr)
        ccc = (set_ccc or {}).get(attr) or {}
        s = scores[:, :, a].astype(np.float64)  # (K, N)
        if w is None:
            # Only sets with a development CCC: without one, nothing says a set beats the mean.
            known = [j for j in range(k) if ccc.get(names[j]) is not None]
            known = [j for j in known if np.isfinite(ccc[names[j]])]
            known.sort(key=lambda j: -ccc[names[j]])
            for i in range(n):
                best_set_or_mean(i, a, s, known, "no ensemble weights; best set on development")
            continue
        vec = np.array([float(w[nm]) for nm in names])  # (K,)
        avail = np.isfinite(s)
        s0 = np.where(avail, s, 0.0)
        wa = vec[:, None] * avail  # (K, N) weights of the sets each row has
        full = avail[vec != 0].all(axis=0)  # (N,)
        total = vec.sum() if vec.sum() != 0 else 1.0
        have_w = wa.sum(axis=0)  # (N,)
        ok = have_w != 0
        pred[ok, a] = (wa[:, ok] * s0[:, ok]).sum(axis=0) * (total / have_w[ok])
        pred[full, a] = vec[vec != 0] @ s0[vec != 0][:, full]  # exactly apply_weights' sum
        rank = sorted(range(k), key=lambda j: -(ccc.get(names[j]) or -np.inf))
        for i in np.flatnonzero(~full):
            if ok[i]:
                sets = [names[j] for j in range(k) if wa[j, i] != 0]
                note(i, attr, f"{'+'.join(sets)} (weights renormalised)", "renormalised")
            else:  # `rank` holds every set: the row's best available one, or the mean if none
                best_set_or_mean(i, a, s, rank, "best available set on development")
    used = []
    for nt in notes:
        kind = nt.pop("_kind", None)
        if kind is None:
            used.append("")
            continue
        kinds[kind] += 1
        vals = set(nt.values())
        same = len(vals) == 1 and len(nt) == len(ATTRIBUTES)
        used.append(vals.pop() if same else "; ".join(f"{a}: {v}" for a, v in nt.items()))
    return Combined(pred, used, kinds)


def write_fallbacks(path: Path, files: list[str], reasons: list[str], used: list[str]) -> int:
    """RUN/ensemble/fallbacks_<split>.csv: FileName, reason, used, for rows not fully ensembled."""
    rows = sorted((f, r, u) for f, r, u in zip(files, reasons, used, strict=True) if u)
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(FALLBACK_COLUMNS)
        wr.writerows(rows)
    return len(rows)


def file_names(data: dict) -> list[str]:
    """The official FileName of each row (score files from before `files` existed: the ids)."""
    return [str(x) for x in data.get("files", data["ids"])]


def missing_reasons(data: dict, names: list[str]) -> list[str]:
    """Why each row lacks some score set: the store's reason if recorded, else the sets."""
    recorded = data.get("missing")
    out = []
    for i in range(len(data["ids"])):
        why = str(recorded[i]) if recorded is not None else ""
        if not why:
            gone = [nm for k, nm in enumerate(names) if not np.isfinite(data["scores"][k, i]).all()]
            why = f"no scores from {', '.join(gone)}" if gone else ""
        out.append(why)
    return out


def write_predictions(path: Path, ids: np.ndarray, pred: np.ndarray) -> None:
    """Unclipped ensembled predictions: FileName,arousal,valence,dominance."""
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["FileName", *ATTRIBUTES])
        for i, row in zip(ids, pred, strict=True):
            wr.writerow([str(i), *(repr(float(v)) for v in row)])


def write_submission(path: Path, ids: np.ndarray, pred: np.ndarray) -> None:
    """The challenge CSV `FileName,EmoAct,EmoVal,EmoDom`, clipped to 1..7, in file-name order;
    pred columns in ATTRIBUTES order."""
    bad = ~np.isfinite(pred)
    if bad.any():  # an empty cell is not a valid submission; `combine` fills every cell it can
        i, a = np.argwhere(bad)[0]
        raise EnsembleError(
            f"{path}: no value for {ATTRIBUTES[a]} of {ids[i]} ({int(bad.sum())} empty cell(s))"
        )
    clipped = np.clip(pred, *LABEL_RANGE)
    order = sorted(range(len(ids)), key=lambda n: str(ids[n]))
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["FileName", *SUBMISSION_COLUMNS])
        for i, row in ((ids[n], clipped[n]) for n in order):
            wr.writerow([str(i), *(f"{v:.6f}" for v in row)])


def plot_dev_ccc(path: Path, fits: dict[str, dict], names: list[str]) -> None:
    """Grouped bar chart: dev CCC per score set and for the ensemble, per attribute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [*names, "ensemble"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(labels)
    for j, lab in enumerate(labels):
        vals = []
        for attr in ATTRIBUTES:
            f = fits[attr]
            v = f["dev_ccc"] if lab == "ensemble" else f["dev_ccc_per_set"].get(lab)
            vals.append(np.nan if v is None else v)
        x = np.arange(len(ATTRIBUTES)) + (j - (len(labels) - 1) / 2) * width
        ax.bar(x, vals, width, label=lab, color="black" if lab == "ensemble" else None)
    ax.set_xticks(np.arange(len(ATTRIBUTES)), ATTRIBUTES)
    ax.set_ylabel("development CCC")
    ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    ax.legend(ncol=len(labels), fontsize="small", loc="upper center", bbox_to_anchor=(0.5, 1.15))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_ensemble(run: str | Path, cfg: EnsembleConfig, dev_split: str | None = None) -> dict:
    """Search weights on RUN/scores/<dev>.npz, write RUN/ensemble/{weights.json, CSVs, dev_ccc.png}."""
    run = Path(run)
    manifest = read_manifest(run)
    if manifest.get("complete") is False:
        raise EnsembleError(
            f"{run / 'manifest.json'}: training is not complete; rerun `ifmvse train`"
        )
    if dev_split is None:
        dev_split = manifest.get("config", {}).get("train", {}).get("dev_split", "Development")
    score_dir = run / "scores"
    dev_path = score_dir / f"{dev_split}.npz"
    if not dev_path.exists():
        have = sorted(p.stem for p in score_dir.glob("*.npz") if not p.name.endswith(".tmp.npz"))
        raise EnsembleError(f"{dev_path}: development scores not found (have: {have})")
    tasks = manifest.get("tasks") or ["attributes"]
    if "attributes" not in tasks:  # task 1 only: no attribute submission to make
        dev = load_scores(dev_path)
        summary = {
            "mode": "simplex" if cfg.simplex else "free",
            "dev_split": dev_split,
            "score_sets": [str(x) for x in dev["score_sets"]],
            "config": dataclasses.asdict(cfg),
            "attributes": {},
            "mean_dev_ccc": None,
            "splits": {},
            "fallbacks": {},
            "unweighted": [],
            "category": run_category_ensemble(run, manifest, cfg, dev_split),
        }
        (run / "ensemble" / "weights.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    dev = load_scores(dev_path)
    if "labels" not in dev:
        raise EnsembleError(f"{dev_path}: no labels; the weight search needs development labels")
    names = [str(s) for s in dev["score_sets"]]
    fits = {attr: _fit_attribute(dev, a, cfg) for a, attr in enumerate(ATTRIBUTES)}
    weights = {attr: fits[attr]["weights"] for attr in ATTRIBUTES}
    set_ccc = {attr: fits[attr]["dev_ccc_per_set"] for attr in ATTRIBUTES}
    label_mean = manifest.get("train_label_mean") or {}
    unweighted = {
        attr: f"no ensemble weights for {attr} ({fits[attr]['n_dev']} usable {dev_split} rows)"
        for attr in ATTRIBUTES
        if weights[attr] is None
    }

    out = run / "ensemble"
    out.mkdir(exist_ok=True)
    splits, fallbacks = {}, {}
    for p in sorted(score_dir.glob("*.npz")):
        if p.name.endswith(".tmp.npz"):  # an interrupted write by `ifmvse train`
            continue
        data = dev if p == dev_path else load_scores(p)
        got = [str(s) for s in data["score_sets"]]
        if got != names:
            raise EnsembleError(f"{p}: score sets {got} differ from the development file's {names}")
        files = file_names(data)
        if len(set(files)) != len(files):
            raise EnsembleError(f"{p}: repeated FileName values; cannot write one row each")
        comb = combine(data["scores"], weights, names, label_mean, set_ccc)
        if comb.kinds["label_mean"] and not label_mean:
            raise EnsembleError(
                f"{run / 'manifest.json'}: no train_label_mean for rows or attributes without"
                " any score; rerun `ifmvse train` with this version"
            )
        write_predictions(out / f"{p.stem}.csv", np.asarray(files), comb.pred)
        write_submission(out / f"submission_{p.stem}.csv", np.asarray(files), comb.pred)
        reasons = [
            "; ".join(r for r in (why, *unweighted.values()) if r)
            for why in missing_reasons(data, names)
        ]
        n_fb = write_fallbacks(out / f"fallbacks_{p.stem}.csv", files, reasons, comb.used)
        splits[p.stem] = int(len(data["ids"]))
        fallbacks[p.stem] = {"rows": n_fb, **comb.kinds}
    summary = {
        "mode": "simplex" if cfg.simplex else "free",
        "dev_split": dev_split,
        "score_sets": names,
        "config": dataclasses.asdict(cfg),
        "attributes": fits,
        "mean_dev_ccc": (
            float(np.mean([fits[a]["dev_ccc"] for a in ATTRIBUTES]))
            if all(fits[a]["dev_ccc"] is not None for a in ATTRIBUTES)
            else None
        ),
        "splits": splits,
        "fallbacks": fallbacks,
        "unweighted": list(unweighted),  # attributes scored by a fallback in every row
    }
    if "category" in tasks:
        summary["category"] = run_category_ensemble(run, manifest, cfg, dev_split)
    (out / "weights.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_dev_ccc(out / "dev_ccc.png", fits, names)
    return summary


# ---------------------------------------------------------------------------------------------
# Task 1: class probabilities of the score sets, weights searched by development macro-F1.

CLASS_COLUMNS = CLASS_NAMES  # probabilities_cat_<split>.csv: one column per class, baseline order


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


def combine_probs(
    probs: np.ndarray, weights: np.ndarray, prior: np.ndarray
) -> tuple[np.ndarray, list[str]]:
    """Ensembled class probabilities (N, J) of probs (K, N, J) and per row what stood in.

    A row missing a weighted set uses the weighted sets it has (weights renormalised), else the
    first available set, and with no set at all the Train class prior.
    """
    k, n, j = probs.shape
    avail = np.isfinite(probs).all(-1)  # (K, N)
    w = np.asarray(weights, np.float64)[:, None] * avail  # (K, N)
    p0 = np.where(avail[..., None], probs, 0.0)
    have = w.sum(0)  # (N,)
    out = np.einsum("kn,knj->nj", w, p0) / np.where(have > 0, have, 1.0)[:, None]
    used = [""] * n
    full = avail[np.asarray(weights) != 0].all(0)
    for i in np.flatnonzero(~full):
        if have[i] > 0:
            used[i] = "weights renormalised"
        elif avail[:, i].any():
            kk = int(np.flatnonzero(avail[:, i])[0])
            out[i] = probs[kk, i]
            used[i] = f"score set {kk} (no weighted set)"
        else:
            out[i] = prior
            used[i] = "Train class prior"
    return out, used


def write_category_submission(path: Path, files: list[str], pred: np.ndarray) -> None:
    """`FileName,EmoClass`: one code per file in file-name order."""
    order = sorted(range(len(files)), key=lambda i: files[i])
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["FileName", "EmoClass"])
        for i in order:
            wr.writerow([files[i], CLASS_CODES[int(pred[i])]])


def write_category_probabilities(path: Path, files: list[str], probs: np.ndarray) -> None:
    """`FileName,Angry,...,Neutral`: ensembled probabilities, baseline class order."""
    order = sorted(range(len(files)), key=lambda i: files[i])
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["FileName", *CLASS_COLUMNS])
        for i in order:
            wr.writerow([files[i], *(f"{v:.6f}" for v in probs[i])])


def run_category_ensemble(
    run: Path, manifest: dict, cfg: EnsembleConfig, dev_split: str
) -> dict[str, Any]:
    """Task 1: weights on RUN/scores/<dev>.npz by macro-F1; submission_cat_<split>.csv and
    probabilities_cat_<split>.csv for every scored split; the summary for weights.json."""
    from jax_ifmvse.categories import class_index
    from jax_ifmvse.metrics import macro_f1

    score_dir = run / "scores"
    dev_path = score_dir / f"{dev_split}.npz"
    dev = load_scores(dev_path)
    if "probs" not in dev or "classes" not in dev:
        raise EnsembleError(f"{dev_path}: no class probabilities; was task 1 (category) trained?")
    names = [str(s) for s in dev["score_sets"]]
    probs = dev["probs"].astype(np.float64)  # (K, N, 8)
    y = class_index(dev["classes"])
    active = [k for k in range(len(names)) if np.isfinite(probs[k]).all(-1).any()]
    rows = (y >= 0) & np.isfinite(probs[active]).all(-1).all(0) if active else y >= 0
    if not active or rows.sum() < 2:
        raise EnsembleError(f"{dev_path}: fewer than 2 {dev_split} rows with a class and scores")
    per_set = {
        nm: (
            float(macro_f1(y[rows], probs[k, rows].argmax(-1), N_CLASSES)) if k in active else None
        )
        for k, nm in enumerate(names)
    }
    w_act, f1, cw, cf1 = search_class_weights(probs[active][:, rows], y[rows], cfg)
    weights = np.zeros(len(names))
    weights[active] = w_act
    counts = np.asarray(manifest.get("train_class_counts") or np.ones(N_CLASSES), np.float64)
    prior = counts / counts.sum()
    out = run / "ensemble"
    out.mkdir(exist_ok=True)
    splits, fallbacks, dev_check = {}, {}, None
    for p in sorted(score_dir.glob("*.npz")):
        if p.name.endswith(".tmp.npz"):
            continue
        data = dev if p == dev_path else load_scores(p)
        if "probs" not in data:
            raise EnsembleError(f"{p}: no class probabilities (other splits of this run have them)")
        files = file_names(data)
        comb, used = combine_probs(data["probs"].astype(np.float64), weights, prior)
        pred = comb.argmax(-1)
        write_category_submission(out / f"submission_cat_{p.stem}.csv", files, pred)
        write_category_probabilities(out / f"probabilities_cat_{p.stem}.csv", files, comb)
        splits[p.stem] = len(files)
        fallbacks[p.stem] = sum(1 for u in used if u)
        if p == dev_path:
            dev_check = float(macro_f1(y[rows], pred[rows], N_CLASSES))
    return {
        "weights": {nm: round(float(v), 10) for nm, v in zip(names, weights, strict=True)},
        "dev_macro_f1": f1,
        "dev_macro_f1_check": dev_check,
        "coarse_weights": {
            nm: float(v) for nm, v in zip([names[k] for k in active], cw, strict=True)
        },
        "coarse_dev_macro_f1": cf1,
        "dev_macro_f1_per_set": per_set,
        "n_dev": int(rows.sum()),
        "classes": list(CLASS_CODES),
        "splits": splits,
        "fallbacks": fallbacks,
    }
