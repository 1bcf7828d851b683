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
from typing import Any

from jax_ifmvse.categories import CLASS_NAMES
from jax_ifmvse.config import ATTRIBUTES
from jax_ifmvse.finetune.predictor import FinetunedPredictor
from jax_ifmvse.inference import PredictError, is_finetune_run
from jax_ifmvse.plots import plot_timeline
from jax_ifmvse.predictor import FALLBACKS, Prediction, Predictor, RunPredictor
from jax_ifmvse.timeline import RowWriter, summary_path, timeline_file

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
TEXT_COLUMNS = ("transcript", "transcript_flags", "transcript_language")  # runs with text views


def open_predictor(
    run: str | Path,
    *,
    max_clips: int = 16,
    fallback: str = "none",
    transcripts: str | Path | None = None,
) -> RunPredictor:
    """The predictor of a run: `Predictor` for trained heads, `FinetunedPredictor` for a
    fine-tuned backbone (same interface). `transcripts`: the clips' texts, for a run whose text
    views embed the corpus' own transcripts."""
    if is_finetune_run(run):
        if transcripts is not None:
            raise PredictError(f"--transcripts {transcripts}: {run} is a fine-tuned backbone"
                               " run without text views")  # fmt: skip
        return FinetunedPredictor(run, max_clips=max_clips, fallback=fallback)
    return Predictor(run, max_clips=max_clips, fallback=fallback, transcripts=transcripts)


def predict_files(
    files: Sequence[str | Path],
    run: str | Path,
    *,
    fallback: str = "none",
    work_dir: str | Path | None = None,
    transcripts: str | Path | None = None,
) -> list[Prediction]:
    """Ensembled predictions for audio files through the run's backbones, heads and weights.

    One call of a `Predictor` (the path `ifmvse serve` keeps warm); it compiles only the shapes
    these files need. `fallback="label-mean"` gives a file nothing could be heard of the Train
    label mean (marked in `fallback`; `error` still says why). `work_dir` is accepted for older
    callers and unused: nothing is written.
    """
    del work_dir  # features stay in memory (the store's dtype rounding kept)
    pred = open_predictor(run, fallback=fallback, transcripts=transcripts)
    return [s.prediction for s in pred.predict_files(files)]


