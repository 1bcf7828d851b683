"""`predict --segments` (jax_ifmvse.timeline): a long file scored segment by segment, each segment
as the same span cut out as a file; coverage, flags, summaries, bad input, the command."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from tiny_run import build_tiny_run, tone
from tolerances import U64, assert_exceeds, assert_within, batch_path_bound, gamma, written

from jax_ifmvse.config import ATTRIBUTES
from jax_ifmvse.timeline import (
    Decode,
    Plan,
    Segmentation,
    SegmentRow,
    TimelineError,
    cut_segments,
    fixed_spans,
    plan_file,
    summarize,
    timeline_file,
)


def test_fixed_windows_cover_the_file_in_order():
    # 10 frames, window 4, hop 4: the last window is the 2-frame tail.
    assert fixed_spans(10, 1, 4, 4) == [(0, 4), (4, 8), (8, 10)]
    # Overlap (hop 3): windows until one reaches the end.
    assert fixed_spans(10, 1, 4, 3) == [(0, 4), (3, 7), (6, 10)]
    # Shorter than one window: one segment, the whole file.
    assert fixed_spans(3, 1, 4, 4) == [(0, 3)]
    # Exactly two windows: no empty tail.
    assert fixed_spans(8, 1, 4, 4) == [(0, 4), (4, 8)]
    # Seconds at a rate: 2.5 s at 16 kHz in 1-s windows.
    assert fixed_spans(40000, 16000, 1.0, 1.0) == [(0, 16000), (16000, 32000), (32000, 40000)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny-Whisper run (2-s window) with task 1 heads, its Predictor and its audio; the
    Predictor's head calls record their inputs (`_bounds` measures magnitudes on them)."""
    pytest.importorskip("torch")
    from jax_ifmvse.predictor import Predictor

    root = tmp_path_factory.mktemp("timeline")
    run, audio = build_tiny_run(root, extra=("train.tasks=[attributes, category]",))
    pred = Predictor(run)
    score = pred.score
    pred.seen = []  # the heads' inputs of each call, with the unwrapped scorer
    pred.score = lambda f: pred.seen.append((f, score)) or score(f)
    return run, audio, pred


def _bounds(run, pred, rows):
    """(rows, 3) and (rows, 8) bounds on a segment vs its cut-out file (the same samples, other
    rows and padding in the batch): `batch_path_bound` on the last head call's inputs, for the
    scores and for the class probabilities."""
    feats, score = pred.seen[-1]
    return (batch_path_bound(run, score, feats)[:rows],
            batch_path_bound(run, score, feats, "probs")[:rows])  # fmt: skip


def _cutouts(path, rows, tmp_path):
    """Each row's span of `path` saved as a file of its own (same rate and sample format)."""
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    subtype = sf.info(str(path)).subtype
    out = []
    for r in rows:
        a, b = round(r.start_s * sr), round(r.end_s * sr)
        p = tmp_path / f"cut{r.index:03d}.wav"
        sf.write(p, x[a:b], sr, subtype=subtype)
        out.append(p)
    return out


def _assert_same(row, scored, bounds, what=""):
    p = scored.prediction
    assert p.error is None
    assert_within(row.values, p.values, bounds[0], f"segment vs cut-out {what}")
    assert row.category == p.category
    assert list(row.probabilities) == list(p.probabilities)
    got, want = list(row.probabilities.values()), list(p.probabilities.values())
    assert_within(got, want, bounds[1], f"segment vs cut-out probabilities {what}")


