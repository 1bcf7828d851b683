"""Pieces shared by the wav2vec2-family backbones (WavLM, HuBERT, Data2Vec-audio).

The conv feature encoder, frame arithmetic, feature projection, weight-normed positional conv,
post-LN encoder layer, the encoder loop, PyTorch->Flax weight renaming, and the common
`SSLBackbone`. Flax parameter paths mirror the PyTorch keys (`encoder.layers.0.x.weight` ->
`encoder/layers_0/x/kernel`), so conversion is renaming plus fixed transposes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from transformers.modeling_flax_utils import ACT2FN
from transformers.models.wav2vec2.modeling_flax_wav2vec2 import (
    FlaxWav2Vec2FeedForward,
    FlaxWav2Vec2LayerNormConvLayer,
)

from jax_ifmvse.backbones.base import Backbone, Regularization, mask_spans
from jax_ifmvse.errors import IfmvseError

# torch.nn.LayerNorm / GroupNorm default eps, used where transformers does not pass config's.
TORCH_NORM_EPS = 1e-5


class CheckpointError(IfmvseError, ValueError):
    """A state dict that does not fit the model config (missing, unexpected or misshapen tensor)."""


# ---------------------------------------------------------------------------------------------
# Frame arithmetic and input preparation


def feat_extract_output_lengths(lengths, config) -> Any:
    """Frames the conv stack yields for `lengths` samples (int or int array), as transformers."""
    for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):
        lengths = (lengths - kernel) // stride + 1
    return lengths


def frame_mask(lengths: jax.Array, num_frames: int, config) -> jax.Array:
    """Valid conv frames: lengths (B,) samples -> (B, num_frames) bool, as transformers'
    `_get_feature_vector_attention_mask` for right-padded audio."""
    n = feat_extract_output_lengths(jnp.asarray(lengths, jnp.int32), config)  # (B,)
    return jnp.arange(num_frames)[None, :] < n[:, None]


def normalize_waves(waves: jax.Array, lengths: jax.Array) -> jax.Array:
    """Wav2Vec2FeatureExtractor `do_normalize`: zero mean, unit variance over each utterance's
    valid samples, padding set to 0. (B, T), (B,) -> (B, T) float32."""
    waves = waves.astype(jnp.float32)
    valid = jnp.arange(waves.shape[1])[None, :] < lengths[:, None]  # (B, T)
    n = jnp.maximum(lengths, 1).astype(jnp.float32)[:, None]
    mean = jnp.sum(jnp.where(valid, waves, 0.0), axis=1, keepdims=True) / n
    var = jnp.sum(jnp.where(valid, (waves - mean) ** 2, 0.0), axis=1, keepdims=True) / n
    return jnp.where(valid, (waves - mean) / jnp.sqrt(var + 1e-7), 0.0)


# ---------------------------------------------------------------------------------------------
# Modules


class MaskedGroupNorm(nn.Module):
    """torch GroupNorm(C, C) (each channel over time) with statistics over valid frames only.

    transformers normalises over the whole padded input, so a group-norm extractor gives an
    utterance different features alone and in a padded batch; restricting the mean and variance
    to the valid frames makes every row equal to the model run on its unpadded utterance.
    """

    features: int
    epsilon: float = TORCH_NORM_EPS
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, valid=None):  # (B, T, C), (B, T) bool | None -> (B, T, C)
        scale = self.param("scale", nn.initializers.ones, (self.features,))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x = x.astype(jnp.float32)
        if valid is None:
            valid = jnp.ones(x.shape[:2], bool)
        m = valid[:, :, None].astype(jnp.float32)  # (B, T, 1)
        n = jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1.0)  # (B, 1, 1)
        mean = jnp.sum(x * m, axis=1, keepdims=True) / n  # (B, 1, C)
        var = jnp.sum(((x - mean) * m) ** 2, axis=1, keepdims=True) / n  # biased, as torch
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype)


class ConvLayer(nn.Module):
    """One conv of the feature encoder with group norm or no norm (the "group" extractor)."""

    config: Any
    layer_id: int
    group_norm: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, valid=None):  # (B, T, C_in), (B, T') bool -> (B, T', C_out)
        c = self.config
        out = c.conv_dim[self.layer_id]
        x = nn.Conv(
            out,
            kernel_size=(c.conv_kernel[self.layer_id],),
            strides=(c.conv_stride[self.layer_id],),
            use_bias=c.conv_bias,
            padding="VALID",
            dtype=self.dtype,
            name="conv",
        )(x)
        if self.group_norm:
            x = MaskedGroupNorm(out, dtype=self.dtype, name="layer_norm")(x, valid)
        return ACT2FN[c.feat_extract_activation](x)


class FeatureEncoder(nn.Module):
    """Conv feature encoder: (B, T) waveform -> (B, F, conv_dim[-1]) features."""

    config: Any
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, waves, lengths=None):  # (B, T), (B,) samples | None (all valid)
        c = self.config
        norm = getattr(c, "feat_extract_norm", "layer")  # Data2Vec-audio is always "layer"
        if norm not in ("layer", "group"):
            raise ValueError(f"feat_extract_norm must be 'layer' or 'group', got {norm!r}")
        x = waves[:, :, None].astype(self.dtype)  # (B, T, 1)
        for i in range(len(c.conv_dim)):
            name = f"conv_layers_{i}"
            if norm == "layer":
                # Per-frame layer norm: padding-invariant as it is. transformers' Flax layer uses
                # config.layer_norm_eps where torch uses 1e-5; every released checkpoint has
                # layer_norm_eps == 1e-5.
                x = FlaxWav2Vec2LayerNormConvLayer(c, layer_id=i, dtype=self.dtype, name=name)(x)
            elif i == 0:
                # Frames of the first conv that read only real samples: (B, T0) bool.
                t0 = (x.shape[1] - c.conv_kernel[0]) // c.conv_stride[0] + 1
                valid = None
                if lengths is not None:
                    n0 = (jnp.asarray(lengths, jnp.int32) - c.conv_kernel[0]) // c.conv_stride[0]
                    valid = jnp.arange(t0)[None, :] < (n0 + 1)[:, None]
                x = ConvLayer(c, i, group_norm=True, dtype=self.dtype, name=name)(x, valid)
            else:
                x = ConvLayer(c, i, group_norm=False, dtype=self.dtype, name=name)(x)
        return x  # (B, F, C)


class FeatureProjection(nn.Module):
    """Feature projection with or without a leading layer norm (HuBERT `feat_proj_layer_norm`).

    transformers' FlaxWav2Vec2FeatureProjection always has the norm, so it covers only one
    HuBERT variant; this covers both with the same parameter names.
    """

    config: Any
    layer_norm: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):  # (B, F, C) -> (B, F, D)
        if self.layer_norm:
            x = nn.LayerNorm(
                epsilon=self.config.layer_norm_eps, dtype=self.dtype, name="layer_norm"
            )(x)
        x = nn.Dense(self.config.hidden_size, dtype=self.dtype, name="projection")(x)
        rate = float(getattr(self.config, "feat_proj_dropout", 0.0))
        return nn.Dropout(rate)(x, deterministic=deterministic)


def same_pad_conv(x, kernel_size: int, groups: int, features: int, dtype, name: str):
    """Grouped conv padded k//2 each side, trimmed by one frame if k is even (SamePadLayer).

    Call inside a compact method: the conv becomes a child `name` of the calling module.
    """
    y = nn.Conv(
        features,
        kernel_size=(kernel_size,),
        padding=[(kernel_size // 2, kernel_size // 2)],
        feature_group_count=groups,
        dtype=dtype,
        name=name,
    )(x)
    return y[:, :-1] if kernel_size % 2 == 0 else y


class BatchNorm1d(nn.Module):
    """Inference-mode torch BatchNorm1d over the channel axis, with torch's parameter names."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, F, D)
        d = (self.features,)
        scale = self.param("scale", nn.initializers.ones, d)
        bias = self.param("bias", nn.initializers.zeros, d)
        mean = self.param("running_mean", nn.initializers.zeros, d)
        var = self.param("running_var", nn.initializers.ones, d)
        y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + TORCH_NORM_EPS) * scale + bias
        return y.astype(self.dtype)


