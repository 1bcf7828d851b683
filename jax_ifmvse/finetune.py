"""`ifmvse finetune`: fine-tune a backbone end to end, the challenge baseline's recipe, in JAX.

The model is the backbone's Flax module (WavLM, HuBERT, Data2Vec-audio or the Whisper encoder)
-> its last hidden state -> the baseline's AttentiveStatisticsPooling over valid frames -> its
EmotionRegression head -> three outputs (arousal, valence, dominance on the (y - 1) / 6 scale),
trained under sum_k (1 - CCC_k) per micro-batch as `train_dim_ser.py` does. Every setting and its
source is in configs/finetune.yaml.

How it runs:
- `finetune_step(state, batch)` is pure and jitted once with the state donated (one program per
  length bucket). AdamW (optax) is wrapped in `optax.MultiSteps`, so a state update happens every
  `finetune.accumulation_steps` micro-batches with their mean gradient; the frozen parts (the CNN
  feature encoder) get no gradient (stop_gradient) and no update or weight decay
  (`optax.multi_transform` with `set_to_zero`), as torch skips parameters whose grad is None.
- Master weights are float32; `finetune.compute_dtype=bfloat16` runs the backbone in bfloat16.
  `finetune.remat` recomputes each transformer layer in the backward pass (gradient checkpointing).
- Batches come from length buckets (`data/buckets.py`) with a fixed row count, padded rows having
  CCC weight 0; the Whisper encoder sees its fixed window as extraction does (`backbone_plan`).
  Batches are sharded over the `data` mesh axis; the CCC is over the global micro-batch.
- Data order of epoch e depends on (seed, e), dropout of micro-step s on fold_in(key, s). One Orbax
  CheckpointManager (`checkpoints.py`) keeps the latest and the best-Development checkpoint; a
  rerun resumes from the latest, and a run killed and restarted ends with the same weights.
- At the end the best epoch's model is exported: RUN/hf/ is a transformers checkpoint folder
  (usable as any SOURCE: `ifmvse extract --backbone NAME=RUN/hf`), RUN/head.safetensors the
  pooling and head weights under the baseline's PyTorch names.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import datetime
import hashlib
import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import yaml
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ifmvse
from jax_ifmvse.categories import CLASS_CODES, CLASS_NAMES, N_CLASSES, class_index, class_weights
from jax_ifmvse.checkpoints import checkpoint_manager, restore_history, restore_state
from jax_ifmvse.config import ATTRIBUTES, Config, check_command, to_dict
from jax_ifmvse.data.buckets import Batch, plan_batches
from jax_ifmvse.data.corpus import from_unit, to_unit
from jax_ifmvse.errors import IfmvseError
from jax_ifmvse.heads.pooling import AttentiveStatisticsPooling
from jax_ifmvse.heads.regression import EmotionRegression
from jax_ifmvse.inference import is_finetune_run  # noqa: F401 - re-exported for callers
from jax_ifmvse.losses import ccc, weighted_cross_entropy
from jax_ifmvse.metrics import accuracy, ccc_np, macro_f1
from jax_ifmvse.parallel import data_mesh
from jax_ifmvse.train import TrainState

FINETUNABLE = ("whisper", "wavlm", "hubert", "data2vec-audio")
COMPUTE_DTYPES = ("float32", "bfloat16")
TASKS = ("attributes", "category")  # finetune.task: task 2 (CCC) or task 1 (weighted CE)
# Test hook: SIGKILL this process right after micro-step N (tests/test_finetune.py resume test).
KILL_AT_STEP_ENV = "IFMVSE_TEST_KILL_AT_STEP"


class FinetuneError(IfmvseError, ValueError):
    """A fine-tuning run that cannot start: backbone, corpus, settings or RUN/ directory."""


# ---------------------------------------------------------------------------------------------
# The model: backbone module + pooling + head, as pure functions of params.


@dataclasses.dataclass(frozen=True)
class Spec:
    """The static parts of a fine-tuned model (modules and input handling), no weights."""

    family: str
    config: Any  # the transformers config
    module: nn.Module  # the backbone's Flax module, compute dtype and remat applied
    pool: nn.Module
    head: nn.Module
    do_normalize: bool = False  # SSL: per-utterance z-normalisation (preprocessor_config.json)
    window_samples: int = 0  # Whisper: the padded input window
    task: str = "attributes"  # "category": the head gives 8 class logits (task 1)

    @property
    def n_outputs(self) -> int:
        """Head outputs: 3 attributes, or 8 class logits for task 1."""
        return N_CLASSES if self.task == "category" else len(ATTRIBUTES)

    @property
    def hidden_size(self) -> int:
        """Width D of the backbone's hidden states."""
        c = self.config
        return int(c.d_model if self.family == "whisper" else c.hidden_size)


def make_spec(backbone: Any, cfg: Config) -> Spec:
    """The Spec of `backbone` (a loaded Backbone) under the config's fine-tuning settings."""
    fc = cfg.finetune
    if backbone.family not in FINETUNABLE:
        raise FinetuneError(
            f"backbone family {backbone.family!r} cannot be fine-tuned "
            f"(fine-tunable: {', '.join(FINETUNABLE)})"
        )
    if getattr(backbone.config, "conv_pos_batch_norm", False):
        raise FinetuneError(
            f"{backbone.source_info.get('source', backbone.family)}: a positional-conv BatchNorm "
            "checkpoint cannot be fine-tuned here (its batch statistics are inference-only)"
        )
    dtype = jnp.dtype(fc.compute_dtype)
    if backbone.family == "whisper":
        module = backbone.module.clone(dtype=dtype, gradient_checkpointing=fc.remat)
        window = int(backbone.window_samples)
    else:
        module = backbone.module.clone(dtype=dtype, remat=fc.remat)
        window = 0
    head = EmotionRegression(
        hidden=fc.head_hidden,
        n_outputs=N_CLASSES if fc.task == "category" else len(ATTRIBUTES),
        num_layers=fc.head_layers,
        dropout=fc.head_dropout,
    )
    return Spec(
        backbone.family,
        backbone.config,
        module,
        AttentiveStatisticsPooling(),
        head,
        bool(getattr(backbone, "do_normalize", False)),
        window,
        fc.task,
    )


