"""The fine-tuned model: backbone module + pooling + head as pure functions of params, its
frozen parts, and the data-dependent head initialisation."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jax_ifmvse.backbones import whisper
from jax_ifmvse.backbones.base import Regularization
from jax_ifmvse.backbones.conv_frontend import (
    feat_extract_output_lengths,
    frame_mask,
    normalize_waves,
)
from jax_ifmvse.categories import N_CLASSES
from jax_ifmvse.config import ATTRIBUTES, Config
from jax_ifmvse.errors import IfmvseError
from jax_ifmvse.heads.pooling import AttentiveStatisticsPooling
from jax_ifmvse.heads.regression import EmotionRegression

FINETUNABLE = ("whisper", "wavlm", "hubert", "data2vec-audio")
TASKS = ("attributes", "category")  # finetune.task: task 2 (CCC) or task 1 (weighted CE)


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
    # The backbone's dropout / LayerDrop / SpecAugment in training (`config` carries it too).
    regularization: Regularization = Regularization()

    @property
    def n_outputs(self) -> int:
        """Head outputs: 3 attributes, or 8 class logits for task 1."""
        return N_CLASSES if self.task == "category" else len(ATTRIBUTES)

    @property
    def hidden_size(self) -> int:
        """Width D of the backbone's hidden states."""
        c = self.config
        return int(c.d_model if self.family == "whisper" else c.hidden_size)


REGULARIZATION_SETTINGS = (
    "hidden_dropout",
    "attention_dropout",
    "activation_dropout",
    "feat_proj_dropout",
    "layerdrop",
    "mask_time_prob",
    "mask_time_length",
    "mask_feature_prob",
    "mask_feature_length",
)
# The probabilities and rates among them (0 switches each off; the lengths have no "off").
REGULARIZATION_RATES = tuple(n for n in REGULARIZATION_SETTINGS if not n.endswith("_length"))


def regularization(config: Any, fc: Any) -> Regularization:
    """The checkpoint's own regularization with the `finetune.*` settings that are not -1."""
    over = {}
    for name in REGULARIZATION_SETTINGS:
        value = getattr(fc, name)
        if value == -1:
            continue
        if value < 0 or (name.endswith("_length") and value < 1):
            raise FinetuneError(
                f"finetune.{name} {value!r}: -1 (the checkpoint's value) or "
                + ("a length >= 1" if name.endswith("_length") else "a rate >= 0")
            )
        over[name] = value
    return dataclasses.replace(Regularization.from_config(config), **over)


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
    reg = regularization(backbone.config, fc)
    config = reg.apply(backbone.config)  # what the modules read, and what RUN/hf/ records
    if backbone.family == "whisper":  # LayerDrop from the rng: backbones.whisper.WhisperEncoder
        module = backbone.module.clone(config=config, dtype=dtype, gradient_checkpointing=fc.remat)
        window = int(backbone.window_samples)
    else:
        module = backbone.module.clone(config=config, dtype=dtype, remat=fc.remat)
        window = 0
    head = EmotionRegression(
        hidden=fc.head_hidden,
        n_outputs=N_CLASSES if fc.task == "category" else len(ATTRIBUTES),
        num_layers=fc.head_layers,
        dropout=fc.head_dropout,
    )
    return Spec(
        backbone.family,
        config,
        module,
        AttentiveStatisticsPooling(),
        head,
        bool(getattr(backbone, "do_normalize", False)),
        window,
        fc.task,
        reg,
    )


def encode(spec: Spec, params: Any, waves: jax.Array, lengths: jax.Array, *, train=False, rng=None):
    """Last hidden state and its valid frames: (B, T), (B,) -> (B, F, D), (B, F) bool.

    `train` (with `rng`) turns on the backbone's regularization (`spec.regularization`).
    """
    lengths = jnp.asarray(lengths, jnp.int32)
    det = not (train and spec.regularization.active)
    rngs = {} if det else {"dropout": rng}
    if spec.family == "whisper":
        feats = whisper.log_mel(waves, int(spec.config.num_mel_bins), spec.window_samples)
        if not det and spec.regularization.masks:  # SpecAugment on the log-mel, as transformers
            n_mel = whisper.mel_lengths(lengths, spec.window_samples)
            feats = whisper.spec_augment(
                feats, jax.random.fold_in(rng, 5), n_mel, spec.regularization
            )
        out = spec.module.apply(
            {"params": params}, feats.astype(spec.module.dtype), deterministic=det, rngs=rngs
        )
        frames = int(spec.config.max_source_positions)
        mask = whisper.frame_mask(jnp.minimum(lengths, spec.window_samples), frames)
        return out.last_hidden_state, mask  # (B, F, D), (B, F)
    if spec.do_normalize:
        waves = normalize_waves(waves, lengths)
    frames = int(feat_extract_output_lengths(waves.shape[1], spec.config))
    mask = frame_mask(lengths, frames, spec.config)  # (B, F)
    states = spec.module.apply({"params": params}, waves, mask, lengths, det, rngs=rngs)
    return states[-1], mask


def forward(
    spec: Spec, params: Any, waves: jax.Array, lengths: jax.Array, *, train: bool, rng=None
) -> jax.Array:
    """Waves (B, T), lengths (B,) -> (B, 3) float32 on the training scale, or (B, 8) logits."""
    bb_rng = None if rng is None else jax.random.fold_in(rng, 1)  # the head keeps `rng`
    hidden, mask = encode(spec, params["backbone"], waves, lengths, train=train, rng=bb_rng)
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
    masks = spec.family != "whisper" and spec.regularization.masks
    if masks and "masked_spec_embed" not in backbone:  # masking on, a checkpoint without it
        k = jax.random.fold_in(key, 7)
        backbone = {**backbone, "masked_spec_embed": jax.random.uniform(k, (d,))}  # as torch
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
        if path[1] == "masked_spec_embed" and not spec.regularization.masks:
            return "frozen"  # unused: torch leaves its grad None (no update, no weight decay)
        if spec.family == "whisper" and path[1] == "embed_positions":
            return "frozen"
        return "frozen" if freeze_feature_encoder and path[1] in cnn else "train"

    return unflatten_dict({k: label(k) for k in flatten_dict(params)})


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
