"""`ifmvse predict`: raw audio files -> arousal, valence, dominance through a trained, ensembled run.

The scoring itself lives in one place, `jax_ifmvse.predictor.Predictor` (the batch path of
`extract` with the store in memory, the best heads, `ensemble.combine`); `predict_files` is one
call of it, `write_predictions` its CSV/JSON writer. So a file predicted here gets the numbers the
batch path gives it, and the answer `ifmvse serve` gives for it: a file missing features for some
view is scored from the score sets it has (weights renormalised, said in `fallback`); a file
nothing could be heard of (missing, empty, not audio, truncated, undecodable) gets no values and
its reason in `error`, or the Train label mean only with `fallback="label-mean"`. Loading the run
lives in `jax_ifmvse.inference`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from jax_ifmvse.config import ATTRIBUTES
from jax_ifmvse.inference import PredictError
from jax_ifmvse.predictor import FALLBACKS, Prediction, Predictor

__all__ = [
    "COLUMNS",
    "FALLBACKS",
    "PredictError",
    "Prediction",
    "predictions_table",
    "short_names",
    "predict_files",
    "write_predictions",
]

COLUMNS = ("file", *ATTRIBUTES, "duration_s", "flags", "fallback", "error")  # CSV, in order


def predict_files(
    files: Sequence[str | Path],
    run: str | Path,
    *,
    fallback: str = "none",
    work_dir: str | Path | None = None,
) -> list[Prediction]:
    """Ensembled predictions for audio files through the run's backbones, heads and weights.

    One call of a `Predictor` (the path `ifmvse serve` keeps warm); it compiles only the shapes
    these files need. `fallback="label-mean"` gives a file nothing could be heard of the Train
    label mean (marked in `fallback`; `error` still says why). `work_dir` is accepted for older
    callers and unused: nothing is written.
    """
    del work_dir  # features stay in memory (the store's dtype rounding kept)
    return [s.prediction for s in Predictor(run, fallback=fallback).predict_files(files)]


def write_predictions(preds: Sequence[Prediction], path: str | Path) -> None:
    """CSV (`COLUMNS`; flags joined by ';', empty score cells for a failed file) or JSON (a
    list of `Prediction.as_dict()` rows, the rows `serve` answers), by the suffix; every file."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps([p.as_dict() for p in preds], indent=2) + "\n")
        return
    if path.suffix.lower() != ".csv":
        raise PredictError(f"{path}: --out must end in .csv or .json")
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(COLUMNS)
        for p in preds:
            row = p.as_dict()
            wr.writerow(
                [
                    p.file,
                    *("" if row[a] is None else repr(row[a]) for a in ATTRIBUTES),
                    "" if p.duration_s is None else repr(p.duration_s),
                    ";".join(p.flags),
                    p.fallback,
                    p.error or "",
                ]
            )


def short_names(files: Sequence[str], budget: int) -> tuple[list[str], str | None]:
    """(names to show, the folder they share or None): the shared folder is shown once (the
    table's caption), and a name longer than `budget` loses its start ("…/deep/clip.wav"), so a
    narrow terminal never breaks a name mid-word."""
    import os

    folder = None
    names = [str(f) for f in files]
    try:
        common = os.path.commonpath([str(Path(f).parent) for f in files]) if files else ""
    except ValueError:  # absolute and relative paths mixed
        common = ""
    if common and common != ".":
        folder = common
        names = [os.path.relpath(f, common) for f in names]
    budget = max(budget, 8)
    return [n if len(n) <= budget else "…" + n[-(budget - 1) :] for n in names], folder


def predictions_table(preds: Sequence[Prediction], title: str, width: int = 80):
    """A rich Table of predictions that fits `width` columns: file names shortened from the
    left (the shared folder in the caption), values, duration, flags, and fallback or error."""
    from rich import box
    from rich.table import Table

    # Everything but the file column: 3 values, duration, flags and note at their narrowest,
    # plus two padding cells per column (box.SIMPLE draws no vertical lines).
    rest = sum(len(a) for a in ATTRIBUTES) + 5 + 9 + 14 + 2 * 7
    names, folder = short_names([p.file for p in preds], width - rest)
    table = Table(
        title=title,
        caption=None if folder is None else f"files in {folder}/",
        box=box.SIMPLE,
        title_justify="left",
        caption_justify="left",
    )
    table.add_column("file", no_wrap=True, min_width=min(max(map(len, names)), width - rest))
    for a in ATTRIBUTES:
        table.add_column(a, justify="right", no_wrap=True)
    table.add_column("s", justify="right", no_wrap=True)  # duration from the header
    table.add_column("flags", min_width=9)
    table.add_column("fallback / error", min_width=14)
    for p, name in zip(preds, names, strict=True):
        values = [f"{v:.3f}" for v in p.values] if p.values else [""] * len(ATTRIBUTES)
        dur = "" if p.duration_s is None else f"{p.duration_s:.2f}"
        note = f"error: {p.error}" if p.error else p.fallback
        if p.error and p.fallback:
            note += f" ({p.fallback} given)"
        table.add_row(name, *values, dur, ", ".join(p.flags), note)
    return table