def encode(spec: Spec, params: Any, waves: jax.Array, lengths: jax.Array):
    """Last hidden state and its valid frames: (B, T), (B,) -> (B, F, D), (B, F) bool."""
    lengths = jnp.asarray(lengths, jnp.int32)
    if spec.family == "whisper":
        from jax_ifmvse.backbones import whisper

        feats = whisper.log_mel(waves, int(spec.config.num_mel_bins), spec.window_samples)
        out = spec.module.apply({"params": params}, feats.astype(spec.module.dtype))
        frames = int(spec.config.max_source_positions)
        mask = whisper.frame_mask(jnp.minimum(lengths, spec.window_samples), frames)
        return out.last_hidden_state, mask  # (B, F, D), (B, F)
    from jax_ifmvse.backbones.conv_frontend import (
        feat_extract_output_lengths,
        frame_mask,
        normalize_waves,
    )

    if spec.do_normalize:
        waves = normalize_waves(waves, lengths)
    frames = int(feat_extract_output_lengths(waves.shape[1], spec.config))
    mask = frame_mask(lengths, frames, spec.config)  # (B, F)
    states = spec.module.apply({"params": params}, waves, mask, lengths)
    return states[-1], mask


def forward(
    spec: Spec, params: Any, waves: jax.Array, lengths: jax.Array, *, train: bool, rng=None
) -> jax.Array:
    """Waves (B, T), lengths (B,) -> (B, 3) float32 on the training scale, or (B, 8) logits."""
    hidden, mask = encode(spec, params["backbone"], waves, lengths)
    pooled = spec.pool.apply({"params": params["pool"]}, hidden.astype(jnp.float32), mask)
    rngs = {"dropout": rng} if train else {}
    return spec.head.apply({"params": params["head"]}, pooled, train=train, rngs=rngs)


def init_params(spec: Spec, backbone_params: Any, key: jax.Array) -> dict[str, Any]:
    """{backbone: the pretrained weights (float32), pool, head: fresh torch-style draws}."""
    d = spec.hidden_size

    @jax.jit  # one compiled init instead of dozens of eagerly compiled initializer ops
    def heads(key):
        k_pool, k_head = jax.random.split(key)
        pool = spec.pool.init(k_pool, jnp.zeros((1, 2, d)), jnp.ones((1, 2), bool))["params"]
        head = spec.head.init(k_head, jnp.zeros((1, 2 * d)), train=False)["params"]
        return {"pool": pool, "head": head}

    backbone = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), backbone_params)
    return {"backbone": backbone, **heads(key)}


def frozen_labels(spec: Spec, params: Any, freeze_feature_encoder: bool) -> Any:
    """'frozen' / 'train' (backbone) / 'head' (pooling, head) per parameter, frozen as the
    baseline's `freeze_feature_encoder()` leaves them.

    SSL models: the CNN `feature_extractor`. Whisper: its conv front end (conv1, conv2), the
    counterpart of that CNN; its sinusoidal positions are frozen always (as transformers does).
    """
    cnn = ("conv1", "conv2") if spec.family == "whisper" else ("feature_extractor",)

    def label(path: tuple[str, ...]) -> str:
        if path[0] != "backbone":
            return "head"
        if spec.family == "whisper" and path[1] == "embed_positions":
            return "frozen"
        return "frozen" if freeze_feature_encoder and path[1] in cnn else "train"

    return unflatten_dict({k: label(k) for k in flatten_dict(params)})


def make_optimizer(cfg: Config, labels: Any) -> optax.GradientTransformation:
    """AdamW as torch.optim.AdamW (lr, weight decay, betas 0.9/0.999, eps 1e-8), frozen parts
    untouched, one update per `finetune.accumulation_steps` micro-batches (mean gradient)."""
    tc = cfg.train

    def adamw(lr: float) -> optax.GradientTransformation:
        return optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=tc.weight_decay)

    head_lr = cfg.finetune.head_learning_rate or tc.learning_rate
    tx = optax.multi_transform(
        {"train": adamw(tc.learning_rate), "head": adamw(head_lr), "frozen": optax.set_to_zero()},
        labels,
    )
    return optax.MultiSteps(tx, every_k_schedule=cfg.finetune.accumulation_steps)


def ccc_sum_loss(y: jax.Array, pred: jax.Array, weights: jax.Array) -> jax.Array:
    """sum over the three attributes of 1 - CCC over the (weighted) batch, as the baseline."""
    return jnp.sum(1.0 - ccc(y, pred.astype(jnp.float32), weights, axis=0))


def step_loss(spec: Spec, batch: dict, pred: jax.Array, cls_weights: jax.Array | None):
    """Task 2: the baseline's CCC sum; task 1: its class-weighted cross-entropy."""
    if spec.task == "category":
        return weighted_cross_entropy(pred, batch["classes"], cls_weights, batch["weights"])
    return ccc_sum_loss(batch["labels"], pred, batch["weights"])


def finetune_step(
    state: TrainState,
    batch: dict,
    *,
    spec: Spec,
    tx: optax.GradientTransformation,
    labels: Any,
    dropout_key: jax.Array,
    batch_sharding: NamedSharding | None = None,
    class_weights: jax.Array | None = None,
) -> tuple[TrainState, dict]:
    """One micro-batch: loss, gradients, and (every k-th call) the AdamW update."""
    if batch_sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    rng = jax.random.fold_in(dropout_key, state.step)

    def loss_fn(params):
        # No gradient flows into frozen parameters: XLA drops their backward pass.
        params = jax.tree.map(
            lambda p, lab: jax.lax.stop_gradient(p) if lab == "frozen" else p, params, labels
        )
        pred = forward(spec, params, batch["waves"], batch["lengths"], train=True, rng=rng)
        return step_loss(spec, batch, pred, class_weights)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new, {"loss": loss, "grad_norm": optax.global_norm(grads)}


def make_finetune_step(
    spec, tx, labels, dropout_key, batch_sharding=None, class_weights=None
) -> Callable:
    """`finetune_step` bound and jitted once, state donated: `(state, batch) -> (state, metrics)`."""
    step = partial(
        finetune_step,
        spec=spec,
        tx=tx,
        labels=labels,
        dropout_key=dropout_key,
        batch_sharding=batch_sharding,
        class_weights=None if class_weights is None else jnp.asarray(class_weights, jnp.float32),
    )
    return jax.jit(step, donate_argnums=0)