class PositionalConvEmbedding(nn.Module):
    """Wav2Vec2-style positional conv (weight norm folded into `conv/kernel` at conversion)."""

    config: Any
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):  # (B, F, D), (B, F) -> (B, F, D)
        c = self.config
        if getattr(c, "conv_pos_batch_norm", False):  # some HuBERT variants
            x = BatchNorm1d(c.hidden_size, dtype=self.dtype, name="batch_norm")(x)
            if mask is not None:
                # BatchNorm(0) != 0: re-zero padded frames so the conv sees the zeros it pads
                # with when the utterance runs alone.
                x = jnp.where(mask[:, :, None], x, 0).astype(x.dtype)
        y = same_pad_conv(
            x,
            c.num_conv_pos_embeddings,
            c.num_conv_pos_embedding_groups,
            c.hidden_size,
            self.dtype,
            "conv",
        )
        return ACT2FN[c.feat_extract_activation](y)


class SelfAttention(nn.Module):
    """wav2vec2 self-attention with torch's attention dropout (independent per batch row, head
    and weight; transformers' Flax attention shares one dropout mask over batch and heads)."""

    config: Any
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):  # (B, F, D), (B, F) -> (B, F, D)
        c = self.config
        b, f, d = x.shape
        h = c.num_attention_heads
        hd = d // h

        def proj(name):
            return nn.Dense(d, dtype=self.dtype, name=name)(x).reshape(b, f, h, hd)

        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")  # (B, F, H, hd)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * (hd**-0.5), k).astype(jnp.float32)
        key_bias = jnp.where(mask[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits + key_bias, axis=-1)  # (B, H, F, F)
        weights = nn.Dropout(c.attention_dropout)(weights, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v).reshape(b, f, d)
        return nn.Dense(d, dtype=self.dtype, name="out_proj")(out)


class EncoderLayer(nn.Module):
    """Post-LN transformer layer (HuBERT / Data2Vec-audio `do_stable_layer_norm=False`)."""

    config: Any
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):  # (B, F, D), (B, F)
        c = self.config
        a = SelfAttention(c, dtype=self.dtype, name="attention")(x, mask, deterministic)
        x = x + nn.Dropout(c.hidden_dropout)(a, deterministic=deterministic)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="layer_norm")(x)
        ff = FlaxWav2Vec2FeedForward(c, dtype=self.dtype, name="feed_forward")
        x = x + ff(x, deterministic=deterministic)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)
        return (x,)


