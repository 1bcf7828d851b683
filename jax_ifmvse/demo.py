"""`ifmvse demo`: the whole IF-MVSE pipeline on the built-in demo corpus, in minutes, on a CPU.

Stages (each resumable, so a rerun reuses what is done): demo corpus (eSpeak NG speech, cached
under `$IFMVSE_CACHE`) -> extract with whisper-base and whisper-tiny.en (offline built-ins) ->
transcribe with whisper-base and embed the transcripts with the packaged all-MiniLM-L6-v2 (a
text view, through `text.stage.transcribe_main`, the code of `ifmvse transcribe`) -> train the
seven score sets (five speech, two with text) for the three attributes -> ensemble weights on
Development, with and without the text sets -> CCC on Test1 for every score set and both
ensembles, the transcripts' WER against the sentences the corpus synthesized ->
RUN/report/index.md with PNG plots. Which encoder plays which view, and every setting, is in
`configs/demo.yaml`; the text view's settings are `TEXT` here.

Task 1 (the eight classes, macro-F1) runs beside it on the same store: the same five score sets
trained with `train.tasks=[category]` into OUT/run_cat, their ensemble, and a reference measured
in the same run, a class-balanced multinomial logistic regression on the concatenated stored
views (`logistic_reference`). The demo corpus's EmoClass is a function of the sentence's
sentiment and the arousal label (`data/demo_corpus.py`: H, N, A if arousal >= 4 else S).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from featurestore import FeatureStore
from jax_ifmvse.backbones.sources import cache_root
from jax_ifmvse.categories import (
    N_CLASSES,
    add_store_codes,
    class_index,
    class_weights,
    store_classes,
)
from jax_ifmvse.config import ATTRIBUTES, Config, EnsembleConfig, load_config, to_dict
from jax_ifmvse.data.demo_corpus import make_demo_corpus
from jax_ifmvse.data.views import load_views, standardize, view_stats
from jax_ifmvse.ensemble.combine import apply_weights, combine_probs
from jax_ifmvse.ensemble.run import load_scores, run_ensemble
from jax_ifmvse.ensemble.search import search_weights
from jax_ifmvse.evaluate import evaluate_files, read_category_labels, read_category_submission
from jax_ifmvse.extract import extract_main
from jax_ifmvse.finetune.run import finetune_main
from jax_ifmvse.losses import weighted_cross_entropy
from jax_ifmvse.metrics import accuracy, ccc_np, macro_f1
from jax_ifmvse.plots import plot_confusion
from jax_ifmvse.provenance import demo_warning, describe, run_corpus
from jax_ifmvse.text import transcripts as tx
from jax_ifmvse.text.stage import transcribe_main
from jax_ifmvse.text.wer import english_normalizer, wer_counts
from jax_ifmvse.train import train_run

# The CI size: about 5 minutes on 2 shared cores; `--finetune` then fine-tunes for 3 epochs, not
# configs/finetune_demo.yaml's 8 (the mechanics in a minute, not its CCC).
QUICK = {"n": 60, "epochs": 20, "finetune_epochs": 3}
FULL = {"n": 300}  # epochs from configs/demo.yaml


@dataclasses.dataclass(frozen=True)
class TextSettings:
    """The demo's text view: which Whisper transcribes, which encoder embeds, under what names."""

    asr: str = "whisper-base"  # built-in Whisper (greedy, the speech views' window)
    transcripts: str = "whisper-base"  # transcript set name beside the store
    language: str = "en"  # the corpus is English (eSpeak NG English voices): not detected
    view: str = "minilm"  # the store's text view (configs/demo.yaml's S6, S7 read it)
    encoder: str = "all-MiniLM-L6-v2"  # the packaged sentence-transformers checkpoint
    batch: int = 8  # clips per Whisper decoding batch


TEXT = TextSettings()


@dataclasses.dataclass(frozen=True)
class DemoPaths:
    """Where a demo run keeps its pieces under --out."""

    out: Path

    @property
    def store(self) -> Path:
        """The HDF5 feature store."""
        return self.out / "store.h5"

    @property
    def run(self) -> Path:
        """The training RUN/ directory."""
        return self.out / "run"

    @property
    def report(self) -> Path:
        """The report folder (index.md and PNGs)."""
        return self.out / "run" / "report"

    @property
    def run_cat(self) -> Path:
        """The task 1 RUN/ directory (train.tasks=[category])."""
        return self.out / "run_cat"


def category_rows(run: Path, split: str, corpus_labels: Path | None = None) -> dict[str, dict]:
    """Task 1: macro-F1 and accuracy of every score set and the ensemble on one split."""
    data = load_scores(run / "scores" / f"{split}.npz")
    weights = json.loads((run / "ensemble" / "weights.json").read_text())["category"]
    names = [str(x) for x in data["score_sets"]]
    probs = data["probs"].astype(np.float64)  # (K, N, 8)
    y = class_index(data["classes"])
    ok = (y >= 0) & np.isfinite(probs).all(-1).all(0)  # the same rows for every set
    w = np.array([weights["weights"][nm] for nm in names])
    preds = {nm: probs[k].argmax(-1) for k, nm in enumerate(names)}
    preds["ensemble"] = combine_probs(probs, w, np.full(N_CLASSES, 1.0 / N_CLASSES))[0].argmax(-1)
    return {
        nm: {"macro_f1": macro_f1(y[ok], p[ok], N_CLASSES), "accuracy": accuracy(y[ok], p[ok])}
        for nm, p in preds.items()
    }


