"""Task 1 of the challenge: the eight emotion classes, their codes, weights and store labels.

The classes and their order are the baseline's (msplabresearch/MSP-Podcast_Challenge_IS2025,
`process_labels_for_categorical.py`): Angry, Sad, Happy, Surprise, Fear, Disgust, Contempt,
Neutral, coded A, S, H, U, F, D, C, N in `labels_consensus.csv`'s `EmoClass`. Rows coded X
(no agreement), O (other) or left empty keep their attributes for task 2 and are left out of the
categorical loss and score (class index -1 here), as the baseline drops them.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from featurestore import FeatureStore, set_codes
from jax_ifmvse.errors import IfmvseError

CLASS_CODES = ("A", "S", "H", "U", "F", "D", "C", "N")
CLASS_NAMES = ("Angry", "Sad", "Happy", "Surprise", "Fear", "Disgust", "Contempt", "Neutral")
N_CLASSES = len(CLASS_CODES)
# Codes in labels_consensus.csv that are not a task 1 class (kept for task 2, not scored).
UNSCORED_CODES = ("X", "O", "")
GENDERS = ("Female", "Male")  # the gender auxiliary's two classes; anything else is unknown


class CategoryError(IfmvseError, ValueError):
    """Task 1 labels that cannot be used: a store without them, a bad label file."""


def class_index(codes: Sequence[str]) -> np.ndarray:
    """(N,) int32 class index in `CLASS_CODES` order; -1 for X, O, empty or anything else."""
    lookup = {c: i for i, c in enumerate(CLASS_CODES)}
    return np.asarray([lookup.get(str(c).strip(), -1) for c in codes], np.int32)


def gender_index(values: Sequence[str]) -> np.ndarray:
    """(N,) int32 index in `GENDERS` (case-insensitive); -1 when unknown."""
    lookup = {g.lower(): i for i, g in enumerate(GENDERS)}
    return np.asarray([lookup.get(str(v).strip().lower(), -1) for v in values], np.int32)


def class_weights(y: np.ndarray) -> np.ndarray:
    """The baseline's weights (8,): total / (8 * count) per class, 0 for an absent class.

    `y` are class indices; rows with -1 (X, O, empty) are not counted, as the baseline computes
    its weights on `processed_labels.csv`, which no longer has them.
    """
    y = np.asarray(y)
    y = y[y >= 0]
    counts = np.bincount(y, minlength=N_CLASSES).astype(np.float64)  # (8,)
    total = counts.sum()
    with np.errstate(divide="ignore"):
        w = np.where(counts > 0, total / (N_CLASSES * counts), 0.0)
    return w.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Store labels.


def store_classes(store, rows: np.ndarray) -> np.ndarray:
    """(N,) class index of store rows; CategoryError if the store has no EmoClass labels."""
    if "EmoClass" not in store.codes:
        raise CategoryError(
            f"{store.path}: no EmoClass labels (the store was made before task 1 support);"
            f" add them with `ifmvse store upgrade {store.path}`"
        )
    return class_index(store.codes["EmoClass"][np.asarray(rows)])


def store_genders(store, rows: np.ndarray) -> np.ndarray:
    """(N,) gender index of store rows; CategoryError if the store has no Gender labels."""
    if "Gender" not in store.codes:
        raise CategoryError(
            f"{store.path}: no Gender labels (the store was made before task 1 support);"
            f" add them with `ifmvse store upgrade {store.path}`"
        )
    return gender_index(store.codes["Gender"][np.asarray(rows)])


def read_label_codes(path: str | Path) -> dict[str, dict[str, str]]:
    """{column: {FileName stem: value}} of EmoClass and Gender in a labels_consensus.csv."""
    path = Path(path)
    if not path.is_file():
        raise CategoryError(f"{path}: label file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        names = [c.strip() for c in reader.fieldnames or []]
        if "FileName" not in names or "EmoClass" not in names:
            raise CategoryError(f"{path}:1: needs columns FileName and EmoClass")
        reader.fieldnames = names
        out: dict[str, dict[str, str]] = {"EmoClass": {}, "Gender": {}}
        for row in reader:
            stem = Path((row.get("FileName") or "").strip()).stem
            if not stem:
                continue
            out["EmoClass"][stem] = (row.get("EmoClass") or "").strip()
            if "Gender" in names:
                out["Gender"][stem] = (row.get("Gender") or "").strip()
    if not out["Gender"]:
        del out["Gender"]
    return out


def default_label_file(store) -> Path | None:
    """The MSP-layout label file of the corpus a store was extracted from, if it still exists."""
    root = str(store.attrs.get("corpus", "") or "")
    if not root:
        return None
    p = Path(root) / "Labels" / "labels_consensus.csv"
    return p if p.is_file() else None


def add_store_codes(store_path: str | Path, labels: str | Path | None = None) -> dict[str, int]:
    """Write EmoClass (and Gender) into a store from a label file; returns rows per class code.

    `labels` defaults to `<corpus root>/Labels/labels_consensus.csv` of the corpus the store
    records. Store rows without a label row (the unlabelled test set) get "" (unknown).
    """
    store = FeatureStore(store_path)
    path = Path(labels) if labels is not None else default_label_file(store)
    if path is None:
        raise CategoryError(
            f"{store_path}: no EmoClass labels and no label file found at the recorded corpus"
            f" root {store.attrs.get('corpus', '')!r}; pass --labels labels_consensus.csv"
        )
    table = read_label_codes(path)
    ids = [str(i) for i in store.ids]
    # A manifest store's ids may be paths: match the id's stem as well as the id itself.
    codes = {col: [m.get(i, m.get(Path(i).stem, "")) for i in ids] for col, m in table.items()}
    matched = sum(1 for i in ids if i in table["EmoClass"] or Path(i).stem in table["EmoClass"])
    if matched == 0:
        raise CategoryError(f"{path}: no FileName matches a row of the store {store_path}")
    set_codes(store_path, codes)
    vals, counts = np.unique(np.asarray(codes["EmoClass"], dtype=str), return_counts=True)
    return {str(v): int(c) for v, c in zip(vals, counts, strict=True)}
