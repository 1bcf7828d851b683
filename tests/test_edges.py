"""Extraction at the edges: every stored vector equals transformers' PyTorch model run on the
utterance (or each real chunk) alone, unpadded; `predict` reproduces the stored input settings.

The reference never goes through our padding, bucketing or chunk planning: each utterance is
decoded with `load_audio`, cut into chunks here (a trailing chunk shorter than one output frame
is dropped), and every chunk runs alone through the PyTorch model.
"""

from __future__ import annotations

import csv
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from test_backbones_ssl import jiggle
from tiny_models import TINY_SSL, save_tiny_whisper, tiny_whisper_config
from tolerances import (
    U32,
    assert_exceeds,
    assert_within,
    batch_path_bound,
    chain,
    encoder_ops,
    mean_std,
    pairwise_depth,
)
from transformers import (
    Data2VecAudioConfig,
    Data2VecAudioModel,
    HubertConfig,
    HubertModel,
    Wav2Vec2FeatureExtractor,
    WavLMConfig,
    WavLMModel,
    WhisperFeatureExtractor,
    WhisperModel,
)

from featurestore import FeatureStore
from jax_ifmvse.backbones import data2vec, hubert, wavlm
from jax_ifmvse.backbones.whisper import WhisperBackbone
from jax_ifmvse.backbones.whisper import convert_state_dict as whisper_convert
from jax_ifmvse.config import ATTRIBUTES, load_config
from jax_ifmvse.data.audio import chunk_spans, load_audio
from jax_ifmvse.data.corpus import load_manifest
from jax_ifmvse.encode import make_loader
from jax_ifmvse.extract import run_extract


def tol(want) -> float:
    """Ours vs PyTorch through a tiny 2-layer backbone: the real wav2vec2 conv stack's 7 convs,
    projection, positional conv (its 1024-term dot product the longest) and norms bound Whisper's
    3 front ops and 240 as well."""
    return chain(encoder_ops(2, 10), 1024, np.abs(want).max())


# The real wav2vec2 conv stack (receptive field 400 samples, hop 320) at a tiny width, so the
# one-frame edges are the real ones: 399 samples give no frame, 400 one, 720 two.
REAL_CONV = dict(conv_dim=(16,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2),
                 conv_stride=(5, 2, 2, 2, 2, 2, 2))  # fmt: skip
FRAME, HOP = 400, 320  # wav2vec2 family: samples for one frame, samples per further frame
WHISPER_MIN = 320  # Whisper: one encoder frame (two 10-ms mel hops)

# family-norm -> (config class, torch model class, our module, backbone class, extra config)
SSL = {
    "wavlm-group": (WavLMConfig, WavLMModel, wavlm, wavlm.WavLMBackbone,
                    dict(feat_extract_norm="group", do_stable_layer_norm=False,
                         num_conv_pos_embeddings=15, num_buckets=16, max_bucket_distance=24)),
    "wavlm-layer": (WavLMConfig, WavLMModel, wavlm, wavlm.WavLMBackbone,
                    dict(feat_extract_norm="layer", do_stable_layer_norm=True,
                         num_conv_pos_embeddings=16, num_buckets=16, max_bucket_distance=24)),
    "hubert-group": (HubertConfig, HubertModel, hubert, hubert.HubertBackbone,
                     dict(feat_extract_norm="group", do_stable_layer_norm=False,
                          feat_proj_layer_norm=True, num_conv_pos_embeddings=16)),
    "hubert-layer": (HubertConfig, HubertModel, hubert, hubert.HubertBackbone,
                     dict(feat_extract_norm="layer", do_stable_layer_norm=True,
                          feat_proj_layer_norm=False, num_conv_pos_embeddings=16)),
    "hubert-group-bnpos": (HubertConfig, HubertModel, hubert, hubert.HubertBackbone,
                           dict(feat_extract_norm="group", do_stable_layer_norm=False,
                                feat_proj_layer_norm=True, num_conv_pos_embeddings=16,
                                conv_pos_batch_norm=True)),
    "data2vec-layer": (Data2VecAudioConfig, Data2VecAudioModel, data2vec,
                       data2vec.Data2VecAudioBackbone,
                       dict(num_conv_pos_embeddings=3, conv_pos_kernel_size=5)),
}  # fmt: skip
FAMILIES = ["whisper", "wavlm-group", "wavlm-layer", "hubert-group", "hubert-layer",
            "data2vec-layer"]  # fmt: skip


