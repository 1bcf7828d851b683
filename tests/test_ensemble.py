"""Ensemble weight search: moment-based CCC, coarse-then-fine grids, RUN/ensemble outputs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from tolerances import (
    U32,
    U64,
    assert_below,
    assert_exceeds,
    assert_not_below,
    assert_within,
    ccc,
    ccc_moments,
    ccc_perturbed,
    gamma,
    search_vs_single,
    two_orders,
    weights_sum,
    written,
)

from jax_ifmvse.cli import cli
from jax_ifmvse.config import ATTRIBUTES, ConfigError, EnsembleConfig
from jax_ifmvse.ensemble import EnsembleError
from jax_ifmvse.ensemble.combine import apply_weights, combine
from jax_ifmvse.ensemble.run import run_ensemble
from jax_ifmvse.ensemble.search import (
    ccc_direct,
    ccc_from_moments,
    coarse_grid,
    fine_grid,
    grid_candidates,
    moments,
    search_grid,
    search_weights,
    search_weights_numpy_loop,
)
from jax_ifmvse.metrics import ccc_np

NAMES = ["S1", "S2", "S3", "S4", "S5"]


def only_s4_signal(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores (5, N) where only S4 tracks y; the others are noise of the same mean and spread."""
    rng = np.random.default_rng(seed)
    y = rng.normal(4.0, 1.0, n)
    s = rng.normal(4.0, 1.0, (5, n))
    s[3] = y + rng.normal(0.0, 0.4, n)
    return s, y


def moment_bound(w, s, y) -> float:
    """The search's float32 CCC from moments vs ccc_np of the same weights (float64, another
    order): `ccc_moments` + `ccc(n)` at u64."""
    mean, cov = moments(s, y)
    return ccc_moments(w, mean, cov) + ccc(len(y), u=U64)


def test_search_puts_weight_on_s4_and_fast_path_matches_numpy():
    s, y = only_s4_signal()
    res = search_weights(s, y, EnsembleConfig())
    assert int(np.argmax(res.weights)) == 3
    assert res.weights[3] >= 0.8
    # The moment-based CCC of the chosen combination equals a direct numpy CCC of it.
    bound = moment_bound(res.weights, s, y)
    assert_within(res.ccc, float(ccc_np(y, res.weights @ s)), bound, "moments vs direct")
    wrong = np.roll(res.weights, 1)  # the weights on the wrong sets
    assert_exceeds(res.ccc, float(ccc_np(y, wrong @ s)), bound, "weights on the wrong sets")
    # Never below the best set alone (its one-hot weight is on the coarse grid).
    mean, cov = moments(s, y)
    single = search_vs_single(3, res.coarse_weights, mean, cov, len(y))
    assert_not_below(res.ccc, float(ccc_np(y, s[3])), single, "search vs S4 alone")


@pytest.mark.parametrize("simplex", [True, False])
def test_search_is_never_below_the_best_single_set(simplex):
    """Where set 0 alone is the best weighting (the others are noise off its mean, and it is
    narrower than y: any other weight only loses), the search lands on its one-hot weight, and
    its float32 CCC from moments is ccc_np of set 0 within `search_vs_single` (tight: both are
    that weight's CCC in two orders). A search that misses it by one fine step, or leaves set 0
    out, lands below."""
    rng = np.random.default_rng(7)
    y = rng.normal(4.0, 1.0, 400)
    s = rng.normal(6.0, 1.0, (3, 400))
    s[0] = 4.0 + 0.8 * (y - 4.0) + rng.normal(0.0, 0.2, 400)
    cfg = EnsembleConfig(simplex=simplex, fine_radius=0.05)
    res = search_weights(s, y, cfg)
    np.testing.assert_array_equal(res.weights, [1.0, 0.0, 0.0])  # the data's premise
    mean, cov = moments(s, y)
    best = float(ccc_np(y, s[0]))
    bound = search_vs_single(0, res.coarse_weights, mean, cov, len(y))
    assert_not_below(res.ccc, best, bound, "search vs set 0 alone")
    step = float(ccc_np(y, np.array([0.99, 0.01, 0.0]) @ s))
    assert_below(step, best, bound, "one fine step off the one-hot weight")
    assert_below(search_weights(s[1:], y, cfg).ccc, best, bound, "set 0 left out")


