"""`ifmvse ensemble`'s work on a training RUN/: score files in; weights, predictions,
submissions, fallbacks and the development chart out (RUN/ensemble/)."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from jax_ifmvse.categories import CLASS_CODES, CLASS_NAMES, N_CLASSES, class_index
from jax_ifmvse.config import ATTRIBUTES, EnsembleConfig
from jax_ifmvse.ensemble import EnsembleError
from jax_ifmvse.ensemble.combine import LABEL_RANGE, combine, combine_probs
from jax_ifmvse.ensemble.search import search_class_weights, search_weights
from jax_ifmvse.metrics import ccc_np, macro_f1
from jax_ifmvse.trainer.rundir import read_finished

SUBMISSION_COLUMNS = ("EmoAct", "EmoVal", "EmoDom")  # challenge order == ATTRIBUTES order


def load_scores(path: Path) -> dict[str, np.ndarray]:
    """Read one RUN/scores/<split>.npz, checking the fields and shapes the ensemble needs."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise EnsembleError(f"{path}: cannot read score file ({e})") from None
    missing = {"ids", "scores", "score_sets"} - set(data)
    if missing:
        raise EnsembleError(f"{path}: missing field(s) {sorted(missing)}")
    s, ids = data["scores"], data["ids"]
    if s.ndim != 3 or s.shape[1] != len(ids) or s.shape[0] != len(data["score_sets"]):
        raise EnsembleError(
            f"{path}: scores shape {s.shape} does not match (K={len(data['score_sets'])},"
            f" N={len(ids)}, 3)"
        )
    attrs = tuple(str(a) for a in data.get("attributes", ATTRIBUTES))
    if attrs != ATTRIBUTES or s.shape[2] != len(ATTRIBUTES):
        raise EnsembleError(f"{path}: attributes {attrs} are not {ATTRIBUTES}")
    if "labels" in data and data["labels"].shape != (len(ids), len(ATTRIBUTES)):
        raise EnsembleError(f"{path}: labels shape {data['labels'].shape} is not (N, 3)")
    return data


def _fit_attribute(dev: dict, a: int, cfg: EnsembleConfig) -> dict[str, Any]:
    """Search weights for attribute column `a` on the dev scores; sets without scores get weight 0."""
    names = [str(s) for s in dev["score_sets"]]
    s = dev["scores"][:, :, a].astype(np.float64)  # (K, N)
    y = dev["labels"][:, a].astype(np.float64)  # (N,)
    labelled = np.isfinite(y)
    active = [k for k in range(len(names)) if np.isfinite(s[k, labelled]).any()]
    rows = labelled & np.isfinite(s[active]).all(axis=0) if active else labelled
    per_set = {
        nm: (float(ccc_np(y[rows], s[k, rows])) if k in active and rows.any() else None)
        for k, nm in enumerate(names)
    }
    if not active or rows.sum() < 2:
        # No weights: `combine` scores this attribute from the best set per row, so rank the sets
        # on the labelled rows each has (the common rows are too few to rank them on).
        own = [labelled & np.isfinite(s[k]) for k in range(len(names))]
        per_set = {
            nm: (float(ccc_np(y[m], s[k, m])) if m.sum() >= 2 else None)
            for k, (nm, m) in enumerate(zip(names, own, strict=True))
        }
        return {
            "weights": None,
            "dev_ccc": None,
            "dev_ccc_per_set": per_set,
            "n_dev": int(rows.sum()),
        }
    res = search_weights(s[active][:, rows], y[rows], cfg)
    w = np.zeros(len(names))
    w[active] = res.weights
    return {
        "weights": {nm: round(float(v), 10) for nm, v in zip(names, w, strict=True)},
        "dev_ccc": res.ccc,
        "dev_ccc_check": float(ccc_np(y[rows], w[active] @ s[active][:, rows])),
        "coarse_weights": {
            nm: float(v)
            for nm, v in zip([names[k] for k in active], res.coarse_weights, strict=True)
        },
        "coarse_dev_ccc": res.coarse_ccc,
        "dev_ccc_per_set": per_set,
        "n_dev": int(rows.sum()),
        "n_candidates": res.n_candidates,
    }


