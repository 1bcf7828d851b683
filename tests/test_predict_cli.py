"""`ifmvse predict` on good and bad files: no invented scores, the answer `serve` gives, what
was done to each clip, where the run came from, and a table that fits 80 columns."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from tiny_run import tone
from tolerances import assert_exceeds, assert_within, batch_path_bound

from jax_ifmvse.cli import cli
from jax_ifmvse.config import ATTRIBUTES

GOOD = ("good.wav", "other.wav", "rate22k.wav", "long.wav", "silent.wav", "short.wav")
BAD = {  # file -> the words its error must name
    "empty.wav": "empty file (0 bytes)",
    "text.wav": "not audio or corrupt",
    "truncated.wav": "truncated",
}


@pytest.fixture(scope="module")
def tiny(tiny_run, tmp_path_factory):
    """The session's tiny ensembled run (2-s crop, 16 kHz) and clips: ordinary, 22.05 kHz, longer
    than the crop, silent, under one frame; empty, text renamed .wav, a WAV cut in half."""
    root = tmp_path_factory.mktemp("predict-cli")
    run, audio = tiny_run.run, tiny_run.audio
    clips = root / "clips"
    clips.mkdir()
    sf.write(clips / "good.wav", tone(0.8, 16000, 190, 1), 16000)
    sf.write(clips / "other.wav", tone(1.3, 16000, 260, 2), 16000)
    sf.write(clips / "rate22k.wav", tone(1.0, 22050, 230, 3), 22050)
    sf.write(clips / "long.wav", tone(3.0, 16000, 210, 4), 16000)
    sf.write(clips / "silent.wav", np.zeros(16000, np.float32), 16000)
    sf.write(clips / "short.wav", tone(100 / 16000, 16000, 300, 5), 16000)
    (clips / "empty.wav").write_bytes(b"")
    (clips / "text.wav").write_text("I am a text file, renamed. " * 20)
    whole = (clips / "other.wav").read_bytes()
    (clips / "truncated.wav").write_bytes(whole[: len(whole) // 2])
    return root, run, audio, clips


def _predict(args, tmp_path):
    return CliRunner().invoke(cli, ["predict", *map(str, args)])


def _serve_answers(run: Path, files: list[Path], predictor=None) -> dict[str, tuple[int, dict]]:
    """(status, JSON) of `serve`'s /predict for each file, uploaded alone as multipart."""
    from starlette.testclient import TestClient

    from jax_ifmvse.serve import Limits, create_app

    app = create_app(run, Limits(max_clips=4), predictor=predictor)
    out = {}
    with TestClient(app) as c:
        t_end = time.monotonic() + 120
        while c.get("/health").status_code != 200 and time.monotonic() < t_end:
            time.sleep(0.1)
        out["/info"] = (200, c.get("/info").json())
        for f in files:
            r = c.post("/predict", files={"f": (f.name, f.read_bytes(), "audio/wav")})
            out[f.name] = (r.status_code, r.json())
    return out


def test_missing_path_or_folder_is_one_line_before_any_model_loads(tiny, tmp_path):
    _, run, _, clips = tiny
    for args in (
        [tmp_path / "missing.wav"],
        [clips / "good.wav", tmp_path / "missing.wav"],
    ):
        # A run that does not exist: the audio path is refused first, so nothing was loaded.
        res = _predict([*args, "--run", tmp_path / "no-run"], tmp_path)
        assert res.exit_code == 1, res.output
        assert res.output.strip() == f"Error: {tmp_path / 'missing.wav'}: no such file"
    res = _predict([clips / "good.wav", clips, "--run", tmp_path / "no-run"], tmp_path)
    assert res.exit_code == 1
    assert (
        res.output.strip() == f"Error: {clips}: not a file (give the audio files, e.g. DIR/*.wav)"
    )