def logistic_reference(
    store_path: Path,
    cfg: Config,
    splits: tuple[str, ...],
    steps: int = 500,
    lr: float = 0.05,
    l2: float = 1e-3,
) -> dict[str, dict]:
    """Task 1 reference: multinomial logistic regression on the concatenated stored views of
    the score sets (Train-standardized as training standardizes them), class-balanced with the
    baseline's weights, full-batch Adam; {split: {macro_f1, accuracy}}."""
    import jax
    import jax.numpy as jnp
    import optax

    store = FeatureStore(store_path)
    views = sorted({v for ss in cfg.model.score_sets for v in ss.views})
    stats = view_stats(store, cfg.train.train_split, views, set())

    def xy(split):
        ids, feats, _ = load_views(store, split, views, set())
        feats = standardize(feats, stats)
        x = np.concatenate([feats[v] for v in views], -1).astype(np.float32)
        return x, store_classes(store, store.index_of(ids))

    x, y = xy(cfg.train.train_split)
    keep = y >= 0
    x, y = jnp.asarray(x[keep]), jnp.asarray(y[keep])
    cw = jnp.asarray(class_weights(np.asarray(y)))
    params = {"w": jnp.zeros((x.shape[1], N_CLASSES)), "b": jnp.zeros(N_CLASSES)}
    tx = optax.adam(lr)

    def loss(p):
        ce = weighted_cross_entropy(x @ p["w"] + p["b"], y, cw)
        return ce + l2 * jnp.sum(p["w"] ** 2)

    @jax.jit
    def fit(p):
        def step(carry, _):
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (p, tx.init(p)), None, length=steps)[0][0]

    params = fit(params)
    out = {}
    for split in splits:
        xs, ys = xy(split)
        ok = ys >= 0
        pred = np.asarray(jnp.asarray(xs[ok]) @ params["w"] + params["b"]).argmax(-1)
        out[split] = {
            "macro_f1": macro_f1(ys[ok], pred, N_CLASSES),
            "accuracy": accuracy(ys[ok], pred),
        }
    return out


def demo_config(
    corpus: Path, epochs: int | None, config: str = "demo", extra: tuple[str, ...] = ()
) -> Config:
    """configs/demo.yaml pointed at the corpus, with the epoch count and any overrides."""
    ov = [f"corpus.path={corpus}"]
    if epochs is not None:
        ov.append(f"train.epochs={epochs}")
    return load_config(config, [*ov, *extra])


def _complete_rows(data: dict) -> dict:
    """Score-file rows that every score set scored (the tables compare sets on the same rows)."""
    s = data["scores"]  # (K, N, 3); a column with no score at all is an untrained attribute
    ok = ~(np.isnan(s) & np.isfinite(s).any(axis=1, keepdims=True)).any(axis=(0, 2))  # (N,)
    return {**data, "scores": data["scores"][:, ok], "labels": data["labels"][ok]}


def table_rows(run: Path, split: str) -> dict[str, dict[str, float]]:
    """CCC per attribute (and mean) of every score set and the ensemble on one split."""
    data = _complete_rows(load_scores(run / "scores" / f"{split}.npz"))
    weights = json.loads((run / "ensemble" / "weights.json").read_text())
    names = [str(s) for s in data["score_sets"]]
    w = {a: weights["attributes"][a]["weights"] for a in ATTRIBUTES}
    y = data["labels"].astype(np.float64)  # (N, 3)
    preds = {nm: data["scores"][k].astype(np.float64) for k, nm in enumerate(names)}
    preds["ensemble"] = apply_weights(data["scores"], w, names)
    out = {}
    for nm, p in preds.items():
        c = [float(ccc_np(y[:, a], p[:, a])) for a in range(len(ATTRIBUTES))]
        out[nm] = {**dict(zip(ATTRIBUTES, c, strict=True)), "mean": float(np.mean(c))}
    return out


def text_sets(cfg: Config) -> tuple[list[str], list[str]]:
    """(speech-only score sets, score sets that read the text view), in config order."""
    names = [s.name for s in cfg.model.score_sets]
    with_text = [s.name for s in cfg.model.score_sets if TEXT.view in s.views]
    return [n for n in names if n not in with_text], with_text