class StableEncoderLayer(nn.Module):
    """Pre-LN transformer layer (`do_stable_layer_norm=True`), as transformers' torch layer."""

    config: Any
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):  # (B, F, D), (B, F)
        c = self.config
        y = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="layer_norm")(x)
        a = SelfAttention(c, dtype=self.dtype, name="attention")(y, mask, deterministic)
        x = x + nn.Dropout(c.hidden_dropout)(a, deterministic=deterministic)
        y = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)
        ff = FlaxWav2Vec2FeedForward(c, dtype=self.dtype, name="feed_forward")
        return (x + ff(y, deterministic=deterministic),)


LayerFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


def run_encoder(
    x: jax.Array,
    mask: jax.Array,
    pos_conv_embed: Callable[[jax.Array, jax.Array], jax.Array],
    layer_norm: Callable[[jax.Array], jax.Array],
    layers: Sequence[LayerFn],
    stable: bool,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
    keep: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """The transformers encoder loop with output_hidden_states=True: num_layers + 1 states.

    Post-LN applies `layer_norm` after adding the positional conv; stable (pre-LN) applies it to
    the last layer's output, which replaces the last hidden state. Each layer maps
    (hidden, carry) -> (hidden, carry) so WavLM can thread its position bias. Training:
    `dropout` (hidden dropout) follows the positional conv, and `keep` (num_layers,) bool is
    LayerDrop: a dropped layer passes its input on (it is computed and discarded, so its
    parameters get a zero gradient as in torch, where it is skipped).
    """
    # Padded frames are zeroed before the positional conv, as transformers does.
    x = jnp.where(mask[:, :, None], x, 0).astype(x.dtype)  # (B, F, D)
    x = x + pos_conv_embed(x, mask)
    if not stable:
        x = layer_norm(x)
    if dropout is not None:
        x = dropout(x)
    states = [x]
    carry = None
    for i, layer in enumerate(layers):
        y, carry = layer(x, carry)
        x = y if keep is None else jnp.where(keep[i], y, x)
        states.append(x)
    if stable:
        states[-1] = layer_norm(x)
    return tuple(states)


def layer_keep(module: nn.Module, n: int, rate: float, first_always: bool = False) -> jax.Array:
    """LayerDrop draw: (n,) bool, layer i kept unless U[0, 1) < rate (torch's `torch.rand([])`);
    WavLM never drops layer 0, which computes the relative position bias."""
    keep = jax.random.uniform(module.make_rng("dropout"), (n,)) >= rate
    return keep.at[0].set(True) if first_always else keep


class Encoder(nn.Module):
    """HuBERT / Data2Vec-audio encoder: positional conv, layer norm, post-LN or stable layers."""

    config: Any
    stable: bool
    pos_conv_cls: type[nn.Module] = PositionalConvEmbedding
    pos_conv_kwargs: tuple[tuple[str, Any], ...] = ()  # extra attributes, hashable
    dtype: jnp.dtype = jnp.float32
    remat: bool = False  # gradient checkpointing per layer (fine-tuning): recompute in backward

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):  # (B, F, D), (B, F) -> L + 1 states
        c = self.config
        layer_cls = StableEncoderLayer if self.stable else EncoderLayer
        if self.remat:
            # Same parameter names, activations not kept; `deterministic` is static.
            layer_cls = nn.remat(layer_cls, static_argnums=(3,))
        layers = [
            layer_cls(c, dtype=self.dtype, name=f"layers_{i}") for i in range(c.num_hidden_layers)
        ]

        def as_fn(layer):
            return lambda h, carry: (layer(h, mask, deterministic)[0], carry)

        pos_conv = self.pos_conv_cls(
            c, dtype=self.dtype, name="pos_conv_embed", **dict(self.pos_conv_kwargs)
        )
        rate = float(getattr(c, "layerdrop", 0.0))
        keep = None if deterministic or rate <= 0 else layer_keep(self, len(layers), rate)
        return run_encoder(
            x,
            mask,
            pos_conv,
            nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="layer_norm"),
            [as_fn(layer) for layer in layers],
            self.stable,
            lambda h: nn.Dropout(c.hidden_dropout)(h, deterministic=deterministic),
            keep,
        )