def standardize_head_input(params: Any, pooled: np.ndarray) -> Any:
    """Fold x -> (x - mean) / std of Train's pooled vectors (N, 2D) into the first Linear.

    Pooled hidden states share a large offset with little spread (Whisper's most of all): after
    Linear -> LayerNorm every utterance then looks alike and the head starts near a constant.
    W' = W / std, b' = b - W' mean gives the fresh head standardized inputs, same architecture.
    """
    mean = pooled.mean(0)
    std = np.maximum(pooled.std(0), 1e-3 * max(float(pooled.std(0).max()), 1e-12))
    fc = params["head"]["fc_0_0"]
    w = np.asarray(fc["weight"]) / std[None, :]  # (H, 2D)
    b = np.asarray(fc["bias"]) - w @ mean
    head = {**params["head"], "fc_0_0": {"weight": jnp.asarray(w), "bias": jnp.asarray(b)}}
    return {**params, "head": head}


def standardize_pool_input(params: Any, mean: np.ndarray, std: np.ndarray) -> Any:
    """Fold x -> (x - mean) / std of Train's valid frames (D,) into the pooling's `sap_linear`,
    so its tanh starts unsaturated on raw hidden states, and scale the N(0, 1) attention vector
    by 1 / sqrt(D), so the first softmax over frames is not a one-frame pick (same architecture).
    """
    sap = params["pool"]["sap_linear"]
    w = np.asarray(sap["weight"], np.float64) / std[None, :]  # (D, D)
    b = np.asarray(sap["bias"], np.float64) - w @ mean
    att = params["pool"]["attention"] / np.sqrt(len(mean))
    pool = {"attention": att, "sap_linear": {"weight": jnp.asarray(w, jnp.float32),
                                             "bias": jnp.asarray(b, jnp.float32)}}  # fmt: skip
    return {**params, "pool": pool}


def make_frame_moments(spec: Spec) -> Callable:
    """Jitted `(params, waves, lengths) -> (sum x, sum x^2, count)` over valid frames, (D,)."""

    def moments(params, w, n):
        hidden, mask = encode(spec, params["backbone"], w, n)
        m = mask.astype(jnp.float32)[..., None]  # (B, F, 1)
        x = hidden.astype(jnp.float32)
        return (x * m).sum((0, 1)), (x * x * m).sum((0, 1)), m.sum()

    return jax.jit(moments)


def make_pooled(spec: Spec) -> Callable:
    """Jitted `(params, waves, lengths) -> (B, 2D)`: the head's input."""

    def pooled(params, w, n):
        hidden, mask = encode(spec, params["backbone"], w, n)
        return spec.pool.apply({"params": params["pool"]}, hidden.astype(jnp.float32), mask)

    return jax.jit(pooled)


def make_predict(spec: Spec) -> Callable:
    """Jitted `(params, waves, lengths) -> (B, 3)` training scale (or (B, 8) logits), no dropout."""
    return jax.jit(lambda params, w, n: forward(spec, params, w, n, train=False))


# ---------------------------------------------------------------------------------------------
# Data: length-bucketed fixed-shape batches of decoded audio.


@dataclasses.dataclass
class Rows:
    """The utterances of one split that fine-tuning uses."""

    ids: list[str]
    paths: list[Path]
    durations: np.ndarray  # (N,) seconds from headers
    labels: np.ndarray  # (N, 3) corpus scale, NaN unknown
    classes: np.ndarray | None = None  # (N,) task 1 class index (categories order), -1 unscored


class AudioFeed:
    """Decodes batches on CPU threads (a few ahead), with an in-memory cache when it fits.

    A clip that cannot be decoded is recorded in `failed` and gets weight 0 wherever it falls.
    """

    def __init__(self, loader: Callable, max_samples: int, workers: int, cache: bool):
        self.loader = loader
        self.max_samples = max_samples
        self.pool = cf.ThreadPoolExecutor(max(1, workers))
        self.cache: dict[str, np.ndarray] | None = {} if cache else None
        self.failed: dict[str, str] = {}

    def _one(self, path: Path) -> np.ndarray | None:
        key = str(path)
        if self.cache is not None and key in self.cache:
            return self.cache[key]
        if key in self.failed:
            return None
        try:
            x = np.asarray(self.loader(path), np.float32)[: self.max_samples]
            if len(x) == 0:
                raise ValueError("empty audio")
        except Exception as e:  # noqa: BLE001 - a bad clip is recorded and skipped, never fatal
            self.failed[key] = " ".join(str(e).split()) or type(e).__name__
            return None
        if self.cache is not None:
            self.cache[key] = x
        return x

    def submit(self, rows: Rows, batch: Batch) -> list[cf.Future]:
        """Start decoding one batch's clips."""
        return [
            self.pool.submit(self._one, rows.paths[i]) if i >= 0 else None for i in batch.indices
        ]

    def collect(self, batch: Batch, futs: list) -> tuple[np.ndarray, np.ndarray]:
        """(waves (B, T), lengths (B,)) of a submitted batch; failed and dummy rows are empty."""
        b, t = batch.shape
        waves = np.zeros((b, t), np.float32)
        lengths = np.zeros(b, np.int32)
        for k, f in enumerate(futs):
            x = None if f is None else f.result()
            if x is None:
                continue
            x = x[:t]
            waves[k, : len(x)] = x
            lengths[k] = len(x)
        return waves, lengths

    def batches(self, rows: Rows, plan: Sequence[Batch], ahead: int = 2):
        """Yield (batch, waves, lengths) in plan order, decoding `ahead` batches early."""
        q: collections.deque = collections.deque()
        it = iter(plan)
        for b in it:
            q.append((b, self.submit(rows, b)))
            if len(q) > ahead:
                break
        while q:
            b, futs = q.popleft()
            nxt = next(it, None)
            if nxt is not None:
                q.append((nxt, self.submit(rows, nxt)))
            yield (b, *self.collect(b, futs))

    def close(self) -> None:
        """Stop the decode threads."""
        self.pool.shutdown(wait=True, cancel_futures=True)


