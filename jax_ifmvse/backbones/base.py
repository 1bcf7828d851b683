"""The one interface every pretrained speech backbone offers to extraction."""

from __future__ import annotations

import abc
import copy
import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp


def masked_mean(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over valid frames: hidden (..., B, F, D), mask (B, F) -> (..., B, D), in float32."""
    m = mask.astype(jnp.float32)[..., None]  # (B, F, 1)
    total = jnp.sum(hidden.astype(jnp.float32) * m, axis=-2)  # (..., B, D)
    count = jnp.maximum(jnp.sum(m, axis=-2), 1.0)  # (B, 1)
    return total / count


def mask_spans(
    key: jax.Array, lengths: jax.Array, seq_len: int, prob: float, length: int, min_masks: int
) -> jax.Array:
    """SpecAugment spans as transformers' `_compute_mask_indices`, traceable: (B,) -> (B, seq_len).

    Per row, n = max(int(prob * len / length + u), min_masks) spans (u ~ U[0, 1) shared by the
    batch, n capped so the spans fit), their starts drawn without replacement among the
    len - length + 1 starts whose span stays inside the row's valid frames.
    """
    b = lengths.shape[0]
    # The most spans any row can get (u < 1), a static bound for top_k.
    k = min(max(int(prob * seq_len / length) + 1, min_masks), seq_len // length)
    k = min(k, max(seq_len - length + 1, 0))
    if k <= 0 or prob <= 0.0:
        return jnp.zeros((b, seq_len), bool)
    k_eps, k_pick = jax.random.split(key)
    eps = jax.random.uniform(k_eps, ())
    n_in = lengths.astype(jnp.int32)  # (B,)
    n = jnp.floor(prob * n_in.astype(jnp.float32) / length + eps).astype(jnp.int32)
    n = jnp.maximum(n, min_masks)
    n = jnp.where(n * length > seq_len, seq_len // length, n)
    starts_ok = jnp.maximum(n_in - (length - 1), 0)  # (B,) number of valid starts
    n = jnp.minimum(n, jnp.minimum(starts_ok, k))
    scores = jax.random.uniform(k_pick, (b, seq_len))
    scores = jnp.where(jnp.arange(seq_len)[None, :] < starts_ok[:, None], scores, -1.0)
    _, idx = jax.lax.top_k(scores, k)  # (B, k) distinct valid starts in random order
    idx = jnp.where(jnp.arange(k)[None, :] < n[:, None], idx, seq_len)  # unused -> sentinel
    starts = jnp.zeros((b, seq_len + 1), jnp.int32).at[jnp.arange(b)[:, None], idx].add(1)
    c = jnp.cumsum(starts[:, :seq_len], axis=1)  # (B, seq_len)
    before = jnp.pad(c, ((0, 0), (length, 0)))[:, :seq_len]  # c[t - length], 0 before the start
    return (c - before) > 0


@dataclasses.dataclass(frozen=True)
class Regularization:
    """A backbone's training-time regularization, under transformers' config names.

    `from_config` reads a checkpoint's own values (what `model.train()` applies in PyTorch);
    `apply` writes them into a config copy that the Flax modules read. All of it acts only when
    the module runs with `deterministic=False` and a "dropout" rng.
    """

    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    feat_proj_dropout: float = 0.0
    layerdrop: float = 0.0
    mask_time_prob: float = 0.0
    mask_time_length: int = 10
    mask_time_min_masks: int = 2
    mask_feature_prob: float = 0.0
    mask_feature_length: int = 10
    mask_feature_min_masks: int = 0

    @classmethod
    def from_config(cls, config: Any) -> Regularization:
        """The checkpoint's values (transformers' defaults where its config has none)."""
        g = lambda name, default: getattr(config, name, default)  # noqa: E731
        spec = bool(g("apply_spec_augment", True))
        whisper = g("model_type", "") == "whisper"
        return cls(
            hidden_dropout=float(g("dropout" if whisper else "hidden_dropout", 0.0)),
            attention_dropout=float(g("attention_dropout", 0.0)),
            activation_dropout=float(g("activation_dropout", 0.0)),
            feat_proj_dropout=0.0 if whisper else float(g("feat_proj_dropout", 0.0)),
            layerdrop=float(g("encoder_layerdrop" if whisper else "layerdrop", 0.0)),
            mask_time_prob=float(g("mask_time_prob", 0.0)) if spec else 0.0,
            mask_time_length=int(g("mask_time_length", 10)),
            mask_time_min_masks=int(g("mask_time_min_masks", 2)),
            mask_feature_prob=float(g("mask_feature_prob", 0.0)) if spec else 0.0,
            mask_feature_length=int(g("mask_feature_length", 10)),
            mask_feature_min_masks=int(g("mask_feature_min_masks", 0)),
        )

    @property
    def masks(self) -> bool:
        """Whether SpecAugment masking is on (time or feature)."""
        return self.mask_time_prob > 0.0 or self.mask_feature_prob > 0.0

    @property
    def active(self) -> bool:
        """Whether anything is on."""
        return self.masks or any(
            v > 0.0
            for v in (
                self.hidden_dropout,
                self.attention_dropout,
                self.activation_dropout,
                self.feat_proj_dropout,
                self.layerdrop,
            )
        )

    def apply(self, config: Any) -> Any:
        """A copy of the transformers config carrying these values (what the modules read)."""
        c = copy.deepcopy(config)
        if getattr(c, "model_type", "") == "whisper":
            c.dropout = self.hidden_dropout
            c.encoder_layerdrop = self.layerdrop
        else:
            c.hidden_dropout = self.hidden_dropout
            c.feat_proj_dropout = self.feat_proj_dropout
            c.layerdrop = self.layerdrop
        c.attention_dropout = self.attention_dropout
        c.activation_dropout = self.activation_dropout
        c.apply_spec_augment = self.masks
        for name in (
            "mask_time_prob",
            "mask_time_length",
            "mask_time_min_masks",
            "mask_feature_prob",
            "mask_feature_length",
            "mask_feature_min_masks",
        ):
            setattr(c, name, getattr(self, name))
        return c


class Backbone(abc.ABC):
    """A loaded backbone: Flax module + params + provenance, behind one waveform interface.

    Subclasses implement `hidden_states`; everything else is shared. All methods are pure
    functions of (params, inputs) so callers can `jax.jit` them once per bucket shape.
    """

    family: ClassVar[str]  # "whisper" | "wavlm" | "hubert" | "data2vec-audio"
    input_seconds: ClassVar[float | None] = None  # a fixed input window (Whisper: 30 s), if any

    def __init__(self, config: Any, params: Any, source_info: dict[str, Any], dtype=jnp.float32):
        self.config = config  # the transformers config object (plain data, no torch needed)
        self.params = params
        self.source_info = source_info  # written to the store's backbone attributes
        self.dtype = dtype  # compute dtype (float32, or bfloat16 on GPUs)

    @property
    def hidden_size(self) -> int:
        """Width D of every hidden state."""
        return int(
            self.config.hidden_size if hasattr(self.config, "hidden_size") else self.config.d_model
        )

    @property
    def min_samples(self) -> int:
        """Shortest input (samples at 16 kHz) that yields one valid output frame.

        Chunk planning drops a trailing chunk shorter than this (with its weight), and
        too-short clips are padded up to it.
        """
        return 1

    @property
    @abc.abstractmethod
    def num_hidden_states(self) -> int:
        """Number L of hidden states returned (embedding output + one per layer)."""

    @abc.abstractmethod
    def hidden_states(
        self, params: Any, waves: jax.Array, lengths: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """waves (B, T) float32 16 kHz, lengths (B,) samples -> (hidden (L, B, F, D), mask (B, F))."""

    def pooled(self, params: Any, waves: jax.Array, lengths: jax.Array) -> jax.Array:
        """Per-layer mean over valid frames: (B, T), (B,) -> (B, L, D) float32."""
        hidden, mask = self.hidden_states(params, waves, lengths)
        return jnp.swapaxes(masked_mean(hidden, mask), 0, 1)