def transcribe_stage(paths: DemoPaths, cfg: Config) -> dict[str, Any]:
    """Transcribe the store with TEXT.asr and embed the transcripts as view TEXT.view (resumable:
    `ifmvse transcribe`'s code skips done rows); what the decoding did."""
    st = transcribe_main(
        str(paths.store), asr_source=TEXT.asr, transcripts_path=None, name=TEXT.transcripts,
        language=TEXT.language, text_backbones=[(TEXT.view, TEXT.encoder)], audio_root=None,
        shard=None, max_tokens=None, pooling="mean", layers="last", batch=TEXT.batch,
        compute_dtype="float32", window_s=cfg.extract.whisper_window_s,
    )  # fmt: skip
    return {
        "rows": st.done,
        "failed": st.failed,
        "audio_s": st.audio_s,
        "decode_s": st.wall_s,  # this run's rows only (compilation included); 0 when resumed
        "flags": st.flags,
    }


def transcript_wer(paths: DemoPaths, corpus: Path) -> dict[str, Any]:
    """WER of the demo transcripts against the sentences the corpus synthesized, per split and
    overall (Whisper's English normaliser on both sides), with the flag counts and examples."""
    import csv

    store = FeatureStore(paths.store)
    texts = tx.read(paths.store, TEXT.transcripts)
    with open(corpus / "Labels" / "demo_controls.csv", newline="") as f:
        spoken = {r["FileName"]: r["text"] for r in csv.DictReader(f)}
    norm = english_normalizer()
    by_split: dict[str, tuple[list[str], list[str]]] = {}
    flags: dict[str, int] = {}
    examples = []
    for row, rec in sorted(texts.items()):
        ref = spoken[Path(str(store.paths[row])).name]
        refs, hyps = by_split.setdefault(str(store.splits[row]), ([], []))
        refs.append(ref)
        hyps.append(rec["text"])
        for flag in filter(None, rec["flags"].split(",")):
            flags[flag] = flags.get(flag, 0) + 1
        if len(examples) < 3:
            examples.append({"id": str(store.ids[row]), "spoken": ref, "transcript": rec["text"]})
    out: dict[str, Any] = {"splits": {}, "flags": flags, "examples": examples}
    total = [0, 0, 0]
    for split, (refs, hyps) in by_split.items():
        err, words = wer_counts(refs, hyps, norm)
        out["splits"][split] = {"wer": err / max(words, 1), "words": words, "clips": len(refs)}
        total = [total[0] + err, total[1] + words, total[2] + len(refs)]
    out["all"] = {"wer": total[0] / max(total[1], 1), "words": total[1], "clips": total[2]}
    return out


def subset_weights(
    run: Path, split: str, names: list[str], cfg: EnsembleConfig
) -> dict[str, dict[str, float]]:
    """Ensemble weights searched on `split` over the score sets `names` only (the others get 0),
    as the run's ensemble searches over all of them: {attribute: {set: weight}}."""
    data = _complete_rows(load_scores(run / "scores" / f"{split}.npz"))
    every = [str(x) for x in data["score_sets"]]
    keep = [every.index(n) for n in names]
    out = {}
    for a, attr in enumerate(ATTRIBUTES):
        res = search_weights(data["scores"][keep, :, a], data["labels"][:, a], cfg)
        w = dict.fromkeys(every, 0.0)
        w.update({n: round(float(v), 10) for n, v in zip(names, res.weights, strict=True)})
        out[attr] = w
    return out


def ensemble_ccc(run: Path, split: str, weights: dict[str, dict[str, float]]) -> dict[str, float]:
    """CCC per attribute (and mean) of the score sets mixed with `weights` on one split."""
    data = _complete_rows(load_scores(run / "scores" / f"{split}.npz"))
    pred = apply_weights(data["scores"], weights, [str(x) for x in data["score_sets"]])
    y = data["labels"].astype(np.float64)
    c = [float(ccc_np(y[:, a], pred[:, a])) for a in range(len(ATTRIBUTES))]
    return {**dict(zip(ATTRIBUTES, c, strict=True)), "mean": float(np.mean(c))}


def with_without_text(run: Path, cfg: Config, rows: dict[str, dict]) -> dict[str, Any]:
    """Each attribute without text (the ensemble searched over the speech sets only) and with it
    (the run's ensemble over every set), per split, beside the text sets alone.

    `rows`: {split: table_rows(run, split)}, whose "ensemble" is the run's ensemble."""
    speech, text = text_sets(cfg)
    weights = subset_weights(run, cfg.train.dev_split, speech, cfg.ensemble)
    out: dict[str, Any] = {"speech_sets": speech, "text_sets": text, "speech_weights": weights}
    for split, table in rows.items():
        without = ensemble_ccc(run, split, weights)
        best = max(speech, key=lambda nm: table[nm]["mean"])
        out[split] = {
            c: {
                "without_text": without[c],
                "with_text": table["ensemble"][c],
                "best_speech_set": table[best][c],
                **{nm: table[nm][c] for nm in text},
            }
            for c in (*ATTRIBUTES, "mean")
        }
        out[split]["best_speech_set_name"] = best
    return out