FALLBACK_COLUMNS = ("FileName", "reason", "used")


def write_fallbacks(path: Path, files: list[str], reasons: list[str], used: list[str]) -> int:
    """RUN/ensemble/fallbacks_<split>.csv: FileName, reason, used, for rows not fully ensembled."""
    rows = sorted((f, r, u) for f, r, u in zip(files, reasons, used, strict=True) if u)
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(FALLBACK_COLUMNS)
        wr.writerows(rows)
    return len(rows)


def file_names(data: dict) -> list[str]:
    """The official FileName of each row (score files from before `files` existed: the ids)."""
    return [str(x) for x in data.get("files", data["ids"])]


def missing_reasons(data: dict, names: list[str]) -> list[str]:
    """Why each row lacks some score set: the store's reason if recorded, else the sets."""
    recorded = data.get("missing")
    out = []
    for i in range(len(data["ids"])):
        why = str(recorded[i]) if recorded is not None else ""
        if not why:
            gone = [nm for k, nm in enumerate(names) if not np.isfinite(data["scores"][k, i]).all()]
            why = f"no scores from {', '.join(gone)}" if gone else ""
        out.append(why)
    return out


def write_predictions(path: Path, ids: np.ndarray, pred: np.ndarray) -> None:
    """Unclipped ensembled predictions: FileName,arousal,valence,dominance."""
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["FileName", *ATTRIBUTES])
        for i, row in zip(ids, pred, strict=True):
            wr.writerow([str(i), *(repr(float(v)) for v in row)])


def write_submission(path: Path, ids: np.ndarray, pred: np.ndarray) -> None:
    """The challenge CSV `FileName,EmoAct,EmoVal,EmoDom`, clipped to 1..7, in file-name order;
    pred columns in ATTRIBUTES order."""
    bad = ~np.isfinite(pred)
    if bad.any():  # an empty cell is not a valid submission; `combine` fills every cell it can
        i, a = np.argwhere(bad)[0]
        raise EnsembleError(
            f"{path}: no value for {ATTRIBUTES[a]} of {ids[i]} ({int(bad.sum())} empty cell(s))"
        )
    clipped = np.clip(pred, *LABEL_RANGE)
    order = sorted(range(len(ids)), key=lambda n: str(ids[n]))
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["FileName", *SUBMISSION_COLUMNS])
        for i, row in ((ids[n], clipped[n]) for n in order):
            wr.writerow([str(i), *(f"{v:.6f}" for v in row)])