def write_predictions(preds: Sequence[Prediction], path: str | Path) -> None:
    """CSV (`COLUMNS`; flags joined by ';', empty score cells for a failed file) or JSON (a
    list of `Prediction.as_dict()` rows, the rows `serve` answers), by the suffix; every file."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps([p.as_dict() for p in preds], indent=2) + "\n")
        return
    if path.suffix.lower() != ".csv":
        raise PredictError(f"{path}: --out must end in .csv or .json")
    # A run with task 1 heads: the class, its probability and all eight after `COLUMNS`.
    classes = next((list(p.probabilities) for p in preds if p.probabilities), [])
    task1 = ["category", "category_prob", *classes] if classes else []
    text = list(TEXT_COLUMNS) if any(p.text is not None for p in preds) else []
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow([*COLUMNS, *task1, *text])
        for p in preds:
            row = p.as_dict()
            cat = [p.category or "", "" if p.category_prob is None else repr(p.category_prob)]
            cat += [repr(p.probabilities[c]) if p.probabilities else "" for c in classes]
            wr.writerow(
                [
                    p.file,
                    *("" if row[a] is None else repr(row[a]) for a in ATTRIBUTES),
                    "" if p.duration_s is None else repr(p.duration_s),
                    ";".join(p.flags),
                    p.fallback,
                    p.error or "",
                    *(cat if task1 else []),
                    *(_text_cells(p.text) if text else []),
                ]
            )


def _text_cells(text: dict | None) -> list[str]:
    """The CSV cells of `TEXT_COLUMNS` (empty transcript cell: none; flags joined by ';')."""
    if text is None:
        return [""] * len(TEXT_COLUMNS)
    t = text["transcript"]
    return ["" if t is None else t, ";".join(text["transcript_flags"]),
            text["transcript_language"]]  # fmt: skip


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
    left (their shared folder once, in the caption), values, duration, and one notes column
    (flags, fallback, error) that wraps between words."""
    from rich.table import Table

    notes_w = 20  # the notes column at its narrowest ("resampled from 8000 Hz" in two lines)
    # The value columns are as wide as their headers; one padding cell each side of a column
    # but the outer two (no box lines: `box=None`, `pad_edge=False`).
    n_cols = len(ATTRIBUTES) + 3
    rest = sum(len(a) for a in ATTRIBUTES) + len("00.00") + notes_w + 2 * n_cols - 2
    names, folder = short_names([p.file for p in preds], width - rest)
    if folder is not None and len(folder) > width - 10:
        tail = folder[-(width - 11) :]
        folder = "…" + (tail[tail.index("/") :] if "/" in tail else tail)  # whole folder names
    table = Table(
        title=title,
        caption=None if folder is None else f"files in {folder}/",
        box=None,
        pad_edge=False,
        header_style="bold underline",
        title_justify="left",
        caption_justify="left",
    )
    table.add_column("file", no_wrap=True, min_width=max(map(len, names), default=4))
    for a in ATTRIBUTES:
        table.add_column(a, justify="right", no_wrap=True)
    table.add_column("s", justify="right", no_wrap=True)  # duration from the header
    table.add_column("notes", min_width=notes_w, overflow="fold")
    for p, name in zip(preds, names, strict=True):
        values = [f"{v:.3f}" for v in p.values] if p.values else [""] * len(ATTRIBUTES)
        dur = "" if p.duration_s is None else f"{p.duration_s:.2f}"
        notes = [", ".join(p.flags)] if p.flags else []
        if p.error:
            notes.append(f"error: {p.error}")
        if p.fallback:
            notes.append(f"{p.fallback} given" if p.failed else f"fallback: {p.fallback}")
        if p.text is not None and p.text["transcript"] is not None:
            notes.append(f"transcript: {p.text['transcript']!r}")
        table.add_row(name, *values, dur, "; ".join(notes))
    return table


def predict_segments(
    files: Sequence[str | Path],
    run: str | Path,
    seg: Any,
    *,
    out: str | Path | None = None,
    plots: str | Path | None = None,
    batch: int | None = None,
    echo: Any = print,
) -> list[dict]:
    """`predict --segments`: every file cut into segments (`timeline.Segmentation`), each row
    written as it is scored (to `out`, .csv or .jsonl, else JSON Lines on stdout), the per-file
    summaries to OUT.summary.json, a PNG timeline per file under `plots`; the summaries back."""
    import sys

    predictor = open_predictor(run, max_clips=16)
    seg = seg.resolved(predictor)
    writer = None
    if out is not None:
        task1 = getattr(predictor, "cat_weights", None) is not None or (
            getattr(getattr(predictor, "model", None), "task", None) == "category"
        )
        writer = RowWriter(out, CLASS_NAMES if task1 else None)

    def emit(rows) -> None:
        if writer is not None:
            writer.write(rows)
        else:
            for r in rows:
                sys.stdout.write(json.dumps(r.as_dict()) + "\n")
            sys.stdout.flush()

    summaries = []
    try:
        for f in files:
            rows, summary = timeline_file(predictor, f, seg, batch=batch, on_rows=emit)
            summaries.append(summary)
            if plots is not None and rows:
                Path(plots).mkdir(parents=True, exist_ok=True)
                png = Path(plots) / f"{Path(f).stem}.timeline.png"
                plot_timeline(rows, png, f"{Path(f).name} ({run})", summary["duration_s"])
                summary["plot"] = str(png)
    finally:
        if writer is not None:
            writer.close()
    if out is not None:
        summary_path(out).write_text(json.dumps(summaries, indent=2) + "\n")
        echo(f"wrote {out} ({writer.rows} segments) and {summary_path(out)}")
    return summaries