def epoch_seed(seed: int, epoch: int) -> int:
    """The data-order seed of one epoch: depends only on (train.seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def plan(rows: Rows, buckets: Sequence[float], size: int, sr: int, seed: int | None):
    """Fixed-size (`size` rows) length-bucketed batches; shuffled when `seed` is given."""
    return plan_batches(
        np.nan_to_num(rows.durations, nan=0.0),
        bucket_seconds=buckets,
        batch_seconds=size * max(buckets),
        max_batch=size,
        sample_rate=sr,
        seed=seed,
    )


def batch_arrays(
    rows: Rows, b: Batch, waves, lengths, normalize: bool, task: str = "attributes"
) -> dict[str, np.ndarray]:
    """The step's input: waves, lengths, labels (training scale) and 0/1 loss weights; task 1:
    class indices instead of labels (X, O, empty: -1 and weight 0)."""
    idx = np.maximum(b.indices, 0)
    if task == "category":
        c = rows.classes[idx].astype(np.int32)  # (B,)
        ok = (b.indices >= 0) & (lengths > 0) & (c >= 0)
        return {
            "waves": waves,
            "lengths": lengths.astype(np.int32),
            "classes": np.where(ok, c, -1).astype(np.int32),
            "weights": ok.astype(np.float32),
        }
    y = rows.labels[idx].astype(np.float32)  # (B, 3)
    ok = (b.indices >= 0) & (lengths > 0) & np.isfinite(y).all(1)
    y = np.where(ok[:, None], y, 1.0 if normalize else 0.0)  # any finite value: weight 0
    y = to_unit(y) if normalize else y
    return {
        "waves": waves,
        "lengths": lengths.astype(np.int32),
        "labels": np.asarray(y, np.float32),
        "weights": ok.astype(np.float32),
    }


def predict_rows(
    predict,
    params,
    rows: Rows,
    feed: AudioFeed,
    buckets,
    size: int,
    sr: int,
    sharding,
    width: int = len(ATTRIBUTES),
) -> np.ndarray:
    """Outputs (N, width) for every row (NaN where the clip failed): attributes on the training
    scale, or task 1 logits."""
    out = np.full((len(rows.ids), width), np.nan, np.float32)
    for b, waves, lengths in feed.batches(rows, plan(rows, buckets, size, sr, None)):
        w = jax.device_put(waves, sharding)
        n = jax.device_put(lengths, sharding)
        pred = np.asarray(predict(params, w, n))
        ok = (b.indices >= 0) & (lengths > 0)
        out[b.indices[ok]] = pred[ok]
    return out


def split_ccc(labels: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """CCC per attribute (corpus scale) on rows with a label and a prediction, plus the mean."""
    out = {}
    for k, a in enumerate(ATTRIBUTES):
        ok = np.isfinite(labels[:, k]) & np.isfinite(pred[:, k])
        out[a] = float(ccc_np(labels[ok, k], pred[ok, k])) if ok.sum() > 1 else float("nan")
    vals = [out[a] for a in ATTRIBUTES]
    out["mean"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return out


def split_f1(classes: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Task 1: macro-F1 and accuracy on rows with a class (A..N) and a prediction."""
    ok = (classes >= 0) & np.isfinite(logits).all(1)
    if not ok.any():
        return {"macro_f1": float("nan"), "accuracy": float("nan")}
    y, p = classes[ok], np.argmax(logits[ok], axis=1)
    return {"macro_f1": macro_f1(y, p, N_CLASSES), "accuracy": accuracy(y, p)}


def softmax_np(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax (float64 for the sum), NaN rows stay NaN."""
    z = logits.astype(np.float64) - np.max(logits, axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Export: RUN/hf/ (transformers folder) and RUN/head.safetensors.


def export_hf(spec: Spec, backbone_params: Any, folder: Path) -> None:
    """Write a transformers checkpoint folder: config.json, model.safetensors, preprocessor."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = spec.config
    if spec.family == "whisper":
        from transformers import WhisperFeatureExtractor

        from jax_ifmvse.backbones import whisper

        sd = whisper.to_state_dict(backbone_params)
        config.architectures = ["WhisperModel"]
        seconds = spec.window_samples / whisper.SAMPLE_RATE
        fe = WhisperFeatureExtractor(feature_size=int(config.num_mel_bins), chunk_length=seconds)
    else:
        from transformers import Wav2Vec2FeatureExtractor

        from jax_ifmvse.backbones.conv_frontend import SSLBackbone

        sd = SSLBackbone.to_state_dict(backbone_params, config)
        config.architectures = [
            {"wavlm": "WavLMModel", "hubert": "HubertModel"}.get(spec.family, "Data2VecAudioModel")
        ]
        fe = Wav2Vec2FeatureExtractor(
            feature_size=1,
            sampling_rate=16000,
            padding_value=0.0,
            do_normalize=spec.do_normalize,
            return_attention_mask=True,
        )
    config.save_pretrained(str(folder))
    fe.save_pretrained(str(folder))
    tmp = folder / ".model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")


def head_state_dict(params: Any) -> dict[str, np.ndarray]:
    """Pooling and head params under the baseline's PyTorch names (`pool.*`, `ser.*`)."""
    out = {}
    for prefix, tree in (("pool", params["pool"]), ("ser", params["head"])):
        for path, v in flatten_dict(tree).items():
            v = np.asarray(v, np.float32)
            *mod, leaf = path
            # fc_0_0 -> fc.0.0, out_0 -> out.0; LayerNorm scale -> weight.
            mod = [m.replace("_", ".") if m.startswith(("fc_", "out_")) else m for m in mod]
            leaf = "weight" if leaf == "scale" else leaf
            out[".".join([prefix, *mod, leaf])] = np.ascontiguousarray(v)
    return out


def head_params(sd: dict[str, np.ndarray]) -> dict[str, Any]:
    """Inverse of `head_state_dict`: {pool, head} Flax params."""
    flat: dict[tuple[str, ...], Any] = {}
    for key, v in sd.items():
        prefix, *mod, leaf = key.split(".")
        if prefix == "ser":
            # fc.0.0 -> fc_0_0, out.0 -> out_0
            joined, mods, i = [], mod, 0
            while i < len(mods):
                if mods[i] == "fc":
                    joined.append(f"fc_{mods[i + 1]}_{mods[i + 2]}")
                    i += 3
                elif mods[i] == "out":
                    joined.append(f"out_{mods[i + 1]}")
                    i += 2
                else:
                    joined.append(mods[i])
                    i += 1
            mod = joined
            if mod[0].startswith("fc_") and mod[0].endswith("_1") and leaf == "weight":
                leaf = "scale"
        flat[("pool" if prefix == "pool" else "head", *mod, leaf)] = jnp.asarray(v)
    return unflatten_dict(flat)


