"""`ifmvse finetune` with `finetune.task=category` (task 1) on a tiny random WavLM."""

from __future__ import annotations

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import f1_score
from tiny_corpus import write_tone_corpus
from tiny_models import save_tiny_wavlm
from tolerances import (
    U32,
    U64,
    assert_exceeds,
    assert_within,
    cross_entropy,
    f1_orders,
    max_diff,
    nudge,
    one_pass,
    probability_sum,
)

from jax_ifmvse.categories import CLASS_CODES, CLASS_NAMES, class_index
from jax_ifmvse.config import load_config
from jax_ifmvse.finetune.model import REGULARIZATION_RATES, FinetuneError
from jax_ifmvse.finetune.run import finetune_run

SETTINGS = [
    "finetune.task=category",
    "train.epochs=3",
    "train.batch_size=4",
    "train.learning_rate=1e-3",
    "finetune.accumulation_steps=2",
    "finetune.head_hidden=16",
    "finetune.eval_batch=4",
    "audio.max_seconds=1.0",
    "audio.bucket_seconds=[1.0]",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftcat")
    return root, write_tone_corpus(root / "corpus"), save_tiny_wavlm(root / "wavlm")


def _cfg(root, manifest, *extra):
    ov = ["corpus.kind=manifest", f"corpus.path={manifest}", f"extract.cache_dir={root / 'c'}"]
    return load_config("finetune", [*ov, *SETTINGS, *extra])


@pytest.fixture(scope="module")
def run(corpus):
    root, manifest, ckpt = corpus
    out = root / "run"
    finetune_run(_cfg(root, manifest), "w", str(ckpt), out)
    return out


def _codes(manifest) -> dict[str, tuple[str, str]]:
    with open(manifest) as f:
        return {r["path"]: (r["split"], r["EmoClass"]) for r in csv.DictReader(f)}


def test_step0_loss_is_the_class_weighted_cross_entropy(corpus):
    """One micro-batch of Train at step 0: the step's loss equals numpy's weighted CE."""
    from jax_ifmvse.backbones import load_backbone
    from jax_ifmvse.data.corpus import load_corpus
    from jax_ifmvse.encode import backbone_plan, make_loader
    from jax_ifmvse.finetune.data import AudioFeed, batch_arrays, corpus_rows, plan
    from jax_ifmvse.finetune.model import forward, frozen_labels, init_params, make_spec
    from jax_ifmvse.finetune.run import make_finetune_step, make_optimizer
    from jax_ifmvse.trainer.state import TrainState

    root, manifest, ckpt = corpus
    # Head dropout and the backbone's own regularization off, so train-mode logits = eval's.
    reg_off = [f"finetune.{k}=0" for k in REGULARIZATION_RATES]
    cfg = _cfg(root, manifest, "finetune.head_dropout=0.0", *reg_off)
    c = load_corpus("manifest", str(manifest))
    rows = corpus_rows(c, "Train")
    # The baseline's weights from the Train codes, by hand: total / (8 * count), 0 if absent.
    y_all = rows.classes[rows.classes >= 0]
    counts = np.bincount(y_all, minlength=8)
    cw = np.where(counts > 0, len(y_all) / (8 * np.maximum(counts, 1)), 0.0)
    bb, _, max_s, buckets = backbone_plan(load_backbone(str(ckpt), dtype="float32"), cfg)
    spec = make_spec(bb, cfg)
    params = init_params(spec, bb.params, jax.random.key(0))
    labels = frozen_labels(spec, params, True)
    tx = make_optimizer(cfg, labels)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    feed = AudioFeed(make_loader(cfg, c), int(max_s * 16000), 1, cache=False)
    # The first plan batch holding two classes and an unscored (X/O) row, if any.
    for b, waves, lengths in feed.batches(rows, plan(rows, buckets, 4, 16000, None)):
        batch = batch_arrays(rows, b, waves, lengths, False, "category")
        if len(set(batch["classes"][batch["classes"] >= 0])) >= 2:
            break
    feed.close()
    logits = np.asarray(forward(spec, params, batch["waves"], batch["lengths"], train=False))
    y = batch["classes"]
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    w = np.where(y >= 0, cw[np.maximum(y, 0)], 0.0)
    want = -(w * logp[np.arange(len(y)), np.maximum(y, 0)]).sum() / w.sum()
    moved = forward(spec, nudge(params), batch["waves"], batch["lengths"], train=False)
    step = make_finetune_step(spec, tx, labels, jax.random.key(1), None, cw)  # donates params
    _, m = step(state, jax.tree.map(jnp.asarray, batch))
    # The step's jitted forward vs the eager one: the logits within `one_pass` of their answer
    # to nudged parameters (k 128: the positional conv, 16 x 32 / 4 groups); the loss moves by
    # at most 2 max|d logits| (its gradient in the logits, (p - onehot) w / sum w, sums to <= 2
    # in absolute value), + its own float32 cross-entropy vs the float64 one.
    scored = int((y >= 0).sum())
    bound = 2 * one_pass(max_diff(moved, logits), 128) + cross_entropy(8, scored, logits, want)
    assert_within(float(m["loss"]), want, bound, "step-0 loss vs the numpy weighted CE")
    keep = np.flatnonzero(y >= 0)[1:]  # the first scored row left out
    wrong = -(w * logp[np.arange(len(y)), np.maximum(y, 0)])[keep].sum() / w[keep].sum()
    assert_exceeds(wrong, want, bound, "step-0 loss, one row left out")


def test_best_epoch_by_development_macro_f1(corpus, run):
    root, manifest, _ = corpus
    info = json.loads((run / "finetune.json").read_text())
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    scores = [h["dev_macro_f1"] for h in history]
    assert len(scores) == 3 and "dev_ccc" not in history[0]
    assert info["best"]["dev_macro_f1"] == max(scores)
    assert scores[info["best"]["epoch"] - 1] == max(scores)
    # Class weights from Train: X and O rows are not counted, absent classes weigh 0.
    codes = _codes(manifest)
    train = class_index([c for s, c in codes.values() if s == "Train"])
    counts = np.bincount(train[train >= 0], minlength=8)
    got = np.array([info["class_weights"][c] for c in CLASS_CODES])
    want = np.where(counts, counts.sum() / (8 * counts.clip(1)), 0)
    # float64 total / (8 count) on both sides, ours stored as float32 then JSON: u32 + 4 u64.
    bound = (U32 + 4 * U64) * want
    assert_within(got, want, bound, "finetune class weights")
    every = len(train)  # X and O rows counted in the total
    assert_exceeds(got, np.where(counts, every / (8 * counts.clip(1)), 0), bound, "X/O counted")
    # The predictions file (best epoch) scores the Development macro-F1 the run reports.
    with open(run / "predictions" / "Development.csv") as f:
        pred = list(csv.DictReader(f))
    assert list(pred[0])[:3] == ["id", "file", "category"] and list(pred[0])[3:] == list(
        CLASS_NAMES
    )
    for r in pred:
        probs = np.array([float(r[n]) for n in CLASS_NAMES])
        assert_within(probs.sum(), 1.0, probability_sum(8, 6), "Development.csv row sum")
        assert r["category"] == CLASS_CODES[probs.argmax()]
    assert_exceeds(probs[1:].sum(), 1.0, probability_sum(8, 6), "Development.csv, a class left out")
    truth = [codes[r["file"]][1] for r in pred]
    scored = [(t, r["category"]) for t, r in zip(truth, pred, strict=True) if t in CLASS_CODES]
    yt, yp = zip(*scored, strict=True)
    # sklearn on the file's classes vs the run's float64 macro-F1 of the same counts.
    assert_within(f1_score(yt, yp, average="macro"), max(scores), f1_orders(8), "dev macro-F1")
    assert_within(info["f1"]["Development"]["macro_f1"], max(scores), f1_orders(8), "manifest")
    wrong = f1_score(yt, yp, average="micro")  # the accuracy, not the mean over classes
    assert_exceeds(wrong, max(scores), f1_orders(8), "micro-F1")


def test_predictor_gives_a_category_with_probabilities(corpus, run):
    from jax_ifmvse.finetune.predictor import FinetunedPredictor

    root, _, _ = corpus
    (scored,) = FinetunedPredictor(run).predict_files([root / "corpus" / "u03.wav"])
    p = scored.prediction
    assert p.error is None and p.values is None  # a task 1 run has no attributes
    assert p.category in CLASS_CODES and set(p.probabilities) == set(CLASS_NAMES)
    probs = list(p.probabilities.values())
    assert_within(sum(probs), 1.0, probability_sum(8), "predictor probabilities' sum")
    assert_exceeds(sum(probs[1:]), 1.0, probability_sum(8), "probabilities, a class left out")
    assert p.category_prob == max(p.probabilities.values())
    assert p.probabilities[CLASS_NAMES[CLASS_CODES.index(p.category)]] == p.category_prob


def test_no_labelled_train_rows_is_a_one_line_error(tmp_path):
    manifest = write_tone_corpus(tmp_path / "corpus", n=10)
    text = manifest.read_text().splitlines()
    # Every row X, O or empty: nothing to train task 1 on.
    rows = [text[0]] + [",".join(r.split(",")[:-1] + ["XO"[i % 2]]) for i, r in enumerate(text[1:])]
    manifest.write_text("\n".join(rows) + "\n")
    with pytest.raises(FinetuneError, match="split 'Train' has no rows coded A,S,H") as e:
        finetune_run(_cfg(tmp_path, manifest), "w", str(tmp_path / "none"), tmp_path / "run")
    assert "\n" not in str(e.value)
