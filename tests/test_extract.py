"""ifmvse extract: store content equals per-utterance computation; devices, hosts, resume."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from tiny_models import save_tiny_wavlm, save_tiny_whisper
from tolerances import assert_exceeds, assert_within, chain, encoder_ops

from featurestore import FeatureStore
from jax_ifmvse.backbones import load_backbone
from jax_ifmvse.cli import cli
from jax_ifmvse.config import load_config
from jax_ifmvse.data.audio import load_audio
from jax_ifmvse.data.corpus import load_manifest
from jax_ifmvse.encode import make_loader
from jax_ifmvse.extract import run_extract

SPLITS = ("Train", "Development", "Test1")


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "tinywhisper"
    save_tiny_whisper(folder, d_model=16, encoder_attention_heads=2, encoder_ffn_dim=32)
    return folder


def _bound(want, front: int = 3, k: int = 240) -> float:
    """Two orders (a batch vs alone, other shards) through a tiny 2-layer encoder: Whisper's 3
    front-end ops, conv1's 80 mels x 3 taps = 240 the longest dot product (WavLM's: 7 convs,
    projection, the positional conv's 128 taps x 8 channels = 1024)."""
    return chain(encoder_ops(2, front), k, np.abs(want).max())


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    rows = ["path,split,arousal,valence,dominance"]
    for i in range(10):
        sr = (16000, 22050, 44100)[i % 3]
        n = int(rng.uniform(0.4, 3.5) * sr)
        x = 0.2 * np.sin(2 * np.pi * (150 + 40 * i) * np.arange(n) / sr) * rng.uniform(0.2, 1)
        sf.write(d / f"a{i}.wav", x.astype(np.float32), sr)
        rows.append(f"a{i}.wav,{SPLITS[i % 3]},{1 + i * 0.5},{4},{7 - i * 0.5}")
    sf.write(d / "long.wav", 0.1 * rng.standard_normal(16000 * 5).astype(np.float32), 16000)
    rows.append("long.wav,Train,2,2,2")
    (d / "bad.wav").write_text("not audio")
    rows.append("bad.wav,Train,1,1,1")
    (d / "m.csv").write_text("\n".join(rows) + "\n")
    return d


def _cfg(cache, *extra):
    return load_config(None, [f"extract.cache_dir={cache}", "audio.max_seconds=4", *extra])


def _run(corpus_dir, ckpt, store, cache, *extra, **kw):
    cfg = _cfg(cache, *extra)
    corpus = load_manifest(corpus_dir / "m.csv")
    bb = load_backbone(str(ckpt), cache_dir=cache)
    stats = run_extract(corpus, {"w": bb}, store, cfg, loader=make_loader(cfg, corpus), **kw)
    return stats, bb, corpus


def test_store_equals_each_utterance_alone(corpus_dir, tiny_whisper, tmp_path):
    store = tmp_path / "s.h5"
    stats, bb, corpus = _run(corpus_dir, tiny_whisper, store, tmp_path / "c", "extract.layers=all")
    s = FeatureStore(store)
    assert stats["w"].done == 11 and stats["w"].failed == 1
    assert s.failures("w") == [("bad.wav", "w", s.failures("w")[0][2])]
    assert s.failures("w")[0][2].startswith("not audio or corrupt (")  # the reason, not the path
    split = s.load(None, ["w"], layers=True)
    pooled = s.load(None, ["w"]).features["w"]
    assert split.features["w"].shape == (11, bb.num_hidden_states, bb.hidden_size)
    np.testing.assert_array_equal(pooled, split.features["w"][:, -1])
    alone = jax.jit(bb.pooled)
    wants = []
    for row, feats in zip(split.indices, split.features["w"]):
        u = corpus.utterances[row]
        x = load_audio(corpus.abspath(u), max_seconds=4.0)
        wants.append(alone(bb.params, x[None], np.asarray([len(x)], np.int32))[0])  # (L, D)
        assert_within(feats, wants[-1], _bound(wants[-1]), f"row {row}: batch vs alone")
    assert_exceeds(split.features["w"][0], wants[1], _bound(wants[1]), "another row")
    np.testing.assert_array_equal(s.labels["arousal"][:3], [1.0, 1.5, 2.0])