def write_head(params: Any, spec: Spec, run: Path) -> None:
    """RUN/head.safetensors + RUN/head.json (the head's shape)."""
    from safetensors.numpy import save_file

    save_file(head_state_dict(params), str(run / "head.safetensors"))
    h = spec.head
    info = {
        "pooling": "AttentiveStatisticsPooling",
        "head": "EmotionRegression",
        "input_dim": 2 * spec.hidden_size,
        "hidden": h.hidden,
        "num_layers": h.num_layers,
        "dropout": h.dropout,
        "outputs": list(CLASS_CODES) if spec.task == "category" else list(ATTRIBUTES),
        "output_scale": "logits" if spec.task == "category" else "(y - 1) / 6",
    }
    (run / "head.json").write_text(json.dumps(info, indent=2))


# ---------------------------------------------------------------------------------------------
# A run.


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _ids_sha(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def check_source_family(source: str) -> None:
    """Refuse, before loading weights, a local checkpoint of a family that cannot be fine-tuned."""
    cfg_path = Path(source).expanduser() / "config.json"
    if cfg_path.is_file():
        try:
            model_type = json.loads(cfg_path.read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return  # load_backbone names the broken file
        if model_type not in FINETUNABLE:
            raise FinetuneError(
                f"{cfg_path}: model_type {model_type!r} cannot be fine-tuned "
                f"(fine-tunable: {', '.join(FINETUNABLE)})"
            )


def corpus_rows(corpus: Any, split: str) -> Rows:
    """Rows of one split, with header durations."""
    sub = corpus.split(split)
    return Rows(
        [u.id for u in sub.utterances],
        [corpus.abspath(u) for u in sub.utterances],
        sub.durations(),
        sub.labels(),
        class_index([u.emo_class or "" for u in sub.utterances]),
    )


def _usable(rows: Rows, skipped: dict[str, str]) -> Rows:
    """Rows whose header is readable; the others are recorded in `skipped` (path -> reason)."""
    ok = np.isfinite(rows.durations)
    for p, good in zip(rows.paths, ok):
        if not good:
            skipped[str(p)] = "unreadable or corrupt audio (header)"
    keep = np.flatnonzero(ok)
    return Rows(
        [rows.ids[i] for i in keep],
        [rows.paths[i] for i in keep],
        rows.durations[keep],
        rows.labels[keep],
        None if rows.classes is None else rows.classes[keep],
    )


def finetune_run(
    cfg: Config,
    name: str,
    source: str,
    out_dir: str | Path,
    *,
    progress: Callable[[dict], None] | None = None,
    mesh: Mesh | None = None,
) -> dict:
    """Fine-tune `source` on cfg.corpus, write RUN/ (resumes an interrupted run); the manifest."""
    from jax_ifmvse.backbones import load_backbone
    from jax_ifmvse.data.corpus import load_corpus
    from jax_ifmvse.encode import backbone_plan, make_loader
    from jax_ifmvse.plots import plot_curves

    tc, fc = cfg.train, cfg.finetune
    out = Path(out_dir)
    check_command(cfg, "finetune")  # batch / accumulation, unread train.* settings refused
    check_source_family(source)
    corpus = load_corpus(cfg.corpus.kind, cfg.corpus.path, cfg.corpus.audio_root or None)
    present = corpus.splits()
    for split in (tc.train_split, tc.dev_split):
        if split not in present:
            raise FinetuneError(f"{corpus.source or corpus.root}: no rows in split {split!r}")
    train_rows = corpus_rows(corpus, tc.train_split)
    dev_rows = corpus_rows(corpus, tc.dev_split)
    category = fc.task == "category"
    for split, rows in ((tc.train_split, train_rows), (tc.dev_split, dev_rows)):
        if category and not (rows.classes >= 0).any():
            raise FinetuneError(
                f"{corpus.source or corpus.root}: split {split!r} has no rows coded "
                f"{','.join(CLASS_CODES)} in EmoClass (finetune.task=category needs them)"
            )
        if not category and np.isfinite(rows.labels).all(1).sum() < 2:
            raise FinetuneError(
                f"{corpus.source or corpus.root}: split {split!r} has fewer than 2 labelled rows"
            )

    bb = load_backbone(source, dtype="float32", cache_dir=cfg.extract.cache_dir or None)
    bb, _, max_s, buckets = backbone_plan(bb, cfg)
    spec = make_spec(bb, cfg)
    mesh = mesh or data_mesh()
    ndev = mesh.devices.size
    sr = cfg.audio.sample_rate
    micro = tc.batch_size // fc.accumulation_steps
    micro = -(-micro // ndev) * ndev  # whole rows per device
    eval_rows = -(-fc.eval_batch // ndev) * ndev

    # One RUN/ per (config, backbone, corpus): a resume with anything else is refused.
    settings = {k: v for k, v in to_dict(cfg).items() if k != "corpus"}
    # Where the cache lives and how audio is decoded change nothing in the result.
    settings["extract"] = {k: v for k, v in settings["extract"].items() if k != "cache_dir"}
    settings["finetune"] = {
        k: v for k, v in settings["finetune"].items() if k not in ("workers", "cache_audio_gb")
    }
    fingerprint = {
        "config": settings,
        "corpus": {k: v for k, v in to_dict(cfg.corpus).items() if k != "path"},
        "backbone": {"name": name, "sha256": bb.source_info.get("sha256", "")},
        "train_ids_sha256": _ids_sha(train_rows.ids),
        "dev_ids_sha256": _ids_sha(dev_rows.ids),
    }
    manifest_path = out / "finetune.json"
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        before = flatten_dict(old.get("fingerprint", {}), sep=".")
        now = flatten_dict(fingerprint, sep=".")
        diff = [
            f"{k} {before.get(k)!r} -> {now.get(k)!r}"
            for k in sorted(set(before) | set(now))
            if before.get(k) != now.get(k)
        ][:3]
        if diff:
            raise FinetuneError(
                f"{manifest_path}: this RUN/ was started with other settings ({'; '.join(diff)});"
                " use another --out or the same settings"
            )
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "kind": "finetune",
        "fingerprint": fingerprint,
        "config": to_dict(cfg),
        "backbone": {"name": name, "source": source, **bb.source_info, "family": bb.family},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "version": jax_ifmvse.__version__,
        "micro_batch": micro,
        "complete": False,
    }
    manifest["backbone"].pop("config", None)  # the whole config.json: RUN/hf/ has it
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    # What `FinetunedPredictor` answers for a file it cannot decode (as the ensemble does).
    manifest["train_label_mean"] = {
        a: float(np.nanmean(train_rows.labels[:, k])) for k, a in enumerate(ATTRIBUTES)
    }
    # Task 1: the baseline's class weights, counted on the Train split's coded rows.
    cls_w = class_weights(train_rows.classes) if category else None
    if category:
        manifest["class_weights"] = dict(zip(CLASS_CODES, map(float, cls_w), strict=True))
    _write_json(manifest_path, manifest)

    skipped: dict[str, str] = {}
    train_rows = _usable(train_rows, skipped)
    dev_rows = _usable(dev_rows, skipped)
    loader = make_loader(cfg, corpus)
    if loader.stats is not None:  # normalize=train: predict must use the same statistics
        manifest["normalize_stats"] = [float(x) for x in loader.stats]
        _write_json(manifest_path, manifest)
    total_s = float(np.sum(np.minimum(train_rows.durations, max_s)))
    total_s += float(np.sum(np.minimum(dev_rows.durations, max_s)))
    cache = total_s * sr * 4 <= fc.cache_audio_gb * 2**30
    feed = AudioFeed(loader, int(round(max_s * sr)), fc.workers, cache)

    root = jax.random.key(tc.seed)
    init_key, dropout_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 2)
    replicated = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))
    mngr = checkpoint_manager(out / "checkpoints")
    start = mngr.latest_step() or 0
    params = init_params(spec, bb.params, init_key)
    if fc.head_init_from_data and not start:  # a resume restores the folded head
        # At most 16 Train batches in plan order (deterministic, so a restart redoes it alike).
        first = plan(train_rows, buckets, micro, sr, None)[:16]
        moments = make_frame_moments(spec)
        s1, s2, cnt = 0.0, 0.0, 0.0
        for _, waves, lengths in feed.batches(train_rows, first):
            a, b2, c = moments(params, jax.device_put(waves, data), jax.device_put(lengths, data))
            s1, s2, cnt = (
                s1 + np.asarray(a, np.float64),
                s2 + np.asarray(b2, np.float64),
                cnt + float(c),
            )
        mean = s1 / max(cnt, 1.0)
        std = np.sqrt(np.maximum(s2 / max(cnt, 1.0) - mean**2, 0.0))
        std = np.maximum(std, 1e-3 * max(float(std.max()), 1e-12))
        params = standardize_pool_input(params, mean, std)
        pooled_fn = make_pooled(spec)
        vecs = []
        for b, waves, lengths in feed.batches(train_rows, first):
            v = np.asarray(
                pooled_fn(params, jax.device_put(waves, data), jax.device_put(lengths, data))
            )
            vecs.append(v[(b.indices >= 0) & (lengths > 0)])
        params = standardize_head_input(params, np.concatenate(vecs).astype(np.float64))
    labels = frozen_labels(spec, params, fc.freeze_feature_encoder)
    tx = make_optimizer(cfg, labels)
    opt_state = jax.jit(tx.init)(params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
    state = jax.device_put(state, replicated)
    step_fn = make_finetune_step(spec, tx, labels, dropout_key, data, cls_w)
    predict = make_predict(spec)
    normalize = cfg.corpus.normalize_labels

    history: list[dict] = []
    if start:
        state = restore_state(mngr, start, state, replicated)
        history = [h for h in restore_history(mngr, start) if h["epoch"] <= start]
    n_train = len(plan(train_rows, buckets, micro, sr, epoch_seed(tc.seed, 0)))
    if progress:
        progress({"kind": "start", "epochs": tc.epochs, "steps": n_train, "done": start})
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0") or 0)
    score_key = "dev_macro_f1" if category else "dev_ccc"  # the best-epoch rule
    best_so_far = max((h[score_key] for h in history), default=-np.inf)
    try:
        for epoch in range(start, tc.epochs):
            t0 = time.perf_counter()
            order = plan(train_rows, buckets, micro, sr, epoch_seed(tc.seed, epoch))
            losses = []
            for k, (b, waves, lengths) in enumerate(feed.batches(train_rows, order)):
                arrays = batch_arrays(train_rows, b, waves, lengths, normalize, fc.task)
                batch = jax.device_put(arrays, data)
                state, m = step_fn(state, batch)
                losses.append(m["loss"])
                if kill_at and int(state.step) >= kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)  # the resume test's crash
                if progress:
                    progress({"kind": "step", "epoch": epoch + 1, "step": k + 1})
            pred = predict_rows(
                predict, state.params, dev_rows, feed, buckets, eval_rows, sr, data,
                spec.n_outputs,
            )  # fmt: skip
            rec = {
                "epoch": epoch + 1,
                "step": int(state.step),
                "train_loss": float(np.mean([float(x) for x in losses])) if losses else 0.0,
            }
            if category:
                per = split_f1(dev_rows.classes, pred)
                score = per["macro_f1"] if np.isfinite(per["macro_f1"]) else -1.0
                rec.update(dev_macro_f1=score, dev_accuracy=per["accuracy"], dev_score=score)
            else:
                pred = from_unit(pred, clip=False) if normalize else pred
                per = split_ccc(dev_rows.labels, pred)
                score = per["mean"] if np.isfinite(per["mean"]) else -1.0
                rec.update(dev_ccc=score, **{f"dev_ccc_{a}": per[a] for a in ATTRIBUTES})
            rec["seconds"] = round(time.perf_counter() - t0, 3)
            dev_ccc = score  # the checkpoint metric below: dev CCC, or task 1's macro-F1
            history.append(rec)
            last = epoch + 1 == tc.epochs
            if dev_ccc > best_so_far or last or (epoch + 1) % max(1, tc.checkpoint_every) == 0:
                mngr.save(
                    epoch + 1,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)
                    ),
                    metrics={score_key: dev_ccc, "dev_score": dev_ccc},
                )
            best_so_far = max(best_so_far, dev_ccc)
            if progress:
                progress({"kind": "epoch", **rec})
        mngr.wait_until_finished()
        best = mngr.best_step()
        if best is None:
            raise FinetuneError(f"{out}: no checkpoint to select from (train.epochs {tc.epochs})")
        best_params = restore_state(mngr, best, state, replicated).params
        mngr.close()
        with open(out / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in history)
        plot_curves(history, out / "curves.png", f"finetune {name}")

        export_hf(spec, jax.device_get(best_params["backbone"]), out / "hf")
        write_head(jax.device_get(best_params), spec, out)
        ccc_by_split, f1_by_split = {}, {}
        (out / "predictions").mkdir(exist_ok=True)
        splits = [tc.dev_split] + [s for s in tc.test_splits if s != tc.dev_split]
        for split in splits:
            if split not in present:
                continue
            rows = _usable(corpus_rows(corpus, split), skipped)
            pred = predict_rows(
                predict, best_params, rows, feed, buckets, eval_rows, sr, data, spec.n_outputs
            )
            if category:
                write_category_predictions(out / "predictions" / f"{split}.csv", rows, pred)
                if (rows.classes >= 0).any():
                    f1_by_split[split] = split_f1(rows.classes, pred)
                continue
            pred = from_unit(pred, clip=False) if normalize else pred
            write_predictions(out / "predictions" / f"{split}.csv", rows, pred)
            if np.isfinite(rows.labels).any():
                ccc_by_split[split] = split_ccc(rows.labels, pred)
    finally:
        feed.close()
    skipped.update(feed.failed)
    with open(out / "skipped.csv", "w") as f:
        f.write("path,reason\n")
        f.writelines(f'"{p}","{r}"\n' for p, r in sorted(skipped.items()))
    best_rec = next(h for h in history if h["epoch"] == best)
    manifest.update(
        complete=True,
        best={"epoch": best, score_key: best_rec[score_key]},
        ccc=ccc_by_split,
        **({"f1": f1_by_split} if category else {}),
        skipped=len(skipped),
        steps_per_epoch=n_train,
    )
    _write_json(manifest_path, manifest)
    return manifest