@pytest.mark.parametrize("bad", sorted(BAD))
def test_a_bad_file_alone_gets_no_score_its_error_and_exit_1(tiny, tmp_path, bad):
    _, run, _, clips = tiny
    out = tmp_path / "p.csv"
    res = _predict([clips / bad, "--run", run, "--out", out], tmp_path)
    assert res.exit_code == 1, res.output
    assert "0 of 1 file(s) scored, 1 failed" in res.stderr
    assert f"Error: {clips / bad}: {BAD[bad]}" in res.stderr
    (row,) = list(csv.DictReader(out.open()))
    assert all(row[a] == "" for a in ATTRIBUTES) and row["fallback"] == ""
    assert row["error"].startswith(BAD[bad]) and str(clips) not in row["error"]


def test_mixed_files_equal_serve_field_for_field(tiny, tmp_path):
    """Good, resampled, cropped, silent, short and bad files in one call: the bad ones get empty
    cells and their error, the others are scored, exit 1; every JSON row equals `serve`'s
    answer for the same file (and a bad file's error is the reason of serve's 422)."""
    _, run, _, clips = tiny
    files = [clips / n for n in (*GOOD[:3], "text.wav", *GOOD[3:], "empty.wav", "truncated.wav")]
    out = tmp_path / "p.json"
    res = _predict([*files, "--run", run, "--out", out], tmp_path)
    assert res.exit_code == 1, res.output
    assert f"{len(GOOD)} of {len(files)} file(s) scored, {len(BAD)} failed" in res.stderr
    rows = {Path(r["file"]).name: r for r in json.loads(out.read_text())}
    assert list(rows) == [f.name for f in files]  # every file, in order
    # The server's Predictor, first scoring the good files in one batch: the heads' inputs
    # give `batch_path_bound`'s magnitudes (served alone vs the CLI's batch: other rows and
    # padding, two orders of the same maths; the JSON's values are written in full).
    from jax_ifmvse.predictor import Predictor

    pred, seen = Predictor(run, max_clips=4), []
    score = pred.score
    pred.score = lambda f: seen.append(f) or score(f)
    good = [f for f in files if f.name in GOOD]
    pred.predict_files(good)
    pred.score = score
    bounds = dict(zip([f.name for f in good], batch_path_bound(run, score, seen[0]), strict=False))
    served = _serve_answers(run, files, pred)
    for name, row in rows.items():
        status, body = served[name]
        if name in BAD:
            assert all(row[a] is None for a in ATTRIBUTES) and BAD[name] in row["error"]
            assert status in (400, 422) and body["error"] == f"{name}: {row['error']}"
            continue
        assert status == 200, (name, body)
        (answer,) = body["results"]
        # Every field the same; values within the batch path bound.
        assert list(answer) == list(row) and answer["file"] == name
        got, want = [answer[a] for a in ATTRIBUTES], [row[a] for a in ATTRIBUTES]
        assert_within(got, want, bounds[name], f"served vs CLI JSON {name}")
        for key, want in row.items():
            if key not in ATTRIBUTES and key != "file":
                assert answer[key] == want, (name, key)
        assert "note" not in body  # not a demo-corpus run
    flags = {n: rows[n]["flags"] for n in GOOD}
    assert flags == {
        "good.wav": [],
        "other.wav": [],
        "rate22k.wav": ["resampled from 22050 Hz"],
        "long.wav": ["cropped"],
        "silent.wav": ["silent"],
        "short.wav": ["short"],
    }
    assert rows["long.wav"]["duration_s"] == 3.0  # frames / rate, exact
    assert rows["short.wav"]["duration_s"] == 100 / 16000
    assert rows["empty.wav"]["duration_s"] is None
    # Numbers differ between clips: the equality above is not a constant echoed back.
    vals = np.array([[rows[n][a] for a in ATTRIBUTES] for n in GOOD[:3]])
    assert np.ptp(vals, axis=0).max() > 1e-4
    other = served["other.wav"][1]["results"][0]
    assert_exceeds([other[a] for a in ATTRIBUTES], [rows["good.wav"][a] for a in ATTRIBUTES],
                   bounds["good.wav"], "served: another file")  # fmt: skip
    # The same call as CSV: the same rows, score cells empty exactly for the bad files.
    csv_out = tmp_path / "p.csv"
    res = _predict([*files, "--run", run, "--out", csv_out], tmp_path)
    assert res.exit_code == 1
    table = list(csv.DictReader(csv_out.open()))
    assert list(table[0]) == ["file", *ATTRIBUTES, "duration_s", "flags", "fallback", "error"]
    for r in table:
        want = rows[Path(r["file"]).name]
        for a in ATTRIBUTES:
            assert (r[a] == "") == (want[a] is None)
            if want[a] is not None:
                assert float(r[a]) == want[a]
        assert r["flags"] == ";".join(want["flags"]) and r["error"] == (want["error"] or "")
    # serve's /info names the corpus the run was trained on.
    info = served["/info"][1]
    assert info["corpus"]["utterances"] == 16 and info["corpus"]["demo"] is False
    assert info["corpus_note"] is None