def test_long_file_of_labelled_clips_scores_each_part_as_its_cutout(tiny, tmp_path):
    run, audio, pred = tiny
    # Three Train clips with different labels: u12 (exactly 2.0 s), u14 cut to 2 s, u08 (1.5 s).
    parts = [sf.read(audio / f"u{i:02d}.wav", dtype="float32")[0] for i in (12, 14, 8)]
    assert len(parts[0]) == 32000 and len(parts[2]) == 24000
    long = tmp_path / "long.wav"
    sf.write(long, np.concatenate([parts[0], parts[1][:32000], parts[2]]), 16000)

    rows, summary = timeline_file(pred, long, Segmentation())  # window: the run's 2 s
    assert [(r.start_s, r.end_s) for r in rows] == [(0.0, 2.0), (2.0, 4.0), (4.0, 5.5)]
    assert [r.index for r in rows] == [0, 1, 2]
    assert [r.flags for r in rows] == [(), (), ("short",)]  # the tail is shorter than 2 s
    cut = pred.predict_files(_cutouts(long, rows, tmp_path))
    bound, pbound = _bounds(run, pred, 3)
    for i, (r, s) in enumerate(zip(rows, cut, strict=True)):
        _assert_same(r, s, (bound[i], pbound[i]), str(i))
    # Another segment's cut-out lands outside the probabilities' bound: it can fail a mix-up of
    # segments. (Not the scores': this tiny model clips two attributes to 1 and moves arousal
    # by 0.004 between these parts, inside their bound of ~0.008.)
    assert_exceeds(list(rows[0].probabilities.values()),
                   list(cut[1].prediction.probabilities.values()), pbound[1],
                   "another cut-out's probabilities")  # fmt: skip
    # The first part is u12.wav itself, sample for sample: the segment scores as that clip.
    (u12,) = pred.predict_files([audio / "u12.wav"])
    b1 = _bounds(run, pred, 1)
    _assert_same(rows[0], u12, (b1[0][0], b1[1][0]), "u12.wav")
    # The parts score differently, so the equalities are not one constant echoed back.
    assert np.ptp([r.values for r in rows], axis=0).max() > 1e-4
    assert all(set(r.probabilities) and r.category for r in rows)
    tiled = np.array([s.prediction.values for s in cut])  # (3, 3) the cut-outs' scores
    three = rows  # the three parts' rows, which `summary` summarizes

    # Overlapping windows: coverage complete and ordered, first and last equal their cut-outs.
    rows, _ = timeline_file(pred, long, Segmentation(hop_s=1.0))
    assert [(r.start_s, r.end_s) for r in rows] == [
        (0.0, 2.0), (1.0, 3.0), (2.0, 4.0), (3.0, 5.0), (4.0, 5.5)
    ]  # fmt: skip
    cut = pred.predict_files(_cutouts(long, rows, tmp_path))
    hb, hp = _bounds(run, pred, 5)
    _assert_same(rows[0], cut[0], (hb[0], hp[0]), "hop 1 s, first")
    _assert_same(rows[-1], cut[-1], (hb[-1], hp[-1]), "hop 1 s, last")

    # The summary: time-weighted mean and spread over the three segments, share per class.
    assert summary["segments"] == 3 and summary["scored"] == 3 and summary["error"] is None
    assert summary["duration_s"] == 5.5 and summary["decoded_s"] == 5.5  # 88000 / 16000
    w = np.array([2.0, 2.0, 1.5])
    mean = (w[:, None] * tiled).sum(0) / w.sum()
    # Each segment within its bound of its cut-out: the time-weighted mean within the weighted
    # bounds (the float64 means' own roundings, ~1e-15, are 1e-12 of that).
    got = [summary["mean"][a] for a in ATTRIBUTES]
    mbound = (w[:, None] * bound).sum(0) / w.sum()
    assert_within(got, mean, mbound, "summary mean vs the cut-outs' time-weighted mean")
    # The summary from the rows themselves is float64 arithmetic only: within `_mean_bound`, and
    # the unweighted mean lands outside it (the chain above is too wide to tell them apart).
    v = np.array([r.values for r in three], np.float64)  # (3, 3)
    assert_within(got, _exact_mean(w, v), _mean_bound(w, v), "summary mean vs its rows")
    assert_exceeds(v.mean(0), _exact_mean(w, v), _mean_bound(w, v), "the unweighted mean")
    _assert_shares(summary["share_of_time"], three)


def test_a_file_shorter_than_one_window_is_one_short_segment(tiny):
    run, audio, pred = tiny
    rows, summary = timeline_file(pred, audio / "u04.wav", Segmentation())  # 1.0 s
    assert len(rows) == 1 and (rows[0].start_s, rows[0].end_s) == (0.0, 1.0)
    assert rows[0].flags == ("short",)
    (alone,) = pred.predict_files([audio / "u04.wav"])
    b, pb = _bounds(run, pred, 1)
    _assert_same(rows[0], alone, (b[0], pb[0]), "u04.wav")
    assert summary["flagged"]["short"] == 1