def write_predictions(path: Path, rows: Rows, pred: np.ndarray) -> None:
    """id, file, arousal, valence, dominance (1..7 scale, unclipped; empty where it failed)."""
    with open(path, "w") as f:
        f.write("id,file," + ",".join(ATTRIBUTES) + "\n")
        for uid, p, v in zip(rows.ids, rows.paths, pred):
            vals = ",".join("" if not np.isfinite(x) else f"{x:.6f}" for x in v)
            f.write(f"{uid},{Path(p).name},{vals}\n")


def write_category_predictions(path: Path, rows: Rows, logits: np.ndarray) -> None:
    """Task 1: id, file, category (A..N), then each class's probability (Angry..Neutral)."""
    probs = softmax_np(logits)
    with open(path, "w") as f:
        f.write("id,file,category," + ",".join(CLASS_NAMES) + "\n")
        for uid, p, q in zip(rows.ids, rows.paths, probs):
            if not np.isfinite(q).all():
                f.write(f"{uid},{Path(p).name},{',' * (N_CLASSES - 1)}\n")
                continue
            vals = ",".join(f"{x:.6f}" for x in q)
            f.write(f"{uid},{Path(p).name},{CLASS_CODES[int(np.argmax(q))]},{vals}\n")


# ---------------------------------------------------------------------------------------------
# Scoring audio with a fine-tuned RUN/ (predict / serve).