def test_good_files_alone_exit_0_with_the_corpus_named(tiny, tmp_path):
    root, run, audio, clips = tiny
    res = CliRunner(env={"COLUMNS": "80"}).invoke(
        cli, ["predict", str(clips / "good.wav"), str(clips / "long.wav"), "--run", str(run)]
    )
    assert res.exit_code == 0, res.output
    sha = hashlib.sha256((audio / "m.csv").read_bytes()).hexdigest()
    assert f"trained on corpus m.csv (16 utterances, labels sha256 {sha[:12]}" in res.stderr
    assert "not the demo corpus" in res.stderr and "synthetic" not in res.stderr
    assert "2 of 2 file(s) scored" in res.stderr and "failed" not in res.stderr
    assert "good.wav" in res.stdout and "cropped" in res.stdout and "3.00" in res.stdout
    assert max(map(len, res.stdout.splitlines())) <= 80
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["corpus"] == {
        "name": "m.csv",
        "utterances": 16,
        "labels": str(audio / "m.csv"),
        "labels_sha256": sha,
        "demo": False,
    }


def test_a_demo_corpus_run_says_so_and_an_old_run_says_unknown(tiny, tmp_path):
    """A run whose store came from the synthetic demo corpus warns in one line on every scoring
    (predict's stderr, serve's answer); a run from before the record says "unknown"."""
    _, run, _, clips = tiny
    demo = tmp_path / "demo-run"
    shutil.copytree(run, demo)
    m = json.loads((demo / "manifest.json").read_text())
    m["corpus"] = {**m["corpus"], "name": "demo_corpus-180-0", "utterances": 180, "demo": True}
    (demo / "manifest.json").write_text(json.dumps(m))
    res = _predict([clips / "good.wav", "--run", demo], tmp_path)
    assert res.exit_code == 0, res.output
    warn = [ln for ln in res.stderr.splitlines() if ln.startswith("note:")]
    assert warn == [
        f"note: {demo} was trained on the built-in synthetic demo corpus (180 eSpeak NG clips);"
        " its scores of real speech mean little"
    ]
    (status, body) = _serve_answers(demo, [clips / "good.wav"])["good.wav"]
    assert status == 200 and body["note"] == warn[0]
    del m["corpus"]
    (demo / "manifest.json").write_text(json.dumps(m))
    res = _predict([clips / "good.wav", "--run", demo], tmp_path)
    assert res.exit_code == 0 and "trained on corpus unknown" in res.stderr


