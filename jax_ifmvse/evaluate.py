"""Score predictions against MSP-Podcast-style labels: CCC per attribute (task 2) or macro-F1
over the eight classes (task 1), with bootstrap intervals.

Task 2 reads the challenge submission (`FileName,EmoAct,EmoVal,EmoDom`), RUN/ensemble/<split>.csv
(`FileName,arousal,valence,dominance`) and `ifmvse predict --out` CSVs (`file,arousal,...`,
matched on the file's name). Like the leaderboard, the mean is over all three attributes, so
each must be predicted for every row.

Task 1 reads a categorical submission (`FileName,EmoClass`, one of A, S, H, U, F, D, C, N per
file; RUN/ensemble/submission_cat_<split>.csv): every file of the split must be there once; the
rows the labels code X, O or leave empty are not scored, as the baseline drops them.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from jax_ifmvse.categories import CLASS_CODES, CLASS_NAMES, N_CLASSES, class_index
from jax_ifmvse.config import ATTRIBUTES
from jax_ifmvse.errors import IfmvseError
from jax_ifmvse.metrics import accuracy, bootstrap_macro_f1, ccc_np, confusion_matrix, per_class_f1

COLUMNS = ("EmoAct", "EmoVal", "EmoDom")  # the challenge's names, in ATTRIBUTES order
SHOW = 5  # ids listed in a mismatch error


class EvaluateError(IfmvseError, ValueError):
    """A submission or labels file that cannot be scored (one-line message)."""


def _key(file_name: str) -> str:
    """Match ids with or without the `.wav` suffix (stores often drop it, the challenge keeps it)."""
    return file_name[:-4] if file_name.lower().endswith(".wav") else file_name


def _read_rows(path: Path, need: tuple[str, ...]) -> tuple[list[str], list[dict]]:
    """Header and rows of a CSV, checking that the columns in `need` are present."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            rows = list(reader)
    except FileNotFoundError:
        raise EvaluateError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise EvaluateError(f"{path}: cannot read as CSV ({e})") from None
    header = [h.strip() for h in header]
    missing = [c for c in need if c not in header]
    if missing:
        raise EvaluateError(f"{path}: missing column(s) {missing}; header is {header}")
    return header, [{k.strip(): v for k, v in r.items() if k is not None} for r in rows]


def _floats(
    path: Path, rows: list[dict], line0: int = 2, columns: tuple[str, ...] = COLUMNS
) -> np.ndarray:
    """(N, 3) float values of the attribute columns (EmoAct, EmoVal, EmoDom by default), in
    ATTRIBUTES order; empty cells become NaN."""
    out = np.full((len(rows), len(columns)), np.nan)
    for i, r in enumerate(rows):
        for j, c in enumerate(columns):
            v = (r.get(c) or "").strip()
            if not v:
                continue
            try:
                out[i, j] = float(v)
            except ValueError:
                raise EvaluateError(
                    f"{path}: line {i + line0}: {c}={v!r} is not a number"
                ) from None
    return out


