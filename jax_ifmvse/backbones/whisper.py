"""Whisper encoder backbone: JAX log-mel front end + transformers' Flax Whisper encoder.

The encoder is transformers' `FlaxWhisperEncoder` with its layer loop replaced
(`WhisperEncoder`, the same parameters): transformers' Flax loop draws LayerDrop with Python's
`random` at trace time (one fixed choice baked into each compiled program, and a dropped layer
returns None); ours draws it from the "dropout" rng, one uniform per layer and call as torch's
`torch.rand([])`, and keeps a dropped layer's input (`jnp.where`: computed, then discarded).
`spec_augment` masks the log-mel input as transformers' `WhisperModel._mask_input_features`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from transformers import WhisperConfig
from transformers.modeling_flax_outputs import FlaxBaseModelOutput
from transformers.models.whisper.modeling_flax_whisper import (
    FlaxWhisperEncoder,
    FlaxWhisperEncoderLayerCollection,
    sinusoidal_embedding_init,
)

from jax_ifmvse.backbones.base import Backbone, Regularization, mask_spans

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SAMPLES = 30 * SAMPLE_RATE  # Whisper always sees exactly 30 s
N_MEL_FRAMES = CHUNK_SAMPLES // HOP_LENGTH  # 3000


@functools.cache
def mel_filters(num_mel_bins: int) -> np.ndarray:
    """The WhisperFeatureExtractor mel filter bank, (201, num_mel_bins) float32."""
    from transformers.audio_utils import mel_filter_bank

    # Same arguments as WhisperFeatureExtractor.__init__, so the bank is bit-identical.
    bank = mel_filter_bank(
        num_frequency_bins=1 + N_FFT // 2,
        num_mel_filters=num_mel_bins,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return bank.astype(np.float32)


@functools.cache
def _frame_index(chunk_samples: int = CHUNK_SAMPLES) -> np.ndarray:
    """Sample indices of every STFT frame of the reflect-padded chunk, (3001, 400) for 30 s."""
    n_frames = 1 + chunk_samples // HOP_LENGTH
    return np.arange(n_frames)[:, None] * HOP_LENGTH + np.arange(N_FFT)[None, :]


def log_mel(
    waves: jax.Array, num_mel_bins: int = 80, chunk_samples: int = CHUNK_SAMPLES
) -> jax.Array:
    """Whisper log-mel of padded audio: (B, T<=chunk) -> (B, num_mel_bins, chunk // 160) float32.

    The default chunk is Whisper's 30 s (3000 mel frames); a shorter chunk is the speed option
    of `WhisperBackbone.with_window`.
    """
    waves = waves.astype(jnp.float32)
    b, t = waves.shape
    if t > chunk_samples:
        raise ValueError(
            f"Whisper takes at most {chunk_samples} samples ({chunk_samples / SAMPLE_RATE:g} s),"
            f" got {t}"
        )
    waves = jnp.pad(
        waves, ((0, 0), (0, chunk_samples - t))
    )  # zero "silence" padding, like the extractor
    # torch.stft(center=True): reflect-pad n_fft // 2 on both sides.
    padded = jnp.pad(waves, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")
    frames = padded[:, _frame_index(chunk_samples)]  # (B, 3001, 400)
    # Periodic Hann, like torch.hann_window and transformers' window_function.
    window = np.hanning(N_FFT + 1)[:-1].astype(np.float32)
    spec = jnp.fft.rfft(frames * window, axis=-1)  # (B, 3001, 201)
    power = jnp.abs(spec[:, :-1]) ** 2  # the extractor drops the last frame -> (B, 3000, 201)
    mel = jnp.matmul(power, mel_filters(num_mel_bins), precision=jax.lax.Precision.HIGHEST)
    logs = jnp.log10(jnp.maximum(mel, 1e-10))  # (B, 3000, M)
    logs = jnp.maximum(logs, jnp.max(logs, axis=(1, 2), keepdims=True) - 8.0)
    return jnp.swapaxes((logs + 4.0) / 4.0, 1, 2)  # (B, M, 3000)


def frame_mask(lengths: jax.Array, num_frames: int = N_MEL_FRAMES // 2) -> jax.Array:
    """Encoder frames that cover real audio: lengths (B,) samples -> (B, 1500) bool.

    Mel frame j is centred on sample j * 160 and encoder frame i reads mel frames 2i and 2i + 1
    (conv2 has stride 2), so frame i is valid iff mel frame 2i is; same rule as the extractor's
    attention_mask[:, ::160][:, ::2].
    """
    lengths = jnp.clip(lengths, 1, CHUNK_SAMPLES)
    n_mel = (lengths + HOP_LENGTH - 1) // HOP_LENGTH  # mel frames whose centre is real audio
    n_enc = (n_mel + 1) // 2
    return jnp.arange(num_frames)[None, :] < n_enc[:, None]


class LayerDropCollection(FlaxWhisperEncoderLayerCollection):
    """transformers' encoder layers with LayerDrop from the "dropout" rng (traceable)."""

    def __call__(
        self,
        hidden_states,
        attention_mask,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ):
        drop = not deterministic and self.layerdrop > 0.0
        n = len(self.layers)
        u = jax.random.uniform(self.make_rng("dropout"), (n,)) if drop else None  # (L,)
        states = ()
        for i, layer in enumerate(self.layers):
            states += (hidden_states,)
            out = layer(hidden_states, attention_mask, output_attentions, deterministic)[0]
            hidden_states = jnp.where(u[i] < self.layerdrop, hidden_states, out) if drop else out
        states += (hidden_states,)
        return FlaxBaseModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=states if output_hidden_states else None,
            attentions=None,
        )


