"""Score sets mixed with ensemble weights, with a stated fallback for every row missing a set."""

from __future__ import annotations

import dataclasses

import numpy as np

from jax_ifmvse.config import ATTRIBUTES
from jax_ifmvse.data.corpus import LABEL_MAX, LABEL_MIN

LABEL_RANGE = (LABEL_MIN, LABEL_MAX)  # the corpus scale, one definition in data/corpus.py


def apply_weights(
    scores: np.ndarray, weights: dict[str, dict | None], names: list[str]
) -> np.ndarray:
    """Ensembled predictions (N, 3) from scores (K, N, 3); NaN where an attribute has no weights."""
    out = np.full(scores.shape[1:], np.nan)
    for a, attr in enumerate(ATTRIBUTES):
        w = weights.get(attr)
        if w is None:
            continue
        vec = np.array([w[nm] for nm in names])
        used = vec != 0
        out[:, a] = vec[used] @ scores[used, :, a].astype(np.float64)
    return out


@dataclasses.dataclass(frozen=True)
class Combined:
    """Ensembled predictions of every row, and how each row that could not use them all was made."""

    pred: np.ndarray  # (N, 3) ATTRIBUTES order, unclipped; NaN only for attributes with no weights
    used: list[str]  # per row: "" for the full ensemble, else what stood in for it
    kinds: dict[str, int]  # fallback counts: renormalised, best_set, label_mean


def combine(
    scores: np.ndarray,
    weights: dict[str, dict | None],
    names: list[str],
    label_mean: dict[str, float | None],
    set_ccc: dict[str, dict[str, float | None]] | None = None,
) -> Combined:
    """`apply_weights` for every row, with fallbacks where some score sets have no score (NaN).

    A row missing a weighted set is scored from the weighted sets it has, their weights scaled
    to the same sum (renormalised); if it has none of them, from the available set with the best
    development CCC (`set_ccc`); with no score at all, from `label_mean` (the Train label mean).
    An attribute with no weights (too few usable development rows) is scored in every row from
    the available set with the best development CCC, else from `label_mean`.
    """
    k, n, _ = scores.shape
    pred = np.full((n, len(ATTRIBUTES)), np.nan)
    notes: list[dict[str, str]] = [{} for _ in range(n)]
    kinds = {"renormalised": 0, "best_set": 0, "label_mean": 0}

    def note(i: int, attr: str, text: str, kind: str) -> None:
        notes[i][attr] = text
        notes[i].setdefault("_kind", kind)
        if kind == "label_mean" or notes[i]["_kind"] == "renormalised":
            notes[i]["_kind"] = kind  # a row counts once, under its weakest fallback

    def best_set_or_mean(i: int, a: int, s: np.ndarray, ranked: list[int], why: str) -> None:
        """Row i of attribute a from the first of `ranked` it has a score from, else the mean."""
        attr = ATTRIBUTES[a]
        j = next((j for j in ranked if np.isfinite(s[j, i])), None)
        if j is not None:
            pred[i, a] = s[j, i]
            note(i, attr, f"{names[j]} ({why})", "best_set")
        else:
            m = label_mean.get(attr)
            pred[i, a] = np.nan if m is None else m
            note(i, attr, "Train label mean", "label_mean")

    for a, attr in enumerate(ATTRIBUTES):
        w = weights.get(attr)
        ccc = (set_ccc or {}).get(attr) or {}
        s = scores[:, :, a].astype(np.float64)  # (K, N)
        if w is None:
            # Only sets with a development CCC: without one, nothing says a set beats the mean.
            known = [j for j in range(k) if ccc.get(names[j]) is not None]
            known = [j for j in known if np.isfinite(ccc[names[j]])]
            known.sort(key=lambda j: -ccc[names[j]])
            for i in range(n):
                best_set_or_mean(i, a, s, known, "no ensemble weights; best set on development")
            continue
        vec = np.array([float(w[nm]) for nm in names])  # (K,)
        avail = np.isfinite(s)
        s0 = np.where(avail, s, 0.0)
        wa = vec[:, None] * avail  # (K, N) weights of the sets each row has
        full = avail[vec != 0].all(axis=0)  # (N,)
        total = vec.sum() if vec.sum() != 0 else 1.0
        have_w = wa.sum(axis=0)  # (N,)
        ok = have_w != 0
        pred[ok, a] = (wa[:, ok] * s0[:, ok]).sum(axis=0) * (total / have_w[ok])
        pred[full, a] = vec[vec != 0] @ s0[vec != 0][:, full]  # apply_weights' sum
        rank = sorted(range(k), key=lambda j: -(ccc.get(names[j]) or -np.inf))
        for i in np.flatnonzero(~full):
            if ok[i]:
                sets = [names[j] for j in range(k) if wa[j, i] != 0]
                note(i, attr, f"{'+'.join(sets)} (weights renormalised)", "renormalised")
            else:  # `rank` holds every set: the row's best available one, or the mean if none
                best_set_or_mean(i, a, s, rank, "best available set on development")
    used = []
    for nt in notes:
        kind = nt.pop("_kind", None)
        if kind is None:
            used.append("")
            continue
        kinds[kind] += 1
        vals = set(nt.values())
        same = len(vals) == 1 and len(nt) == len(ATTRIBUTES)
        used.append(vals.pop() if same else "; ".join(f"{a}: {v}" for a, v in nt.items()))
    return Combined(pred, used, kinds)


def combine_probs(
    probs: np.ndarray, weights: np.ndarray, prior: np.ndarray
) -> tuple[np.ndarray, list[str]]:
    """Ensembled class probabilities (N, J) of probs (K, N, J) and per row what stood in.

    A row missing a weighted set uses the weighted sets it has (weights renormalised), else the
    first available set, and with no set at all the Train class prior.
    """
    k, n, j = probs.shape
    avail = np.isfinite(probs).all(-1)  # (K, N)
    w = np.asarray(weights, np.float64)[:, None] * avail  # (K, N)
    p0 = np.where(avail[..., None], probs, 0.0)
    have = w.sum(0)  # (N,)
    out = np.einsum("kn,knj->nj", w, p0) / np.where(have > 0, have, 1.0)[:, None]
    used = [""] * n
    full = avail[np.asarray(weights) != 0].all(0)
    for i in np.flatnonzero(~full):
        if have[i] > 0:
            used[i] = "weights renormalised"
        elif avail[:, i].any():
            kk = int(np.flatnonzero(avail[:, i])[0])
            out[i] = probs[kk, i]
            used[i] = f"score set {kk} (no weighted set)"
        else:
            out[i] = prior
            used[i] = "Train class prior"
    return out, used