def read_submission(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Ids and predictions (N, 3) in ATTRIBUTES order from a submission, an ensemble CSV or a
    `predict --out` CSV (see the module docstring); every attribute cell must hold a number."""
    path = Path(path)
    header, _ = _read_rows(path, ())
    id_col = "file" if "file" in header and "FileName" not in header else "FileName"
    cols = ATTRIBUTES if set(ATTRIBUTES) <= set(header) else COLUMNS
    _, rows = _read_rows(path, (id_col, *cols))
    if not rows:
        raise EvaluateError(f"{path}: no prediction rows")
    ids = [r[id_col].strip() for r in rows]
    if id_col == "file":  # predict's paths: the labels name the file only
        ids = [Path(i).name for i in ids]
    keys = [_key(i) for i in ids]
    if len(set(keys)) != len(keys):
        seen, dup = set(), []
        for k in keys:
            if k in seen:
                dup.append(k)
            seen.add(k)
        raise EvaluateError(f"{path}: {len(dup)} duplicate FileName(s), e.g. {dup[:SHOW]}")
    values = _floats(path, rows, columns=cols)
    for j, c in enumerate(cols):
        empty = ~np.isfinite(values[:, j])
        if empty.all():
            raise EvaluateError(
                f"{path}: column {c} is empty; the challenge score averages all three attributes"
            )
        if empty.any():
            first = int(np.flatnonzero(empty)[0])
            raise EvaluateError(
                f"{path}: line {first + 2}: {c} is empty or not finite"
                f" ({int(empty.sum())} row(s) in all)"
            )
    return ids, values


def _split_rows(path: Path, header: list[str], rows: list[dict], split: str | None) -> list[dict]:
    """The label rows of one `Split_Set` (all rows for None), with one-line errors."""
    if split is not None:
        if "Split_Set" not in header:
            raise EvaluateError(f"{path}: no Split_Set column to select split {split!r}")
        have = sorted({r["Split_Set"] for r in rows})
        rows = [r for r in rows if r["Split_Set"] == split]
        if not rows:
            raise EvaluateError(f"{path}: no rows with Split_Set={split!r} (have: {have})")
    if not rows:
        raise EvaluateError(f"{path}: no label rows")
    return rows


def read_labels(path: str | Path, split: str | None) -> tuple[list[str], np.ndarray]:
    """Ids and labels (N, 3) in ATTRIBUTES order for one `Split_Set` of a labels CSV."""
    path = Path(path)
    header, rows = _read_rows(path, ("FileName", *COLUMNS))
    rows = _split_rows(path, header, rows, split)
    return [r["FileName"].strip() for r in rows], _floats(path, rows)


def align(
    pred_ids: list[str], pred: np.ndarray, label_ids: list[str], pred_path: str = "predictions"
) -> np.ndarray:
    """Predictions reordered to the label ids; raise on missing or extra ids, listing a few."""
    index = {_key(i): n for n, i in enumerate(pred_ids)}
    want = [_key(i) for i in label_ids]
    missing = [k for k in want if k not in index]
    extra = sorted(set(index) - set(want))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} labelled id(s) missing, e.g. {missing[:SHOW]}")
        if extra:
            parts.append(f"{len(extra)} extra id(s) not in the labels, e.g. {extra[:SHOW]}")
        raise EvaluateError(
            f"{pred_path}: ids do not match the labels ({len(pred_ids)} predicted,"
            f" {len(label_ids)} labelled): " + "; ".join(parts)
        )
    return pred[[index[k] for k in want]]


def bootstrap_cccs(
    y_true: np.ndarray, y_pred: np.ndarray, n: int = 1000, seed: int = 0, chunk: int = 50
) -> np.ndarray:
    """Bootstrap CCC samples (n, A) of A attribute columns, resampling rows jointly.

    Draws the same resamples as `metrics.bootstrap_ccc(..., n, seed)` (same generator, same
    stream) but `chunk` resamples at a time, so 30,000 rows x 1,000 resamples fit in memory.
    """
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n, chunk):
        idx = rng.integers(0, len(y_true), size=(min(chunk, n - start), len(y_true)))  # (c, N)
        out.append(ccc_np(y_true[idx], y_pred[idx], axis=1))  # (c, A)
    return np.concatenate(out, axis=0)


def evaluate_arrays(
    labels: np.ndarray, pred: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """CCC, bootstrap interval and N per attribute and for their mean; labels, pred (N, 3)."""
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    scored = [a for a in range(len(ATTRIBUTES)) if np.isfinite(pred[:, a]).any()]
    for a in scored:
        if not np.isfinite(pred[:, a]).all():
            bad = int((~np.isfinite(pred[:, a])).sum())
            raise EvaluateError(f"{ATTRIBUTES[a]}: {bad} prediction(s) empty or not finite")
    rows = np.isfinite(labels[:, scored]).all(axis=1)  # (N,)
    t, p = labels[rows][:, scored], pred[rows][:, scored]
    if len(t) < 2:
        raise EvaluateError("fewer than 2 labelled utterances to score")
    point = ccc_np(t, p, axis=0)  # (A,)
    samples = bootstrap_cccs(t, p, n=n_boot, seed=seed)  # (n, A)
    result = {"n": int(rows.sum()), "n_bootstrap": n_boot, "level": level, "attributes": {}}
    for j, a in enumerate(scored):
        lo, hi = np.quantile(samples[:, j], [lo_q, hi_q])
        result["attributes"][ATTRIBUTES[a]] = {"ccc": float(point[j]), "low": lo, "high": hi}
    for a in set(range(len(ATTRIBUTES))) - set(scored):
        result["attributes"][ATTRIBUTES[a]] = None  # not predicted (empty column)
    result["attributes"] = {k: result["attributes"][k] for k in ATTRIBUTES}
    lo, hi = np.quantile(samples.mean(axis=1), [lo_q, hi_q])
    result["mean"] = {"ccc": float(point.mean()), "low": float(lo), "high": float(hi)}
    result["mean"]["over"] = [ATTRIBUTES[a] for a in scored]
    for v in result["attributes"].values():
        if v is not None:
            v["low"], v["high"] = float(v["low"]), float(v["high"])
    return result


def evaluate_files(
    pred_path: str | Path,
    labels_path: str | Path,
    split: str | None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Score a submission CSV against a labels CSV (one split): see `evaluate_arrays`
    (task 2) or `evaluate_category_files` (task 1, recognised by its `EmoClass` column)."""
    if is_category_submission(pred_path):
        return evaluate_category_files(pred_path, labels_path, split, n_boot=n_boot, seed=seed)
    pred_ids, pred = read_submission(pred_path)
    label_ids, labels = read_labels(labels_path, split)
    aligned = align(pred_ids, pred, label_ids, str(pred_path))
    try:
        result = evaluate_arrays(labels, aligned, n_boot=n_boot, seed=seed)
    except EvaluateError as e:
        raise EvaluateError(f"{pred_path}: {e}") from None
    result.update(predictions=str(pred_path), labels=str(labels_path), split=split)
    return result


def print_table(result: dict) -> None:
    """The evaluation as a rich table: CCC, 95% interval per attribute and the mean (task 2),
    or macro-F1, accuracy, per-class F1 and the confusion matrix (task 1)."""
    from rich.console import Console
    from rich.table import Table

    if result.get("task") == "category":
        print_category_table(result)
        return

    pct = round(100 * result["level"])
    table = Table(
        title=f"{result['predictions']} vs {result['labels']}"
        + (f" [{result['split']}]" if result["split"] else "")
        + f", N={result['n']}"
    )
    table.add_column("attribute")
    table.add_column("CCC", justify="right")
    table.add_column(f"{pct}% interval ({result['n_bootstrap']} bootstrap)", justify="right")
    for name, v in result["attributes"].items():
        if v is None:
            table.add_row(name, "-", "not predicted")
        else:
            table.add_row(name, f"{v['ccc']:.4f}", f"[{v['low']:.4f}, {v['high']:.4f}]")
    m = result["mean"]
    table.add_row("mean", f"{m['ccc']:.4f}", f"[{m['low']:.4f}, {m['high']:.4f}]", style="bold")
    Console().print(table)


# ---------------------------------------------------------------------------------------------
# Task 1: categorical submissions.


def is_category_submission(path: str | Path) -> bool:
    """Whether a CSV is a task 1 submission: an `EmoClass` column and no attribute columns."""
    header, _ = _read_rows(Path(path), ())
    return "EmoClass" in header and not (set(COLUMNS) | set(ATTRIBUTES)) & set(header)


def _duplicates(path: Path, keys: list[str]) -> None:
    seen, dup = set(), []
    for k in keys:
        if k in seen:
            dup.append(k)
        seen.add(k)
    if dup:
        raise EvaluateError(f"{path}: {len(dup)} duplicate FileName row(s), e.g. {dup[:SHOW]}")


def read_category_submission(path: str | Path) -> tuple[list[str], np.ndarray]:
    """FileNames and class indices (N,) of a `FileName,EmoClass` submission."""
    path = Path(path)
    _, rows = _read_rows(path, ("FileName", "EmoClass"))
    if not rows:
        raise EvaluateError(f"{path}: no prediction rows")
    ids = [(r.get("FileName") or "").strip() for r in rows]
    _duplicates(path, [_key(i) for i in ids])
    lookup = {c: j for j, c in enumerate(CLASS_CODES)}
    out = np.empty(len(rows), np.int64)
    for i, r in enumerate(rows):
        code = (r.get("EmoClass") or "").strip()
        if code not in lookup:
            raise EvaluateError(
                f"{path}: line {i + 2}: EmoClass {code!r} is not one of {', '.join(CLASS_CODES)}"
            )
        out[i] = lookup[code]
    return ids, out


def read_category_labels(path: str | Path, split: str | None) -> tuple[list[str], np.ndarray]:
    """FileNames of one split and their class index (N,), -1 for X, O or empty (not scored)."""
    path = Path(path)
    header, rows = _read_rows(path, ("FileName", "EmoClass"))
    rows = _split_rows(path, header, rows, split)
    ids = [r["FileName"].strip() for r in rows]
    return ids, class_index([r["EmoClass"] for r in rows]).astype(np.int64)


def evaluate_category_arrays(
    y: np.ndarray, pred: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """Macro-F1 (the official task 1 metric), accuracy, per-class F1, confusion matrix and
    bootstrap intervals of macro-F1 and accuracy; y, pred (N,) class indices."""
    if len(y) < 2:
        raise EvaluateError(
            "fewer than 2 utterances with a class (A, S, H, U, F, D, C, N) to score"
        )
    f1, lo, hi = bootstrap_macro_f1(y, pred, N_CLASSES, n=n_boot, seed=seed, level=level)
    # The same resamples as bootstrap_macro_f1 (same generator and draw).
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n_boot, len(y)))
    acc = (y[idx] == pred[idx]).mean(1)
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    cm = confusion_matrix(y, pred, N_CLASSES)
    return {
        "task": "category",
        "n": int(len(y)),
        "n_bootstrap": n_boot,
        "level": level,
        "macro_f1": f1,
        "macro_f1_interval": [float(lo), float(hi)],
        "accuracy": accuracy(y, pred),
        "accuracy_interval": [float(v) for v in np.quantile(acc, q)],
        "per_class_f1": dict(zip(CLASS_CODES, map(float, per_class_f1(cm)), strict=True)),
        "support": dict(zip(CLASS_CODES, map(int, cm.sum(1)), strict=True)),
        "classes": list(CLASS_CODES),
        "confusion": cm.tolist(),  # rows true, columns predicted
    }