def test_store_records_the_corpus_it_was_made_from(tmp_path):
    """`extract`'s store creation writes the corpus record (demo marker included) that
    `train_run` copies into the manifest; an older store without it reads as unknown."""
    from featurestore import FeatureStore, create_store
    from jax_ifmvse.config import load_config
    from jax_ifmvse.data.corpus import load_manifest
    from jax_ifmvse.data.demo_corpus import MARKER
    from jax_ifmvse.extract import _create_store
    from jax_ifmvse.provenance import describe, store_corpus

    root = tmp_path / "corpus"
    root.mkdir()
    sf.write(root / "a.wav", tone(0.5, 16000, 200, 0), 16000)
    sf.write(root / "b.wav", tone(0.6, 16000, 220, 1), 16000)
    (root / "m.csv").write_text("path,split\na.wav,Train\nb.wav,Development\n")
    (root / MARKER).write_text("{}")
    corpus = load_manifest(root / "m.csv")
    cfg = load_config(None)
    _create_store(tmp_path / "s.h5", corpus, cfg)  # what extract (and a job's process 0) calls
    rec = store_corpus(FeatureStore(tmp_path / "s.h5"))
    sha = hashlib.sha256((root / "m.csv").read_bytes()).hexdigest()
    assert rec == {
        "name": "m.csv",
        "utterances": 2,
        "labels": str(root / "m.csv"),
        "labels_sha256": sha,
        "demo": True,
    }
    assert "built-in synthetic demo corpus" in describe(rec)
    create_store(
        tmp_path / "old.h5", ids=["a"], splits=["Train"], durations=[0.5], paths=["a.wav"],
        attrs={"corpus": str(root)},
    )  # fmt: skip
    old = store_corpus(FeatureStore(tmp_path / "old.h5"))
    assert old["name"] == "corpus" and old["demo"] is None and old["labels_sha256"] is None
    assert "demo or not unknown" in describe(old) and "sha256 unknown" in describe(old)


def test_table_fits_80_columns_without_breaking_names():
    """Deep, long paths: the shared folder once (the caption), names shortened from the left,
    nothing wider than 80 columns, no word of a name or reason broken across lines."""
    from rich.console import Console

    from jax_ifmvse.predict import predictions_table
    from jax_ifmvse.predictor import Prediction

    folder = "/data/corpora/some-very-long-project-name/recordings/2024-05-17/session-three"
    preds = [
        Prediction(f"{folder}/speaker_0001_utterance_0042.wav", (3.1234, 4.5, 2.25), None, "",
                   duration_s=7.75, flags=("cropped", "resampled from 8000 Hz")),
        Prediction(f"{folder}/sub/a_much_longer_file_name_that_cannot_fit_in_the_column.wav",
                   None, "truncated (header says 3200 data bytes, file has 1578)", "", duration_s=0.05),
        Prediction(f"{folder}/b.wav", (1.0, 7.0, 4.0), None, "", duration_s=0.36, flags=("short",)),
    ]  # fmt: skip
    console = Console(width=80, record=True, color_system=None)
    console.print(predictions_table(preds, "predictions (runs/demo/run)", 80))
    text = console.export_text()
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80, text
    assert "files in …" in text and "/2024-05-17/session-three/" in text  # the folder, once
    assert text.count("session-three") == 1
    assert "utterance_0042.wav" in text and "b.wav" in text  # the ends of names: never cut
    assert "…" in text and "in_the_column.wav" in text  # shortened from the left
    words = set(text.split())
    for w in ("truncated", "(header", "says", "3200", "resampled", "cropped", "short"):
        assert any(w in x for x in words), w
    assert "3.123" in text and "7.75" in text


def test_demo_report_names_the_training_corpus(tiny, tmp_path):
    """The demo report's provenance lines come from the run's manifest (the demo flag too)."""
    from jax_ifmvse.config import load_config
    from jax_ifmvse.demo import DemoPaths, write_report

    _, run, _, _ = tiny
    paths = DemoPaths(tmp_path / "out")
    shutil.copytree(run / "ensemble", paths.run / "ensemble")
    m = json.loads((run / "manifest.json").read_text())
    cfg = load_config(run / "config.yaml")
    row = {**{a: 0.5 for a in ATTRIBUTES}, "mean": 0.5}
    scores = {**{s.name: row for s in cfg.model.score_sets}, "ensemble": row}
    paths.report.mkdir(parents=True)
    for demo in (False, True):
        (paths.run / "manifest.json").write_text(
            json.dumps({**m, "corpus": {**m["corpus"], "demo": demo}})
        )
        index = write_report(paths, cfg, scores, scores, "Test1", {"total": 1.0}, "ifmvse demo")
        text = index.read_text()
        assert "Trained on: m.csv (16 utterances, labels sha256 " in text
        warned = "This run was trained on the built-in synthetic demo corpus (16 eSpeak NG clips)"
        assert (warned in text) == demo