def plot_dev_ccc(path: Path, fits: dict[str, dict], names: list[str]) -> None:
    """Grouped bar chart: dev CCC per score set and for the ensemble, per attribute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [*names, "ensemble"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(labels)
    for j, lab in enumerate(labels):
        vals = []
        for attr in ATTRIBUTES:
            f = fits[attr]
            v = f["dev_ccc"] if lab == "ensemble" else f["dev_ccc_per_set"].get(lab)
            vals.append(np.nan if v is None else v)
        x = np.arange(len(ATTRIBUTES)) + (j - (len(labels) - 1) / 2) * width
        ax.bar(x, vals, width, label=lab, color="black" if lab == "ensemble" else None)
    ax.set_xticks(np.arange(len(ATTRIBUTES)), ATTRIBUTES)
    ax.set_ylabel("development CCC")
    ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    ax.legend(ncol=len(labels), fontsize="small", loc="upper center", bbox_to_anchor=(0.5, 1.15))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_ensemble(run: str | Path, cfg: EnsembleConfig, dev_split: str | None = None) -> dict:
    """Search weights on RUN/scores/<dev>.npz, write RUN/ensemble/{weights.json, CSVs, dev_ccc.png}."""
    run = Path(run)
    manifest = read_finished(run, "manifest.json", "train")
    if dev_split is None:
        dev_split = manifest.get("config", {}).get("train", {}).get("dev_split", "Development")
    score_dir = run / "scores"
    dev_path = score_dir / f"{dev_split}.npz"
    if not dev_path.exists():
        have = sorted(p.stem for p in score_dir.glob("*.npz") if not p.name.endswith(".tmp.npz"))
        raise EnsembleError(f"{dev_path}: development scores not found (have: {have})")
    tasks = manifest.get("tasks") or ["attributes"]
    if "attributes" not in tasks:  # task 1 only: no attribute submission to make
        dev = load_scores(dev_path)
        summary = {
            "mode": "simplex" if cfg.simplex else "free",
            "dev_split": dev_split,
            "score_sets": [str(x) for x in dev["score_sets"]],
            "config": dataclasses.asdict(cfg),
            "attributes": {},
            "mean_dev_ccc": None,
            "splits": {},
            "fallbacks": {},
            "unweighted": [],
            "category": run_category_ensemble(run, manifest, cfg, dev_split),
        }
        (run / "ensemble" / "weights.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    dev = load_scores(dev_path)
    if "labels" not in dev:
        raise EnsembleError(f"{dev_path}: no labels; the weight search needs development labels")
    names = [str(s) for s in dev["score_sets"]]
    fits = {attr: _fit_attribute(dev, a, cfg) for a, attr in enumerate(ATTRIBUTES)}
    weights = {attr: fits[attr]["weights"] for attr in ATTRIBUTES}
    set_ccc = {attr: fits[attr]["dev_ccc_per_set"] for attr in ATTRIBUTES}
    label_mean = manifest.get("train_label_mean") or {}
    unweighted = {
        attr: f"no ensemble weights for {attr} ({fits[attr]['n_dev']} usable {dev_split} rows)"
        for attr in ATTRIBUTES
        if weights[attr] is None
    }

    out = run / "ensemble"
    out.mkdir(exist_ok=True)
    splits, fallbacks = {}, {}
    for p in sorted(score_dir.glob("*.npz")):
        if p.name.endswith(".tmp.npz"):  # an interrupted write by `ifmvse train`
            continue
        data = dev if p == dev_path else load_scores(p)
        got = [str(s) for s in data["score_sets"]]
        if got != names:
            raise EnsembleError(f"{p}: score sets {got} differ from the development file's {names}")
        files = file_names(data)
        if len(set(files)) != len(files):
            raise EnsembleError(f"{p}: repeated FileName values; cannot write one row each")
        comb = combine(data["scores"], weights, names, label_mean, set_ccc)
        if comb.kinds["label_mean"] and not label_mean:
            raise EnsembleError(
                f"{run / 'manifest.json'}: no train_label_mean for rows or attributes without"
                " any score; rerun `ifmvse train` with this version"
            )
        write_predictions(out / f"{p.stem}.csv", np.asarray(files), comb.pred)
        write_submission(out / f"submission_{p.stem}.csv", np.asarray(files), comb.pred)
        reasons = [
            "; ".join(r for r in (why, *unweighted.values()) if r)
            for why in missing_reasons(data, names)
        ]
        n_fb = write_fallbacks(out / f"fallbacks_{p.stem}.csv", files, reasons, comb.used)
        splits[p.stem] = int(len(data["ids"]))
        fallbacks[p.stem] = {"rows": n_fb, **comb.kinds}
    summary = {
        "mode": "simplex" if cfg.simplex else "free",
        "dev_split": dev_split,
        "score_sets": names,
        "config": dataclasses.asdict(cfg),
        "attributes": fits,
        "mean_dev_ccc": (
            float(np.mean([fits[a]["dev_ccc"] for a in ATTRIBUTES]))
            if all(fits[a]["dev_ccc"] is not None for a in ATTRIBUTES)
            else None
        ),
        "splits": splits,
        "fallbacks": fallbacks,
        "unweighted": list(unweighted),  # attributes scored by a fallback in every row
    }
    if "category" in tasks:
        summary["category"] = run_category_ensemble(run, manifest, cfg, dev_split)
    (out / "weights.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_dev_ccc(out / "dev_ccc.png", fits, names)
    return summary


# ---------------------------------------------------------------------------------------------
# Task 1: class probabilities of the score sets, weights searched by development macro-F1.

CLASS_COLUMNS = CLASS_NAMES  # probabilities_cat_<split>.csv: one column per class, baseline order


def write_category_submission(path: Path, files: list[str], pred: np.ndarray) -> None:
    """`FileName,EmoClass`: one code per file in file-name order."""
    order = sorted(range(len(files)), key=lambda i: files[i])
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["FileName", "EmoClass"])
        for i in order:
            wr.writerow([files[i], CLASS_CODES[int(pred[i])]])


def write_category_probabilities(path: Path, files: list[str], probs: np.ndarray) -> None:
    """`FileName,Angry,...,Neutral`: ensembled probabilities, baseline class order."""
    order = sorted(range(len(files)), key=lambda i: files[i])
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["FileName", *CLASS_COLUMNS])
        for i in order:
            wr.writerow([files[i], *(f"{v:.6f}" for v in probs[i])])


def run_category_ensemble(
    run: Path, manifest: dict, cfg: EnsembleConfig, dev_split: str
) -> dict[str, Any]:
    """Task 1: weights on RUN/scores/<dev>.npz by macro-F1; submission_cat_<split>.csv and
    probabilities_cat_<split>.csv for every scored split; the summary for weights.json."""
    score_dir = run / "scores"
    dev_path = score_dir / f"{dev_split}.npz"
    dev = load_scores(dev_path)
    if "probs" not in dev or "classes" not in dev:
        raise EnsembleError(f"{dev_path}: no class probabilities; was task 1 (category) trained?")
    names = [str(s) for s in dev["score_sets"]]
    probs = dev["probs"].astype(np.float64)  # (K, N, 8)
    y = class_index(dev["classes"])
    active = [k for k in range(len(names)) if np.isfinite(probs[k]).all(-1).any()]
    rows = (y >= 0) & np.isfinite(probs[active]).all(-1).all(0) if active else y >= 0
    if not active or rows.sum() < 2:
        raise EnsembleError(f"{dev_path}: fewer than 2 {dev_split} rows with a class and scores")
    per_set = {
        nm: (
            float(macro_f1(y[rows], probs[k, rows].argmax(-1), N_CLASSES)) if k in active else None
        )
        for k, nm in enumerate(names)
    }
    w_act, f1, cw, cf1 = search_class_weights(probs[active][:, rows], y[rows], cfg)
    weights = np.zeros(len(names))
    weights[active] = w_act
    counts = np.asarray(manifest.get("train_class_counts") or np.ones(N_CLASSES), np.float64)
    prior = counts / counts.sum()
    out = run / "ensemble"
    out.mkdir(exist_ok=True)
    splits, fallbacks, dev_check = {}, {}, None
    for p in sorted(score_dir.glob("*.npz")):
        if p.name.endswith(".tmp.npz"):
            continue
        data = dev if p == dev_path else load_scores(p)
        if "probs" not in data:
            raise EnsembleError(f"{p}: no class probabilities (other splits of this run have them)")
        files = file_names(data)
        comb, used = combine_probs(data["probs"].astype(np.float64), weights, prior)
        pred = comb.argmax(-1)
        write_category_submission(out / f"submission_cat_{p.stem}.csv", files, pred)
        write_category_probabilities(out / f"probabilities_cat_{p.stem}.csv", files, comb)
        splits[p.stem] = len(files)
        fallbacks[p.stem] = sum(1 for u in used if u)
        if p == dev_path:
            dev_check = float(macro_f1(y[rows], pred[rows], N_CLASSES))
    return {
        "weights": {nm: round(float(v), 10) for nm, v in zip(names, weights, strict=True)},
        "dev_macro_f1": f1,
        "dev_macro_f1_check": dev_check,
        "coarse_weights": {
            nm: float(v) for nm, v in zip([names[k] for k in active], cw, strict=True)
        },
        "coarse_dev_macro_f1": cf1,
        "dev_macro_f1_per_set": per_set,
        "n_dev": int(rows.sum()),
        "classes": list(CLASS_CODES),
        "splits": splits,
        "fallbacks": fallbacks,
    }