def test_chunked_long_audio_is_length_weighted_mean(corpus_dir, tiny_whisper, tmp_path):
    store = tmp_path / "s.h5"
    _, bb, corpus = _run(
        corpus_dir,
        tiny_whisper,
        store,
        tmp_path / "c",
        "audio.long_audio=chunk",
        "audio.max_seconds=2",
    )
    s = FeatureStore(store)
    row = int(s.index_of(["long.wav"])[0])
    got = s.load(None, ["w"]).features["w"][list(s.load(None, ["w"]).indices).index(row)]
    x = load_audio(corpus.abspath(corpus.utterances[row]))
    chunks = [x[i : i + 32000] for i in range(0, len(x), 32000)]
    alone = jax.jit(bb.pooled)
    parts = [alone(bb.params, c[None], np.asarray([len(c)], np.int32))[0, -1] for c in chunks]
    want = sum(len(c) * p for c, p in zip(chunks, parts)) / len(x)
    assert_within(got, want, _bound(np.stack(parts)), "chunks' length-weighted mean")
    assert_exceeds(np.mean(parts, 0), want, _bound(np.stack(parts)), "the unweighted mean")


def test_interrupted_run_resumes_with_only_missing_rows(corpus_dir, tiny_whisper, tmp_path):
    store = tmp_path / "s.h5"
    calls = []

    def stop_after_first(name, n, seconds):
        calls.append(n)
        raise KeyboardInterrupt  # as if the user pressed ctrl-C after one batch

    cfg_extra = ("extract.batch_seconds=8", "extract.max_batch=2")
    with pytest.raises(KeyboardInterrupt):
        _run(corpus_dir, tiny_whisper, store, tmp_path / "c", *cfg_extra, progress=stop_after_first)
    first = int(FeatureStore(store).filled("w").sum())
    assert 0 < first < 11
    stats, _, _ = _run(corpus_dir, tiny_whisper, store, tmp_path / "c", *cfg_extra)
    assert stats["w"].done == 11 - first
    ref = tmp_path / "ref.h5"
    _run(corpus_dir, tiny_whisper, ref, tmp_path / "c", *cfg_extra)
    a, b = FeatureStore(store).load(None, ["w"]), FeatureStore(ref).load(None, ["w"])
    np.testing.assert_array_equal(a.ids, b.ids)
    assert_within(a.features["w"], b.features["w"], _bound(b.features["w"]), "resumed")


