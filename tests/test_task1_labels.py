"""Task 1 labels in the store: EmoClass and Gender per row, kept through finalize, added later."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from tolerances import U32, U64, assert_exceeds, assert_within

from featurestore import FeatureStore, StoreError, StoreWriter, create_store, finalize, set_codes
from jax_ifmvse.categories import (
    CategoryError,
    add_store_codes,
    class_index,
    class_weights,
    gender_index,
    store_classes,
)
from jax_ifmvse.cli import cli

SPLITS = ["Development", "Train", "Test1", "Train", "Development", "Train"]
CODES = ["A", "X", "N", "", "O", "H"]
GENDERS = ["Male", "Female", None, "Unknown", "Female", "Male"]


def _store(path, codes=None):
    ids = [f"u{i}" for i in range(len(SPLITS))]
    create_store(
        path,
        ids=ids,
        splits=SPLITS,
        durations=np.ones(6),
        paths=ids,
        codes=codes,
        attrs={"corpus": str(path.parent / "corpus")},
    )
    return ids


def test_codes_are_stored_per_row_and_survive_finalize(tmp_path):
    path = tmp_path / "s.h5"
    _store(path, {"EmoClass": CODES, "Gender": GENDERS})
    # Rows are stored grouped by split: the API order must come back anyway.
    with StoreWriter(path, "b", dim=2) as w:
        w.write(np.arange(6), np.ones((6, 2)))
    finalize(path)
    s = FeatureStore(path)
    assert list(s.codes["EmoClass"]) == CODES
    assert list(s.codes["Gender"]) == ["Male", "Female", "", "Unknown", "Female", "Male"]
    np.testing.assert_array_equal(store_classes(s, np.arange(6)), [0, -1, 7, -1, -1, 2])
    # `ifmvse inspect` counts the codes per split.
    res = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
    classes = {k: v.get("classes") for k, v in json.loads(res.output)["splits"].items()}
    assert classes == {
        "Train": {"": 1, "H": 1, "X": 1},
        "Development": {"A": 1, "O": 1},
        "Test1": {"N": 1},
    }
    table = CliRunner().invoke(cli, ["inspect", str(path)])
    assert "EmoClass per split" in table.output and "Train empty=1 H=1 X=1" in table.output
    with pytest.raises(StoreError, match="unknown code label"):
        create_store(
            tmp_path / "t.h5",
            ids=["a"],
            splits=["Train"],
            durations=[1],
            paths=["a"],
            codes={"Emotion": ["A"]},
        )


def test_old_store_errors_in_one_line_then_upgrade_adds_the_labels(tmp_path):
    path = tmp_path / "s.h5"
    ids = _store(path)  # made "before task 1": no codes
    s = FeatureStore(path)
    with pytest.raises(CategoryError, match="ifmvse store upgrade") as e:
        store_classes(s, np.arange(6))
    assert "\n" not in str(e.value)
    # No label file at the recorded corpus root: a note, nothing written.
    res = CliRunner().invoke(cli, ["store", "upgrade", str(path)])
    assert res.exit_code == 0 and "pass --labels" in res.output
    assert "EmoClass" not in FeatureStore(path).codes
    # The MSP layout under the recorded root: found without --labels.
    lab = tmp_path / "corpus" / "Labels"
    lab.mkdir(parents=True)
    with open(lab / "labels_consensus.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "Gender", "Split_Set"])
        for i, c, g in zip(ids[:5], CODES, GENDERS, strict=False):  # u5 has no label row
            w.writerow([f"{i}.wav", c, 4, 4, 4, g or "", SPLITS[int(i[1:])]])
    res = CliRunner().invoke(cli, ["store", "upgrade", str(path)])
    assert res.exit_code == 0, res.output
    s = FeatureStore(path)
    assert list(s.codes["EmoClass"]) == [*CODES[:5], ""]
    assert list(s.codes["Gender"]) == ["Male", "Female", "", "Unknown", "Female", ""]
    res = CliRunner().invoke(
        cli, ["store", "upgrade", str(path), "--labels", str(tmp_path / "no.csv")]
    )
    assert res.exit_code != 0 and "label file not found" in res.output


def test_set_codes_checks_lengths(tmp_path):
    path = tmp_path / "s.h5"
    _store(path)
    with pytest.raises(StoreError, match="has 2 rows"):
        set_codes(path, {"EmoClass": ["A", "S"]})
    with pytest.raises(CategoryError, match="no FileName matches"):
        p = tmp_path / "l.csv"
        p.write_text("FileName,EmoClass\nzz.wav,A\n")
        add_store_codes(path, p)


def test_class_and_gender_indices():
    np.testing.assert_array_equal(class_index(list("ASHUFDCNXO") + [""]), [*range(8), -1, -1, -1])
    np.testing.assert_array_equal(gender_index(["female", "Male", "Unknown", ""]), [0, 1, -1, -1])


def _baseline_weights(codes):
    """The baseline's formula on its processed label table (pandas-free transcription)."""
    classes = ["Angry", "Sad", "Happy", "Surprise", "Fear", "Disgust", "Contempt", "Neutral"]
    emotion_codes = ["A", "S", "H", "U", "F", "D", "C", "N"]
    kept = [c for c in codes if c in emotion_codes]  # process_labels_for_categorical.py
    freq = {cls: sum(1.0 for c in kept if c == e) for cls, e in zip(classes, emotion_codes)}
    total = len(kept)
    w = {cls: total / (len(classes) * f) if f != 0 else 0 for cls, f in freq.items()}
    return [w[c] for c in classes]


@pytest.mark.parametrize("seed", range(5))
def test_class_weights_equal_the_baselines_formula(seed):
    rng = np.random.default_rng(seed)
    pool = list("ASHUFDCNXO") + [""]
    p = rng.dirichlet(np.ones(len(pool)))
    p[rng.integers(0, 8)] = 0.0  # one class absent: weight 0
    codes = list(rng.choice(pool, size=200, p=p / p.sum()))
    want = np.array(_baseline_weights(codes))
    # float64 total / (8 count) on both sides (ours then rounded to float32): u32 + 4 u64 of it.
    bound = (U32 + 4 * U64) * np.abs(want)
    assert_within(class_weights(class_index(codes)), want, bound, "class weights vs baseline")
    kept = [c for c in codes if c in "ASHUFDCN" and c]
    wrong = want * (len(codes) / len(kept))  # X, O and empty rows counted in the total
    assert_exceeds(wrong, want, bound, "class weights, X/O rows counted")