def spec_augment(
    module: nn.Module, x: jax.Array, mask: jax.Array, embed: jax.Array, config: Any
) -> jax.Array:
    """transformers' `_mask_hidden_states` in training: time spans -> `masked_spec_embed`,
    feature spans -> 0. (B, F, D), (B, F) valid frames -> (B, F, D)."""
    reg = Regularization.from_config(config)
    b, f, d = x.shape
    if reg.mask_time_prob > 0:
        spans = mask_spans(
            module.make_rng("dropout"), jnp.sum(mask, axis=1), f, reg.mask_time_prob,
            reg.mask_time_length, reg.mask_time_min_masks,
        )  # fmt: skip
        x = jnp.where(spans[:, :, None], embed.astype(x.dtype), x)
    if reg.mask_feature_prob > 0:
        chans = mask_spans(
            module.make_rng("dropout"), jnp.full((b,), d), d, reg.mask_feature_prob,
            reg.mask_feature_length, reg.mask_feature_min_masks,
        )  # fmt: skip
        x = jnp.where(chans[:, None, :], jnp.zeros((), x.dtype), x)
    return x


def _uniform(key, shape, dtype=jnp.float32):
    """torch `Tensor.uniform_()`: U[0, 1), the initialisation of `masked_spec_embed`."""
    return jax.random.uniform(key, shape, dtype)