def test_moment_ccc_equals_direct_ccc_for_random_candidates():
    s, y = only_s4_signal(500, seed=1)
    w = np.random.default_rng(2).uniform(0, 1, (64, 5))
    mean, cov = moments(s, y)
    fast = np.asarray(ccc_from_moments(w, mean, cov))
    direct = np.asarray(
        ccc_direct(w.astype(np.float32), s.astype(np.float32), y.astype(np.float32))
    )
    ref = np.array([ccc_np(y, wi @ s) for wi in w])
    fast_bound = np.array([ccc_moments(wi, mean, cov) + ccc(len(y), u=U64) for wi in w])
    assert_within(fast, ref, fast_bound, "moments (float32 on the device) vs ccc_np")
    assert_exceeds(fast[::-1], ref, fast_bound, "candidates reversed")
    # From the predictions in float32: y and s rounded (u32), w @ s (K terms: gamma_{K+1}),
    # then the n-term statistics (`ccc` with this data's offset |m_p - m_y| (|m_p| + |m_y|) / D).
    pred = w @ s  # (C, N)
    dp = U32 * np.abs(pred).max() + gamma(6) * (np.abs(w) @ np.abs(s)).max()
    mp, my = pred.mean(1), y.mean()
    offset = np.abs(mp - my) * (np.abs(mp) + abs(my)) / (pred.var(1) + y.var() + (mp - my) ** 2)
    direct_bound = np.array(
        [
            ccc_perturbed(y, p, U32 * np.abs(y).max(), dp) + ccc(len(y), o)
            for p, o in zip(pred, offset, strict=True)
        ]
    )
    assert_within(direct, ref, direct_bound, "float32 direct vs ccc_np")
    assert_exceeds(direct[::-1], ref, direct_bound, "candidates reversed")


@pytest.mark.parametrize("simplex", [True, False])
def test_fine_never_lowers_coarse(simplex):
    cfg = EnsembleConfig(simplex=simplex, fine_radius=0.05)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        y = rng.normal(4, 1, 300)
        s = 0.3 * y + rng.normal(2.8, 1.0, (4, 300))
        res = search_weights(s, y, cfg)
        # The fine grid holds the coarse best w1 and scores it again (another place in the
        # batch): each float32 value within `ccc_moments(w1)` of w1's exact CCC.
        mean, cov = moments(s, y)
        cm = ccc_moments(res.coarse_weights, mean, cov)
        assert_not_below(res.ccc, res.coarse_ccc, 2 * cm, "fine vs coarse")
        direct = float(ccc_np(y, res.coarse_weights @ s))
        assert_not_below(res.ccc, direct, cm + ccc(300, u=U64), "fine vs ccc_np of w1")


def test_simplex_weights_sum_to_one():
    rng = np.random.default_rng(3)
    y = rng.normal(4, 1, 400)
    s = 0.5 * y + rng.normal(2.0, 0.8, (5, 400))
    res = search_weights(s, y, EnsembleConfig(simplex=True))
    # w_k = n_k x (1 / n) in float64 (two roundings each) with the n_k summing to n; their
    # K-term sum: gamma_{K+1} u64 of 1.
    k = len(res.weights)
    assert_within(res.weights.sum(), 1.0, gamma(k + 1, U64), "simplex weights sum to 1")
    assert_within(res.coarse_weights.sum(), 1.0, gamma(k + 1, U64), "coarse weights sum to 1")
    assert (res.weights >= 0).all()


def test_free_weights_reach_beyond_the_simplex():
    # Two half-scale copies of y: the best combination is w1 = w2 = 1, off the simplex.
    rng = np.random.default_rng(4)
    y = rng.normal(4, 1, 1000)
    s = np.stack([0.5 * y + rng.normal(0, 0.05, 1000) for _ in range(2)] + [rng.normal(4, 1, 1000)])
    free = search_weights(s, y, EnsembleConfig(simplex=False))
    simp = search_weights(s, y, EnsembleConfig(simplex=True))
    assert free.weights.sum() > 1.5
    assert ((free.weights >= 0) & (free.weights <= 1)).all()
    assert free.ccc > simp.ccc + 0.1
    bound = moment_bound(free.weights, s, y)
    assert_within(free.ccc, float(ccc_np(y, free.weights @ s)), bound, "free weights: moments")


