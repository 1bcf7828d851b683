"""Benchmark: the full coarse-then-fine ensemble weight search, ours (moments + device) vs a numpy loop.

    python bench/bench_ensemble.py                 # simplex (the paper's mode) and free weights
    python bench/bench_ensemble.py --mode simplex --n 30000 --loop-budget 60

`bench_ensemble(...)` returns one dict row per call for `bench/run_all.py`.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import numpy as np

from jax_ifmvse.config import EnsembleConfig
from jax_ifmvse.ensemble.search import (
    coarse_grid,
    fine_grid,
    grid_candidates,
    grid_units,
    search_weights,
    search_weights_numpy_loop,
)
from jax_ifmvse.metrics import ccc_np


def make_dev(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random development predictions (K, N) with a real signal of different strength per set."""
    rng = np.random.default_rng(seed)
    y = np.clip(rng.normal(4.0, 1.0, n), 1.0, 7.0)  # (N,) labels on the 1..7 scale
    noise = np.linspace(1.0, 0.4, k)[rng.permutation(k)]  # one set clearly best, as in the paper
    shared = rng.normal(0.0, 0.3, n)  # errors correlated across sets, as for real models
    s = 0.8 * y + 0.8 + shared + noise[:, None] * rng.normal(0.0, 1.0, (k, n))  # (K, N)
    return s.astype(np.float32), y.astype(np.float32)


def _n_valid(grid) -> int:
    """Number of valid candidates on a grid (free grids are counted, not enumerated)."""
    return math.prod(grid.size) if grid.total is None else len(grid_candidates(grid))


def _sample(grid, m: int, rng: np.random.Generator) -> np.ndarray:
    """m random valid candidates (int units) of a grid."""
    if grid.total is not None:
        c = grid_candidates(grid)
        return c[rng.choice(len(c), size=min(m, len(c)), replace=False)]
    d = rng.integers(0, np.asarray(grid.size), size=(m, len(grid.size)))
    return np.asarray(grid.lo) + d * grid.stride


def _loop_ccc(cands: np.ndarray, s: np.ndarray, y: np.ndarray, n_units: int) -> np.ndarray:
    """The straightforward loop: one numpy CCC per candidate."""
    return np.array([ccc_np(y, (w / n_units) @ s) for w in cands])


def bench_ensemble(
    n: int = 30000, k: int = 5, simplex: bool = True, loop_budget_s: float = 60.0, seed: int = 0
) -> dict:
    """Time the full search (ours, best of 3 after a compile run) against a numpy loop; one row."""
    cfg = EnsembleConfig(simplex=simplex)
    s, y = make_dev(n, k, seed)
    s64, y64 = s.astype(np.float64), y.astype(np.float64)
    n_units, _, _ = grid_units(cfg)

    t0 = time.perf_counter()
    res = search_weights(s, y, cfg)  # includes jit compilation
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        res = search_weights(s, y, cfg)
        times.append(time.perf_counter() - t0)
    ours_s = min(times)

    g1 = coarse_grid(cfg, k)
    g2 = fine_grid(cfg, np.round(res.coarse_weights * n_units).astype(np.int64))
    n_cands = _n_valid(g1) + _n_valid(g2)  # same candidate set for both (same coarse optimum)

    rng = np.random.default_rng(seed)
    probe = _sample(g1, 200, rng)
    t0 = time.perf_counter()
    _loop_ccc(probe, s64, y64, n_units)
    per_cand = (time.perf_counter() - t0) / len(probe)
    estimate = per_cand * n_cands
    row = {
        "bench": "ensemble_search",
        "mode": "simplex" if simplex else "free",
        "n_dev": n,
        "K": k,
        "candidates": n_cands,
        "ours_s": ours_s,
        "ours_first_call_s": first_s,
        "device": str(jax.devices()[0].device_kind),
        "ours_weights": [round(float(w), 4) for w in res.weights],
        "ours_ccc": res.ccc,
    }
    if estimate <= loop_budget_s:
        t0 = time.perf_counter()
        w_loop, c_loop = search_weights_numpy_loop(s64, y64, cfg)
        row.update(
            numpy_s=time.perf_counter() - t0,
            numpy_extrapolated=False,
            numpy_weights=[round(float(w), 4) for w in w_loop],
            numpy_ccc=c_loop,
            same_best=bool(np.allclose(w_loop, res.weights, atol=1e-9)),
        )
    else:
        # Full loop too slow: time it on a random subset of the same candidates, extrapolate,
        # and check that our CCC equals the loop's on the subset's best candidate.
        m = max(200, int(loop_budget_s / 4 / per_cand))
        sub = np.concatenate([_sample(g1, m // 4, rng), _sample(g2, m - m // 4, rng)])
        t0 = time.perf_counter()
        cccs = _loop_ccc(sub, s64, y64, n_units)
        sub_s = time.perf_counter() - t0
        row.update(
            numpy_s=sub_s / len(sub) * n_cands,
            numpy_extrapolated=True,
            numpy_subset=len(sub),
            numpy_weights=None,
            numpy_ccc=None,
            # Nothing on the subset beats our optimum, and our optimum is what numpy says it is.
            same_best=bool(
                cccs.max() <= res.ccc + 1e-6
                and abs(float(ccc_np(y64, res.weights @ s64)) - res.ccc) < 1e-5
            ),
        )
    row["speedup"] = row["numpy_s"] / row["ours_s"]
    return row


def print_row(row: dict) -> None:
    """Human-readable summary of one benchmark row."""
    extra = (
        f" (extrapolated from {row['numpy_subset']} of {row['candidates']} candidates:"
        " the full loop would take too long)"
        if row["numpy_extrapolated"]
        else ""
    )
    print(
        f"[{row['mode']}] N={row['n_dev']} K={row['K']} candidates={row['candidates']:,}"
        f" on {row['device']}\n"
        f"  ours (moments + jit, chunked): {row['ours_s'] * 1e3:9.1f} ms"
        f"  (first call incl. compile {row['ours_first_call_s'] * 1e3:.0f} ms)\n"
        f"  numpy loop:                    {row['numpy_s'] * 1e3:9.1f} ms{extra}\n"
        f"  speedup {row['speedup']:.0f}x; best weights ours {row['ours_weights']}"
        f" CCC {row['ours_ccc']:.5f}"
    )
    if row["numpy_extrapolated"]:
        print(f"  subset check (no subset candidate beats ours, CCC agrees): {row['same_best']}")
    else:
        print(
            f"  numpy best {row['numpy_weights']} CCC {row['numpy_ccc']:.5f};"
            f" same best weights: {row['same_best']}"
        )


def main() -> None:
    """Command-line entry: run the selected modes and print a summary per mode."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30000, help="development utterances")
    ap.add_argument("--k", type=int, default=5, help="score sets")
    ap.add_argument("--mode", choices=["simplex", "free", "both"], default="both")
    ap.add_argument("--loop-budget", type=float, default=60.0, help="max seconds of numpy loop")
    args = ap.parse_args()
    modes = {"simplex": [True], "free": [False], "both": [True, False]}[args.mode]
    for simplex in modes:
        print_row(bench_ensemble(args.n, args.k, simplex, args.loop_budget))


if __name__ == "__main__":
    main()