class WhisperEncoder(FlaxWhisperEncoder):
    """`FlaxWhisperEncoder` (same parameters and outputs) with `LayerDropCollection`."""

    def setup(self) -> None:
        d, init = self.config.d_model, jax.nn.initializers.normal(self.config.init_std)
        self.conv1 = nn.Conv(d, kernel_size=(3,), padding=1, kernel_init=init, dtype=self.dtype)
        self.conv2 = nn.Conv(
            d, kernel_size=(3,), strides=2, padding=1, kernel_init=init, dtype=self.dtype
        )
        self.dropout_layer = nn.Dropout(rate=self.config.dropout)
        self.layers = LayerDropCollection(
            self.config, dtype=self.dtype, gradient_checkpointing=self.gradient_checkpointing
        )
        self.embed_positions = nn.Embed(
            self.config.max_source_positions,
            d,
            dtype=self.dtype,
            embedding_init=sinusoidal_embedding_init,
        )
        self.layer_norm = nn.LayerNorm(dtype=self.dtype, epsilon=1e-05)


def spec_augment(
    features: jax.Array, key: jax.Array, lengths: jax.Array, reg: Regularization
) -> jax.Array:
    """SpecAugment of the log-mel input (B, M, T) as transformers' `_mask_input_features`:
    spans of mel frames (within each row's valid frames, `lengths` (B,)) and of mel bins set
    to 0."""
    b, m, t = features.shape
    k_time, k_feat = jax.random.split(key)
    if reg.mask_time_prob > 0.0:
        spans = mask_spans(
            k_time, lengths, t, reg.mask_time_prob, reg.mask_time_length, reg.mask_time_min_masks
        )  # (B, T)
        features = jnp.where(spans[:, None, :], 0.0, features)
    if reg.mask_feature_prob > 0.0:
        spans = mask_spans(
            k_feat,
            jnp.full((b,), m, jnp.int32),
            m,
            reg.mask_feature_prob,
            reg.mask_feature_length,
            reg.mask_feature_min_masks,
        )  # (B, M)
        features = jnp.where(spans[:, :, None], 0.0, features)
    return features