def evaluate_category_files(
    pred_path: str | Path,
    labels_path: str | Path,
    split: str | None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Score a `FileName,EmoClass` submission against a labels CSV (one split)."""
    pred_ids, pred = read_category_submission(pred_path)
    label_ids, y = read_category_labels(labels_path, split)
    # Every file of the split, X and O rows included (the challenge asks for all of them).
    aligned = align(pred_ids, pred[:, None], label_ids, str(pred_path))[:, 0]
    scored = y >= 0
    try:
        result = evaluate_category_arrays(y[scored], aligned[scored], n_boot=n_boot, seed=seed)
    except EvaluateError as e:
        raise EvaluateError(f"{pred_path}: {e}") from None
    result.update(
        predictions=str(pred_path),
        labels=str(labels_path),
        split=split,
        n_unscored=int((~scored).sum()),
    )
    return result


def print_category_table(result: dict) -> None:
    """Task 1 tables: macro-F1 and accuracy with intervals, per-class F1, confusion matrix."""
    from rich.console import Console
    from rich.table import Table

    pct = round(100 * result["level"])
    title = (
        f"{result['predictions']} vs {result['labels']}"
        + (f" [{result['split']}]" if result["split"] else "")
        + f", N={result['n']} ({result.get('n_unscored', 0)} X/O/empty not scored)"
    )
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column(f"{pct}% interval ({result['n_bootstrap']} bootstrap)", justify="right")
    lo, hi = result["macro_f1_interval"]
    t.add_row("macro-F1", f"{result['macro_f1']:.4f}", f"[{lo:.4f}, {hi:.4f}]", style="bold")
    lo, hi = result["accuracy_interval"]
    t.add_row("accuracy", f"{result['accuracy']:.4f}", f"[{lo:.4f}, {hi:.4f}]")
    console = Console()
    console.print(t)
    c = Table(title="per class (rows true, columns predicted)")
    c.add_column("class")
    c.add_column("F1", justify="right")
    c.add_column("N", justify="right")
    for code in result["classes"]:
        c.add_column(code, justify="right")
    for i, code in enumerate(result["classes"]):
        c.add_row(
            f"{code} {CLASS_NAMES[i]}",
            f"{result['per_class_f1'][code]:.3f}",
            str(result["support"][code]),
            *(str(v) for v in result["confusion"][i]),
        )
    console.print(c)
