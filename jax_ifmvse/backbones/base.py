"""The one interface every pretrained speech backbone offers to extraction."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import jax
import jax.numpy as jnp


def masked_mean(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over valid frames: hidden (..., B, F, D), mask (B, F) -> (..., B, D), in float32."""
    m = mask.astype(jnp.float32)[..., None]  # (B, F, 1)
    total = jnp.sum(hidden.astype(jnp.float32) * m, axis=-2)  # (..., B, D)
    count = jnp.maximum(jnp.sum(m, axis=-2), 1.0)  # (B, 1)
    return total / count


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
