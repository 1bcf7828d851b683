"""Corpus readers: MSP-Podcast layout, manifests, label errors, path safety, label scaling."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import soundfile as sf
from tolerances import assert_exceeds, assert_within, gamma

from jax_ifmvse.data.corpus import (
    CorpusError,
    UnsafePathError,
    from_unit,
    load_corpus,
    load_manifest,
    load_msp_podcast,
    submission_name,
    to_unit,
)

HEADER = "FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set"


def _wav(path, seconds=0.5, sr=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, 0.1 * np.sin(2 * np.pi * 220 * t), sr)


def _msp(root, rows, audio=True):
    (root / "Labels").mkdir(parents=True, exist_ok=True)
    (root / "Labels" / "labels_consensus.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    if audio:
        for r in rows:
            _wav(root / "Audios" / r.split(",")[0])
    return root / "Labels" / "labels_consensus.csv"


GOOD = [
    "a.wav,H,5.2,4.8,3.0,12,Female,Train",
    "b.wav,N,3.0,4.0,4.5,13,Male,Development",
    "c.wav,,,,,,,Test3",  # the challenge's test set ships without labels
    "d.wav,S,1,7,2.5,14,Male,Test1",
]


def test_msp_reader_fields_splits_and_durations(tmp_path):
    _msp(tmp_path, GOOD)
    c = load_msp_podcast(tmp_path)
    assert [u.id for u in c.utterances] == ["a", "b", "c", "d"]
    a = c.utterances[0]
    assert (a.arousal, a.valence, a.dominance) == (5.2, 4.8, 3.0)
    assert (a.speaker, a.gender, a.split, a.emo_class) == ("12", "Female", "Train", "H")
    np.testing.assert_array_equal(a.labels(), np.float32([5.2, 4.8, 3.0]))  # ATTRIBUTES order
    assert a.labeled and not c.utterances[2].labeled
    assert np.isnan(c.utterances[2].labels()).all()
    assert c.splits() == ("Train", "Development", "Test1", "Test3")
    assert len(c.split("Test3")) == 1
    assert c.abspath(a) == (tmp_path / "Audios" / "a.wav").resolve()
    assert c.labels().shape == (4, 3)
    (tmp_path / "Audios" / "b.wav").unlink()  # unreadable -> NaN, the others still measured
    d = c.durations()
    np.testing.assert_array_equal(d[[0, 2, 3]], 0.5)  # 8000 frames / 16000 Hz
    assert math.isnan(d[1])


@pytest.mark.parametrize(
    ("rows", "line", "reason"),
    [
        (["a.wav,H,x,4,4,1,Male,Train"], 2, "not a number"),
        (["a.wav,H,4,4,4,1,Male,Train", "b.wav,H,4,8,4,1,Male,Train"], 3, "outside 1..7"),
        (["a.wav,H,4,4,0.5,1,Male,Train"], 2, "outside 1..7"),
        (["a.wav,H,4,4,4,1,Male,Train", "a.wav,H,4,4,4,1,Male,Test1"], 3, "duplicate FileName"),
        (["a.wav,H,4,4,4,1,Male,Validation"], 2, "unknown split"),
        (["a.wav,H,,4,4,1,Male,Train"], 2, "missing EmoAct"),
    ],
)
def test_msp_label_errors_name_file_and_line(tmp_path, rows, line, reason):
    labels = _msp(tmp_path, rows, audio=False)
    with pytest.raises(CorpusError) as e:
        load_msp_podcast(tmp_path)
    msg = str(e.value)
    assert f"{labels}:{line}:" in msg and reason in msg and "\n" not in msg


def test_msp_missing_columns_and_missing_file(tmp_path):
    (tmp_path / "Labels").mkdir()
    f = tmp_path / "Labels" / "labels_consensus.csv"
    f.write_text("FileName,EmoAct,EmoVal,Split_Set\na.wav,4,4,Train\n")
    with pytest.raises(CorpusError, match=r":1: missing column\(s\) EmoDom$"):
        load_msp_podcast(tmp_path)
    with pytest.raises(CorpusError, match="label file not found"):
        load_msp_podcast(tmp_path / "nowhere")


def test_msp_refuses_paths_escaping_root(tmp_path):
    root = tmp_path / "corpus"
    _msp(root, ["../../etc/passwd,H,4,4,4,1,Male,Train"], audio=False)
    with pytest.raises(UnsafePathError, match="escapes the corpus root"):
        load_msp_podcast(root)


def test_symlink_out_of_root_refused(tmp_path):
    outside = tmp_path / "outside.wav"
    _wav(outside)
    root = tmp_path / "corpus"
    _msp(root, ["a.wav,H,4,4,4,1,Male,Train", "link.wav,H,4,4,4,1,Male,Train"], audio=False)
    _wav(root / "Audios" / "a.wav")
    os.symlink(outside, root / "Audios" / "link.wav")
    with pytest.raises(UnsafePathError, match="link.wav"):
        load_msp_podcast(root)


@pytest.mark.parametrize("sep", [",", "\t"])
def test_manifest_csv_and_tsv(tmp_path, sep):
    root = tmp_path / "m"
    _wav(root / "clips" / "x.wav")
    _wav(root / "y.flac")
    ext = "tsv" if sep == "\t" else "csv"
    rows = [
        ["path", "split", "arousal", "valence", "dominance", "id"],
        ["clips/x.wav", "train", "2.5", "3", "4", ""],
        [str((root / "y.flac").resolve()), "dev", "", "", "", "why"],  # absolute, inside root
    ]
    (root / f"list.{ext}").write_text("\n".join(sep.join(r) for r in rows) + "\n")
    c = load_manifest(root / f"list.{ext}")
    assert c.root == root.resolve()
    x, y = c.utterances
    assert (x.id, x.path, x.split, x.arousal, x.dominance) == (
        "clips/x.wav",  # the default id is the path relative to the root: unique
        "clips/x.wav",
        "Train",
        2.5,
        4.0,
    )
    assert (y.id, y.path, y.split) == ("why", "y.flac", "Development")
    assert np.isnan(y.labels()).all()
    assert c.abspath(x).is_file() and c.abspath(y).is_file()
    assert load_corpus("manifest", root / f"list.{ext}").utterances == c.utterances


def test_manifest_without_label_columns(tmp_path):
    (tmp_path / "l.csv").write_text("path,split\na.wav,Test2\n")
    (u,) = load_manifest(tmp_path / "l.csv").utterances
    assert u.split == "Test2" and np.isnan(u.labels()).all()


@pytest.mark.parametrize(
    ("body", "error", "reason"),
    [
        ("split,arousal\nTrain,3\n", CorpusError, ":1: missing column(s) path"),
        ("path,split\n../up.wav,Train\n", UnsafePathError, "escapes the corpus root"),
        ("path,split\n/etc/hosts,Train\n", UnsafePathError, "escapes the corpus root"),
        ("path,split\na.wav,Train\nb.wav,holdout\n", CorpusError, ":3: unknown split"),
        ("path,split,valence\na.wav,Train,9\n", CorpusError, ":2: valence '9' is outside"),
        ("path,split,id\na.wav,Train,k\nb.wav,Train,k\n", CorpusError, ":3: duplicate id"),
    ],
)
def test_manifest_errors(tmp_path, body, error, reason):
    f = tmp_path / "sub" / "list.csv"
    f.parent.mkdir()
    f.write_text(body)
    with pytest.raises(error) as e:
        load_manifest(f)
    assert str(f) in str(e.value) and reason in str(e.value)


def test_load_corpus_dispatch(tmp_path):
    _msp(tmp_path, GOOD[:1])
    assert len(load_corpus("msp", tmp_path)) == 1
    with pytest.raises(CorpusError, match="unknown corpus kind"):
        load_corpus("timit", tmp_path)


def test_label_scaling_round_trip_and_clip():
    y = np.array([1.0, 2.5, 4.0, 7.0])
    np.testing.assert_array_equal(to_unit(y), [0.0, 0.25, 0.5, 1.0])  # exact in float32
    # Round trip in float32: (y - 1) exact here, / 6, * 6, + 1 one rounding each.
    back = from_unit(to_unit(y))
    bound = gamma(3) * (np.abs(y - 1) + np.abs(y))
    assert_within(back, y, bound, "label scale round trip")
    assert_exceeds(to_unit(y) * 7 + 1, y, bound, "back with the wrong range")
    np.testing.assert_array_equal(from_unit([-0.5, 1.4]), [1.0, 7.0])  # clipped


def test_msp_needs_only_the_five_columns_the_baseline_reads(tmp_path):
    (tmp_path / "Labels").mkdir()
    (tmp_path / "Labels" / "labels_consensus.csv").write_text(
        "Split_Set,EmoDom,FileName,EmoVal,EmoAct\nTrain,3,a.wav,4,5\n"
    )
    _wav(tmp_path / "Audios" / "a.wav")
    (u,) = load_msp_podcast(tmp_path).utterances
    assert (u.id, u.split, u.arousal, u.valence, u.dominance) == ("a", "Train", 5.0, 4.0, 3.0)
    assert (u.speaker, u.gender, u.emo_class) == (None, None, None)


def test_msp_test3_is_the_unlabelled_test3_audio_and_other_strays_are_named(tmp_path):
    _msp(tmp_path, ["MSP-PODCAST_0001_0001.wav,H,5,4,3,1,Male,Train"])
    for name in ("MSP-PODCAST_test3_0002.wav", "MSP-PODCAST_test3_0001.wav", "stray_0001.wav"):
        _wav(tmp_path / "Audios" / name)
    (tmp_path / "Audios" / "readme.txt").write_text("not audio")
    c = load_msp_podcast(tmp_path)
    test3 = c.split("Test3").utterances
    assert [u.path for u in test3] == [
        "Audios/MSP-PODCAST_test3_0001.wav",
        "Audios/MSP-PODCAST_test3_0002.wav",
    ]
    assert [u.id for u in test3] == ["MSP-PODCAST_test3_0001", "MSP-PODCAST_test3_0002"]
    assert all(np.isnan(u.labels()).all() for u in test3)
    assert c.splits() == ("Train", "Test3")
    assert c.unlisted == ("stray_0001.wav",)  # no label row, not test3: reported, not used
    assert [submission_name(u.path, u.id) for u in test3] == [
        "MSP-PODCAST_test3_0001.wav",
        "MSP-PODCAST_test3_0002.wav",
    ]


def test_msp_test3_stem_clash_with_a_labelled_file_is_an_error(tmp_path):
    _msp(tmp_path, ["x_test3.wav,H,5,4,3,1,Male,Train"])
    _wav(tmp_path / "Audios" / "x_test3.flac")
    with pytest.raises(CorpusError, match="same stem"):
        load_msp_podcast(tmp_path)


def test_submission_name_keeps_the_extension_only_for_the_msp_layout():
    assert submission_name("Audios/MSP-PODCAST_1_2.wav", "MSP-PODCAST_1_2") == "MSP-PODCAST_1_2.wav"
    assert submission_name("clips/x.wav", "clips/x.wav") == "clips/x.wav"
    assert submission_name("Audios/x.wav", "custom") == "custom"


def test_manifest_default_ids_are_unique_relative_paths(tmp_path):
    for rel in ("a/x.wav", "b/x.wav", "x.wav", "x.flac"):
        _wav(tmp_path / rel)
    (tmp_path / "m.csv").write_text(
        "path,split\na/x.wav,Train\nb/x.wav,Train\nx.wav,dev\nx.flac,dev\n"
    )
    c = load_manifest(tmp_path / "m.csv")
    assert [u.id for u in c.utterances] == ["a/x.wav", "b/x.wav", "x.wav", "x.flac"]


def test_manifest_audio_root_accepts_absolute_paths_inside_it(tmp_path):
    data = tmp_path / "data"
    _wav(data / "s1" / "x.wav")
    _wav(data / "y.wav")
    lists = tmp_path / "lists"
    lists.mkdir()
    m = lists / "m.csv"
    m.write_text(f"path,split\n{data / 's1' / 'x.wav'},Train\ny.wav,Test1\n")
    with pytest.raises(UnsafePathError, match="escapes the corpus root"):
        load_manifest(m)  # the default root is the manifest's folder
    c = load_manifest(m, audio_root=data)
    assert c.root == data.resolve()
    assert [(u.id, u.path) for u in c.utterances] == [("s1/x.wav", "s1/x.wav"), ("y.wav", "y.wav")]
    assert all(c.abspath(u).is_file() for u in c.utterances)
    assert load_corpus("manifest", m, data).utterances == c.utterances
    # A symlinked root spelled as given still yields paths relative to it.
    os.symlink(data, tmp_path / "link")
    m.write_text(f"path,split\n{tmp_path / 'link' / 'y.wav'},Train\n")
    (u,) = load_manifest(m, audio_root=tmp_path / "link").utterances
    assert u.path == "y.wav"


def test_manifest_audio_root_still_refuses_escapes(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _wav(tmp_path / "outside.wav")
    os.symlink(tmp_path / "outside.wav", data / "link.wav")
    m = tmp_path / "m.csv"
    for body in (f"{tmp_path / 'outside.wav'}", "../outside.wav", "link.wav"):
        m.write_text(f"path,split\n{body},Train\n")
        with pytest.raises(UnsafePathError, match="escapes the corpus root"):
            load_manifest(m, audio_root=data)
    with pytest.raises(CorpusError, match="not a directory"):
        load_manifest(m, audio_root=tmp_path / "nowhere")
