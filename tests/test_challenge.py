"""From a folder shaped like the official MSP-Podcast release to the Test3 submission.

The corpus has the release's 8 label columns with only Train and Development rows; Test3 is the
unlabelled `MSP-PODCAST_test3_*.wav` audio in `Audios/`, one file 5 ms long and one corrupt.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from tiny_models import save_tiny_wavlm, save_tiny_whisper
from tolerances import U32, U64, assert_exceeds, assert_within, two_orders, written

from featurestore import FeatureStore
from jax_ifmvse.cli import cli

OFFICIAL_COLUMNS = "FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set"
TEST3 = [f"MSP-PODCAST_test3_{i:04d}.wav" for i in (1, 2, 3, 4, 5)]
SHORT, CORRUPT = TEST3[1], TEST3[3]
STRAY = "MSP-PODCAST_9999_0001.wav"  # no label row, not test3: named, not extracted
SETS = (
    "[{name: S1, kind: mlp, views: [whisper]}, {name: S2, kind: fusion, views: [whisper, wavlm]},"
    " {name: S3, kind: mlp, views: [wavlm]}]"
)


def _clip(path, seconds, f0, rng, sr=16000):
    n = max(int(seconds * sr), 1)
    t = np.arange(n) / sr
    x = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.02 * rng.standard_normal(n)
    sf.write(path, x.astype(np.float32), sr)


def make_official_corpus(root):
    """Labels/labels_consensus.csv (Train + Development only) and Audios/ with Test3 inside."""
    rng = np.random.default_rng(0)
    (root / "Labels").mkdir(parents=True)
    audios = root / "Audios"
    audios.mkdir()
    rows = [OFFICIAL_COLUMNS]
    for i in range(20):
        name = f"MSP-PODCAST_{i // 5 + 1:04d}_{i:04d}.wav"
        a = 1.5 + 0.25 * i
        _clip(audios / name, rng.uniform(0.4, 1.0), 100 + 15 * i, rng)
        split = "Development" if i % 3 == 0 else "Train"
        rows.append(f"{name},N,{a:.2f},{8 - a:.2f},{4 + 0.1 * (i % 7):.2f},{i % 4},Female,{split}")
    (root / "Labels" / "labels_consensus.csv").write_text("\n".join(rows) + "\n")
    for k, name in enumerate(TEST3):
        _clip(audios / name, 0.8 - 0.1 * k, 180 + 20 * k, rng)
    _clip(audios / SHORT, 0.005, 200, rng)  # 80 samples: less than one conv frame
    (audios / CORRUPT).write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(64)))
    _clip(audios / STRAY, 0.5, 300, rng)
    return root


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("ckpt")
    whisper = save_tiny_whisper(d / "whisper", d_model=16, encoder_attention_heads=2)
    return {"whisper": whisper, "wavlm": save_tiny_wavlm(d / "wavlm")}


def _invoke(args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


@pytest.mark.slow  # extract, train, ensemble, predict with two backbones
def test_official_layout_to_test3_submission(backbones, tmp_path):
    corpus = make_official_corpus(tmp_path / "MSP-Podcast")
    store, run = tmp_path / "store.h5", tmp_path / "run"
    common = [
        "--set", f"extract.cache_dir={tmp_path / 'cache'}",
        "--set", "extract.whisper_window_s=2",
        "--set", "audio.max_seconds=2",
        "--set", "audio.bucket_seconds=[1.0]",
    ]  # fmt: skip
    out = _invoke(
        ["extract", "--corpus", corpus, "--config", "paper", "--out", store,
         "--backbone", f"whisper={backbones['whisper']}", "--backbone", f"wavlm={backbones['wavlm']}",
         *common],
    )  # fmt: skip
    assert "1 audio file(s)" in out and STRAY in out  # the stray file is named, not dropped
    s = FeatureStore(store)
    test3 = s.split_indices("Test3")
    assert sorted(str(p) for p in s.paths[test3]) == [f"Audios/{n}" for n in TEST3]
    assert STRAY.removesuffix(".wav") not in set(s.ids)
    for name in ("whisper", "wavlm"):
        flags = dict(zip(s.ids, s.flags(name), strict=True))
        assert flags[SHORT.removesuffix(".wav")] == "short"
        assert sum("short" in f for f in flags.values()) == 1
        assert [f[0] for f in s.failures(name)] == [CORRUPT.removesuffix(".wav")]
        pooled = s.load(None, [name]).features[name]
        assert np.abs(pooled).max(axis=1).min() > 0  # no stored vector is all zeros

    res = CliRunner().invoke(
        cli,
        ["train", "--store", str(store), "--config", "paper", "--out", str(run),
         "--set", f"model.score_sets={SETS}", "--set", "model.common_dim=8",
         "--set", "model.hidden=16", "--set", "train.multitask=true", "--set", "train.epochs=1",
         "--set", "train.batch_size=4", "--set", "train.learning_rate=1e-2", *common],
    )  # fmt: skip
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "test split Test1 is not in the store; skipped" in res.output  # paper.yaml lists it
    assert "scores for Development, Test3" in res.output

    out = _invoke(["ensemble", run])
    assert "Test3: 5 rows, 1 fallback(s)" in out and "1 Train label mean" in out
    with open(run / "ensemble" / "submission_Test3.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["FileName", "EmoAct", "EmoVal", "EmoDom"]
    assert [r[0] for r in rows[1:]] == TEST3  # every file once, official name, name order
    values = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    assert np.isfinite(values).all() and values.min() >= 1 and values.max() <= 7
    with open(run / "ensemble" / "fallbacks_Test3.csv", newline="") as f:
        fallbacks = list(csv.DictReader(f))
    assert [r["FileName"] for r in fallbacks] == [CORRUPT]
    # The row's FileName names the file; the reason says why (failures no longer repeat paths).
    assert "not audio or corrupt (" in fallbacks[0]["reason"]
    assert "object at 0x" not in fallbacks[0]["reason"]  # no BytesIO repr
    assert fallbacks[0]["used"] == "Train label mean"
    train = []
    with open(corpus / "Labels" / "labels_consensus.csv") as f:
        train = [r for r in csv.DictReader(f) if r["Split_Set"] == "Train"]
    cols = ("EmoAct", "EmoVal", "EmoDom")
    y = np.array([[float(r[c]) for c in cols] for r in train])  # (n, 3)
    want = y.mean(0)
    # The manifest's mean of the labels stored as float32 (u32 |y|), a float64 sum in another
    # order, written with 6 decimals (as test_predict's Train label mean, + `written`).
    bound = U32 * np.abs(y).max() + two_orders(len(y), np.abs(y).mean(), U64) + written(6, 7)
    assert_within(values[TEST3.index(CORRUPT)], want, bound, "fallback: Train label mean")
    with open(corpus / "Labels" / "labels_consensus.csv") as f:
        both = [[float(r[c]) for c in cols] for r in csv.DictReader(f)
                if r["Split_Set"] in ("Train", "Development")]  # fmt: skip
    assert_exceeds(np.mean(both, 0), want, bound, "Train and Development's mean")

    # The Development submission scores against the official label file as it is.
    out = _invoke(
        ["evaluate", run / "ensemble" / "submission_Development.csv", "--labels",
         corpus / "Labels" / "labels_consensus.csv", "--split", "Development", "--json",
         "--bootstrap", "20"],
    )  # fmt: skip
    assert '"n": 7' in out