@dataclasses.dataclass
class Pair:
    """Our backbone and a function giving the PyTorch reference (L, D) for one unpadded clip."""

    backbone: object
    reference: object
    min_samples: int
    model: object  # the torch model behind `reference`


def _ssl_pair(kind: str, do_normalize: bool = False, seed: int = 0) -> Pair:
    cfg_cls, model_cls, mod, bb_cls, extra = SSL[kind]
    config = cfg_cls(**{**TINY_SSL, **REAL_CONV}, **extra)
    torch.manual_seed(seed)
    model = jiggle(model_cls(config), seed)
    if kind.endswith("bnpos"):  # non-trivial running statistics, so BatchNorm(0) != 0
        with torch.no_grad():
            bn = model.encoder.pos_conv_embed.batch_norm
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    params = mod.convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()}, config)
    bb = bb_cls(config, params, {"source": f"tiny-{kind}"}, do_normalize=do_normalize)
    fe = Wav2Vec2FeatureExtractor(do_normalize=True)

    def reference(x: np.ndarray) -> np.ndarray:
        if do_normalize:
            x = fe(x, sampling_rate=16000, return_tensors="np").input_values[0]
        with torch.no_grad():
            out = model(torch.from_numpy(x[None].astype(np.float32)), output_hidden_states=True)
        return np.stack([h[0].numpy().mean(0) for h in out.hidden_states])  # (L, D)

    return Pair(bb, reference, FRAME, model)


