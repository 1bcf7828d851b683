"""`WhisperBackbone.with_window`: a shorter padded Whisper window (a speed option)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny_models import tiny_whisper_config
from tolerances import assert_exceeds, assert_within, chain, encoder_ops
from transformers import WhisperModel

from jax_ifmvse.backbones.whisper import WhisperBackbone, convert_state_dict


def _backbone() -> WhisperBackbone:
    config = tiny_whisper_config()
    torch.manual_seed(0)
    model = WhisperModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return WhisperBackbone(config, convert_state_dict(model.state_dict(), config), {"source": "t"})


def _speech(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16_000
    tone = np.sin(2 * np.pi * (150 + 80 * np.sin(3 * t)) * t)
    return (0.3 * tone + 0.05 * rng.standard_normal(n)).astype(np.float32)


@pytest.fixture(scope="module")
def bb() -> WhisperBackbone:
    return _backbone()


def test_window_30_is_the_default(bb):
    same = bb.with_window(30.0)
    assert same.input_seconds == 30.0 and same.window_samples == 480_000
    wave = _speech(16_000, 0)[None]
    a = jax.jit(bb.pooled)(bb.params, jnp.asarray(wave), jnp.array([16_000]))
    b = jax.jit(same.pooled)(same.params, jnp.asarray(wave), jnp.array([16_000]))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_short_window_shapes_finite_and_batch_invariant(bb):
    short = bb.with_window(2.0)
    assert short.input_seconds == 2.0 and bb.input_seconds == 30.0  # the original is untouched
    assert short.config.max_source_positions == 100 and bb.config.max_source_positions == 1500
    assert short.params["embed_positions"]["embedding"].shape == (100, 32)
    assert short.source_info["whisper_window_s"] == 2.0
    assert short.features(jnp.zeros((1, 8_000))).shape == (1, 80, 200)
    a, b = _speech(8_000, 1), _speech(32_000, 2)
    fn = jax.jit(short.pooled)
    hidden, mask = jax.jit(short.hidden_states)(
        short.params, jnp.asarray(b[None]), jnp.array([32_000])
    )
    assert hidden.shape == (3, 1, 100, 32) and mask.shape == (1, 100) and bool(mask.all())
    alone = fn(short.params, jnp.asarray(a[None]), jnp.array([8_000]))
    batch = np.zeros((2, 32_000), np.float32)
    batch[0, :8_000], batch[1] = a, b
    both = fn(short.params, jnp.asarray(batch), jnp.array([8_000, 32_000]))
    assert both.shape == (2, 3, 32) and np.isfinite(np.asarray(both)).all()
    # Two orders through the tiny encoder (conv1's 80 mels x 3 taps = 240 is the longest).
    bound = chain(encoder_ops(2, front=3), 240, np.abs(alone).max())
    assert_within(both[0], alone[0], bound, "alone vs in a padded batch")
    # The features really change: attention no longer sees 30 s of padding.
    full = jax.jit(bb.pooled)(bb.params, jnp.asarray(a[None]), jnp.array([8_000]))
    assert_exceeds(full, alone, bound, "a 30-s window")


def test_bad_window_is_refused(bb):
    for bad in (0.0, 31.0, 1.005):
        with pytest.raises(ValueError, match="whisper window"):
            bb.with_window(bad)
