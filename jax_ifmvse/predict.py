"""`ifmvse predict`: raw audio files -> arousal, valence, dominance through a trained, ensembled run.

The scoring itself lives in one place, `jax_ifmvse.predictor.Predictor` (the batch path of
`extract` with the store in memory, the best heads, `ensemble.combine`); `predict_files` is one
call of it, `write_predictions` its CSV/JSON writer. So a file predicted here gets the numbers the
batch path gives it, fallbacks included: a file without features for some view is scored from the
score sets it has (weights renormalised), and with none from the Train label mean, flagged in
`Prediction.fallback`. Loading the run lives in `jax_ifmvse.inference`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from jax_ifmvse.config import ATTRIBUTES
from jax_ifmvse.inference import PredictError
from jax_ifmvse.predictor import Prediction, Predictor

__all__ = ["PredictError", "Prediction", "predict_files", "write_predictions"]


def predict_files(
    files: Sequence[str | Path], run: str | Path, *, work_dir: str | Path | None = None
) -> list[Prediction]:
    """Ensembled predictions for audio files through the run's backbones, heads and weights.

    One call of a `Predictor` (the path `ifmvse serve` keeps warm); it compiles only the shapes
    these files need. `work_dir` is accepted for older callers and unused: nothing is written.
    """
    del work_dir  # features stay in memory (the store's dtype rounding kept)
    return [s.prediction for s in Predictor(run).predict_files(files)]


def write_predictions(preds: Sequence[Prediction], path: str | Path) -> None:
    """CSV (file, arousal, valence, dominance, fallback) or JSON (by the suffix), one row per
    file that has values; `fallback` says what stood in for the full ensemble ("" = nothing)."""
    path = Path(path)
    good = [p for p in preds if p.values is not None]
    if path.suffix.lower() == ".json":
        rows = [
            {
                "file": p.file,
                **dict(zip(ATTRIBUTES, p.values, strict=True)),
                "fallback": p.fallback,
                **p.task1(),
            }
            for p in good
        ]
        path.write_text(json.dumps(rows, indent=2) + "\n")
        return
    if path.suffix.lower() != ".csv":
        raise PredictError(f"{path}: --out must end in .csv or .json")
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        cat = any(p.category is not None for p in good)  # task 1 heads: their columns too
        names = list(good[0].probabilities) if cat else []
        wr.writerow(
            [
                "file",
                *ATTRIBUTES,
                "fallback",
                *(["category", "category_prob"] if cat else []),
                *names,
            ]
        )
        for p in good:
            extra = [p.category, repr(p.category_prob), *(repr(p.probabilities[c]) for c in names)]
            wr.writerow([p.file, *(repr(v) for v in p.values), p.fallback, *(extra if cat else [])])
