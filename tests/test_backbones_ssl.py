"""WavLM, HuBERT, Data2Vec-audio Flax backbones vs transformers' PyTorch models, same weights."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tiny_models import TINY_SSL
from tolerances import U32, assert_exceeds, assert_within, chain, encoder_ops, mean_std
from transformers import (
    Data2VecAudioConfig,
    Data2VecAudioForCTC,
    Data2VecAudioModel,
    HubertConfig,
    HubertForCTC,
    HubertModel,
    WavLMConfig,
    WavLMForCTC,
    WavLMModel,
)

from jax_ifmvse.backbones import data2vec, hubert, wavlm
from jax_ifmvse.backbones.base import masked_mean
from jax_ifmvse.backbones.conv_frontend import (
    CheckpointError,
    feat_extract_output_lengths,
    normalize_waves,
)

TOL = 1e-4
T_LONG, T_SHORT = 4000, 2500  # samples (0.25 s, 0.16 s)

TINY = TINY_SSL

# name -> (config class, torch model class, our module (file), extra config, our backbone kwargs)
VARIANTS = {
    "wavlm-stable": (
        WavLMConfig,
        WavLMModel,
        wavlm,
        # Few buckets so the log-spaced bucket branch is exercised at 0.25 s.
        dict(feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=16,
             num_buckets=16, max_bucket_distance=24),
    ),
    "wavlm-postln-group": (
        WavLMConfig,
        WavLMModel,
        wavlm,
        dict(feat_extract_norm="group", do_stable_layer_norm=False, num_conv_pos_embeddings=15,
             num_buckets=16, max_bucket_distance=24),
    ),
    "hubert-stable-noproj": (
        HubertConfig,
        HubertModel,
        hubert,
        dict(feat_extract_norm="layer", do_stable_layer_norm=True, feat_proj_layer_norm=False,
             num_conv_pos_embeddings=16),
    ),
    "hubert-stable-proj": (
        HubertConfig,
        HubertModel,
        hubert,
        dict(feat_extract_norm="layer", do_stable_layer_norm=True, feat_proj_layer_norm=True,
             num_conv_pos_embeddings=16),
    ),
    "hubert-postln-proj-group": (
        HubertConfig,
        HubertModel,
        hubert,
        dict(feat_extract_norm="group", do_stable_layer_norm=False, feat_proj_layer_norm=True,
             num_conv_pos_embeddings=16),
    ),
    "hubert-postln-noproj": (
        HubertConfig,
        HubertModel,
        hubert,
        dict(feat_extract_norm="layer", do_stable_layer_norm=False, feat_proj_layer_norm=False,
             num_conv_pos_embeddings=16),
    ),
    "data2vec-audio": (
        Data2VecAudioConfig,
        Data2VecAudioModel,
        data2vec,
        dict(num_conv_pos_embeddings=3, conv_pos_kernel_size=5),
    ),
}  # fmt: skip

BACKBONES = {wavlm: wavlm.WavLMBackbone, hubert: hubert.HubertBackbone}
BACKBONES[data2vec] = data2vec.Data2VecAudioBackbone


def jiggle(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every 1-D/4-D parameter (biases, norms, gates, embeddings) so a dropped or
    misplaced bias cannot hide behind transformers' zero/one initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim != 2 and p.ndim != 3 or "rel_attn_embed" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def torch_model(variant: str, cls=None):
    """Seeded tiny transformers model (eval mode) for `variant`; cls overrides (e.g. ForCTC)."""
    cfg_cls, model_cls, _, extra = VARIANTS[variant]
    config = cfg_cls(**TINY, **extra)
    torch.manual_seed(0)
    return jiggle((cls or model_cls)(config)), config


def waves_and_lengths(batch_lengths=(T_LONG, T_SHORT), seed=0):
    """Right-padded random batch (B, max len) float32 and lengths (B,)."""
    lengths = np.asarray(batch_lengths)
    x = np.random.RandomState(seed).randn(len(lengths), lengths.max()).astype(np.float32)
    x[np.arange(x.shape[1])[None, :] >= lengths[:, None]] = 0.0
    return x, lengths


def torch_hidden(model, x, lengths, mask=True):
    """transformers' hidden states (L, B, F, D) numpy, with the waveform attention mask."""
    am = torch.from_numpy((np.arange(x.shape[1])[None, :] < lengths[:, None]).astype(np.int64))
    with torch.no_grad():
        out = model(torch.from_numpy(x), attention_mask=am if mask else None,
                    output_hidden_states=True)  # fmt: skip
    return np.stack([h.numpy() for h in out.hidden_states])