def test_silence_is_flagged_and_never_scored(tiny, tmp_path):
    run, audio, pred = tiny
    f = tmp_path / "quiet.wav"
    x = np.concatenate([tone(2.0, 16000, 200, 0), np.zeros(4 * 16000, np.float32)])
    x[:100] = 1.0  # a burst at full scale: the first segment is clipped
    sf.write(f, x, 16000, subtype="FLOAT")
    rows, summary = timeline_file(pred, f, Segmentation())
    assert [r.flags for r in rows] == [("clipped",), ("silent",), ("silent",)]
    assert rows[0].values is not None
    for r in rows[1:]:
        assert r.values is None and r.category is None and r.probabilities is None
    assert summary["flagged"] == {"silent": 2, "short": 0, "clipped": 1}
    assert summary["scored"] == 1 and summary["scored_s"] == 2.0
    # All silent: no mean, no class shares (never scores presented as speech).
    z = tmp_path / "zeros.wav"
    sf.write(z, np.zeros(3 * 16000, np.float32), 16000)
    rows, summary = timeline_file(pred, z, Segmentation())
    assert all(r.values is None and "silent" in r.flags for r in rows) and len(rows) == 2
    assert summary["mean"] is None and summary["share_of_time"] is None


def test_a_corrupt_tail_keeps_the_segments_before_it(tiny, tmp_path):
    run, audio, pred = tiny
    x = tone(7.0, 16000, 150, 1)
    full = tmp_path / "full.wav"
    sf.write(full, x, 16000)
    data = full.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: 44 + 2 * 55000])  # the header promises 7 s, 3.44 s are there
    rows, summary = timeline_file(pred, cut, Segmentation())
    assert [(r.start_s, r.end_s) for r in rows] == [(0.0, 2.0)]  # [2, 4) is not all there
    assert summary["error"].startswith("decoding stopped at 3.44 s of 7.00 s (truncated")
    whole = timeline_file(pred, full, Segmentation())[0]
    b, pb = _bounds(run, pred, len(whole))  # the same first 2 s in another batch
    assert_within(rows[0].values, whole[0].values, b[0], "corrupt tail's first segment")
    probs = [list(r.probabilities.values()) for r in (rows[0], whole[0])]  # (2, 8)
    assert_within(probs[0], probs[1], pb[0], "corrupt tail's first segment, probabilities")
    (other,) = pred.predict_files([audio / "u12.wav"])  # the tone's next segments barely differ
    other = list(other.prediction.probabilities.values())
    assert_exceeds(other, probs[1], pb[0], "another clip's probabilities")

    flac = tmp_path / "bad.flac"
    sf.write(flac, x, 16000)
    clean = sf.read(flac, dtype="float32")[0]
    b = bytearray(flac.read_bytes())
    noise = np.random.default_rng(0).integers(0, 256, len(b) - len(b) // 2, np.uint8)
    b[len(b) // 2 :] = noise.tobytes()
    flac.write_bytes(bytes(b))
    plan, decode = plan_file(flac, Segmentation(window_s=1.0, hop_s=1.0)), Decode()
    got = [c for batch in cut_segments(plan, 2, decode) for c in batch]
    assert decode.stop.startswith("decoding stopped at ") and " of 7.00 s" in decode.stop
    stopped = float(decode.stop.split()[3])
    assert 2.0 < stopped < 4.0  # the second half of the bytes is noise
    assert [c.index for c in got] == list(range(int(stopped)))  # whole segments before it
    np.testing.assert_array_equal(np.concatenate([c.samples for c in got])[:, 0],
                                  clean[: len(got) * 16000])  # fmt: skip

    (tmp_path / "junk.wav").write_text("not audio")
    rows, summary = timeline_file(pred, tmp_path / "junk.wav", Segmentation())
    assert rows == [] and summary["error"].startswith("not audio or corrupt")


def test_settings_are_checked_against_the_run(tiny):
    run, audio, pred = tiny
    with pytest.raises(TimelineError, match="at most 2 s, the run's shortest backbone input"):
        Segmentation(window_s=3.0).resolved(pred)
    with pytest.raises(TimelineError, match="at most the window"):
        Segmentation(window_s=1.0, hop_s=1.5).resolved(pred)


def _speech(tmp_path):
    """1 s silence, a spoken sentence, 2 s silence, another sentence, 1 s silence (22.05 kHz)."""
    from jax_ifmvse.data.tts import synthesize

    a, sr = synthesize("The quick brown fox jumps over the lazy dog near the river bank.")
    b, _ = synthesize("I am so happy today, this is wonderful news.", pitch=70)
    z = np.zeros(sr, np.int16)
    f = tmp_path / "talk.wav"
    sf.write(f, np.concatenate([z, a, z, z, b, z]), sr)
    speech = [(1.0, 1.0 + len(a) / sr), (3.0 + len(a) / sr, 3.0 + (len(a) + len(b)) / sr)]
    return f, speech


def test_command_writes_rows_summaries_plots_and_exits_1_on_a_failed_file(tiny, tmp_path):
    from jax_ifmvse.cli import cli

    run, audio, pred = tiny
    talk, speech = _speech(tmp_path)
    (tmp_path / "junk.wav").write_text("not audio")
    out = tmp_path / "seg.csv"
    args = ["predict", str(talk), str(tmp_path / "junk.wav"), "--run", str(run), "--segments",
            "fixed", "--out", str(out), "--plots", str(tmp_path / "png")]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1, res.output
    assert "junk.wav: not audio or corrupt" in res.output
    with open(out) as f:
        rows = list(csv.DictReader(f))
    dur = sf.info(str(talk)).duration
    assert [float(r["start_s"]) for r in rows] == [2.0 * k for k in range(len(rows))]
    assert_within(float(rows[-1]["end_s"]), dur, written(6, dur), "last end, 6 decimals")
    assert {"category", "category_prob", "Angry", "Neutral"} <= set(rows[0])
    summaries = json.loads((tmp_path / "seg.summary.json").read_text())
    assert [s["segments"] for s in summaries] == [len(rows), 0]
    assert (tmp_path / "png" / "talk.timeline.png").stat().st_size > 5000

    # VAD: rows only inside the spoken sentences, good file alone exits 0, JSON Lines.
    out = tmp_path / "vad.jsonl"
    res = CliRunner().invoke(cli, ["predict", str(talk), "--run", str(run), "--segments", "vad",
                                   "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) >= 2 and all(r["end_s"] - r["start_s"] <= 2.0 + 1e-9 for r in rows)
    for r in rows:  # each segment lies in a sentence (VAD edges within 0.2 s)
        assert any(a - 0.2 <= r["start_s"] and r["end_s"] <= b + 0.2 for a, b in speech), r
    for a, b in speech:  # and each sentence is covered
        assert any(r["start_s"] < b and r["end_s"] > a for r in rows)
    summary = json.loads((tmp_path / "vad.summary.json").read_text())[0]
    assert summary["speech_s"] == pytest.approx(sum(b - a for a, b in speech), abs=0.5)

    res = CliRunner().invoke(cli, ["predict", str(talk), "--run", str(run), "--segments",
                                   "fixed", "--out", str(tmp_path / "x.json")])  # fmt: skip
    assert res.exit_code != 0 and "must end in .csv or .jsonl" in res.output


def test_serve_streams_segments_as_json_lines_with_the_same_limits(tiny, tmp_path):
    """POST /segments on an in-process server: the rows `timeline_file` gives, then a summary;
    bad uploads get /predict's JSON errors; a corrupt tail ends with the summary's error."""
    import threading
    import time

    import httpx
    import uvicorn
    from test_serve import free_port, wait_ready

    from jax_ifmvse.serve import Limits, create_app

    run, audio, pred = tiny
    long = tmp_path / "long.wav"
    sf.write(long, np.concatenate([sf.read(audio / f"u{i:02d}.wav")[0] for i in (12, 8, 10)]),
             16000)  # fmt: skip
    want, _ = timeline_file(pred, long, Segmentation())
    bound, pbound = _bounds(run, pred, len(want))  # the server batches the segments otherwise
    limits = Limits(max_timeline_bytes=400_000, max_timeline_s=8.0, segment_batch=2)
    app = create_app(run, limits, predictor=pred)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wav = {"content-type": "audio/wav"}
    try:
        t_end = time.monotonic() + 30
        while not server.started and time.monotonic() < t_end:
            time.sleep(0.05)
        wait_ready(url, 120)
        with httpx.Client(base_url=url, timeout=60) as c:
            with c.stream("POST", "/segments?name=ep.wav", content=long.read_bytes(),
                          headers=wav) as r:  # fmt: skip
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("application/x-ndjson")
                lines = [json.loads(line) for line in r.iter_lines() if line]
            rows, summary = lines[:-1], lines[-1]["summary"]
            assert len(rows) == len(want) == 3  # 2.0 + 1.5 + 1.75 s in 2-s windows
            for got, w, b, pb in zip(rows, want, bound, pbound, strict=True):
                assert got["file"] == "ep.wav" and (got["start_s"], got["end_s"]) == (
                    w.start_s, w.end_s)  # fmt: skip
                assert_within([got[a] for a in ATTRIBUTES], w.values, b, "served segment")
                assert_within(list(got["probabilities"].values()),
                              list(w.probabilities.values()), pb, "served probabilities")  # fmt: skip
                assert got["category"] == w.category and got["flags"] == list(w.flags)
            assert_exceeds(list(rows[1]["probabilities"].values()),
                           list(want[0].probabilities.values()), pbound[0],
                           "served: the next segment's probabilities")  # fmt: skip
            assert summary["file"] == "ep.wav" and summary["segments"] == 3
            assert summary["error"] is None
            assert c.get("/info").json()["served"]["segments"] == 3

            bad = [
                (c.post("/segments", content=b"x", headers={"content-type": "text/plain"}), 415,
                 "content type 'text/plain'"),
                (c.post("/segments?name=j.wav", content=b"junk" * 10, headers=wav), 422,
                 "j.wav: not audio or corrupt"),
                (c.post("/segments?window_s=3", content=long.read_bytes(), headers=wav), 422,
                 "at most 2 s"),
                (c.post("/segments?hop_s=x", content=long.read_bytes(), headers=wav), 422,
                 "hop_s='x': not a number"),
                (c.post("/segments", content=b"", headers=wav), 400, "empty file"),
                (c.post("/segments", content=b"\0" * 400_001, headers=wav), 413, "over the limit"),
            ]  # fmt: skip
            for r, status, text in bad:
                assert r.status_code == status and text in r.json()["error"], r.text
                assert r.json()["status"] == status
            x = np.zeros(int(9 * 16000), np.float32)
            r = c.post("/segments", content=_wav(x), headers=wav)
            assert r.status_code == 422 and "absurd length 9 s (limit 8 s)" in r.json()["error"]

            cut = _wav(tone(6.0, 16000, 150, 1))[: 44 + 2 * 50000]  # 3.1 s of the 6 promised
            r = c.post("/segments", content=cut, headers=wav)
            lines = [json.loads(line) for line in r.text.splitlines()]
            assert r.status_code == 200 and len(lines) == 2  # [0, 2) kept, then the summary
            assert lines[-1]["summary"]["error"].startswith("decoding stopped at 3.12 s of 6.00 s")
    finally:
        server.should_exit = True
        thread.join(15)


def _wav(x: np.ndarray, sr: int = 16000) -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_a_label_mean_stand_in_is_never_shown_as_a_segment_score(tmp_path):
    """A run without attribute heads: the ensemble's Train label mean is dropped, the class kept."""
    from jax_ifmvse.predictor import Prediction, Scored

    class ClassOnly:  # predict_audio as Predictor answers for a task-1-only run
        sources = ()

        def predict_audio(self, clips):
            p = Prediction(clips[0][0], (3.0, 4.0, 4.0), None, "Train label mean",
                           category="N", category_prob=0.9, probabilities={"Neutral": 0.9})  # fmt: skip
            return [Scored(p, 1.0, (), None) for _ in clips]

    f = tmp_path / "a.wav"
    sf.write(f, tone(3.0, 16000, 200, 0), 16000)
    rows, summary = timeline_file(ClassOnly(), f, Segmentation(window_s=1.0))
    assert len(rows) == 3 and all(r.values is None and r.category == "N" for r in rows)
    assert summary["mean"] is None
    _assert_shares(summary["share_of_time"], rows)
    assert summary["share_of_time"]["N"] > 1 - 1e-15 and summary["share_of_time"]["A"] == 0


def _exact_mean(w, v) -> np.ndarray:
    """The time-weighted mean of rows `v` (S, 3) with weights `w` (S,), correctly rounded sums."""
    return np.array([math.fsum(w * v[:, j]) / math.fsum(w) for j in range(v.shape[1])])


def _mean_bound(w, v) -> np.ndarray:
    """`summarize`'s float64 mean vs `_exact_mean`: numerator (one product, S-1 sums) and
    denominator (S-1 sums) within gamma_S each, its division one u, the reference's product and
    division two more: gamma_{2S+3} sum|w v| / sum w."""
    return gamma(2 * len(w) + 3, U64) * (w[:, None] * np.abs(v)).sum(0) / w.sum()


def _assert_shares(share: dict, rows) -> None:
    """The summary's share of scored time per class vs correctly rounded sums (each share: the
    total's S-1 sums, one division, the class's n-1 sums: gamma_{2S} of it; their sum within one
    more gamma_8 of 1), and the share by segment count (a wrong computation) outside that."""
    rows = [r for r in rows if r.category is not None]
    d = {r.category: [] for r in rows}
    for r in rows:
        d[r.category].append(r.end_s - r.start_s)
    total = math.fsum(x for xs in d.values() for x in xs)
    want = {c: math.fsum(d.get(c, [])) / total for c in share}
    bound = gamma(2 * len(rows), U64) * max(want.values())
    assert_within(list(share.values()), list(want.values()), bound, "share of time per class")
    assert_within(sum(share.values()), 1.0, bound * len(share) + gamma(len(share), U64),
                  "the shares' sum")  # fmt: skip
    if len({r.end_s - r.start_s for r in rows}) > 1 and len(d) > 1:
        by_count = [len(d.get(c, [])) / len(rows) for c in share]
        assert_exceeds(by_count, list(want.values()), bound, "share by segment count")


def test_summary_weights_by_time_and_shares_scored_time_per_class():
    """`summarize` on hand-made rows: unequal durations and classes, so the time weighting shows."""
    spans = [(0.0, 2.0), (2.0, 2.5), (2.5, 4.0), (4.0, 5.25)]
    vals = [(3.1, 5.7, 2.2), (6.4, 1.3, 4.8), None, (4.05, 2.9, 6.6)]
    cats = ["H", "A", "A", "N"]
    rows = [SegmentRow("f.wav", i, a, b, v, category=c, category_prob=0.5)
            for i, ((a, b), v, c) in enumerate(zip(spans, vals, cats, strict=True))]  # fmt: skip
    plan = Plan("f.wav", 16000, 84000, 1, ((0, 84000),), Segmentation(window_s=2.0, hop_s=2.0))
    out = summarize(plan, rows, Decode(frames=84000))
    scored = [r for r in rows if r.values is not None]
    w = np.array([r.end_s - r.start_s for r in scored])
    v = np.array([r.values for r in scored], np.float64)  # (3, 3)
    got = np.array([out["mean"][a] for a in ATTRIBUTES])
    assert_within(got, _exact_mean(w, v), _mean_bound(w, v), "summary mean")
    assert_exceeds(v.mean(0), _exact_mean(w, v), _mean_bound(w, v), "the unweighted mean")
    # The spread: sqrt of the weighted mean square deviation. Each term's subtraction, square
    # and product, the sums and the division: gamma_{2S+3} of the variance, halved by the sqrt,
    # + u, + the references' roundings; the mean's error d enters as sqrt(var + d^2) (the cross
    # term is 0 at the weighted mean): d^2 / (2 std).
    dev = np.array([math.fsum(w * (v[:, j] - _exact_mean(w, v)[j]) ** 2) / math.fsum(w)
                    for j in range(3)])  # fmt: skip
    std = np.array([out["std"][a] for a in ATTRIBUTES])
    sbound = gamma(2 * len(w) + 8, U64) * np.sqrt(dev) + _mean_bound(w, v) ** 2 / (2 * np.sqrt(dev))
    assert_within(std, np.sqrt(dev), sbound, "summary std")
    assert_exceeds(v.std(0), np.sqrt(dev), sbound, "the unweighted std")
    # Shares over all four rows (a class without scores still counts its time).
    assert out["share_of_time"]["A"] > out["share_of_time"]["N"] > 0
    _assert_shares(out["share_of_time"], rows)