def _whisper_pair(seed: int = 0) -> Pair:
    config = tiny_whisper_config(d_model=16, encoder_attention_heads=2, encoder_ffn_dim=32)
    torch.manual_seed(seed)
    model = WhisperModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    bb = WhisperBackbone(config, whisper_convert(model.state_dict(), config), {"source": "tw"})
    fe = WhisperFeatureExtractor()

    def reference(x: np.ndarray) -> np.ndarray:
        f = fe(x, sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
        n = int(f.attention_mask[0, ::2].sum())  # encoder frames over real audio
        with torch.no_grad():
            hs = model.encoder(f.input_features, output_hidden_states=True).hidden_states
        return np.stack([h[0, :n].numpy().mean(0) for h in hs])  # (L, D)

    return Pair(bb, reference, WHISPER_MIN, model)


def _pair(kind: str, do_normalize: bool = False) -> Pair:
    return _whisper_pair() if kind == "whisper" else _ssl_pair(kind, do_normalize)


def reference_row(pair: Pair, path, max_seconds: float, long_audio: str) -> np.ndarray:
    """(L, D): the utterance cropped, or the length-weighted mean over its real chunks."""
    if long_audio == "crop":
        return pair.reference(load_audio(path, max_seconds=max_seconds))
    x = load_audio(path)
    n = int(round(max_seconds * 16000))
    chunks = [x[i : i + n] for i in range(0, len(x), n)]
    if len(chunks) > 1 and len(chunks[-1]) < pair.min_samples:
        chunks.pop()  # shorter than one output frame: no real chunk
    w = np.asarray([len(c) for c in chunks], np.float64)
    return sum(wi * pair.reference(c) for wi, c in zip(w / w.sum(), chunks))


def write_corpus(folder, clips):
    """clips: (name, frames, sample rate); noise-plus-tone wavs and a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["id,path,split,arousal,valence,dominance"]
    for k, (name, n, sr) in enumerate(clips):
        rng = np.random.default_rng(k)
        t = np.arange(n) / sr
        x = 0.3 * np.sin(2 * np.pi * (140 + 13 * k) * t) + 0.05 * rng.standard_normal(n)
        sf.write(folder / f"{name}.wav", x.astype(np.float32), sr, subtype="FLOAT")
        rows.append(f"{name},{name}.wav,Train,{1 + k % 7},4,4")
    (folder / "m.csv").write_text("\n".join(rows) + "\n")
    return load_manifest(folder / "m.csv")


def extract_and_check(pair, corpus, store, overrides, loader=None):
    """run_extract with all layers stored; every row equals the PyTorch reference."""
    cfg = load_config(None, ["extract.layers=all", *overrides])
    loader = loader or make_loader(cfg, corpus)
    stats = run_extract(corpus, {"b": pair.backbone}, store, cfg, loader=loader)
    s = FeatureStore(store)
    assert stats["b"].failed == 0, s.failures()
    split = s.load(None, ["b"], layers=True)
    assert len(split.ids) == len(corpus.utterances)
    for row, got in zip(split.indices, split.features["b"], strict=True):
        u = corpus.utterances[row]
        want = reference_row(pair, corpus.abspath(u), cfg.audio.max_seconds, cfg.audio.long_audio)
        assert_within(got, want, tol(want), u.id)
    return s, split


# ---------------------------------------------------------------------------------------------
# Chunk planning


def test_chunk_spans_edges(tmp_path):
    sf.write(tmp_path / "a.wav", np.full(32399, 0.1, np.float32), 16000, subtype="FLOAT")
    got = load_audio(tmp_path / "a.wav", max_seconds=1, long_audio="chunk", min_samples=FRAME)
    assert [len(c) for c in got] == [16000, 16000]  # the same rule as extraction
    assert chunk_spans(0, 100, 40) == []
    assert chunk_spans(5, 100, 40) == [(0, 5)]  # a lone chunk stays, however short
    assert chunk_spans(200, 100, 40) == [(0, 100), (100, 200)]
    assert chunk_spans(201, 100, 40) == [(0, 100), (100, 200)]  # 1-sample tail dropped
    assert chunk_spans(239, 100, 40) == [(0, 100), (100, 200)]  # 39-sample tail dropped
    assert chunk_spans(240, 100, 40) == [(0, 100), (100, 200), (200, 240)]


def test_trailing_chunks_and_44k1_rounding_store_real_chunks_only(tmp_path):
    """Trailing chunks of 1 and 399 samples add nothing; 400 (one frame) counts; 44.1-kHz files
    whose header duration exceeds 1 s by a fraction of a sample do not fail; 1- and 2-frame clips.
    (Whole clips of 0 frames: the test after this one.)"""
    pair = _pair("wavlm-group")
    clips = [("tail1", 32001, 16000), ("tail399", 32399, 16000), ("tail400", 32400, 16000),
             ("exact", 32000, 16000), ("f1", FRAME, 16000), ("f2", FRAME + HOP, 16000),
             ("r44101", 44101, 44100), ("r88201", 88201, 44100)]  # fmt: skip
    corpus = write_corpus(tmp_path / "c", clips)
    assert [len(load_audio(corpus.abspath(u))) for u in corpus.utterances[-2:]] == [16000, 32000]
    s, split = extract_and_check(
        pair, corpus, tmp_path / "s.h5", ["audio.long_audio=chunk", "audio.max_seconds=1"]
    )
    assert s.backbones["b"].attrs["chunk_min_samples"] == FRAME
    # The old behaviour (the empty 399-sample chunk pooled to zeros, weighted in) is far off.
    i = list(split.ids).index("tail399")
    x = load_audio(corpus.abspath(corpus.utterances[i]))
    parts = [pair.reference(x[:16000]), pair.reference(x[16000:32000])]
    naive = (16000 * parts[0] + 16000 * parts[1]) / 32399
    assert_exceeds(split.features["b"][i], naive, tol(naive), "empty chunk weighted in")


@pytest.mark.parametrize("kind", ["whisper", "wavlm-group", "wavlm-layer"])
def test_clips_with_no_frame_equal_torch_on_the_clip_padded_to_one_frame(kind, tmp_path):
    """Whole clips shorter than one output frame (0 frames) are zero-padded to `min_samples` and
    flagged `short`: the stored vector is PyTorch's on that padded clip, never all zeros."""
    pair = _pair(kind)
    m = pair.min_samples
    clips = [("one", 1, 16000), ("five_ms", 80, 16000), ("almost", m - 1, 16000),
             ("frame", m, 16000), ("normal", 12000, 16000)]  # fmt: skip
    corpus = write_corpus(tmp_path / "c", clips)
    cfg = load_config(None, ["extract.layers=all", "audio.bucket_seconds=[1.0]"])
    stats = run_extract(corpus, {"b": pair.backbone}, tmp_path / "s.h5", cfg,
                        loader=make_loader(cfg, corpus))  # fmt: skip
    assert stats["b"].failed == 0 and stats["b"].short == 3
    s = FeatureStore(tmp_path / "s.h5")
    got = s.load(None, ["b"], layers=True)
    flags = dict(zip(s.ids, s.flags("b"), strict=True))
    for uid, row in zip(got.ids, got.features["b"], strict=True):
        x = load_audio(tmp_path / "c" / f"{uid}.wav")
        assert (flags[uid] == "short") == (len(x) < m), uid
        want = pair.reference(np.pad(x, (0, max(0, m - len(x)))))
        assert np.abs(row[-1]).max() > 0, uid
        assert_within(row, want, tol(want), f"{kind} {uid}")


def test_decoded_length_rules_not_the_header(tmp_path):
    """A loader yielding more or fewer samples than the header: chunks and buckets follow the
    decoded audio (missed chunks and too-long items are planned again, extra ones weightless)."""
    pair = _pair("hubert-group")
    corpus = write_corpus(tmp_path / "c", [("a", 16000, 16000), ("b", 48000, 16000),
                                           ("c", 8000, 16000)])  # fmt: skip
    real = {"a": 40000, "b": 20000, "c": 8000}  # decoded samples, whatever the header says

    def loader(path):
        x = load_audio(path)
        return np.resize(x, real[path.stem]).astype(np.float32)

    for mode, max_s in (("chunk", 1.0), ("crop", 4.0)):
        cfg = load_config(None, [f"audio.long_audio={mode}", f"audio.max_seconds={max_s}"])
        store = tmp_path / f"{mode}.h5"
        stats = run_extract(corpus, {"b": pair.backbone}, store, cfg, loader=loader)
        assert stats["b"].failed == 0 and stats["b"].done == 3
        assert stats["b"].valid_samples == sum(real.values())  # nothing cropped to a bucket
        split = FeatureStore(store).load(None, ["b"])
        for uid, got in zip(split.ids, split.features["b"], strict=True):
            x = loader(tmp_path / "c" / f"{uid}.wav")
            n = int(max_s * 16000)
            chunks = [x[i : i + n] for i in range(0, len(x), n)] if mode == "chunk" else [x[:n]]
            want = sum(len(c) * pair.reference(c)[-1] for c in chunks) / sum(map(len, chunks))
            assert_within(got, want, tol(want), f"{mode} {uid}")


def test_resume_with_other_input_settings_is_refused(tmp_path):
    """Rows of one backbone never mix inputs: appending with another normalisation fails."""
    pair = _pair("wavlm-layer")
    corpus = write_corpus(tmp_path / "c", [("a", 4000, 16000), ("b", 6000, 16000)])
    store = tmp_path / "s.h5"
    cfg = load_config(None, ["audio.normalize=utterance", "audio.max_seconds=1"])
    run_extract(corpus, {"b": pair.backbone}, store, cfg, loader=make_loader(cfg, corpus))
    assert FeatureStore(store).backbones["b"].attrs["normalize"] == "utterance"
    other = load_config(None, ["audio.normalize=none", "audio.max_seconds=1"])
    with pytest.raises(ValueError, match=r"s\.h5: backbone 'b'.*normalize 'utterance' != 'none'"):
        run_extract(corpus, {"b": pair.backbone}, store, other, loader=make_loader(other, corpus))


# ---------------------------------------------------------------------------------------------
# Group-norm front ends: padding-invariant


@pytest.mark.parametrize("kind", ["wavlm-group", "hubert-group", "hubert-group-bnpos"])
def test_group_norm_rows_equal_torch_alone_in_any_bucket(kind):
    """Edge lengths (1 frame, 2 frames, long) padded together equal each clip run alone."""
    pair = _pair(kind)
    lengths = np.asarray([FRAME, FRAME + HOP, 16000, 4000])
    x = np.random.default_rng(0).standard_normal((4, 16000)).astype(np.float32)
    x[np.arange(16000)[None] >= lengths[:, None]] = 0.0
    pooled = jax.jit(pair.backbone.pooled)(pair.backbone.params, jnp.asarray(x), lengths)
    for i, n in enumerate(lengths):
        want = pair.reference(x[i, :n])
        assert_within(pooled[i], want, tol(want), f"{kind} row {i}")
    # transformers' padded batch (GroupNorm over the padding) really differs: not vacuous.
    with torch.no_grad():
        h = pair.model(torch.from_numpy(x), output_hidden_states=True).hidden_states[-1][0]
    n0 = (int(lengths[0]) - 400) // 320 + 1
    assert np.abs(h[:n0].numpy().mean(0) - pair.reference(x[0, : lengths[0]])[-1]).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# Property-style: random lengths (edges included), sample rates, bucket mixes, both modes


def _draw_case(rng: np.random.Generator, kind: str):
    """A random corpus (name, frames, rate), its overrides, and whether the model normalizes."""
    mode = str(rng.choice(["crop", "chunk"]))
    max_s = float(rng.choice([0.5, 0.75, 1.0]))
    chunk = int(max_s * 16000)
    min_s = WHISPER_MIN if kind == "whisper" else FRAME
    edges16 = [min_s, min_s + HOP, chunk, chunk + 1, chunk + min_s - 1, chunk + min_s,
               2 * chunk + 1, 3 * chunk - 7]  # fmt: skip
    clips = []
    for k in range(int(rng.integers(4, 8))):
        sr = int(rng.choice([8000, 16000, 22050, 44100]))
        if rng.random() < 0.5:  # an edge length (exact at 16 kHz, rounded elsewhere)
            n16 = int(rng.choice(edges16))
            sr = 16000 if rng.random() < 0.6 else sr
        else:
            n16 = int(rng.integers(min_s + HOP, int(2.6 * chunk)))
        n = max(int(np.ceil(n16 * sr / 16000)), int(np.ceil(min_s * sr / 16000)) + 1)
        clips.append((f"u{k}", n, sr))
    buckets = sorted(rng.choice([0.1, 0.25, 0.3, 0.5, 0.6], int(rng.integers(1, 4)), replace=False))
    overrides = [
        f"audio.long_audio={mode}",
        f"audio.max_seconds={max_s}",
        f"audio.bucket_seconds=[{','.join(map(str, buckets))}]",
        f"extract.max_batch={int(rng.integers(1, 5))}",
        f"extract.batch_seconds={float(rng.choice([0.5, 1.0, 2.0]))}",
    ]
    return clips, overrides, bool(rng.random() < 0.5) and kind != "whisper"


def _property(kind: str, seed: int, tmp_path):
    rng = np.random.default_rng([seed, FAMILIES.index(kind)])
    clips, overrides, do_norm = _draw_case(rng, kind)
    pair = _pair(kind, do_normalize=do_norm)
    corpus = write_corpus(tmp_path / f"c{seed}", clips)
    extract_and_check(pair, corpus, tmp_path / f"s{seed}.h5", overrides)


@pytest.mark.parametrize("kind", FAMILIES)
def test_property_every_stored_vector_equals_torch_alone(kind, tmp_path):
    """One random draw per family and norm type (more under `slow`)."""
    _property(kind, 0, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 6))
