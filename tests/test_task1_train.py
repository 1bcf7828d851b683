"""Task 1 training: categorical and joint score sets, class-balanced sampling, one seam."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import (
    U32,
    assert_exceeds,
    assert_within,
    f1_orders,
    heads_rounding,
    probability_sum,
    two_orders,
    weights_sum,
)
from toy_store import write_toy_store

from jax_ifmvse.categories import CLASS_CODES, class_index
from jax_ifmvse.config import ATTRIBUTES, load_config

N_TRAIN, N_DEV, N_TEST = 640, 160, 48


def make_store(path: Path, seed: int = 0) -> np.ndarray:
    """Class = 4 [a0 > 0] + 2 [a1 > 0] + [b0 > 0]: each view alone knows only half of it.

    Rows 0, 1 of Train are coded X and O (kept for task 2, never trained on as a class).
    Returns the class codes.
    """
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_DEV + N_TEST
    a = rng.normal(size=(n, 8)).astype(np.float32)
    b = rng.normal(size=(n, 8)).astype(np.float32)
    cls = 4 * (a[:, 0] > 0) + 2 * (a[:, 1] > 0) + (b[:, 0] > 0)
    codes = np.asarray(CLASS_CODES)[cls].astype(object)
    codes[0], codes[1] = "X", "O"
    gender = np.where(b[:, 1] > 0, "Female", "Male").astype(object)
    y = (4 + 2 * np.tanh(np.stack([a[:, 2], b[:, 2], a[:, 3] + b[:, 3]], 1))).astype(np.float32)
    splits = ["Train"] * N_TRAIN + ["Development"] * N_DEV + ["Test1"] * N_TEST
    write_toy_store(path, splits, y, {"a": a, "b": b}, {"EmoClass": codes, "Gender": gender})
    return codes


SETS = (
    "[{name: F, kind: fusion, views: [a, b]}, {name: A, kind: mlp, views: [a]},"
    " {name: B, kind: mlp, views: [b]}]"
)


def small_cfg(*extra):
    return load_config(
        None,
        [
            "model.common_dim=16",
            "model.hidden=32",
            "model.dropout=0.1",
            f"model.score_sets={SETS}",
            "train.learning_rate=1e-2",
            "train.batch_size=64",
            "train.epochs=25",
            "train.test_splits=[Test1]",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    p = tmp_path_factory.mktemp("store") / "store.h5"
    make_store(p)
    return p


@pytest.fixture(scope="module")
def category_run(store, tmp_path_factory):
    from jax_ifmvse.train import train_run

    out = tmp_path_factory.mktemp("run") / "RUN"
    return out, train_run(store, small_cfg("train.tasks=[category]"), out)


def test_fusion_learns_the_class_that_single_views_cannot(category_run):
    out, manifest = category_run
    best = {s: manifest["best"][s]["category"]["dev_macro_f1"] for s in ("F", "A", "B")}
    assert best["F"] > 0.8, best
    assert best["A"] < 0.6 and best["B"] < 0.6, best
    assert manifest["tasks"] == ["category"] and manifest["classes"] == list(CLASS_CODES)
    with np.load(out / "scores" / "Development.npz") as z:
        probs, classes = z["probs"], z["classes"]
        assert probs.shape == (3, N_DEV, 8) and np.isnan(z["scores"]).all()
    assert_within(
        probs.sum(-1), np.ones(probs.shape[:2]), probability_sum(8), "stored probabilities sum to 1"
    )
    assert_exceeds(
        probs[..., :-1].sum(-1), np.ones(probs.shape[:2]), probability_sum(8), "a class left out"
    )
    # The stored probabilities are the selected epoch's: their macro-F1 is the recorded one.
    from jax_ifmvse.metrics import macro_f1

    y = class_index(classes)
    assert macro_f1(y, probs[0].argmax(-1), 8) == best["F"]  # the same counts, the same code
    hist = [json.loads(line) for line in (out / "F" / "category" / "metrics.jsonl").open()]
    assert max(h["dev_macro_f1"] for h in hist) == best["F"]  # the number itself, via JSON
    assert (out / "F" / "category" / "confusion.png").stat().st_size > 0


def test_joint_model_with_gender_fills_both_tasks(store, tmp_path):
    from jax_ifmvse.train import train_run

    cfg = small_cfg(
        "train.tasks=[attributes, category, gender]",
        "train.epochs=3",
        "model.score_sets=[{name: F, kind: fusion, views: [a, b]}]",
    )
    manifest = train_run(store, cfg, tmp_path / "RUN")
    best = manifest["best"]["F"]
    assert set(best) == {"arousal", "valence", "dominance", "category"}
    assert {v["model"] for v in best.values()} == {"joint"}
    hist = [json.loads(line) for line in (tmp_path / "RUN/F/joint/metrics.jsonl").open()]
    h = hist[-1]
    for k in ("loss_attributes", "loss_category", "loss_gender", "dev_ccc", "dev_macro_f1"):
        assert np.isfinite(h[k]), k
    # The loss is the configured weighted sum (epoch means of each part; the weights are linear).
    # Per step loss = parts' weighted sum (3 terms, 0.1 rounded), then each an epoch mean of
    # N_TRAIN / 64 steps in float32: two orders of a sum of steps + 4 terms of positive parts.
    want = h["loss_attributes"] + h["loss_category"] + 0.1 * h["loss_gender"]
    bound = two_orders(N_TRAIN // 64 + 4, want)
    assert_within(h["train_loss"], want, bound, "train loss = weighted parts")
    wrong = h["loss_attributes"] + h["loss_category"] + h["loss_gender"]
    assert_exceeds(h["train_loss"], wrong, bound, "gender weighted 1, not 0.1")
    assert h["dev_score"] == (h["dev_ccc"] + h["dev_macro_f1"]) / 2  # float64, the same op
    with np.load(tmp_path / "RUN/scores/Test1.npz") as z:
        assert np.isfinite(z["scores"]).all() and np.isfinite(z["probs"]).all()
    # One joint model per score set, an ensemble and a submission per task.
    from jax_ifmvse.ensemble.run import run_ensemble

    summary = run_ensemble(tmp_path / "RUN", cfg.ensemble)
    assert set(summary["attributes"]) == {"arousal", "valence", "dominance"}
    assert summary["category"]["weights"] == {"F": 1.0}
    for name in ("submission_Test1.csv", "submission_cat_Test1.csv"):
        assert len((tmp_path / "RUN/ensemble" / name).read_text().splitlines()) == N_TEST + 1


def test_a_store_without_classes_refuses_category_training_before_writing(tmp_path):
    from jax_ifmvse.train import TrainError, train_run

    p = tmp_path / "old.h5"
    rng = np.random.default_rng(0)
    write_toy_store(
        p,
        ["Train"] * 8 + ["Development"] * 4,
        rng.uniform(1, 7, (12, 3)),
        {"a": rng.normal(size=(12, 4)), "b": rng.normal(size=(12, 4))},
    )
    with pytest.raises(TrainError, match="store upgrade") as e:
        train_run(p, small_cfg("train.tasks=[category]"), tmp_path / "RUN")
    assert "\n" not in str(e.value) and not (tmp_path / "RUN").exists()


@pytest.mark.parametrize(
    "tasks,err", [("[gender]", "auxiliary"), ("[category, category]", "distinct")]
)
def test_bad_task_lists_are_one_line_errors(tasks, err):
    from jax_ifmvse.config import ConfigError

    with pytest.raises(ConfigError, match=err):  # rules between settings: checked at load
        small_cfg(f"train.tasks={tasks}")
    with pytest.raises(ConfigError, match="expected one of attributes, category, gender"):
        small_cfg("train.tasks=[colour]")  # checked as the config loads


def test_balanced_sampling_draws_each_class_equally_over_an_epoch():
    from jax_ifmvse.train import balanced_order, balanced_rows, epoch_batches

    rng = np.random.default_rng(0)
    y = rng.choice(8, size=500, p=[0.4, 0.2, 0.1, 0.1, 0.08, 0.06, 0.04, 0.02]).astype(np.int32)
    y[:20] = -1  # X / O rows: never drawn
    y[y == 5] = 6  # one class absent altogether
    rows = balanced_rows(y)
    m = min(len(r) for r in rows)
    key = jax.random.key(7)
    draws = []

    @jax.jit
    def batches(epoch):
        order = lambda k, e: balanced_order(k, e, rows)  # noqa: E731
        return epoch_batches(key, epoch, m * len(rows), 32, order=order)

    for epoch in range(3):
        idx, w = batches(jnp.int32(epoch))
        drawn = np.asarray(idx)[np.asarray(w) > 0]
        counts = np.bincount(y[drawn], minlength=8)
        assert len(drawn) == m * 7 and len(set(drawn.tolist())) == len(drawn)  # no repeats
        np.testing.assert_array_equal(counts[[0, 1, 2, 3, 4, 6, 7]], m)
        assert counts[5] == 0 and (y[drawn] >= 0).all()
        draws.append(set(drawn.tolist()))
    assert draws[0] != draws[1]  # redrawn every epoch from fold_in(key, epoch)
    again = np.asarray(balanced_order(key, jnp.int32(1), rows))
    assert set(again.tolist()) == draws[1]


def test_balanced_sampler_trains_and_needs_the_category_task(store, tmp_path):
    from jax_ifmvse.config import ConfigError
    from jax_ifmvse.train import train_run

    one = "model.score_sets=[{name: F, kind: fusion, views: [a, b]}]"
    m = train_run(
        store,
        small_cfg("train.tasks=[category]", "train.sampler=balanced", "train.epochs=2", one),
        tmp_path / "RUN",
    )
    hist = [json.loads(line) for line in (tmp_path / "RUN/F/category/metrics.jsonl").open()]
    # 640 rows, rarest class of the two coded X/O drops: each epoch is m * 8 rows in batches of 64.
    assert m["best"]["F"]["category"]["dev_macro_f1"] > 0.2
    assert hist[0]["step"] < N_TRAIN // 64 + 1
    with pytest.raises(ConfigError, match="balanced needs the category"):
        small_cfg("train.sampler=balanced", one)  # at load: before any RUN/ exists


def test_category_ensemble_writes_a_submission_with_every_file(category_run):
    from click.testing import CliRunner

    from jax_ifmvse.cli import cli
    from jax_ifmvse.config import EnsembleConfig
    from jax_ifmvse.ensemble.run import run_ensemble

    out, manifest = category_run
    summary = run_ensemble(out, EnsembleConfig())
    cat = summary["category"]
    assert summary["attributes"] == {}  # a task 1 run makes no attribute submission
    assert not (out / "ensemble" / "submission_Test1.csv").exists()
    # Macro-F1 is a function of integer counts: the search's (float32) and the written
    # submission's (float64) argmax agree, so the two differ by F1's roundings only; each set's
    # one-hot weight is on the grid (its argmax unchanged), so the ensemble is at least the best
    # set's (float64) within the same bound (was a slack of 1e-9, under float32's rounding).
    b32 = f1_orders(8, U32)
    assert_within(cat["dev_macro_f1"], cat["dev_macro_f1_check"], b32, "search vs written F1")
    best_set = max(v for v in cat["dev_macro_f1_per_set"].values())
    assert cat["dev_macro_f1"] >= best_set - b32, (cat["dev_macro_f1"], best_set)
    w = list(cat["weights"].values())  # K grid weights i / n, written with 10 decimals
    assert_within(sum(w), 1.0, weights_sum(len(w)), "weights' sum")
    for split, n in (("Development", N_DEV), ("Test1", N_TEST)):
        with np.load(out / "scores" / f"{split}.npz") as z:
            files = sorted(str(f) for f in z["files"])
        sub = (out / "ensemble" / f"submission_cat_{split}.csv").read_text().splitlines()
        assert sub[0] == "FileName,EmoClass" and len(sub) == n + 1
        assert [r.split(",")[0] for r in sub[1:]] == files
        assert {r.split(",")[1] for r in sub[1:]} <= set(CLASS_CODES)
        probs = (out / "ensemble" / f"probabilities_cat_{split}.csv").read_text().splitlines()
        assert probs[0] == "FileName,Angry,Sad,Happy,Surprise,Fear,Disgust,Contempt,Neutral"
        rows = [list(map(float, r.split(",")[1:])) for r in probs[1:]]
        bound = probability_sum(8, decimals=6)  # each written with 6 decimals
        assert_within(
            np.sum(rows, 1), np.ones(len(rows)), bound, f"{split}: written probabilities sum to 1"
        )
        # The submitted class is the most probable one.
        assert [CLASS_CODES[int(np.argmax(r))] for r in rows] == [r.split(",")[1] for r in sub[1:]]
    # `ifmvse evaluate` recognises it and reports the macro-F1 the weight search found.
    with np.load(out / "scores" / "Development.npz") as z:
        files, classes = [str(f) for f in z["files"]], [str(c) for c in z["classes"]]
    labels = out / "labels.csv"
    labels.write_text(
        "FileName,EmoClass,Split_Set\n"
        + "".join(f"{f},{c},Development\n" for f, c in zip(files, classes, strict=True))
    )
    sub = out / "ensemble" / "submission_cat_Development.csv"
    res = CliRunner().invoke(
        cli, ["evaluate", str(sub), "--labels", str(labels), "--split", "Development", "--json"]
    )
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    # The submission's classes are the ensemble's argmax: F1 of the same counts (the search's
    # in float32).
    assert_within(got["macro_f1"], cat["dev_macro_f1"], f1_orders(8, U32), "evaluate vs search")
    assert_within(got["macro_f1"], cat["dev_macro_f1_check"], f1_orders(8), "evaluate vs written")
    assert got["macro_f1_interval"][0] <= got["macro_f1"] <= got["macro_f1_interval"][1]


@pytest.mark.parametrize("fused", [False, True])
def test_loaded_heads_give_the_stored_class_probabilities(category_run, store, fused):
    from featurestore import FeatureStore
    from jax_ifmvse.inference import load_heads

    out, _ = category_run
    split = FeatureStore(store).load("Development", ["a", "b"])
    heads = load_heads(out, fused=fused, with_probs=True)
    scores, probs = heads(split.features)
    bound = heads_rounding(lambda f: heads(f)[1], split.features)  # (K, N, 8)
    with np.load(out / "scores" / "Development.npz") as z:
        assert_within(probs, z["probs"], bound, "loaded heads vs stored probabilities")
        assert_exceeds(probs[:, ::-1], z["probs"], bound, "rows reversed")
    assert np.isnan(scores).all()  # a task 1 run has no attribute heads


@pytest.mark.slow
def test_predict_adds_the_class_and_its_probabilities_as_the_batch_path(tmp_path):
    """A joint run's `predict` answers carry category, its probability and all eight, equal to
    RUN/ensemble/probabilities_cat_<split>.csv of the same files."""
    pytest.importorskip("torch")
    import csv

    from tiny_run import build_tiny_run
    from tolerances import assert_exceeds, assert_within, batch_path_bound

    from jax_ifmvse.categories import CLASS_NAMES
    from jax_ifmvse.predict import open_predictor, write_predictions

    run, audio = build_tiny_run(tmp_path, extra=("train.tasks=[attributes, category]",))
    with open(run / "ensemble" / "probabilities_cat_Test1.csv") as f:
        batch = {r["FileName"]: [float(r[c]) for c in CLASS_NAMES] for r in csv.DictReader(f)}
    files = [audio / k for k in sorted(batch)]
    pred = open_predictor(run)  # what `predict_files` opens
    seen = []  # the heads' inputs (measured for the bound's magnitudes only)
    score = pred.score
    pred.score = lambda f: seen.append(f) or score(f)
    preds = [s.prediction for s in pred.predict_files(files)]
    bound = batch_path_bound(run, score, seen[0], "probs")[: len(files)]  # (N, 8)
    probs = [[p.probabilities[c] for c in CLASS_NAMES] for p in preds]
    assert_exceeds(probs[1], batch[sorted(batch)[0]], bound[0], "another file's probabilities")
    for p, k, b in zip(preds, sorted(batch), bound, strict=True):
        got = [p.probabilities[c] for c in CLASS_NAMES]
        assert_within(got, batch[k], b, f"class probabilities {k}")
        assert p.category == CLASS_CODES[int(np.argmax(got))]
        assert p.category_prob == max(got)  # the reported probability is the largest one
    out = tmp_path / "pred.csv"
    write_predictions(preds, out)
    from jax_ifmvse.predict import COLUMNS

    head = out.read_text().splitlines()[0].split(",")
    n = len(COLUMNS)
    assert head[n : n + 2] == ["category", "category_prob"] and head[n + 2 :] == list(CLASS_NAMES)
    row = preds[0].as_dict()  # the row `predict --out x.json` writes and `serve` answers
    assert row["category"] == preds[0].category and set(row["probabilities"]) == set(CLASS_NAMES)


@pytest.mark.slow
def test_a_task1_only_run_scores_no_attribute(tmp_path):
    """`predict` on a run with category heads only: the class and its probabilities, and no
    attribute values (empty cells, JSON null), never the ensemble's Train label mean."""
    pytest.importorskip("torch")
    import csv

    from tiny_run import build_tiny_run

    from jax_ifmvse.predict import predict_files, write_predictions

    run, audio = build_tiny_run(tmp_path, extra=("train.tasks=[category]",))
    with open(run / "ensemble" / "probabilities_cat_Test1.csv") as f:
        names = sorted(r["FileName"] for r in csv.DictReader(f))
    preds = predict_files([audio / k for k in names], run)
    for p in preds:
        assert p.values is None and p.fallback == "" and not p.failed, p
        assert p.category in CLASS_CODES and 0 < p.category_prob <= 1
        row = p.as_dict()
        assert [row[a] for a in ATTRIBUTES] == [None] * 3 and row["fallback"] == ""
    out = tmp_path / "pred.csv"
    write_predictions(preds, out)
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(names) and all(r[a] == "" for r in rows for a in ATTRIBUTES)


def test_train_command_prints_the_category_result(store, tmp_path):
    from click.testing import CliRunner

    from jax_ifmvse.cli import cli

    args = ["train", "--store", str(store), "--config", "paper", "--out", str(tmp_path / "R")]
    sets = ["model.common_dim=16", "model.hidden=16", "train.epochs=1", "train.tasks=[category]",
            "model.score_sets=[{name: A, kind: mlp, views: [a]}]"]  # fmt: skip
    res = CliRunner().invoke(cli, [*args, *(x for s in sets for x in ("--set", s))])
    assert res.exit_code == 0, res.output
    assert "A: category macro-F1 0." in res.output and "(epoch 1)" in res.output