@pytest.mark.parametrize("simplex", [True, False])
def test_device_search_equals_numpy_loop(simplex):
    cfg = EnsembleConfig(simplex=simplex, fine_radius=0.04, chunk=256)  # several chunks
    rng = np.random.default_rng(5)
    y = rng.normal(4, 1, 300)
    s = np.stack([0.6 * y + rng.normal(1.6, 0.6, 300), 0.4 * y + rng.normal(2.4, 0.6, 300)])
    s = np.concatenate([s, rng.normal(4, 1, (1, 300))])
    res = search_weights(s, y, cfg)
    w_loop, c_loop = search_weights_numpy_loop(s, y, cfg)
    # The same grid point: n_k x (1 / n) vs n_k / n, three roundings apart at most.
    assert_within(res.weights, w_loop, gamma(3, U64) * np.abs(w_loop), "device vs loop weights")
    step = np.eye(len(w_loop))[0] * cfg.fine_step  # one grid step away
    assert_exceeds(res.weights + step, w_loop, gamma(3, U64) * np.abs(w_loop), "a step away")
    assert_within(res.ccc, c_loop, moment_bound(res.weights, s, y), "device vs numpy loop")


def test_grid_enumeration_counts_and_bounds():
    cfg = EnsembleConfig()
    coarse = grid_candidates(coarse_grid(cfg, 5))
    assert len(coarse) == 1001  # compositions of 10 tenths into 5 parts: C(14, 4)
    assert (coarse.sum(1) == 100).all()
    fine = grid_candidates(fine_grid(cfg, np.array([0, 0, 10, 90, 0])))
    assert (fine.sum(1) == 100).all() and (fine >= 0).all()
    assert fine[:, 3].max() == 100 and fine[:, 3].min() == 80
    free = EnsembleConfig(simplex=False)
    assert len(grid_candidates(coarse_grid(free, 3))) == 11**3
    # The device search sees every candidate: its best equals the best over the explicit list.
    s, y = only_s4_signal(300, seed=6)
    mean, cov = moments(s, y)
    w, c = search_grid(fine_grid(cfg, np.array([0, 0, 10, 90, 0])), mean, cov, 0.01, 4096)
    ref = np.array([ccc_np(y, (f / 100) @ s) for f in fine])
    bound = moment_bound(fine[int(np.argmax(ref))] / 100, s, y)
    assert_within(c, ref.max(), bound, "device grid's best")
    np.testing.assert_array_equal(w, fine[int(np.argmax(ref))])


def test_config_steps_must_nest():
    with pytest.raises(ConfigError, match="fine_step"):
        search_weights(*only_s4_signal(50), EnsembleConfig(fine_step=0.03))
    with pytest.raises(ConfigError, match="coarse_step"):
        search_weights(*only_s4_signal(50), EnsembleConfig(coarse_step=0.15, fine_step=0.05))