class SSLModel(nn.Module):
    """Waveform -> all hidden states: feature encoder, projection, then `make_encoder()`."""

    config: Any
    dtype: jnp.dtype = jnp.float32
    remat: bool = False  # gradient checkpointing per transformer layer (`make_encoder` passes it)

    def feat_proj_layer_norm(self) -> bool:
        """Whether the feature projection starts with a layer norm."""
        return True

    def make_encoder(self) -> nn.Module:
        """The encoder submodule (named `encoder`); called inside `__call__`."""
        raise NotImplementedError

    @nn.compact
    def __call__(self, waves, mask, lengths=None, deterministic: bool = True):
        """(B, T), (B, F), (B,) -> L + 1 x (B, F, D); `deterministic=False` (training, with a
        "dropout" rng) turns on the config's dropout, LayerDrop and SpecAugment masking."""
        c = self.config
        x = FeatureEncoder(c, dtype=self.dtype, name="feature_extractor")(waves, lengths)
        x = FeatureProjection(
            c, self.feat_proj_layer_norm(), dtype=self.dtype, name="feature_projection"
        )(x, deterministic)
        if has_masked_spec_embed(c):  # a parameter exactly when torch's model has one
            embed = self.param("masked_spec_embed", _uniform, (c.hidden_size,))
            if not deterministic and getattr(c, "apply_spec_augment", True):
                x = spec_augment(self, x, mask, embed, c)
        return self.make_encoder()(x, mask, deterministic)


def has_masked_spec_embed(config: Any) -> bool:
    """transformers creates `masked_spec_embed` iff mask_time_prob > 0 or mask_feature_prob > 0."""
    return (
        float(getattr(config, "mask_time_prob", 0.0)) > 0
        or float(getattr(config, "mask_feature_prob", 0.0)) > 0
    )


# ---------------------------------------------------------------------------------------------
# PyTorch -> Flax weights