def assert_close_valid(ours, ref, mask, tol=TOL):
    """Every hidden state equal within tol on valid frames."""
    ours, mask = np.asarray(ours, np.float32), np.asarray(mask)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    for i in range(ref.shape[0]):
        err = np.abs(ours[i] - ref[i])[mask].max()
        assert err < tol, f"hidden state {i}: max abs err {err:.2e}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_hidden_state_matches_torch(variant):
    """Unpadded single clip and padded batch + mask, every hidden state within 1e-4."""
    model, config = torch_model(variant)
    mod = VARIANTS[variant][2]
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    params = mod.convert_state_dict(sd, config)
    kwargs = {"pad_invariant": False} if mod is data2vec else {}
    bb = BACKBONES[mod](config, params, {}, **kwargs)
    assert bb.num_hidden_states == config.num_hidden_layers + 1

    x, lengths = waves_and_lengths()
    # Unpadded: the long clip alone, no attention mask on the torch side.
    ours, mask = jax.jit(bb.hidden_states)(params, jnp.asarray(x[:1]), jnp.asarray(lengths[:1]))
    assert np.asarray(mask).all()
    assert_close_valid(ours, torch_hidden(model, x[:1], lengths[:1], mask=False), mask)

    # Padded batch with the attention mask; compare valid frames only.
    ours, mask = jax.jit(bb.hidden_states)(params, jnp.asarray(x), jnp.asarray(lengths))
    want = feat_extract_output_lengths(lengths, config)
    np.testing.assert_array_equal(np.asarray(mask).sum(1), want)
    if getattr(config, "feat_extract_norm", "layer") == "group":
        # transformers' GroupNorm sees the padding; ours (masked statistics) equals
        # transformers on each utterance alone, unpadded.
        for i, n in enumerate(lengths):
            alone = torch_hidden(model, x[i : i + 1, :n], lengths[i : i + 1], mask=False)
            f = alone.shape[2]
            assert_close_valid(np.asarray(ours)[:, i : i + 1, :f], alone, np.ones((1, f), bool))
    else:
        assert_close_valid(ours, torch_hidden(model, x, lengths), mask)


def test_data2vec_pad_invariant_equals_torch_alone():
    """transformers' Data2Vec-audio leaks padding into its stacked positional convs; our
    default backbone matches transformers run on each utterance alone instead."""
    model, config = torch_model("data2vec-audio")
    params = data2vec.convert_state_dict(
        {k: v.numpy() for k, v in model.state_dict().items()}, config
    )
    x, lengths = waves_and_lengths()
    run = data2vec.Data2VecAudioBackbone(config, params).hidden_states
    ours, mask = jax.jit(run)(params, jnp.asarray(x), jnp.asarray(lengths))
    alone = torch_hidden(model, x[1:, :T_SHORT], lengths[1:], mask=False)
    n = alone.shape[2]
    assert_close_valid(np.asarray(ours)[:, 1:, :n], alone, np.ones((1, n), bool))
    # ...and the transformers padded batch really does differ near the end (the reason).
    batch = torch_hidden(model, x, lengths)
    assert np.abs(batch[:, 1, :n] - alone[:, 0]).max() > 1e-2


@pytest.mark.parametrize("variant", ["wavlm-stable", "hubert-stable-noproj", "data2vec-audio"])
def test_pooled_same_alone_or_padded(variant):
    """An utterance pooled alone equals its row in a batch padded to a longer one."""
    cfg_cls, _, mod, extra = VARIANTS[variant]
    config = cfg_cls(**TINY, **extra)
    params = mod.init_params(config, jax.random.PRNGKey(1))
    rng = np.random.RandomState(0)  # init has zero biases; make them matter
    params = jax.tree.map(lambda p: p + 0.1 * rng.randn(*p.shape).astype(np.float32), params)
    bb = BACKBONES[mod](config, params, {}, do_normalize=True)
    x, lengths = waves_and_lengths((T_LONG, T_SHORT))
    pooled = jax.jit(bb.pooled)
    batch = pooled(params, jnp.asarray(x), jnp.asarray(lengths))  # (B, L, D)
    assert batch.shape == (2, config.num_hidden_layers + 1, config.hidden_size)
    alone = pooled(params, jnp.asarray(x[1:, :T_SHORT]), lengths[1:])
    # Two orders through the encoder: 3 convs, projection, up to 3 positional convs (16 taps x
    # 8 channels = the longest dot product, 128), 2 layers, pooling.
    bound = chain(encoder_ops(config.num_hidden_layers, front=7), 128, np.abs(alone).max())
    assert_within(batch[1], alone[0], bound, variant)
    # The bug it guards against, padding seen as speech, errs by more than the bound.
    seen = pooled(params, jnp.asarray(x[1:]), jnp.asarray([T_LONG]))
    assert_exceeds(seen[0], alone[0], bound, "padding seen")