def make_run(tmp_path, n_dev: int = 300, n_test: int = 60, seed: int = 0):
    """A fake training RUN/: manifest + scores/{Development,Test1}.npz, S4 the informative set."""
    rng = np.random.default_rng(seed)
    run = tmp_path / "run"
    (run / "scores").mkdir(parents=True)
    manifest = {
        "store": "store.h5",
        "config": {"train": {"dev_split": "Development"}, "ensemble": {"fine_radius": 0.05}},
        "attributes": list(ATTRIBUTES),
        "complete": True,  # a finished training run
        "score_sets": [{"name": n, "kind": "mlp", "views": ["v"]} for n in NAMES],
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    centers = np.array([2.0, 4.0, 6.0])  # arousal, valence, dominance differ: catches column swaps
    labels = {}
    for split, n in [("Development", n_dev), ("Test1", n_test)]:
        y = centers + rng.normal(0, 0.6, (n, 3))  # (N, 3)
        s = centers + rng.normal(0, 0.6, (5, n, 3))  # (K, N, 3)
        s[3] = y + rng.normal(0, 0.2, (n, 3))
        s[4, :, 2] = np.nan  # S5 has no dominance model
        lab = y if split == "Development" else np.full((n, 3), np.nan)
        ids = np.array([f"MSP-PODCAST_{split[:4]}_{i:04d}" for i in range(n)])
        np.savez(
            run / "scores" / f"{split}.npz",
            ids=ids,
            scores=s.astype(np.float32),
            labels=lab.astype(np.float32),
            score_sets=np.array(NAMES),
            attributes=np.array(ATTRIBUTES),
        )
        labels[split] = (ids, y)
    return run, labels


def fit_moments(run, attr: str) -> tuple[list[str], np.ndarray, np.ndarray, int]:
    """(the fitted sets, mean, cov, n) of RUN's Development scores on the rows it fitted."""
    a = ATTRIBUTES.index(attr)
    with np.load(run / "scores" / "Development.npz") as z:
        s, y = z["scores"][:, :, a].astype(np.float64), z["labels"][:, a].astype(np.float64)
    active = [k for k in range(len(s)) if np.isfinite(s[k]).any()]
    rows = np.isfinite(y) & np.isfinite(s[active]).all(0)
    mean, cov = moments(s[active][:, rows], y[rows])
    return [NAMES[k] for k in active], mean, cov, int(rows.sum())


def fit_bound(run, attr: str, weights: dict) -> float:
    """`ccc_moments` + float64 orders for a fitted attribute of RUN's Development scores."""
    names, mean, cov, n = fit_moments(run, attr)
    w = np.array([weights[nm] for nm in names])
    return ccc_moments(w, mean, cov) + ccc(n, u=U64)


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_run_ensemble_writes_weights_predictions_submission_and_chart(tmp_path):
    run, labels = make_run(tmp_path)
    (run / "scores" / "Development.tmp.npz").write_bytes(b"half-written by an interrupted train")
    summary = run_ensemble(run, EnsembleConfig(fine_radius=0.05))
    out = run / "ensemble"
    weights = json.loads((out / "weights.json").read_text())
    assert weights["mode"] == "simplex" and weights["score_sets"] == NAMES
    for attr in ATTRIBUTES:
        fit = weights["attributes"][attr]
        w = fit["weights"]
        assert max(w, key=w.get) == "S4"
        bound = weights_sum(len(w))  # weights.json rounds each to 10 decimals
        assert_within(sum(w.values()), 1.0, bound, f"{attr}: weights sum to 1")
        names, mean, cov, n = fit_moments(run, attr)
        per = [fit["dev_ccc_per_set"][nm] for nm in names]
        coarse = [fit["coarse_weights"][nm] for nm in names]
        k = int(np.argmax(per))
        single = search_vs_single(k, coarse, mean, cov, n)
        assert_not_below(fit["dev_ccc"], per[k], single, f"{attr}: vs the best set")
        bound = fit_bound(run, attr, w)
        assert_within(fit["dev_ccc"], fit["dev_ccc_check"], bound, f"{attr}: dev_ccc")
    assert weights["attributes"]["dominance"]["weights"]["S5"] == 0.0
    assert weights["attributes"]["dominance"]["dev_ccc_per_set"]["S5"] is None
    assert summary["splits"] == {"Development": 300, "Test1": 60}
    assert not (out / "Development.tmp.csv").exists()

    header, rows = read_csv(out / "submission_Test1.csv")
    assert header == ["FileName", "EmoAct", "EmoVal", "EmoDom"]
    ids, y = labels["Test1"]
    assert [r[0] for r in rows] == list(ids)
    sub = np.array([[float(v) for v in r[1:]] for r in rows])
    assert sub.min() >= 1.0 and sub.max() <= 7.0
    for a in range(3):  # each column tracks its own attribute (centres 2, 4, 6 differ)
        assert np.abs(sub[:, a].mean() - y[:, a].mean()) < 0.3
        assert ccc_np(np.clip(y[:, a], 1, 7), sub[:, a]) > 0.8

    header, rows = read_csv(out / "Development.csv")
    assert header == ["FileName", *ATTRIBUTES]
    dev_pred = np.array([[float(v) for v in r[1:]] for r in rows])
    _, y_dev = labels["Development"]
    for a, attr in enumerate(ATTRIBUTES):
        fit = weights["attributes"][attr]
        # The CSV's 6 decimals move each prediction by <= written(6, 7); the search's CCC is
        # the float32 one from moments.
        bound = fit_bound(run, attr, fit["weights"])
        bound += ccc_perturbed(y_dev[:, a], dev_pred[:, a], 0.0, written(6, 7.0))
        got = ccc_np(y_dev[:, a], dev_pred[:, a])
        assert_within(got, fit["dev_ccc"], bound, f"{attr}: CCC of Development.csv")
        wrong = ccc_np(y_dev[:, a], dev_pred[:, (a + 1) % 3])
        assert_exceeds(wrong, fit["dev_ccc"], bound, f"{attr}: another attribute's column")

    png = (out / "dev_ccc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_cli_ensemble_free_weights_and_errors(tmp_path):
    run, _ = make_run(tmp_path, n_dev=120, n_test=20)
    r = CliRunner().invoke(cli, ["ensemble", str(run), "--free-weights", "--set", "chunk=4096"])
    assert r.exit_code == 0, r.output
    weights = json.loads((run / "ensemble" / "weights.json").read_text())
    assert weights["mode"] == "free"
    assert weights["config"]["fine_radius"] == 0.05  # from the manifest's config
    assert weights["config"]["chunk"] == 4096

    r = CliRunner().invoke(cli, ["ensemble", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "manifest.json: not found" in r.output
    assert len(r.output.strip().splitlines()) == 1

    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    r = CliRunner().invoke(cli, ["ensemble", str(run)])
    assert (
        r.exit_code == 1
        and "manifest.json: the run is not finished; run `ifmvse train --out" in r.output
    )
    (run / "manifest.json").write_text(json.dumps(manifest))

    (run / "scores" / "Development.npz").unlink()
    r = CliRunner().invoke(cli, ["ensemble", str(run)])
    assert r.exit_code == 1 and "Development.npz: development scores not found" in r.output

    (run / "scores" / "Development.npz").write_bytes(b"not a zip")
    with pytest.raises(EnsembleError, match="Development.npz: cannot read"):
        run_ensemble(run, EnsembleConfig())


def test_combine_renormalises_then_best_set_then_train_mean():
    names = ["S1", "S2", "S3"]
    rng = np.random.default_rng(7)
    s = rng.uniform(2, 6, (3, 4, 3))  # (K, N, 3)
    s[0, 1] = np.nan  # row 1: no S1
    s[1:, 2] = np.nan  # row 2: only S1, which has weight 0
    s[:, 3] = np.nan  # row 3: nothing
    w = {a: {"S1": 0.0, "S2": 0.6, "S3": 0.4} for a in ATTRIBUTES}
    w["arousal"] = {"S1": 0.5, "S2": 0.3, "S3": 0.2}
    mean = dict(zip(ATTRIBUTES, [3.0, 4.0, 5.0], strict=True))
    ccc = {a: {"S1": 0.2, "S2": 0.5, "S3": 0.4} for a in ATTRIBUTES}
    got = combine(s, w, names, mean, ccc)
    full = apply_weights(s, w, names)
    # Complete rows: the ensemble itself, the same float64 dot product over other columns (BLAS
    # may order it differently: 2 gamma_K of sum |w s|); the sets' plain mean is outside.
    mags = np.stack([sum(abs(w[a][nm]) * np.abs(s[j, 0, i]) for j, nm in enumerate(names))
                     for i, a in enumerate(ATTRIBUTES)])  # fmt: skip
    assert_within(got.pred[0], full[0], two_orders(3, mags, U64), "complete row vs apply_weights")
    assert_exceeds(s[:, 0].mean(0), full[0], two_orders(3, mags, U64), "unweighted")
    # Row 1, arousal: S2 and S3 weights scaled from 0.5 to the total 1.0. Both sides in float64:
    # two products, a sum, the rescaling (three more roundings here, one there): 2 gamma_4.
    want = (0.3 * s[1, 1, 0] + 0.2 * s[2, 1, 0]) / 0.5
    bound = two_orders(4, (0.3 * s[1, 1, 0] + 0.2 * s[2, 1, 0]) / 0.5, U64)
    assert_within(got.pred[1, 0], want, bound, "renormalised weights")
    assert_exceeds(0.3 * s[1, 1, 0] + 0.2 * s[2, 1, 0], want, bound, "weights not renormalised")
    np.testing.assert_array_equal(got.pred[1, 1:], full[1, 1:])  # S1 has no weight there
    np.testing.assert_array_equal(got.pred[2, 1:], s[0, 2, 1:])  # only S1 left: best available
    assert got.pred[2, 0] == s[0, 2, 0]  # arousal renormalises onto S1 alone (x 0.5 x 2: exact)
    np.testing.assert_array_equal(got.pred[3], [3.0, 4.0, 5.0])
    assert got.used[0] == "" and got.used[3] == "Train label mean"
    assert got.used[1] == "arousal: S2+S3 (weights renormalised)"
    assert "S1 (best available set on development)" in got.used[2]
    assert got.kinds == {"renormalised": 1, "best_set": 1, "label_mean": 1}


def test_run_ensemble_keeps_every_row_and_lists_fallbacks(tmp_path):
    run, _ = make_run(tmp_path, n_dev=120, n_test=10)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["train_label_mean"] = {"arousal": 3.5, "valence": 4.5, "dominance": 5.5}
    (run / "manifest.json").write_text(json.dumps(manifest))
    rng = np.random.default_rng(1)
    n = 5
    s = rng.uniform(2, 6, (5, n, 3)).astype(np.float32)
    s[:, 2] = np.nan  # a failed decode: no score at all
    s[3, 4] = np.nan  # no S4 (the heaviest set)
    files = [f"MSP-PODCAST_test3_{i:04d}.wav" for i in (3, 1, 4, 0, 2)]  # not in name order
    missing = ["", "", "no v features (corrupt audio)", "", "no w features (not extracted)"]
    np.savez(
        run / "scores" / "Test3.npz",
        ids=np.array([f[:-4] for f in files]),
        files=np.array(files),
        missing=np.array(missing),
        scores=s,
        labels=np.full((n, 3), np.nan, np.float32),
        score_sets=np.array(NAMES),
        attributes=np.array(ATTRIBUTES),
    )
    r = CliRunner().invoke(cli, ["ensemble", str(run)])
    assert r.exit_code == 0, r.output
    assert "Test3: 5 rows, 2 fallback(s) (1 renormalised weights" in r.output
    assert "1 Train label mean" in r.output
    header, rows = read_csv(run / "ensemble" / "submission_Test3.csv")
    assert [row[0] for row in rows] == sorted(files)  # every file once, official name, in order
    by_name = {row[0]: [float(v) for v in row[1:]] for row in rows}
    assert by_name["MSP-PODCAST_test3_0004.wav"] == [3.5, 4.5, 5.5]
    assert all(1 <= v <= 7 for vals in by_name.values() for v in vals)
    header, fb = read_csv(run / "ensemble" / "fallbacks_Test3.csv")
    assert header == ["FileName", "reason", "used"]
    assert fb == [
        ["MSP-PODCAST_test3_0002.wav", "no w features (not extracted)", fb[0][2]],
        ["MSP-PODCAST_test3_0004.wav", "no v features (corrupt audio)", "Train label mean"],
    ]
    assert "weights renormalised" in fb[0][2] and "S4" not in fb[0][2]
    weights = json.loads((run / "ensemble" / "weights.json").read_text())
    assert weights["fallbacks"]["Test3"]["rows"] == 2
    assert weights["fallbacks"]["Test1"]["rows"] == 0


def test_rows_without_scores_need_the_train_label_mean(tmp_path):
    run, _ = make_run(tmp_path, n_dev=60, n_test=10)
    with np.load(run / "scores" / "Test1.npz") as z:
        data = {k: z[k] for k in z.files}
    data["scores"][:, 0] = np.nan
    np.savez(run / "scores" / "Test1.npz", **data)
    with pytest.raises(EnsembleError, match="no train_label_mean"):
        run_ensemble(run, EnsembleConfig(fine_radius=0.05))


def _edit_dev(run, edit):
    path = run / "scores" / "Development.npz"
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    edit(data)
    np.savez(path, **data)


def test_attribute_without_weights_takes_the_best_set_per_row(tmp_path):
    """Dominance: S1 and S2..S5 scored on disjoint Development rows, so no common rows and no
    weights; every Test1 row takes the best set it has (S4, else the next) instead of an empty
    submission cell, and the fallbacks file and summary say so."""
    run, labels = make_run(tmp_path, n_dev=120, n_test=10)

    def disjoint(d):
        d["scores"][0, 60:, 2] = np.nan
        d["scores"][1:, :60, 2] = np.nan

    _edit_dev(run, disjoint)
    test = run / "scores" / "Test1.npz"
    with np.load(test) as z:
        data = {k: z[k] for k in z.files}
    data["scores"][3, 0] = np.nan  # row 0 has no S4 at all
    np.savez(test, **data)
    r = CliRunner().invoke(cli, ["ensemble", str(run)])
    assert r.exit_code == 0, r.output
    assert "dominance has no ensemble weights (0 usable Development rows)" in r.stderr
    w = json.loads((run / "ensemble" / "weights.json").read_text())
    fit = w["attributes"]["dominance"]
    assert fit["weights"] is None and w["unweighted"] == ["dominance"]
    per = fit["dev_ccc_per_set"]
    assert max((v, k) for k, v in per.items() if v is not None)[1] == "S4"
    second = max((v, k) for k, v in per.items() if v is not None and k != "S4")[1]
    _, rows = read_csv(run / "ensemble" / "submission_Test1.csv")
    assert len(rows) == 10 and all(v != "" for row in rows for v in row)
    dom = {row[0]: float(row[3]) for row in rows}
    s = data["scores"].astype(np.float64)
    k2 = NAMES.index(second)
    for i, name in enumerate(data["ids"]):
        want = s[k2, i, 2] if i == 0 else s[3, i, 2]
        assert_within(dom[str(name)], np.clip(want, 1, 7), written(6, 7.0), f"{name} written")
    _, fb = read_csv(run / "ensemble" / "fallbacks_Test1.csv")
    assert len(fb) == 10
    by = {row[0]: row for row in fb}
    assert "no ensemble weights for dominance" in by[str(data["ids"][1])][1]
    assert (
        by[str(data["ids"][1])][2] == "dominance: S4 (no ensemble weights; best set on development)"
    )
    assert f"dominance: {second} (no ensemble weights" in by[str(data["ids"][0])][2]
    assert w["fallbacks"]["Test1"]["best_set"] == 10


def test_attribute_without_dev_labels_takes_the_train_label_mean(tmp_path):
    """Dominance has one labelled Development row: no weights and no set CCC, so the Train label
    mean fills its column; without a recorded mean the ensemble refuses instead of empty cells."""
    run, _ = make_run(tmp_path, n_dev=60, n_test=10)
    _edit_dev(run, lambda d: d["labels"][1:, 2].__setitem__(..., np.nan))
    with pytest.raises(EnsembleError, match="no train_label_mean"):
        run_ensemble(run, EnsembleConfig(fine_radius=0.05))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["train_label_mean"] = {"arousal": 3.5, "valence": 4.5, "dominance": 5.5}
    (run / "manifest.json").write_text(json.dumps(manifest))
    summary = run_ensemble(run, EnsembleConfig(fine_radius=0.05))
    assert summary["attributes"]["dominance"]["n_dev"] == 1
    _, rows = read_csv(run / "ensemble" / "submission_Test1.csv")
    assert [float(row[3]) for row in rows] == [5.5] * 10
    assert all(float(row[1]) != 3.5 for row in rows)  # arousal is still the ensemble
    _, fb = read_csv(run / "ensemble" / "fallbacks_Test1.csv")
    assert len(fb) == 10 and all(row[2] == "dominance: Train label mean" for row in fb)
    assert summary["fallbacks"]["Test1"]["label_mean"] == 10