@pytest.mark.parametrize("kind", FAMILIES)
def test_property_more_draws(kind, seed, tmp_path):
    _property(kind, seed, tmp_path)


# ---------------------------------------------------------------------------------------------
# predict reproduces the stored input; one cache root


def test_predict_uses_stored_train_normalisation_and_one_cache_root(tmp_path, monkeypatch):
    """normalize=train recorded with its statistics; predict equals the batch path even when
    the run's config says otherwise; converted weights land under $IFMVSE_CACHE."""
    from jax_ifmvse.backbones import load_backbone
    from jax_ifmvse.ensemble.run import run_ensemble
    from jax_ifmvse.inference import input_settings
    from jax_ifmvse.predict import PredictError, open_predictor
    from jax_ifmvse.train import train_run

    cache = tmp_path / "cache"
    monkeypatch.setenv("IFMVSE_CACHE", str(cache))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # nothing may land in ~/.cache
    ckpt = save_tiny_whisper(
        tmp_path / "tw", d_model=16, encoder_attention_heads=2, encoder_ffn_dim=32
    )
    splits = ("Train", "Train", "Development", "Test1")
    audio = tmp_path / "audio"
    audio.mkdir()
    rows = ["path,split,arousal,valence,dominance"]
    rng = np.random.default_rng(0)
    for i in range(8):
        n = int(rng.uniform(0.5, 2.0) * 16000)
        x = 0.3 * np.sin(2 * np.pi * (120 + 25 * i) * np.arange(n) / 16000) + 0.2
        sf.write(audio / f"u{i:02d}.wav", (x * rng.uniform(0.3, 1)).astype(np.float32), 16000)
        rows.append(f"u{i:02d}.wav,{splits[i % 4]},{1 + i * 0.4:.2f},4,{6 - i * 0.3:.2f}")
    (audio / "m.csv").write_text("\n".join(rows) + "\n")
    sets = "[{name: S1, kind: mlp, views: [w]}]"
    cfg = load_config(None, [
        "corpus.kind=manifest", f"corpus.path={audio / 'm.csv'}", "audio.normalize=train",
        "audio.max_seconds=2", "extract.whisper_window_s=2", "model.common_dim=8",
        "model.hidden=16", f"model.score_sets={sets}", "train.multitask=true", "train.epochs=1",
        "train.batch_size=4", "train.learning_rate=1e-2",
    ])  # fmt: skip
    corpus = load_manifest(audio / "m.csv")
    store = tmp_path / "store.h5"
    run_extract(
        corpus, {"w": load_backbone(str(ckpt))}, store, cfg, loader=make_loader(cfg, corpus)
    )
    assert list(cache.glob("whisper-*/params.msgpack"))
    assert not (tmp_path / "home" / ".cache" / "jax_ifmvse").exists()
    attrs = FeatureStore(store).backbones["w"].attrs
    assert attrs["normalize"] == "train" and attrs["sample_rate"] == 16000
    files = [load_audio(audio / f"u{i:02d}.wav") for i in range(8) if i % 4 < 2]
    train = np.concatenate(files)
    # Ours in float64 vs numpy's float32 pairwise mean and std of the same samples.
    got = [attrs["normalize_mean"], attrs["normalize_std"]]
    bound = mean_std(train, U32, pairwise_depth(len(train)))
    assert_within(got, [train.mean(), train.std()], bound, "train audio stats vs numpy")
    rest = np.concatenate(files[:-1])  # one file left out
    assert_exceeds(got, [rest.mean(), rest.std()], bound, "train audio stats, one file left out")
    assert attrs["max_seconds"] == 2.0 and attrs["whisper_window_s"] == 2.0

    run = tmp_path / "run"
    train_run(store, cfg, run)
    run_ensemble(run, cfg.ensemble)
    with open(run / "ensemble" / "Test1.csv") as f:
        batch = {r["FileName"]: [float(r[a]) for a in ATTRIBUTES] for r in csv.DictReader(f)}
    # The run's config now says something else: predict must follow the store.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["audio"]["normalize"] = "none"
    saved["audio"]["max_seconds"] = 7.0
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    files = [audio / k for k in sorted(batch)]  # FileName is the official file name
    home = tmp_path / "home"
    before = sorted(home.rglob("*"))  # training's plots leave matplotlib's config and cache
    pred = open_predictor(run)  # what `predict_files` opens
    seen = []  # the heads' inputs (measured for the bound's magnitudes only)
    score = pred.score
    pred.score = lambda f: seen.append(f) or score(f)
    preds = [s.prediction for s in pred.predict_files(files)]
    bound = batch_path_bound(run, score, seen[0])[: len(files)]
    for p, k, b in zip(preds, sorted(batch), bound, strict=True):
        assert p.error is None
        assert_within(p.values, np.clip(batch[k], 1, 7), b, f"stored normalisation {k}")
    # (This 1-epoch model scores both Test1 files alike, so another file is no wrong
    # computation here; test_predict and test_serve check that the bound fails a row mix-up.)
    # predict reloads the backbone too: it adds nothing under HOME (params, XLA programs, ...).
    assert sorted(home.rglob("*")) == before
    assert not (home / ".cache" / "jax_ifmvse").exists()

    # Settings it cannot reproduce: a one-line refusal naming the backbone.
    for bad in ({k: v for k, v in attrs.items() if k != "normalize"},
                {k: v for k, v in attrs.items() if k != "normalize_std"},
                {**attrs, "normalize": "custom loader (none)"}):  # fmt: skip
        with pytest.raises(PredictError, match="backbone 'w'") as e:
            input_settings(bad, "store: backbone 'w'")
        assert "\n" not in str(e.value)