def test_normalize_waves_matches_feature_extractor():
    """do_normalize equals Wav2Vec2FeatureExtractor's per-utterance normalisation."""
    from transformers import Wav2Vec2FeatureExtractor

    fe = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    x, lengths = waves_and_lengths()
    x = 3.0 * x + 0.5
    ref = fe([x[0], x[1, :T_SHORT]], sampling_rate=16000, padding=True, return_tensors="np")
    ours = normalize_waves(jnp.asarray(x), jnp.asarray(lengths))
    want = ref["input_values"]
    # Per row, two float32 orders of its mean and variance (n-term sums, worst case), over the
    # std; then per sample the subtraction, sqrt and quotient: 2 u |x - m| / s + 3 u |z| each.
    bound = np.zeros(want.shape)
    for i, n in enumerate(lengths):
        v = x[i, :n].astype(np.float64)
        e_m, e_s = mean_std(v, U32)
        s = v.std()
        dz = (e_m + 4 * U32 * np.abs(v - v.mean())) / s + np.abs(want[i, :n]) * (e_s / s + 6 * U32)
        bound[i, :n] = dz
    assert_within(np.asarray(ours), want, bound, "normalize_waves vs the feature extractor")
    seen = normalize_waves(jnp.asarray(x), jnp.full(len(lengths), x.shape[1]))  # padding seen
    n = lengths[1]
    assert_exceeds(np.asarray(seen)[1, :n], want[1, :n], bound[1, :n], "normalize, padding seen")


@pytest.mark.parametrize(
    "variant,ctc_cls",
    [("wavlm-stable", WavLMForCTC), ("hubert-stable-noproj", HubertForCTC),
     ("data2vec-audio", Data2VecAudioForCTC)],
)  # fmt: skip
def test_convert_saved_ctc_checkpoint(variant, ctc_cls, tmp_path):
    """save_pretrained(ForCTC) -> model.safetensors (prefixed keys, lm_head) -> our params."""
    model, config = torch_model(variant, cls=ctc_cls)
    model.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.startswith("lm_head") for k in sd)
    mod = VARIANTS[variant][2]
    params = mod.convert_state_dict(sd, config)
    bb = BACKBONES[mod](config, params, {}, **({"pad_invariant": False} if mod is data2vec else {}))
    x, lengths = waves_and_lengths()
    ours, mask = jax.jit(bb.hidden_states)(params, jnp.asarray(x), jnp.asarray(lengths))
    assert_close_valid(ours, torch_hidden(model, x, lengths), mask)

    # The old weight-norm key style (weight_g / weight_v) converts to the same params.
    old = {}
    for k, v in sd.items():
        k = k.replace("parametrizations.weight.original0", "weight_g")
        old[k.replace("parametrizations.weight.original1", "weight_v")] = v
    if old.keys() != sd.keys():
        params_old = mod.convert_state_dict(old, config)
        jax.tree.map(np.testing.assert_array_equal, params, params_old)  # same g, v, same code


def test_wrong_config_is_a_clear_error():
    """A checkpoint for another shape fails with a one-line CheckpointError naming the tensor."""
    model, config = torch_model("hubert-stable-noproj")
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    other = HubertConfig(**{**TINY, "num_hidden_layers": 3}, **VARIANTS["hubert-stable-noproj"][3])
    with pytest.raises(CheckpointError, match="missing") as e:
        hubert.convert_state_dict(sd, other)
    assert "\n" not in str(e.value)
    bad = dict(sd, **{"encoder.layer_norm.weight": np.zeros(5, np.float32)})
    with pytest.raises(CheckpointError, match="encoder/layer_norm/scale has shape"):
        hubert.convert_state_dict(bad, config)


