"""`ifmvse evaluate`: submission and labels CSVs, id alignment, CCC with bootstrap intervals."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from tolerances import U64, assert_exceeds, assert_within, ccc, ccc_perturbed, written

from jax_ifmvse.cli import cli
from jax_ifmvse.config import ATTRIBUTES
from jax_ifmvse.ensemble.run import write_submission
from jax_ifmvse.evaluate import (
    EvaluateError,
    bootstrap_cccs,
    evaluate_files,
    read_submission,
)
from jax_ifmvse.metrics import bootstrap_ccc, ccc_np

CENTERS = np.array([2.5, 4.0, 5.5])  # arousal, valence, dominance differ: catches column swaps


def make_case(tmp_path, n: int = 200, seed: int = 0):
    """Labels CSV with Development and Train rows, and predictions (N, 3) for Development."""
    rng = np.random.default_rng(seed)
    y = CENTERS + rng.normal(0, 0.8, (n, 3))
    pred = y + rng.normal(0, [0.3, 0.6, 0.9], (n, 3))  # three distinct CCCs
    ids = [f"MSP-PODCAST_0001_{i:04d}" for i in range(n)]
    labels = tmp_path / "labels_consensus.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Split_Set"])
        for i, row in zip(ids, y, strict=True):
            w.writerow([i + ".wav", "N", *row, "7", "Development"])
        for j in range(10):
            w.writerow([f"MSP-PODCAST_0009_{j:04d}.wav", "N", 4, 4, 4, "9", "Train"])
    return labels, ids, y, pred


def csv_ccc_bound(y, pred) -> np.ndarray:
    """(3,) bound on the CCC of predictions written with 6 decimals (each value off by at most
    `written(6, 7)`) vs the CCC of the values themselves, both in float64 (another order)."""
    d = written(6, 7.0)
    return np.array(
        [ccc_perturbed(y[:, a], pred[:, a], 0.0, d) + ccc(len(y), u=U64) for a in range(3)]
    )


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_submission_round_trips_through_evaluate(tmp_path):
    labels, ids, y, pred = make_case(tmp_path)
    sub = tmp_path / "submission.csv"
    write_submission(sub, np.array(ids), pred)
    result = evaluate_files(sub, labels, "Development", n_boot=200)
    assert result["n"] == len(ids)
    direct = [float(ccc_np(y[:, a], np.clip(pred[:, a], 1, 7))) for a in range(3)]
    got = [result["attributes"][a]["ccc"] for a in ("arousal", "valence", "dominance")]
    bound = csv_ccc_bound(y, np.clip(pred, 1, 7))  # 6 decimals in the CSV
    assert_within(got, direct, bound, "CCC of the CSV")
    unclipped = [float(ccc_np(y[:, a], pred[:, a])) for a in range(3)]
    assert_exceeds(unclipped, direct, bound, "predictions not clipped to 1..7")
    assert got[0] > got[1] > got[2]  # the noise levels differ, so the order is meaningful
    assert_within(result["mean"]["ccc"], np.mean(direct), bound.max(), "mean CCC of the CSV")
    for v in [*result["attributes"].values(), result["mean"]]:
        assert v["low"] <= v["ccc"] <= v["high"] and v["high"] - v["low"] > 0


def test_column_order_is_by_name_not_position(tmp_path):
    labels, ids, y, pred = make_case(tmp_path)
    pred = np.clip(pred, 1, 7)  # as write_submission does, so both files hold the same values
    # Columns in a different order in the file: read back into arousal, valence, dominance.
    rows = [
        [f"{p[2]:.6f}", i, f"{p[0]:.6f}", f"{p[1]:.6f}"] for i, p in zip(ids, pred, strict=True)
    ]
    shuffled = write_csv(
        tmp_path / "shuffled.csv", ["EmoDom", "FileName", "EmoAct", "EmoVal"], rows
    )
    _, read = read_submission(shuffled)
    assert_within(read, pred, written(6, 7.0), "values read back")
    assert_exceeds(read[:, [2, 0, 1]], pred, written(6, 7.0), "columns by position")
    # A model emitting arousal, dominance, valence written positionally scores badly on both.
    swapped = tmp_path / "swapped.csv"
    write_submission(swapped, np.array(ids), pred[:, [0, 2, 1]])
    good = evaluate_files(shuffled, labels, "Development", n_boot=50)["attributes"]
    bad = evaluate_files(swapped, labels, "Development", n_boot=50)["attributes"]
    assert good["valence"]["ccc"] > 0.5 and good["dominance"]["ccc"] > 0.3
    assert bad["valence"]["ccc"] < 0.2 and bad["dominance"]["ccc"] < 0.2
    # The same written arousal strings in both files: two float64 orders of one CCC at most.
    assert_within(bad["arousal"]["ccc"], good["arousal"]["ccc"], ccc(len(ids), u=U64), "arousal")


def test_missing_and_extra_ids_are_listed(tmp_path):
    labels, ids, _, pred = make_case(tmp_path)
    sub = tmp_path / "sub.csv"
    keep = list(range(3, len(ids)))  # drop the first three
    ids2 = [ids[i] for i in keep] + ["MSP-PODCAST_9999_0000", "MSP-PODCAST_9999_0001"]
    write_submission(sub, np.array(ids2), np.concatenate([pred[keep], pred[:2]]))
    with pytest.raises(EvaluateError) as e:
        evaluate_files(sub, labels, "Development")
    msg = str(e.value)
    assert "\n" not in msg and str(sub) in msg
    assert "3 labelled id(s) missing" in msg and "MSP-PODCAST_0001_0000" in msg
    assert "2 extra id(s)" in msg and "MSP-PODCAST_9999_0001" in msg
    assert f"({len(ids2)} predicted, {len(ids)} labelled)" in msg


def test_bad_files_give_one_line_errors(tmp_path):
    labels, ids, _, pred = make_case(tmp_path, n=20)
    cases = {
        "no_col.csv": (["FileName", "EmoAct", "EmoVal"], [[ids[0], 1, 2]], "missing column"),
        "text.csv": (
            ["FileName", "EmoAct", "EmoVal", "EmoDom"],
            [[ids[0], 1, "high", 3]],
            "line 2: EmoVal='high' is not a number",
        ),
        "dup.csv": (
            ["FileName", "EmoAct", "EmoVal", "EmoDom"],
            [[ids[0], 1, 2, 3], [ids[0] + ".wav", 1, 2, 3]],
            "1 duplicate FileName",
        ),
        "empty.csv": (["FileName", "EmoAct", "EmoVal", "EmoDom"], [], "no prediction rows"),
    }
    for name, (header, rows, reason) in cases.items():
        path = write_csv(tmp_path / name, header, rows)
        with pytest.raises(EvaluateError, match=reason) as e:
            evaluate_files(path, labels, "Development")
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    sub = tmp_path / "ok.csv"
    write_submission(sub, np.array(ids), pred)
    with pytest.raises(EvaluateError, match=r"no rows with Split_Set='Test2' \(have: "):
        evaluate_files(sub, labels, "Test2")
    with pytest.raises(EvaluateError, match="file not found"):
        evaluate_files(tmp_path / "absent.csv", labels, "Development")


def test_chunked_bootstrap_matches_metrics_bootstrap():
    rng = np.random.default_rng(1)
    t = rng.normal(size=(150, 3))
    p = t + rng.normal(size=(150, 3))
    samples = bootstrap_cccs(t, p, n=300, seed=7, chunk=23)
    # The same resamples, their float64 CCC sums over another array layout: each sample within
    # `ccc(150, u=U64)` (means near 0: offset under the default 3), so each order statistic too;
    # the quantile's interpolation adds ~4 u.
    bound = ccc(150, u=U64) + 4 * U64
    for a in range(3):
        _, lo, hi = bootstrap_ccc(t[:, a], p[:, a], n=300, seed=7)
        got = np.quantile(samples[:, a], [0.025, 0.975])
        assert_within(got, [lo, hi], bound, "chunked bootstrap interval")
        assert_exceeds(np.quantile(samples[:, a], [0.05, 0.95]), [lo, hi], bound, "90 %")


def test_cli_evaluate_json_table_and_error(tmp_path):
    labels, ids, y, pred = make_case(tmp_path, n=80)
    sub = tmp_path / "sub.csv"
    write_submission(sub, np.array(ids), pred)
    args = ["evaluate", str(sub), "--labels", str(labels), "--split", "Development"]
    r = CliRunner().invoke(cli, [*args, "--json", "--bootstrap", "100"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    cccs = [out["attributes"][a]["ccc"] for a in ("arousal", "valence", "dominance")]
    assert out["mean"]["ccc"] == np.mean(cccs)  # the same values, mean, JSON round trip
    want = float(ccc_np(y[:, 0], np.clip(pred[:, 0], 1, 7)))
    assert_within(cccs[0], want, csv_ccc_bound(y, np.clip(pred, 1, 7))[0], "CLI JSON arousal CCC")
    r = CliRunner().invoke(cli, [*args, "--bootstrap", "100"])
    assert r.exit_code == 0 and "arousal" in r.output and "mean" in r.output
    r = CliRunner().invoke(cli, ["evaluate", str(sub), "--labels", str(labels), "--split", "X"])
    assert r.exit_code == 1 and r.output.startswith("Error: ")
    assert len(r.output.strip().splitlines()) == 1


def test_an_empty_attribute_column_is_a_one_line_error_not_a_two_attribute_mean(tmp_path):
    labels, ids, _, pred = make_case(tmp_path, n=20)
    rows = [[i, f"{p[0]:.3f}", f"{p[1]:.3f}", ""] for i, p in zip(ids, pred, strict=True)]
    path = write_csv(tmp_path / "no_dom.csv", ["FileName", "EmoAct", "EmoVal", "EmoDom"], rows)
    with pytest.raises(EvaluateError, match="column EmoDom is empty") as e:
        evaluate_files(path, labels, "Development")
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    rows[4][3] = "5.0"
    write_csv(path, ["FileName", "EmoAct", "EmoVal", "EmoDom"], rows)
    with pytest.raises(EvaluateError, match="line 2: EmoDom is empty"):
        evaluate_files(path, labels, "Development")
    r = CliRunner().invoke(cli, ["evaluate", str(path), "--labels", str(labels)])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["predict", "ensemble"])
def test_predict_and_ensemble_csvs_score_like_the_submission(tmp_path, kind):
    labels, ids, y, pred = make_case(tmp_path, n=60)
    pred = np.clip(pred, 1, 7)
    sub = tmp_path / "sub.csv"
    write_submission(sub, np.array(ids), pred)
    if kind == "predict":  # `ifmvse predict --out`: file paths, attribute names, fallback column
        header = ["file", "arousal", "valence", "dominance", "fallback"]
        rows = [[f"/data/Audios/{i}.wav", *p, ""] for i, p in zip(ids, pred, strict=True)]
    else:  # RUN/ensemble/<split>.csv
        header = ["FileName", "arousal", "valence", "dominance"]
        rows = [[f"{i}.wav", *p] for i, p in zip(ids, pred, strict=True)]
    other = write_csv(tmp_path / f"{kind}.csv", header, rows[::-1])
    a = evaluate_files(sub, labels, "Development", n_boot=50)
    b = evaluate_files(other, labels, "Development", n_boot=50)
    # `other` holds the full-precision values, `sub` the 6-decimal ones: both CSVs' CCCs lie
    # within the written bound of the values' CCC (+ float64 orders).
    bound = csv_ccc_bound(y, pred)
    direct = ccc_np(y, pred, axis=0)
    got_a = [a["attributes"][attr]["ccc"] for attr in ATTRIBUTES]
    got_b = [b["attributes"][attr]["ccc"] for attr in ATTRIBUTES]
    assert_within(got_a, direct, bound, f"{kind}: submission CCC")
    assert_within(got_b, direct, bound, f"{kind}: CSV CCC")
    assert_within(b["mean"]["ccc"], float(np.mean(direct)), bound.max(), f"{kind}: mean CCC")
    assert_exceeds(got_b, direct[[1, 2, 0]], bound, f"{kind}: columns shifted")
