"""`ifmvse evaluate` on task 1 submissions: macro-F1 and its tables, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from tolerances import U64, assert_exceeds, assert_within, f1_orders

from jax_ifmvse.categories import CLASS_CODES
from jax_ifmvse.cli import cli

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _write(tmp_path, n=60, seed=0):
    rng = np.random.default_rng(seed)
    truth = list(rng.choice(list(CLASS_CODES) + ["X", "O"], n))
    pred = [
        t if t in CLASS_CODES and rng.random() < 0.6 else rng.choice(CLASS_CODES) for t in truth
    ]
    labels = tmp_path / "labels.csv"
    rows = [f"f{i}.wav,{t},4,4,4,Test1" for i, t in enumerate(truth)] + ["g0.wav,A,4,4,4,Train"]
    labels.write_text("FileName,EmoClass,EmoAct,EmoVal,EmoDom,Split_Set\n" + "\n".join(rows) + "\n")
    sub = tmp_path / "sub.csv"
    sub.write_text("FileName,EmoClass\n" + "".join(f"f{i}.wav,{p}\n" for i, p in enumerate(pred)))
    return labels, sub, truth, pred


def _run(*args):
    return CliRunner().invoke(cli, ["evaluate", *map(str, args)])


def test_category_submission_scores_like_sklearn(tmp_path):
    labels, sub, truth, pred = _write(tmp_path)
    res = _run(sub, "--labels", labels, "--split", "Test1", "--json", "--bootstrap", "200")
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    keep = [i for i, t in enumerate(truth) if t in CLASS_CODES]  # X and O are not scored
    t = [truth[i] for i in keep]
    p = [pred[i] for i in keep]
    # The same counts in float64 (`f1_orders`); accuracy: one division each, within 2 u.
    want = sklearn_metrics.f1_score(t, p, average="macro")
    assert_within(got["macro_f1"], want, f1_orders(len(CLASS_CODES)), "macro-F1 vs sklearn")
    assert_exceeds(sklearn_metrics.f1_score(t, p, average="micro"), want,
                   f1_orders(len(CLASS_CODES)), "micro-F1")  # fmt: skip
    assert_within(got["accuracy"], sklearn_metrics.accuracy_score(t, p), 2 * U64, "accuracy")
    assert got["n"] == len(keep) and got["n_unscored"] == len(truth) - len(keep)
    cm = sklearn_metrics.confusion_matrix(t, p, labels=list(CLASS_CODES))
    assert got["confusion"] == cm.tolist()
    table = _run(sub, "--labels", labels, "--split", "Test1", "--bootstrap", "50")
    assert table.exit_code == 0 and "macro-F1" in table.output and "Neutral" in table.output


@pytest.mark.parametrize(
    "edit,msg",
    [
        (lambda rows: rows[:-1], "missing"),  # a file of the split left out
        (lambda rows: rows + [rows[-1]], "duplicate FileName"),
        (
            lambda rows: [rows[0].replace(rows[0].split(",")[1], "Q"), *rows[1:]],
            "'Q' is not one of",
        ),
        (lambda rows: rows + ["g0.wav,A"], "extra id"),  # another split's file
    ],
)
def test_category_submission_errors_are_one_line(tmp_path, edit, msg):
    labels, sub, _, _ = _write(tmp_path)
    head, *rows = sub.read_text().splitlines()
    sub.write_text("\n".join([head, *edit(rows)]) + "\n")
    res = _run(sub, "--labels", labels, "--split", "Test1")
    assert res.exit_code != 0
    assert msg in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