class FinetunedModel:
    """A fine-tuned RUN/ loaded for scoring: RUN/hf/ through `load_backbone`, plus the head."""

    def __init__(self, run: str | Path, mesh: Mesh | None = None):
        from safetensors.numpy import load_file

        from jax_ifmvse.backbones import load_backbone
        from jax_ifmvse.config import load_config
        from jax_ifmvse.encode import Loader, backbone_plan

        run = Path(run)
        path = run / "finetune.json"
        if not path.is_file():
            raise FinetuneError(f"{path}: not a fine-tuned RUN/ (no finetune.json)")
        manifest = json.loads(path.read_text())
        if not manifest.get("complete"):
            raise FinetuneError(f"{path}: the run is not finished (rerun ifmvse finetune)")
        cfg = load_config(run / "config.yaml")
        bb = load_backbone(str(run / "hf"), dtype=cfg.finetune.compute_dtype)
        bb, _, max_s, self.buckets = backbone_plan(bb, cfg)
        self.spec = make_spec(bb, cfg)
        head = head_params(load_file(str(run / "head.safetensors")))
        self.params = {"backbone": bb.params, **head}
        self.mesh = mesh or data_mesh()
        self.sr = cfg.audio.sample_rate
        self.normalize_labels = cfg.corpus.normalize_labels
        self.task = cfg.finetune.task
        stats = None
        if cfg.audio.normalize == "train":
            s = manifest.get("normalize_stats")
            stats = tuple(s) if s else None
        self.loader = Loader(self.sr, max_s, cfg.audio.normalize, stats)
        self.max_s = max_s
        self.rows = -(-cfg.finetune.eval_batch // self.mesh.devices.size) * self.mesh.devices.size
        self._predict = make_predict(self.spec)

    def predict_files(self, files: Sequence[str | Path]) -> tuple[np.ndarray, list[str | None]]:
        """(N, 3) attributes on 1..7 (clipped), or task 1's (N, 8) class probabilities; NaN
        where unreadable; and per-file errors."""
        rows = Rows(
            [str(f) for f in files],
            [Path(f) for f in files],
            _header_info(files)[0],
            np.full((len(files), 3), np.nan, np.float32),
        )
        feed = AudioFeed(self.loader, int(round(self.max_s * self.sr)), 2, cache=False)
        try:
            pred = predict_rows(
                self._predict, self.params, rows, feed, self.buckets, self.rows, self.sr,
                NamedSharding(self.mesh, P("data")), self.spec.n_outputs,
            )  # fmt: skip
        finally:
            feed.close()
        if self.task == "category":
            return softmax_np(pred), [feed.failed.get(str(Path(f))) for f in files]
        pred = from_unit(pred, clip=True) if self.normalize_labels else pred
        errors = [feed.failed.get(str(Path(f))) for f in files]
        return pred, errors


class FinetunedPredictor:
    """`predictor.Predictor`'s interface over a fine-tuned RUN/ (for `predict` and `serve`).

    A file that cannot be decoded gets empty scores and its error, or with
    `fallback="label-mean"` the Train label mean marked in `fallback`, as `Predictor` does.
    """

    def __init__(self, run: str | Path, *, max_clips: int = 16, fallback: str = "none"):
        self.run = Path(run)
        self.fallback = fallback
        self.model = FinetunedModel(self.run)
        self.max_clips = max(1, int(max_clips))
        manifest = json.loads((self.run / "finetune.json").read_text())
        self.manifest = manifest
        self.label_mean = manifest.get("train_label_mean") or {}
        self.ready = False
        self.warmup_s: float | None = None

    def warm_up(self) -> float:
        """Compile the scoring program of every bucket once; returns seconds taken."""
        t = time.perf_counter()
        m = self.model
        sharding = NamedSharding(m.mesh, P("data"))
        for sec in m.buckets:
            w = jax.device_put(np.zeros((m.rows, int(round(sec * m.sr))), np.float32), sharding)
            n = jax.device_put(np.ones(m.rows, np.int32), sharding)
            jax.block_until_ready(m._predict(m.params, w, n))
        self.ready, self.warmup_s = True, time.perf_counter() - t
        return self.warmup_s

    def programs(self) -> dict[str, list[list[int]]]:
        """The (batch, samples) shapes scored, one per bucket."""
        m = self.model
        name = self.manifest["backbone"]["name"]
        return {name: [[m.rows, int(round(s * m.sr))] for s in m.buckets]}

    def predict_files(self, files: Sequence[str | Path]) -> list:
        """One `predictor.Scored` per file, in order."""
        from jax_ifmvse.predictor import Prediction, Predictor, Scored

        category = self.model.task == "category"
        pred, errors = self.model.predict_files(files)
        durations, rates = _header_info(files)
        mean = tuple(float(self.label_mean.get(a, np.nan)) for a in ATTRIBUTES)
        out = []
        for f, p, err, d, rate in zip(files, pred, errors, durations, rates, strict=True):
            ok = err is None and np.isfinite(p).all()
            dur = float(d) if np.isfinite(d) else None
            flags = []
            if dur is not None and dur > self.model.max_s + 1e-6:
                flags.append("cropped")
            if rate and int(rate) != int(self.model.sr):
                flags.append(f"resampled from {int(rate)} Hz")
            task1 = {}
            if ok and category:  # task 1 runs have no attributes: values stay None
                values, fallback, task1 = None, "", Predictor._task1(p)
            elif ok:
                values, fallback = tuple(float(x) for x in p), ""
            elif self.fallback == "label-mean" and not category:
                values, fallback = mean, "Train label mean"
            else:
                values, fallback = None, ""  # never an invented score
            prediction = Prediction(
                str(f), values, None if ok else (err or "failed"), fallback,
                duration_s=dur, flags=tuple(sorted(flags)), **task1,
            )  # fmt: skip
            out.append(Scored(prediction, dur, prediction.flags, None if ok else err))
        return out

    def info(self) -> dict:
        """What `GET /info` reports: the fine-tuned backbone, its head and programs."""
        b = self.manifest["backbone"]
        return {
            "run": str(self.run),
            "kind": "finetune",
            "backbones": {
                b["name"]: {
                    "source": str(self.run / "hf"),
                    "finetuned_from": b.get("source"),
                    "model_type": b.get("model_type"),
                    "compute_dtype": self.manifest["config"]["finetune"]["compute_dtype"],
                }
            },
            "best": self.manifest.get("best"),
            "train_label_mean": self.label_mean,
            "programs": self.programs(),
            "warmup_s": self.warmup_s,
        }


def _header_info(files: Sequence[str | Path]) -> tuple[np.ndarray, list[int | None]]:
    """Each file's duration (NaN when unreadable) and sample rate from its header."""
    import soundfile as sf

    out, rates = np.full(len(files), np.nan), [None] * len(files)
    for i, f in enumerate(files):
        try:
            info = sf.info(str(f))
            out[i], rates[i] = info.frames / info.samplerate, int(info.samplerate)
        except Exception:  # noqa: BLE001 - the decode reports it
            continue
    return out, rates


# ---------------------------------------------------------------------------------------------
# The command.


def finetune_main(cfg: Config, name: str, source: str, out: str | Path) -> dict:
    """`ifmvse finetune`: run with a progress bar, then print the best epoch, CCCs, skipped clips."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from jax_ifmvse.report import make_console

    console = make_console(stderr=True)
    category = cfg.finetune.task == "category"
    metric = "dev macro-F1" if category else "dev CCC"
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "loss {task.fields[loss]}  " + metric + " {task.fields[ccc]}  best {task.fields[best]}"
        ),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        ids: dict[str, Any] = {}
        best = [float("-inf")]

        def progress(e: dict) -> None:
            if e["kind"] == "start":
                ids["epochs"] = bar.add_task(
                    f"finetune {name}", total=e["epochs"], completed=e["done"],
                    loss="-", ccc="-", best="-",
                )  # fmt: skip
                ids["steps"] = bar.add_task("  micro-batches", total=e["steps"], loss="-",
                                            ccc="-", best="-")  # fmt: skip
            elif e["kind"] == "step":
                bar.update(ids["steps"], completed=e["step"])
            else:
                score = e["dev_macro_f1"] if category else e["dev_ccc"]
                best[0] = max(best[0], score)
                bar.update(
                    ids["epochs"], completed=e["epoch"], loss=f"{e['train_loss']:.4f}",
                    ccc=f"{score:.4f}", best=f"{best[0]:.4f}",
                )  # fmt: skip
                bar.reset(ids["steps"])

        manifest = finetune_run(cfg, name, source, out, progress=progress)
    table = Table(title=f"finetune {name} -> {out} (best epoch {manifest['best']['epoch']})")
    table.add_column("split")
    cols, scores = ((*ATTRIBUTES, "mean"), manifest["ccc"])
    if category:
        cols, scores = ("macro_f1", "accuracy"), manifest["f1"]
    for col in cols:
        table.add_column(col, justify="right")
    for split, per in scores.items():
        table.add_row(split, *(f"{per[c]:.4f}" for c in cols))
    stdout = make_console()
    stdout.print(table)
    if manifest["skipped"]:
        lines = (Path(out) / "skipped.csv").read_text().splitlines()[1:]
        shown = ", ".join(line.split(",")[0].strip('"') for line in lines[:20])
        more = f" and {len(lines) - 20} more" if len(lines) > 20 else ""
        stdout.print(f"{len(lines)} clip(s) skipped (unreadable): {shown}{more}; see skipped.csv")
    stdout.print(f"checkpoint: {Path(out) / 'hf'} (use as --backbone NAME={Path(out) / 'hf'})")
    return manifest