def _md_text_table(ww: dict[str, Any], split: str) -> str:
    """Markdown: per attribute, the ensemble without and with text, the gain, and the parts."""
    text = ww["text_sets"]
    best = ww[split]["best_speech_set_name"]
    head = (
        f"| {split} CCC | without text (ensemble of {', '.join(ww['speech_sets'])}) | with text"
        f" (ensemble of all) | gain | best speech set ({best}) | "
        + " | ".join(f"{nm} (text)" for nm in text)
        + " |\n|---|"
        + "---:|" * (4 + len(text))
        + "\n"
    )
    body = ""
    for c in (*ATTRIBUTES, "mean"):
        r = ww[split][c]
        body += (
            f"| {c} | {r['without_text']:.4f} | {r['with_text']:.4f} |"
            f" {r['with_text'] - r['without_text']:+.4f} | {r['best_speech_set']:.4f} | "
            + " | ".join(f"{r[nm]:.4f}" for nm in text)
            + " |\n"
        )
    return head + body


def plot_with_without_text(ww: dict[str, Any], split: str, path: Path) -> None:
    """Bars per attribute: the ensemble without text and with text on one split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = (*ATTRIBUTES, "mean")
    x = np.arange(len(cols))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for j, (key, label) in enumerate(
        (("without_text", "without text"), ("with_text", "with text"))
    ):
        vals = [ww[split][c][key] for c in cols]
        ax.bar(x + (j - 0.5) * 0.38, vals, 0.38, label=label)
        for xi, v in zip(x, vals, strict=True):
            ax.text(xi + (j - 0.5) * 0.38, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, cols)
    ax.set_ylabel(f"{split} CCC (ensemble)")
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.0)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_curves(run: Path, names: list[str], path: Path) -> None:
    """Training curves: train loss and dev CCC per epoch, one panel per attribute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(ATTRIBUTES), figsize=(12, 6), sharex=True)
    for j, attr in enumerate(ATTRIBUTES):
        for nm in names:
            f = run / nm / attr / "metrics.jsonl"
            if not f.exists():
                continue
            hist = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            ep = [h["epoch"] for h in hist]
            axes[0, j].plot(ep, [h["train_loss"] for h in hist], label=nm)
            axes[1, j].plot(ep, [h["dev_ccc"] for h in hist], label=nm)
        axes[0, j].set_title(attr)
        axes[1, j].set_xlabel("epoch")
    axes[0, 0].set_ylabel("train loss (1 - CCC)")
    axes[1, 0].set_ylabel("development CCC")
    axes[0, 0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_test_scatter(run: Path, split: str, path: Path) -> None:
    """Ensemble prediction vs label on the test split, one panel per attribute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = _complete_rows(load_scores(run / "scores" / f"{split}.npz"))
    weights = json.loads((run / "ensemble" / "weights.json").read_text())
    w = {a: weights["attributes"][a]["weights"] for a in ATTRIBUTES}
    pred = apply_weights(data["scores"], w, [str(s) for s in data["score_sets"]])
    fig, axes = plt.subplots(1, len(ATTRIBUTES), figsize=(12, 4))
    for a, attr in enumerate(ATTRIBUTES):
        y, p = data["labels"][:, a], pred[:, a]
        axes[a].scatter(y, p, s=10, alpha=0.7)
        axes[a].plot([1, 7], [1, 7], "k--", lw=0.8)
        axes[a].set(xlim=(1, 7), ylim=(1, 7), xlabel="label", ylabel="ensemble prediction")
        axes[a].set_title(f"{attr} ({split}, CCC {ccc_np(y, p):.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _md_table(rows: dict[str, dict[str, float]]) -> str:
    head = "| score set | " + " | ".join(ATTRIBUTES) + " | mean |\n"
    head += "|---|" + "---:|" * (len(ATTRIBUTES) + 1) + "\n"
    body = "".join(
        f"| {nm} | " + " | ".join(f"{r[c]:.4f}" for c in (*ATTRIBUTES, "mean")) + " |\n"
        for nm, r in rows.items()
    )
    return head + body


def make_plots(paths: DemoPaths, cfg: Config, test_split: str) -> None:
    """The report's PNGs: training curves, dev CCC bars, ensemble-vs-label scatter on test."""
    rep = paths.report
    rep.mkdir(parents=True, exist_ok=True)
    plot_curves(paths.run, [s.name for s in cfg.model.score_sets], rep / "training_curves.png")
    shutil.copyfile(paths.run / "ensemble" / "dev_ccc.png", rep / "dev_ccc.png")
    plot_test_scatter(paths.run, test_split, rep / "test_scatter.png")


def write_report(
    paths: DemoPaths,
    cfg: Config,
    dev: dict,
    test: dict,
    test_split: str,
    times: dict[str, float],
    command: str,
    evaluation: dict | None = None,
    task1: dict | None = None,
    text_view: dict | None = None,
) -> Path:
    """RUN/report/index.md and results.json: CCC tables, weights, stage times, plot links."""
    rep = paths.report
    names = [s.name for s in cfg.model.score_sets]
    weights = json.loads((paths.run / "ensemble" / "weights.json").read_text())
    views = "\n".join(
        f"- `{s.name}` = {s.kind}({', '.join(s.views)})" for s in cfg.model.score_sets
    )
    sources = "\n".join(f"- `{k}`: {v}" for k, v in cfg.extract.backbones)
    sources += "".join(
        f"\n- `{k}`: hidden state {v.partition(':')[2]} of `{v.partition(':')[0]}`"
        for k, v in cfg.extract.layer_views
    )
    wtab = "| attribute | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names) + "\n"
    for a in ATTRIBUTES:
        w = weights["attributes"][a]["weights"] or {}
        wtab += f"| {a} | " + " | ".join(f"{w.get(n, 0):.2f}" for n in names) + " |\n"
    best = max((nm for nm in test if nm != "ensemble"), key=lambda nm: test[nm]["mean"])
    verdict = (
        f"The ensemble's mean {test_split} CCC ({test['ensemble']['mean']:.4f}) "
        + ("beats" if test["ensemble"]["mean"] > test[best]["mean"] else "does NOT beat")
        + f" the best single score set {best} ({test[best]['mean']:.4f})."
    )
    for a in ATTRIBUTES:
        top = max((nm for nm in test if nm != "ensemble"), key=lambda nm: test[nm][a])
        if test["ensemble"][a] <= test[top][a]:
            verdict += (
                f" On {a} it does not: {test['ensemble'][a]:.4f} vs {top}'s {test[top][a]:.4f}"
                f" (weights fitted on {cfg.train.dev_split} do not carry over exactly)."
            )
    ci = ""
    if evaluation is not None:
        ci = (
            "\n95% bootstrap intervals of the ensemble (`ifmvse evaluate` on the submission"
            " file, predictions clipped to 1..7):\n\n"
        ) + "".join(
            f"- {a}: {v['ccc']:.4f} [{v['low']:.4f}, {v['high']:.4f}]\n"
            for a, v in evaluation["attributes"].items()
            if v is not None
        )
    stage = "".join(f"| {k} | {v:.1f} |\n" for k, v in times.items())
    cat = ""
    if task1 is not None:
        ev = task1["evaluation"]
        lo, hi = ev["macro_f1_interval"]
        cat = f"""
## Task 1: {test_split} macro-F1 (eight classes; weights searched on {cfg.train.dev_split})

The same score sets trained with `train.tasks=[category]` (class-weighted cross-entropy, best
epoch by development macro-F1) in `run_cat/`, their ensemble (weights by development macro-F1),
and a reference measured in this run: a class-balanced multinomial logistic regression on the
concatenated stored views. The demo's classes are H, N, A, S (a rule of the sentence's sentiment
and arousal), so the other four never occur.

{_md_category_table(task1, cfg.train.dev_split, test_split)}
Ensemble (`ifmvse evaluate` on `submission_cat_{test_split}.csv`): macro-F1 {ev["macro_f1"]:.4f},
95% bootstrap interval [{lo:.4f}, {hi:.4f}], accuracy {ev["accuracy"]:.4f}, N = {ev["n"]}.

![task 1 confusion matrix](confusion_test.png)
"""
    with_text = ""
    if text_view is not None:
        with_text = _md_text_section(text_view, cfg, test_split)
    record = run_corpus(json.loads((paths.run / "manifest.json").read_text()))
    corpus_line = describe(record)
    demo_line = (demo_warning(record, "this run") or "").replace("note: t", "T", 1)
    text = f"""# IF-MVSE demo report

Command: `{command}`

Corpus: `{cfg.corpus.path}` (built-in eSpeak NG demo corpus; labels follow documented rules).

Trained on: {corpus_line}
{demo_line}

Views (store backbones):
{sources}

Score sets:
{views}

Whisper window: {cfg.extract.whisper_window_s:g} s (a speed option; the paper uses 30 s).
Training: {cfg.train.epochs} epochs, lr {cfg.train.learning_rate:g}, batch {cfg.train.batch_size},
common_dim {cfg.model.common_dim}, hidden {cfg.model.hidden}.

## {test_split} CCC (weights searched on {cfg.train.dev_split})

{_md_table(test)}
{verdict}
{ci}{with_text}
## {cfg.train.dev_split} CCC

{_md_table(dev)}{cat}
## Ensemble weights ({weights["mode"]})

{wtab}
## Stage times (s)

| stage | seconds |
|---|---:|
{stage}
## Plots

![training curves](training_curves.png)

![development CCC](dev_ccc.png)

![{test_split} scatter](test_scatter.png)
"""
    (rep / "index.md").write_text(text)
    (rep / "results.json").write_text(
        json.dumps(
            {
                "test_split": test_split,
                "test": test,
                "dev": dev,
                "task1": task1,
                "text": text_view,
                "stage_seconds": times,
            },
            indent=2,
        )
        + "\n"
    )
    return rep / "index.md"


def _md_text_section(text: dict, cfg: Config, test_split: str) -> str:
    """The report's text section: with and without text per attribute, the transcripts' WER."""
    w, dec = text["wer"], text["decoding"]
    splits = "; ".join(f"{sp} {v['wer']:.1%} ({v['words']} words)" for sp, v in w["splits"].items())
    flags = ", ".join(f"{k} {v}" for k, v in sorted(w["flags"].items())) or "none"
    rt = dec["audio_s"] / dec["decode_s"] if dec["decode_s"] > 0 else float("nan")
    speed = (
        f"{dec['rows']} clips ({dec['audio_s']:.0f} s of audio) decoded in {dec['decode_s']:.0f} s"
        f" ({rt:.2f}x real time, compilation included)"
        if dec["rows"]
        else "every clip was transcribed by an earlier run (resumed)"
    )
    examples = "".join(
        f"| {e['id']} | {e['spoken']} | {e['transcript']} |\n" for e in w["examples"]
    )
    return f"""
## With and without text ({test_split}; weights searched on {cfg.train.dev_split})

Without text: the ensemble searched over the speech score sets only; with text: the run's
ensemble, searched over every score set (the text view `{text["view"]}` is
`{text["encoder"]}` over `{text["asr"]}` transcripts).

{_md_text_table(text, test_split)}
{cfg.train.dev_split}:

{_md_text_table(text, cfg.train.dev_split)}
The demo's valence follows the sentence's sentiment (a rule of the corpus), and sentences recur
across splits, so the text sets can learn it from the words; arousal and dominance follow the
prosody alone, which text does not carry.

![with and without text](with_without_text.png)

## Transcripts: {text["asr"]} against the sentences the corpus synthesized

Greedy decoding in JAX (`ifmvse transcribe`'s code), language {text["language"]} given, the
encoder seeing a {text["window_s"]:g}-s window (the speech views' speed option; Whisper's own is
30 s). Word error rate after Whisper's English normaliser: **{w["all"]["wer"]:.1%}** over
{w["all"]["words"]} words in {w["all"]["clips"]} clips ({splits}). Flags: {flags}. {speed}.

| clip | spoken | transcript |
|---|---|---|
{examples}"""


def print_text_table(console, text: dict, test_split: str) -> None:
    """Per attribute: the ensemble without and with text, and the transcripts' WER."""
    from rich.table import Table

    table = Table(title=f"CCC on {test_split}: ensemble without and with the text view")
    for col in ("", "without text", "with text", "gain", *text["text_sets"]):
        table.add_column(col, justify="left" if not col else "right")
    for c in (*ATTRIBUTES, "mean"):
        r = text[test_split][c]
        table.add_row(
            c,
            f"{r['without_text']:.4f}",
            f"{r['with_text']:.4f}",
            f"{r['with_text'] - r['without_text']:+.4f}",
            *(f"{r[nm]:.4f}" for nm in text["text_sets"]),
        )
    console.print(table)
    w = text["wer"]["all"]
    console.print(
        f"transcripts ({text['asr']}, {text['window_s']:g}-s window): WER {w['wer']:.1%} over"
        f" {w['words']} words against the synthesized sentences",
        highlight=False,
    )


def run_demo(
    out: str | Path = "runs/demo",
    *,
    n: int | None = None,
    epochs: int | None = None,
    quick: bool = False,
    seed: int = 0,
    overrides: tuple[str, ...] = (),
    command: str = "ifmvse demo",
    finetune: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the whole demo under `out`; returns the tables and stage times.

    `finetune=True` adds a stage: whisper-tiny.en fine-tuned end to end on the same corpus and
    split (configs/finetune_demo.yaml), its Test1 CCC printed next to the frozen-feature heads.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    from rich.rule import Rule

    console = Console()
    size = QUICK if quick else FULL
    n = n if n is not None else size["n"]
    epochs = epochs if epochs is not None else size.get("epochs")
    paths = DemoPaths(Path(out))
    paths.out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    console.print(Rule(f"1/6 demo corpus (n={n}, seed={seed})"))
    t = time.perf_counter()
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("synthesizing", total=n)
        corpus = make_demo_corpus(
            cache_root() / f"demo_corpus-{n}-{seed}",
            n=n,
            seed=seed,
            progress=lambda i, total: bar.update(task, completed=i),
        )
        bar.update(task, completed=n)
    times["corpus"] = time.perf_counter() - t
    cfg = demo_config(corpus, epochs, extra=overrides)
    console.print(f"corpus: {corpus}")

    console.print(
        Rule("2/6 extract (" + ", ".join(f"{k}={v}" for k, v in cfg.extract.backbones) + ")")
    )
    t = time.perf_counter()
    extract_main(cfg, dict(cfg.extract.backbones), str(paths.store))
    times["extract"] = time.perf_counter() - t

    console.print(
        Rule(
            f"3/6 transcribe ({TEXT.asr}, language {TEXT.language},"
            f" {cfg.extract.whisper_window_s:g}-s window) + text view {TEXT.view}={TEXT.encoder}"
        )
    )
    t = time.perf_counter()
    decoding = transcribe_stage(paths, cfg)
    times["transcribe"] = time.perf_counter() - t

    console.print(Rule(f"4/6 train {len(cfg.model.score_sets)} score sets x 3 attributes"))
    t = time.perf_counter()
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        "dev CCC {task.fields[ccc]}  best {task.fields[best]}",
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        tasks: dict[str, Any] = {}
        best: dict[str, float] = {}

        def on_epoch(rec: dict) -> None:
            # The best epoch's checkpoint is the one kept, so show it beside the latest epoch.
            name = rec["model"]
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=rec["epochs"], ccc="-", best="-")
            score = rec.get("dev_score", rec.get("dev_ccc"))  # task 1: dev macro-F1
            best[name] = max(best.get(name, float("-inf")), score)
            bar.update(
                tasks[name],
                completed=rec["epoch"],
                ccc=f"{score:.4f}",
                best=f"{best[name]:.4f}",
            )

        train_run(paths.store, cfg, paths.run, progress=on_epoch)
        times["train"] = time.perf_counter() - t
        # Task 1 on the same store and score sets (a store from before task 1 gets its labels).
        t = time.perf_counter()
        if "EmoClass" not in FeatureStore(paths.store).codes:
            add_store_codes(paths.store, corpus / "Labels" / "labels_consensus.csv")
        cfg_cat = demo_config(corpus, epochs, extra=(*overrides, "train.tasks=[category]"))
        train_run(paths.store, cfg_cat, paths.run_cat, progress=on_epoch)
    times["train task 1"] = time.perf_counter() - t

    console.print(Rule(f"5/6 ensemble weights on {cfg.train.dev_split}"))
    t = time.perf_counter()
    run_ensemble(paths.run, cfg.ensemble)
    run_ensemble(paths.run_cat, cfg.ensemble)
    times["ensemble"] = time.perf_counter() - t

    test_split = cfg.train.test_splits[0]
    console.print(Rule(f"6/6 evaluate on {test_split} and write the report"))
    t = time.perf_counter()
    dev = table_rows(paths.run, cfg.train.dev_split)
    test = table_rows(paths.run, test_split)
    text = {
        "asr": TEXT.asr,
        "language": TEXT.language,
        "window_s": cfg.extract.whisper_window_s,
        "encoder": TEXT.encoder,
        "view": TEXT.view,
        "decoding": decoding,
        "wer": transcript_wer(paths, corpus),
        **with_without_text(paths.run, cfg, {cfg.train.dev_split: dev, test_split: test}),
    }
    evaluation = evaluate_files(
        paths.run / "ensemble" / f"submission_{test_split}.csv",
        corpus / "Labels" / "labels_consensus.csv",
        test_split,
    )
    task1 = {
        "dev": category_rows(paths.run_cat, cfg.train.dev_split),
        "test": category_rows(paths.run_cat, test_split),
        "reference": logistic_reference(paths.store, cfg, (cfg.train.dev_split, test_split)),
        "evaluation": evaluate_files(
            paths.run_cat / "ensemble" / f"submission_cat_{test_split}.csv",
            corpus / "Labels" / "labels_consensus.csv",
            test_split,
        ),
    }
    make_plots(paths, cfg, test_split)
    plot_with_without_text(text, test_split, paths.report / "with_without_text.png")
    plot_category_confusion(paths, test_split, corpus)
    times["evaluate+report"] = time.perf_counter() - t
    finetuned = None
    if finetune:
        console.print(Rule("+ fine-tune whisper-tiny.en end to end (configs/finetune_demo.yaml)"))
        t = time.perf_counter()
        finetuned = run_demo_finetune(paths, corpus, cfg, test_split, size.get("finetune_epochs"))
        times["finetune"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_all
    index = write_report(paths, cfg, dev, test, test_split, times, command, evaluation, task1, text)
    print_tables(console, dev, test, cfg.train.dev_split, test_split, times)
    print_text_table(console, text, test_split)
    print_category_tables(console, task1, cfg.train.dev_split, test_split)
    if finetuned is not None:
        print_finetune_table(console, finetuned, test, test_split)
    console.print(f"report: {index}")
    return {
        "report": str(index),
        "dev": dev,
        "test": test,
        "task1": task1,
        "text": text,
        "test_split": test_split,
        "stage_seconds": times,
        "config": to_dict(cfg),
        **({"finetune": finetuned} if finetuned is not None else {}),
    }


FINETUNE_VIEW = "tiny"  # the demo view whose encoder (whisper-tiny.en) is fine-tuned


def run_demo_finetune(
    paths: DemoPaths, corpus: Path, cfg: Config, test_split: str, epochs: int | None = None
) -> dict:
    """Fine-tune the `tiny` view's encoder on the demo corpus (resumable); its manifest."""
    source = dict(cfg.extract.backbones)[FINETUNE_VIEW]
    over = [f"corpus.path={corpus}", f"train.test_splits=[{test_split}]"]
    ft_cfg = load_config("finetune_demo", over + ([f"train.epochs={epochs}"] if epochs else []))
    return finetune_main(ft_cfg, FINETUNE_VIEW, source, paths.out / "finetune")


def print_finetune_table(console, finetuned: dict, test: dict, test_split: str) -> None:
    """Test CCC of the fine-tuned encoder next to the frozen-feature score sets and ensemble."""
    from rich.table import Table

    table = Table(title=f"CCC on {test_split}: fine-tuned whisper-tiny.en vs frozen-feature heads")
    table.add_column("model")
    for a in (*ATTRIBUTES, "mean"):
        table.add_column(a, justify="right")
    ft = finetuned["ccc"][test_split]
    table.add_row(
        f"fine-tuned {FINETUNE_VIEW} (best epoch {finetuned['best']['epoch']})",
        *(f"{ft[c]:.4f}" for c in (*ATTRIBUTES, "mean")),
        style="bold",
    )
    for nm, r in test.items():
        table.add_row(f"{nm} (frozen features)", *(f"{r[c]:.4f}" for c in (*ATTRIBUTES, "mean")))
    console.print(table)


def plot_category_confusion(paths: DemoPaths, split: str, corpus: Path) -> None:
    """The task 1 ensemble's confusion matrix on the test split (report/confusion_test.png)."""
    ids, pred = read_category_submission(paths.run_cat / "ensemble" / f"submission_cat_{split}.csv")
    lab_ids, y = read_category_labels(corpus / "Labels" / "labels_consensus.csv", split)
    by_id = dict(zip(ids, pred, strict=True))
    p = np.asarray([by_id[i] for i in lab_ids])
    ok = y >= 0
    title = f"task 1 ensemble, {split}"
    plot_confusion(y[ok], p[ok], paths.report / "confusion_test.png", title)


def _md_category_table(task1: dict, dev_split: str, test_split: str) -> str:
    """Task 1 markdown table: macro-F1 and accuracy per score set, ensemble and reference."""
    head = f"| score set | {test_split} macro-F1 | {test_split} accuracy | {dev_split} macro-F1 |\n"
    head += "|---|---:|---:|---:|\n"
    rows = {**task1["test"], "logistic reference": task1["reference"][test_split]}
    dev = {**task1["dev"], "logistic reference": task1["reference"][dev_split]}
    return head + "".join(
        f"| {nm} | {r['macro_f1']:.4f} | {r['accuracy']:.4f} | {dev[nm]['macro_f1']:.4f} |\n"
        for nm, r in rows.items()
    )


def print_category_tables(console, task1: dict, dev_split: str, test_split: str) -> None:
    """The task 1 table next to the task 2 one: macro-F1 per score set, ensemble, reference."""
    from rich.table import Table

    table = Table(title=f"task 1: macro-F1 on {test_split} (dev = {dev_split}, weights there)")
    table.add_column("score set")
    table.add_column(f"{test_split} macro-F1", justify="right")
    table.add_column(f"{test_split} accuracy", justify="right")
    table.add_column(f"{dev_split} macro-F1", justify="right")
    rows = {**task1["test"], "logistic reference": task1["reference"][test_split]}
    dev = {**task1["dev"], "logistic reference": task1["reference"][dev_split]}
    for nm, r in rows.items():
        table.add_row(
            nm,
            f"{r['macro_f1']:.4f}",
            f"{r['accuracy']:.4f}",
            f"{dev[nm]['macro_f1']:.4f}",
            style="bold" if nm == "ensemble" else None,
        )
    console.print(table)
    ev = task1["evaluation"]
    lo, hi = ev["macro_f1_interval"]
    console.print(
        f"task 1 ensemble {test_split} macro-F1 {ev['macro_f1']:.4f}, 95% bootstrap"
        f" [{lo:.4f}, {hi:.4f}] (`ifmvse evaluate` on submission_cat_{test_split}.csv)",
        highlight=False,
    )


def print_tables(console, dev: dict, test: dict, dev_split: str, test_split: str, times) -> None:
    """The CCC table (test and dev per score set and the ensemble) and the stage times."""
    from rich.table import Table

    table = Table(title=f"CCC on {test_split} (dev = {dev_split}, weights searched there)")
    table.add_column("score set")
    for a in (*ATTRIBUTES, "mean"):
        table.add_column(f"{test_split} {a}", justify="right")
    table.add_column("dev mean", justify="right")
    best = max(test[nm]["mean"] for nm in test if nm != "ensemble")
    for nm, r in test.items():
        style = "bold" if nm == "ensemble" else ("green" if r["mean"] == best else None)
        table.add_row(
            nm,
            *(f"{r[c]:.4f}" for c in (*ATTRIBUTES, "mean")),
            f"{dev[nm]['mean']:.4f}",
            style=style,
        )
    console.print(table)
    console.print(
        "stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()), highlight=False
    )