_WEIGHT_NORM_SUFFIXES = (
    (".weight_g", ".weight_v"),
    (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
)


def _normed_weight(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """torch weight_norm(dim=2): w = g * v / ||v|| with the norm over all axes but 2."""
    norm = np.sqrt(np.sum(v.astype(np.float64) ** 2, axis=(0, 1), keepdims=True))
    return (g * v / norm).astype(np.float32)


def torch_to_flax(
    state_dict: Mapping[str, Any], prefixes: Sequence[str], roots: Sequence[str] = ()
) -> dict[tuple[str, ...], np.ndarray]:
    """Rename + transpose a wav2vec2-family state dict into flat Flax paths.

    Strips the first matching task prefix (`wavlm.`, ...), keeps only keys under `roots` and
    the training-only `masked_spec_embed` (dropping heads: lm_head, quantizer, ...), folds
    weight norm, and maps
    linear (out, in) -> kernel (in, out), conv (out, in, k) -> kernel (k, in, out),
    norm weight -> scale, embedding weight -> embedding.
    """
    roots = tuple(roots) or ("feature_extractor.", "feature_projection.", "encoder.")
    sd: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        for p in prefixes:
            if key.startswith(p):
                key = key[len(p) :]
                break
        keep = key.startswith(roots) or key == "masked_spec_embed"
        if keep and not key.endswith("num_batches_tracked"):
            sd[key] = np.asarray(value, dtype=np.float32)

    # Weight norm: old (weight_g, weight_v) or new parametrizations (original0, original1).
    for g_suffix, v_suffix in _WEIGHT_NORM_SUFFIXES:
        for g_key in [k for k in sd if k.endswith(g_suffix)]:
            base = g_key.removesuffix(g_suffix)
            sd[base + ".weight"] = _normed_weight(sd.pop(g_key), sd.pop(base + v_suffix))

    flat: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in sd.items():
        parts = re.sub(r"\.(\d+)(?=\.)", r"_\1", key).split(".")
        module, leaf = parts[:-1], parts[-1]
        if leaf == "weight":
            if module[-1] == "rel_attn_embed":
                leaf = "embedding"
            elif value.ndim == 2:
                leaf, value = "kernel", value.T
            elif value.ndim == 3:
                leaf, value = "kernel", value.transpose(2, 1, 0)
            else:
                leaf = "scale"
        flat[tuple(module) + (leaf,)] = np.ascontiguousarray(value)
    return flat


def with_masked_spec_embed(flat: dict[tuple[str, ...], Any], config) -> dict[tuple[str, ...], Any]:
    """Flat params with `masked_spec_embed` exactly when the config's model has it.

    A checkpoint saved without it (an export from before it was kept) gets torch's U[0, 1) draw
    (seeded, so a load is reproducible); one whose config masks nothing drops it, as
    transformers ignores it there.
    """
    key = ("masked_spec_embed",)
    flat = dict(flat)
    if not has_masked_spec_embed(config):
        flat.pop(key, None)
    elif key not in flat:
        rng = np.random.default_rng(0)
        flat[key] = rng.uniform(0.0, 1.0, (int(config.hidden_size),)).astype(np.float32)
    return flat


def flax_to_torch(params: Any, weight_norm: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Flax params -> transformers base-model state dict: the inverse of `torch_to_flax`.

    `weight_norm` names the modules (dotted torch paths) whose folded weight is written back as
    torch's weight-norm parametrization, g = ||w|| over all axes but 2 and v = w (so g v / ||v||
    is w again).
    """
    out: dict[str, np.ndarray] = {}
    for path, value in flatten_dict(params).items():
        value = np.asarray(value, np.float32)
        *module, leaf = path
        if leaf == "kernel":
            # Linear (in, out) -> (out, in); conv (k, in, out) -> (out, in, k).
            value = value.T if value.ndim == 2 else value.transpose(2, 1, 0)
        name = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
        base = ".".join(re.sub(r"_(\d+)$", r".\1", m) for m in module)
        if base in weight_norm and name == "weight":
            g = np.sqrt(np.sum(value.astype(np.float64) ** 2, axis=(0, 1), keepdims=True))
            out[f"{base}.parametrizations.weight.original0"] = g.astype(np.float32)
            out[f"{base}.parametrizations.weight.original1"] = np.ascontiguousarray(value)
            continue
        out[f"{base}.{name}" if base else name] = np.ascontiguousarray(value)
    return out


def check_and_nest(
    flat: dict[tuple[str, ...], np.ndarray], expected: Any, what: str
) -> dict[str, Any]:
    """Compare flat converted params with the module's expected shapes; nest them."""
    want = {k: tuple(v.shape) for k, v in flatten_dict(expected).items()}
    missing = sorted("/".join(k) for k in want if k not in flat)
    extra = sorted("/".join(k) for k in flat if k not in want)
    if missing:
        raise CheckpointError(f"{what}: {len(missing)} tensors missing, e.g. {missing[:3]}")
    if extra:
        raise CheckpointError(f"{what}: {len(extra)} unexpected tensors, e.g. {extra[:3]}")
    for k, shape in want.items():
        if flat[k].shape != shape:
            raise CheckpointError(
                f"{what}: {'/'.join(k)} has shape {flat[k].shape}, config expects {shape}"
            )
    return unflatten_dict(flat)


# ---------------------------------------------------------------------------------------------
# Backbone


class SSLBackbone(Backbone):
    """Common waveform -> hidden states implementation; subclasses name the Flax module."""

    module_cls: ClassVar[type[nn.Module]]
    prefixes: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        config: Any,
        params: Any,
        source_info: dict[str, Any] | None = None,
        dtype=jnp.float32,
        do_normalize: bool = False,
    ):
        super().__init__(config, params, dict(source_info or {}), dtype)
        # The checkpoint's preprocessor_config.json `do_normalize` (per-utterance zero-mean,
        # unit-variance waveform), applied here so callers pass raw audio.
        self.do_normalize = do_normalize
        self.module = type(self).module_cls(config, dtype=dtype)

    @property
    def num_hidden_states(self) -> int:
        """Embedding output + one per transformer layer."""
        return int(self.config.num_hidden_layers) + 1

    @property
    def min_samples(self) -> int:
        """Shortest input giving one conv frame: the receptive field (400 samples = 25 ms)."""
        need = 1  # frames wanted after the last conv, walked back through the stack
        for kernel, stride in reversed(list(zip(self.config.conv_kernel, self.config.conv_stride))):
            need = (need - 1) * stride + kernel
        return int(need)

    def num_frames(self, num_samples: int) -> int:
        """Frames F for a (padded) waveform of `num_samples` samples."""
        return int(feat_extract_output_lengths(num_samples, self.config))

    def hidden_states(self, params, waves, lengths):
        """waves (B, T) float32 16 kHz, lengths (B,) samples -> (hidden (L, B, F, D), mask (B, F)).

        Hidden states come in the compute dtype; the mask is transformers' feature-vector mask.
        """
        if waves.ndim != 2 or self.num_frames(waves.shape[1]) < 1:
            raise ValueError(
                f"{self.family}: waves must be (B, T) with T >= the conv receptive field, "
                f"got shape {tuple(waves.shape)}"
            )
        lengths = jnp.asarray(lengths, jnp.int32)
        if self.do_normalize:
            waves = normalize_waves(waves, lengths)
        mask = frame_mask(lengths, self.num_frames(waves.shape[1]), self.config)  # (B, F)
        states = self.module.apply({"params": params}, waves, mask, lengths)
        return jnp.stack(states), mask

    @classmethod
    def param_shapes(cls, config) -> Any:
        """Expected parameter tree (ShapeDtypeStructs), traced without allocating weights."""
        module = cls.module_cls(config)
        n = 1  # shortest power-of-two input giving a frame: parameter shapes do not depend on T
        while feat_extract_output_lengths(n, config) < 1:
            n *= 2
        waves = jax.ShapeDtypeStruct((1, n), jnp.float32)
        mask = jax.ShapeDtypeStruct((1, int(feat_extract_output_lengths(n, config))), bool)
        return jax.eval_shape(module.init, jax.random.PRNGKey(0), waves, mask)["params"]

    @classmethod
    def init_params(cls, config, key: jax.Array) -> Any:
        """Random float32 parameters (tests, benchmarks), no torch needed.

        Drawn in numpy from the traced shapes: compiling Flax's own init graph takes tens of
        seconds for no benefit. Kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norms at
        identity, biases zero.
        """
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
        out = {}
        for path, leaf in flatten_dict(cls.param_shapes(config)).items():
            name, shape = path[-1], leaf.shape
            if name == "kernel":
                value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
            elif name == "embedding":
                value = rng.standard_normal(shape)
            elif name == "masked_spec_embed":
                value = rng.uniform(0.0, 1.0, shape)  # torch's uniform_()
            elif name in ("scale", "running_var", "gru_rel_pos_const"):
                value = np.ones(shape)
            else:
                value = np.zeros(shape)
            out[path] = jnp.asarray(value, jnp.float32)
        return unflatten_dict(out)

    @staticmethod
    def to_state_dict(params: Any, config) -> dict[str, np.ndarray]:
        """Flax params -> the transformers base model's state dict (the inverse of `convert`)."""
        # The wav2vec2-style positional conv is weight-normed; Data2Vec-audio's stacked convs
        # are not.
        normed = () if config.model_type == "data2vec-audio" else ("encoder.pos_conv_embed.conv",)
        return flax_to_torch(params, normed)

    @classmethod
    def convert(cls, state_dict: Mapping[str, Any], config) -> dict[str, Any]:
        """PyTorch state dict (base or task model, numpy values) -> Flax params, shape-checked."""
        flat = torch_to_flax(state_dict, cls.prefixes)
        return check_and_nest(
            with_masked_spec_embed(flat, config),
            cls.param_shapes(config),
            f"{cls.family} state dict",
        )