def test_bf16_compute_close_to_float32():
    """dtype=bfloat16 runs (params stay float32) and stays near the float32 result."""
    cfg_cls, _, mod, extra = VARIANTS["wavlm-stable"]
    config = cfg_cls(**TINY, **extra)
    params = mod.init_params(config, jax.random.PRNGKey(0))
    x, lengths = waves_and_lengths()
    f32 = wavlm.WavLMBackbone(config, params, {})
    b16 = wavlm.WavLMBackbone(config, params, {}, dtype=jnp.bfloat16)
    h32, mask = jax.jit(f32.hidden_states)(params, jnp.asarray(x), jnp.asarray(lengths))
    h16, _ = jax.jit(b16.hidden_states)(params, jnp.asarray(x), jnp.asarray(lengths))
    assert h16.dtype == jnp.bfloat16
    p32, p16 = masked_mean(h32, mask), masked_mean(h16, mask)  # what Backbone.pooled does
    assert p16.dtype == jnp.float32
    scale = float(jnp.abs(p32).max())
    err = float(jnp.abs(p16 - p32).max())
    assert 1e-5 * scale < err < 0.05 * scale  # bfloat16 rounding, and not silently float32
    assert float(jnp.abs(h16.astype(jnp.float32) - h32).mean()) < 0.02 * float(jnp.abs(h32).mean())


# ---------------------------------------------------------------------------------------------
# Full large-model shape (random weights): slow.

LARGE = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    conv_dim=(512,) * 7,
    conv_kernel=(10, 3, 3, 3, 3, 2, 2),
    conv_stride=(5, 2, 2, 2, 2, 2, 2),
    num_conv_pos_embedding_groups=16,
    feat_extract_norm="layer",
)
LARGE_VARIANTS = {
    "wavlm-large": (WavLMConfig, WavLMModel, wavlm,
                    dict(do_stable_layer_norm=True, num_conv_pos_embeddings=128)),
    "hubert-large": (HubertConfig, HubertModel, hubert,
                     dict(do_stable_layer_norm=True, feat_proj_layer_norm=False,
                          num_conv_pos_embeddings=128)),
    "data2vec-audio-large": (Data2VecAudioConfig, Data2VecAudioModel, data2vec,
                             dict(num_conv_pos_embeddings=5, conv_pos_kernel_size=19)),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(LARGE_VARIANTS))
def test_large_shape_parity(variant):
    """1024-wide, 24-layer model with the real conv stack, ~1 s clip: every hidden state."""
    cfg_cls, model_cls, mod, extra = LARGE_VARIANTS[variant]
    config = cfg_cls(**LARGE, **extra)
    torch.manual_seed(0)
    model = jiggle(model_cls(config))
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    params = mod.convert_state_dict(sd, config)
    del sd
    bb = BACKBONES[mod](config, params, {})
    x, lengths = waves_and_lengths((16000,))
    t0 = time.perf_counter()
    ref = torch_hidden(model, x, lengths, mask=False)
    t1 = time.perf_counter()
    ours, mask = jax.jit(bb.hidden_states)(params, jnp.asarray(x), jnp.asarray(lengths))
    ours = np.asarray(ours)
    t2 = time.perf_counter()
    print(f"{variant}: torch {t1 - t0:.1f}s, jax (compile+run) {t2 - t1:.1f}s")
    assert ours.shape == (25, 1, 49, 1024)
    # Relative to each state's scale: the stable-LN residual stream grows with depth.
    scales = np.maximum(1.0, np.abs(ref).max(axis=(1, 2, 3)))  # (L,)
    errs = np.abs(ours - ref).max(axis=(1, 2, 3))  # (L,)
    print(f"{variant}: max abs err {errs.max():.2e}, max err/scale {(errs / scales).max():.2e}")
    bad = np.flatnonzero(errs >= TOL * scales)
    assert bad.size == 0, f"hidden states {bad.tolist()}: errs {errs[bad]}, scales {scales[bad]}"


def test_too_short_input_is_a_clear_error():
    """Audio shorter than the conv receptive field fails up front with a one-line message."""
    cfg_cls, _, mod, extra = VARIANTS["hubert-stable-noproj"]
    config = cfg_cls(**TINY, **extra)
    bb = hubert.HubertBackbone(config, None, {})
    with pytest.raises(ValueError, match="receptive field"):
        bb.hidden_states(None, jnp.zeros((1, 8)), jnp.array([8]))