def _cli(args, env_extra=None, wait=True):
    env = {**os.environ, **(env_extra or {})}
    cmd = [sys.executable, "-m", "jax_ifmvse.cli", "extract", *args]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_four_devices_and_two_hosts_match_one_device(corpus_dir, tiny_whisper, tmp_path):
    cache = tmp_path / "c"
    base = [
        "--manifest",
        str(corpus_dir / "m.csv"),
        "--backbone",
        f"w={tiny_whisper}",
        "--max-seconds",
        "4",
        "--set",
        f"extract.cache_dir={cache}",
    ]
    one = _cli([*base, "--out", str(tmp_path / "one.h5")])
    assert one.returncode == 0, one.stderr
    four = _cli(
        [*base, "--out", str(tmp_path / "four.h5")],
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    )
    assert four.returncode == 0, four.stderr
    hosts = [  # two hosts: two shards of one job, then one finalize
        _cli([*base, "--out", str(tmp_path / "mh.h5"), "--shard", f"{k}/2"], wait=False)
        for k in range(2)
    ]
    outs = [h.communicate(timeout=600)[0] for h in hosts]
    assert all(h.returncode == 0 for h in hosts), outs
    fin = subprocess.run(
        [sys.executable, "-m", "jax_ifmvse.cli", "store", "finalize", str(tmp_path / "mh.h5")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert fin.returncode == 0 and "w: complete" in fin.stdout, fin
    assert all("done" in o for o in outs)
    ref = FeatureStore(tmp_path / "one.h5").load(None, ["w"])
    for other in ("four.h5", "mh.h5"):
        s = FeatureStore(tmp_path / other)
        assert s.pending_journal_files == 0
        got = s.load(None, ["w"])
        np.testing.assert_array_equal(got.ids, ref.ids)
        assert_within(got.features["w"], ref.features["w"], _bound(ref.features["w"]), other)
        assert [f[0] for f in s.failures()] == ["bad.wav"]


def test_cli_errors_are_one_line(corpus_dir, tmp_path):
    r = CliRunner().invoke(
        cli,
        [
            "extract",
            "--manifest",
            str(corpus_dir / "m.csv"),
            "--backbone",
            f"w={tmp_path / 'nope'}",
            "--out",
            str(tmp_path / "x.h5"),
        ],
    )
    assert r.exit_code != 0 and "nope" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, ["extract", "--backbone", "w=x", "--out", str(tmp_path / "x.h5")])
    assert r.exit_code != 0 and "--corpus" in r.output
    r = CliRunner().invoke(
        cli,
        [
            "extract",
            "--manifest",
            str(tmp_path / "none.csv"),
            "--backbone",
            "w=x",
            "--out",
            str(tmp_path / "x.h5"),
        ],
    )
    assert r.exit_code != 0 and "none.csv" in r.output


def test_short_audio_is_padded_to_the_backbone_minimum_and_flagged(tiny_whisper, tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    rng = np.random.default_rng(3)
    sf.write(d / "ok.wav", 0.2 * rng.standard_normal(8000).astype(np.float32), 16000)
    sf.write(d / "tiny.wav", 0.2 * rng.standard_normal(80).astype(np.float32), 16000)  # 5 ms
    sf.write(d / "quiet.wav", np.zeros(8000, np.float32), 16000)
    (d / "m.csv").write_text("path,split\nok.wav,Train\ntiny.wav,Train\nquiet.wav,Train\n")
    corpus = load_manifest(d / "m.csv")
    cache = tmp_path / "c"
    bbs = {
        "w": load_backbone(str(tiny_whisper), cache_dir=cache),
        "s": load_backbone(str(save_tiny_wavlm(tmp_path / "tinywavlm")), cache_dir=cache),
    }
    assert (bbs["w"].min_samples, bbs["s"].min_samples) == (320, 400)
    # 400 is exactly the conv stack's receptive field: one sample less gives no frame at all.
    assert [bbs["s"].num_frames(n) for n in (399, 400)] == [0, 1]
    cfg = _cfg(cache, "extract.whisper_window_s=2", "audio.bucket_seconds=[1.0]")
    store = tmp_path / "s.h5"
    stats = run_extract(corpus, bbs, store, cfg, loader=make_loader(cfg, corpus))
    s = FeatureStore(store)
    for name, bb in bbs.items():
        assert stats[name].short == 1 and stats[name].silent == 1 and stats[name].done == 3
        assert list(s.flags(name)) == ["", "short", "silent"]
        got = s.load(None, [name]).features[name]  # (3, D)
        assert np.abs(got[1]).max() > 0  # the 5-ms clip is no longer an all-zero vector
        x = load_audio(d / "tiny.wav")
        padded = np.zeros((1, 16000), np.float32)
        padded[0, :80] = x
        if name == "w":
            bb = bb.with_window(2.0)  # as the extractor ran it
        pooled = jax.jit(bb.pooled)
        want = pooled(bb.params, padded, np.asarray([bb.min_samples], np.int32))[0, -1]
        assert_within(got[1], want, _bound(want) if name == "w" else _bound(want, 9, 1024), name)
        if name == "s":  # what the store held before: every conv frame masked, all zeros
            raw = pooled(bb.params, padded, np.asarray([80], np.int32))[0, -1]
            assert not np.asarray(raw).any()


def test_cli_audio_root_reaches_the_manifest_reader(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    sf.write(data / "x.wav", np.zeros(1600, np.float32), 16000)
    m = tmp_path / "lists" / "m.csv"
    m.parent.mkdir()
    m.write_text(f"path,split\n{data / 'x.wav'},Train\n")
    base = ["extract", "--manifest", str(m), "--backbone", f"w={tmp_path / 'nope'}"]
    base += ["--out", str(tmp_path / "x.h5")]
    r = CliRunner().invoke(cli, base)  # the manifest's folder is the root: /data escapes it
    assert r.exit_code != 0 and "escapes the corpus root" in r.output
    r = CliRunner().invoke(cli, [*base, "--audio-root", str(data)])  # corpus fine, backbone not
    assert r.exit_code != 0 and "nope" in r.output and "escapes" not in r.output
    other = ["extract", "--corpus", str(tmp_path), *base[3:], "--audio-root", str(data)]
    r = CliRunner().invoke(cli, other)
    assert r.exit_code != 0 and "--audio-root goes with --manifest" in r.output


@pytest.mark.slow
def test_retry_failed_recomputes_recorded_failures_matching_a_reason(
    corpus_dir, tiny_whisper, tmp_path
):
    """bad.wav fails as not audio; fixed at the source, a plain rerun leaves it failed,
    --retry-failed with another reason too, and --retry-failed 'not audio' computes it."""
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    store = tmp_path / "s.h5"
    stats, _, _ = _run(corpus, tiny_whisper, store, tmp_path / "c")
    assert stats["w"].failed == 1 and FeatureStore(store).failures("w")[0][0] == "bad.wav"
    sf.write(corpus / "bad.wav", 0.1 * np.ones(8000, np.float32), 16000)  # fixed
    for retry, done in ((None, 0), ("empty audio", 0), ("NOT AUDIO", 1)):
        stats, _, _ = _run(corpus, tiny_whisper, store, tmp_path / "c", retry_failed=retry)
        assert stats["w"].done == done and stats["w"].failed == 0, retry
    s = FeatureStore(store)
    assert s.filled("w").all() and s.failures("w") == []