def mel_lengths(lengths: jax.Array, window_samples: int) -> jax.Array:
    """Mel frames whose centre is real audio, (B,) samples -> (B,) (the feature extractor's
    attention mask at the hop rate)."""
    lengths = jnp.clip(lengths, 1, window_samples)
    return ((lengths + HOP_LENGTH - 1) // HOP_LENGTH).astype(jnp.int32)


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Encoder tensors with keys relative to the encoder, from any Whisper PyTorch checkpoint."""
    for prefix in ("model.encoder.", "encoder."):
        out = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if out:
            return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}
    raise KeyError("no 'model.encoder.*' or 'encoder.*' keys in the Whisper state dict")


def convert_state_dict(state_dict: Mapping[str, Any], config: WhisperConfig) -> dict[str, Any]:
    """PyTorch Whisper keys (model.encoder.* or encoder.*) -> FlaxWhisperEncoder params."""
    sd = _strip_prefix(state_dict)
    d, ffn = config.d_model, config.encoder_ffn_dim
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in sd:
            raise KeyError(f"missing Whisper encoder tensor {key!r}")
        value = sd[key]
        if value.shape != shape:
            raise ValueError(
                f"Whisper encoder tensor {key!r} has shape {value.shape}, expected {shape}"
            )
        used.add(key)
        return value

    def linear(key: str, n_in: int, n_out: int, bias: bool = True) -> dict[str, np.ndarray]:
        out = {"kernel": take(f"{key}.weight", (n_out, n_in)).T}  # torch (out, in) -> (in, out)
        if bias:
            out["bias"] = take(f"{key}.bias", (n_out,))
        return out

    def norm(key: str) -> dict[str, np.ndarray]:
        return {"scale": take(f"{key}.weight", (d,)), "bias": take(f"{key}.bias", (d,))}

    def conv(key: str, n_in: int) -> dict[str, np.ndarray]:
        kernel = take(f"{key}.weight", (d, n_in, 3)).transpose(2, 1, 0)  # (out,in,k) -> (k,in,out)
        return {"kernel": kernel, "bias": take(f"{key}.bias", (d,))}

    params: dict[str, Any] = {
        "conv1": conv("conv1", config.num_mel_bins),
        "conv2": conv("conv2", d),
        "embed_positions": {
            "embedding": take("embed_positions.weight", (config.max_source_positions, d))
        },
        "layer_norm": norm("layer_norm"),
        "layers": {},
    }
    for i in range(config.encoder_layers):
        p = f"layers.{i}"
        params["layers"][str(i)] = {
            "self_attn": {
                "q_proj": linear(f"{p}.self_attn.q_proj", d, d),
                "k_proj": linear(f"{p}.self_attn.k_proj", d, d, bias=False),
                "v_proj": linear(f"{p}.self_attn.v_proj", d, d),
                "out_proj": linear(f"{p}.self_attn.out_proj", d, d),
            },
            "self_attn_layer_norm": norm(f"{p}.self_attn_layer_norm"),
            "fc1": linear(f"{p}.fc1", d, ffn),
            "fc2": linear(f"{p}.fc2", ffn, d),
            "final_layer_norm": norm(f"{p}.final_layer_norm"),
        }
    extra = sorted(set(sd) - used)
    if extra:
        raise ValueError(f"unexpected Whisper encoder tensors (wrong layer count?): {extra[:5]}")
    return jax.tree.map(np.ascontiguousarray, params)


def to_state_dict(params: Any) -> dict[str, np.ndarray]:
    """FlaxWhisperEncoder params -> PyTorch `encoder.*` keys: the inverse of `convert_state_dict`."""
    from flax.traverse_util import flatten_dict

    out = {}
    for path, value in flatten_dict(params).items():
        value = np.asarray(value, np.float32)
        *module, leaf = path
        if leaf == "kernel":
            # Linear (in, out) -> (out, in); conv (k, in, out) -> (out, in, k).
            value = value.T if value.ndim == 2 else value.transpose(2, 1, 0)
        name = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
        out[".".join(["encoder", *module, name])] = np.ascontiguousarray(value)
    return out


def window_config(config: Any, seconds: float) -> Any | None:
    """A copy of a Whisper config whose encoder sees a `seconds` window (None: the full one)."""
    frames = round(seconds * SAMPLE_RATE / HOP_LENGTH / 2)  # encoder frames, 50 per second
    full = int(config.max_source_positions)
    if frames * 2 * HOP_LENGTH != round(seconds * SAMPLE_RATE) or not 0 < frames <= full:
        raise ValueError(
            f"whisper window {seconds!r} s: must be a multiple of 0.02 s in (0, {full / 50:g}]"
        )
    if frames == full:
        return None
    out = copy.deepcopy(config)
    out.max_source_positions = frames  # transformers' encoder checks the input length against it
    return out


class WhisperBackbone(Backbone):
    """Whisper encoder: 30-s log-mel -> every encoder hidden state, mask over the real audio."""

    family: ClassVar[str] = "whisper"
    input_seconds: ClassVar[float | None] = 30.0  # the encoder always sees a 30-s log-mel

    def __init__(
        self, config: WhisperConfig, params: Any, source_info: dict[str, Any], dtype=jnp.float32
    ):
        super().__init__(config, params, source_info, dtype)
        self.module = WhisperEncoder(config, dtype=jnp.dtype(dtype))
        # A checkpoint saved with a shorter window (a fine-tuned `with_window` copy) keeps it.
        positions = int(config.max_source_positions)
        if positions != 1500:
            self.input_seconds = positions * 2 * HOP_LENGTH / SAMPLE_RATE

    @property
    def num_hidden_states(self) -> int:
        """Embedding output + one per encoder layer (the last one after the final layer norm)."""
        return int(self.config.encoder_layers) + 1

    @property
    def min_samples(self) -> int:
        """One encoder frame (two 10-ms mel hops, 320 samples): shorter input still yields that
        frame, but it is mostly padding; zero-padding up to this changes nothing (Whisper pads
        with zeros to its window anyway)."""
        return 2 * HOP_LENGTH

    @property
    def window_samples(self) -> int:
        """Samples of the padded input window (480000 for the faithful 30 s)."""
        return int(self.config.max_source_positions) * 2 * HOP_LENGTH

    def with_window(self, seconds: float) -> WhisperBackbone:
        """A copy whose encoder sees a `seconds`-long padded window instead of 30 s.

        A speed option, not the paper's setting: self-attention no longer sees the 30-s padding,
        so the features differ from the faithful ones. Positional embeddings are sliced to the
        window's frames (50 per second) and the config copy says so, because transformers'
        encoder checks the input length against `max_source_positions`.
        """
        config = window_config(self.config, seconds)
        if config is None:
            return self
        frames = int(config.max_source_positions)
        params = dict(self.params)
        table = params["embed_positions"]["embedding"]
        params["embed_positions"] = {"embedding": table[:frames]}  # (frames, D)
        info = {**self.source_info, "whisper_window_s": float(seconds)}
        out = WhisperBackbone(config, params, info, self.dtype)
        out.input_seconds = float(seconds)  # instance value shadows the 30-s class default
        return out

    def features(self, waves: jax.Array) -> jax.Array:
        """Log-mel input of the encoder, (B, T) -> (B, num_mel_bins, 3000) for 30 s."""
        return log_mel(waves, int(self.config.num_mel_bins), self.window_samples)

    def encode(self, params: Any, features: jax.Array) -> jax.Array:
        """Log-mel (B, M, 3000) -> stacked hidden states (L, B, 1500, D) in the compute dtype."""
        out = self.module.apply(
            {"params": params}, features.astype(self.dtype), output_hidden_states=True
        )
        return jnp.stack(out.hidden_states)

    def hidden_states(self, params: Any, waves: jax.Array, lengths: jax.Array):
        """waves (B, T<=480000), lengths (B,) -> (hidden (L, B, 1500, D), mask (B, 1500))."""
        hidden = self.encode(params, self.features(waves))
        lengths = jnp.minimum(lengths, self.window_samples)
        return hidden, frame_mask(lengths, int(self.config.max_source_positions))
