"""`ifmvse serve`: the real server process on a free localhost port, called with httpx."""

from __future__ import annotations

import concurrent.futures as cf
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from tiny_run import build_tiny_run, tone
from tolerances import assert_exceeds, assert_within, batch_path_bound

from jax_ifmvse.config import ATTRIBUTES
from jax_ifmvse.predict import open_predictor, predict_files

httpx = pytest.importorskip("httpx")
ROOT = Path(__file__).resolve().parents[1]
MAX_UPLOAD = 1024 * 1024  # the server below runs with --max-upload-mb 1


def free_port() -> int:
    """A port nobody listens on now (the kernel's pick for port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wav_bytes(x: np.ndarray, sr: int = 16000, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    """Encode samples as an audio file in memory."""
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def wait_ready(url: str, deadline_s: float, proc=None) -> list[int]:
    """Poll /health until 200; returns the status codes seen on the way."""
    seen = []
    t_end = time.monotonic() + deadline_s
    while time.monotonic() < t_end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            seen.append(r.status_code)
            if r.status_code == 200:
                return seen
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {deadline_s} s (saw {seen})")


@pytest.fixture(scope="module")
def tiny(tiny_run, tmp_path_factory):
    """The session's tiny run plus clips: four ordinary, one longer than the run's 2-s crop, one
    silent."""
    root = tmp_path_factory.mktemp("serve")
    run = tiny_run.run
    clips = root / "clips"
    clips.mkdir()
    files = []
    for i in range(4):
        files.append(clips / f"c{i}.wav")
        sf.write(files[-1], tone(0.7 + 0.4 * i, 16000, 180 + 37 * i, 100 + i), 16000)
    files.append(clips / "long.wav")
    sf.write(files[-1], tone(3.0, 22050, 220, 7), 22050)
    files.append(clips / "silent.wav")
    sf.write(files[-1], np.zeros(16000, np.float32), 16000)
    files.append(clips / "short.wav")  # 100 samples: under one 25-ms analysis frame
    sf.write(files[-1], tone(100 / 16000, 16000, 300, 9), 16000)
    pred = open_predictor(run)  # `ifmvse predict`'s path
    seen = []  # the heads' inputs (measured for the bound's magnitudes only)
    score = pred.score
    pred.score = lambda f: seen.append(f) or score(f)
    preds = [s.prediction for s in pred.predict_files(files)]
    assert all(p.values is not None for p in preds) and len(seen) == 1, len(seen)
    # The server batches requests otherwise (other rows, padding): two orders of the same maths.
    bound = batch_path_bound(run, score, seen[0])[: len(files)]  # (N, 3)
    expected = {p.file: (p.values, b) for p, b in zip(preds, bound, strict=True)}
    return run, files, expected


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """`ifmvse serve` as a subprocess on a free port; killed at the end."""
    run, _, _ = tiny
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env["IFMVSE_COMPILE_CACHE"] = "off"
    cmd = [
        sys.executable, "-m", "jax_ifmvse.cli", "serve", "--run", str(run), "--port", str(port),
        "--window-ms", "30", "--max-upload-mb", "1", "--max-audio-s", "10", "--timeout-s", "60",
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 180, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        print(log.read_text()[-3000:])


def _check(result: dict, want) -> None:
    values, bound = want
    got = [result[a] for a in ATTRIBUTES]
    assert_within(got, values, bound, "served vs predict")
    assert all(1.0 <= v <= 7.0 for v in got)


def test_serve_equals_predict_raw_and_multipart(tiny, server):
    _, files, expected = tiny
    with httpx.Client(base_url=server, timeout=60) as c:
        r = c.post("/predict", content=files[0].read_bytes(), headers={"content-type": "audio/wav"})
        assert r.status_code == 200, r.text
        (res,) = r.json()["results"]
        _check(res, expected[str(files[0])])
        # Another clip's values are outside the bound: a mix-up of rows fails it.
        assert_exceeds(expected[str(files[1])][0], *expected[str(files[0])], "another clip")
        assert res["file"] == "body" and res["flags"] == []
        assert res["duration_s"] == 0.7  # 11200 frames / 16000 Hz, correctly rounded

        multi = [("f", (p.name, p.read_bytes(), "audio/wav")) for p in files]
        r = c.post("/predict", files=multi)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
    assert [x["file"] for x in results] == [p.name for p in files]
    for x, p in zip(results, files, strict=True):
        _check(x, expected[str(p)])
    flags = {x["file"]: x["flags"] for x in results}
    assert flags["long.wav"] == ["cropped", "resampled from 22050 Hz"]
    assert flags["silent.wav"] == ["silent"]
    assert flags["short.wav"] == ["short"]
    assert flags["c1.wav"] == []
    assert {x["fallback"] for x in results} == {""}  # every view heard: the full ensemble
    # Distinct clips give distinct numbers, so equality is not a constant echoed back.
    vals = np.array([[x[a] for a in ATTRIBUTES] for x in results[:4]])  # (4, 3)
    assert np.ptp(vals, axis=0).max() > 1e-4


def test_concurrent_requests_are_batched_and_equal(tiny, server):
    _, files, expected = tiny
    with httpx.Client(base_url=server, timeout=60) as c:
        before = c.get("/info").json()["served"]
        order = [files[i % 4] for i in range(16)]

        def one(p: Path):
            return c.post("/predict", content=p.read_bytes(), headers={"content-type": "audio/wav"})

        with cf.ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(one, order))
        after = c.get("/info").json()["served"]
    for r, p in zip(replies, order, strict=True):
        assert r.status_code == 200, r.text
        _check(r.json()["results"][0], expected[str(p)])
    assert after["clips"] - before["clips"] == 16
    assert after["batches"] - before["batches"] < 16  # some requests shared a batch


def test_info_names_run_sources_sets_weights_limits(tiny, server):
    import json

    run, _, _ = tiny
    info = httpx.get(f"{server}/info", timeout=30).json()
    assert info["run"] == str(run)
    assert info["backbones"]["w"]["source"] == str(run.parent / "tinywhisper")
    assert info["layer_views"] == {"w_mid": "w:1"}
    assert [s["name"] for s in info["score_sets"]] == ["S1", "S2"]
    weights = json.loads((run / "ensemble" / "weights.json").read_text())["attributes"]
    assert info["ensemble_weights"] == {a: weights[a]["weights"] for a in ATTRIBUTES}
    assert info["limits"]["max_upload_bytes"] == MAX_UPLOAD
    assert info["limits"]["max_audio_s"] == 10
    assert info["programs"]["w"] == [[n, 32000] for n in (1, 2, 4, 8)]
    assert info["compile_cache"] is None  # IFMVSE_COMPILE_CACHE=off


def _bad_cases(files) -> list[tuple[str, dict, int, str]]:
    """(name, httpx post kwargs, expected status, words the error must contain)."""
    good = files[0].read_bytes()
    wav = {"content-type": "audio/wav"}
    nan = tone(1.0, 16000, 200, 1)
    nan[100] = np.nan
    inf = tone(1.0, 16000, 200, 1)
    inf[5] = np.inf
    flac = wav_bytes(tone(2.0, 16000, 300, 2), fmt="FLAC")
    return [
        ("not audio", dict(content=b"hello, I am text" * 20, headers=wav), 422, "not audio"),
        ("empty", dict(content=b"", headers=wav), 400, "empty"),
        ("truncated wav", dict(content=good[: len(good) // 2], headers=wav), 422, "truncated"),
        ("truncated flac", dict(content=flac[: len(flac) // 2], headers={"content-type": "audio/flac"}), 422, "corrupt"),
        ("nan", dict(content=wav_bytes(nan, subtype="FLOAT"), headers=wav), 422, "NaN"),
        ("inf", dict(content=wav_bytes(inf, subtype="FLOAT"), headers=wav), 422, "inf"),
        ("json", dict(content=b'{"a": 1}', headers={"content-type": "application/json"}), 415, "not audio"),
        ("no type", dict(content=good), 415, "content type"),
        ("oversize", dict(content=b"\0" * (MAX_UPLOAD + 1), headers=wav), 413, "limit"),
        ("too long", dict(content=wav_bytes(np.zeros(8000 * 12, np.float32), 8000), headers=wav), 422, "over the limit"),
        ("text field", dict(data={"note": "hi"}, files={"f": ("a.wav", good, "audio/wav")}), 400, "not a file"),
        ("empty file", dict(files={"f": ("e.wav", b"", "audio/wav")}), 400, "e.wav: empty"),
        ("one bad of two", dict(files=[("f", ("ok.wav", good, "audio/wav")), ("f", ("x.wav", b"junk" * 50, "audio/wav"))]), 422, "x.wav"),
    ]  # fmt: skip


def test_bad_input_gets_4xx_json_and_server_keeps_serving(tiny, server):
    _, files, expected = tiny
    with httpx.Client(base_url=server, timeout=60) as c:
        for name, kwargs, status, words in _bad_cases(files):
            r = c.post("/predict", **kwargs)
            assert r.status_code == status, (name, r.status_code, r.text)
            body = r.json()
            assert words in body["error"], (name, body)
            assert "\n" not in body["error"]
            ok = c.post("/predict", content=files[1].read_bytes(), headers={"content-type": "audio/wav"})  # fmt: skip
            assert ok.status_code == 200, (name, ok.text)
            _check(ok.json()["results"][0], expected[str(files[1])])
        assert c.get("/nowhere").status_code == 404 and "error" in c.get("/nowhere").json()
        assert c.get("/predict").status_code == 405


class _Gated:
    """A real Predictor whose warm-up and batches wait for the test to open a gate."""

    def __init__(self, inner):
        self.inner = inner
        self.warm_gate = threading.Event()
        self.run_gate = threading.Event()
        self.calls = 0

    @property
    def ready(self):
        return self.inner.ready

    @property
    def warmup_s(self):
        return self.inner.warmup_s

    def warm_up(self):
        assert self.warm_gate.wait(60)
        return self.inner.warm_up()

    def predict_files(self, files):
        self.calls += 1
        assert self.run_gate.wait(60)
        return self.inner.predict_files(files)

    def info(self):
        return self.inner.info()


def test_not_ready_then_ready_full_queue_503_and_timeout_504(tiny):
    """In-process uvicorn (to hold the predictor at chosen moments): health, overload, timeout."""
    import uvicorn

    from jax_ifmvse.predictor import Predictor
    from jax_ifmvse.serve import Limits, create_app

    run, files, expected = tiny
    gated = _Gated(Predictor(run, max_clips=4))
    limits = Limits(max_queue=1, timeout_s=3.0, window_ms=1.0, max_clips=4)
    app = create_app(run, limits, predictor=gated)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    body = dict(content=files[2].read_bytes(), headers={"content-type": "audio/wav"})
    try:
        t_end = time.monotonic() + 30
        while not server.started and time.monotonic() < t_end:
            time.sleep(0.05)
        with httpx.Client(base_url=url, timeout=30) as c:
            r = c.get("/health")
            assert r.status_code == 503 and "warming up" in r.json()["error"]
            assert r.headers["retry-after"] == "5"
            assert c.post("/predict", **body).status_code == 503
            gated.warm_gate.set()
            wait_ready(url, 60)
            with cf.ThreadPoolExecutor(2) as pool:
                first = pool.submit(c.post, "/predict", **body)  # taken by the worker, held
                t_end = time.monotonic() + 10
                while gated.calls == 0 and time.monotonic() < t_end:
                    time.sleep(0.01)
                second = pool.submit(c.post, "/predict", **body)  # waits in the queue (size 1)
                time.sleep(0.3)
                full = c.post("/predict", **body)
                assert full.status_code == 503, full.text
                assert full.headers["retry-after"] == "1" and "busy" in full.json()["error"]
                assert first.result().status_code == 504  # held past timeout_s
                assert "timed out" in first.result().json()["error"]
                assert second.result().status_code == 504
            gated.run_gate.set()
            svc = app.state.service  # the abandoned jobs hold their slots until the worker is back
            t_end = time.monotonic() + 30
            while svc.queue.qsize() and time.monotonic() < t_end:
                time.sleep(0.05)
            r = c.post("/predict", **body)
            assert r.status_code == 200, r.text
            _check(r.json()["results"][0], expected[str(files[2])])
    finally:
        gated.warm_gate.set()
        gated.run_gate.set()
        server.should_exit = True
        thread.join(15)


def test_serve_refuses_a_run_that_cannot_serve_in_one_line(tmp_path):
    from click.testing import CliRunner

    from jax_ifmvse.cli import cli

    res = CliRunner().invoke(cli, ["serve", "--run", str(tmp_path / "nope"), "--port", "1"])
    assert res.exit_code != 0
    assert "manifest.json: not found" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["serve", "--run", str(tmp_path), "--timeout-s", "0"])
    assert res.exit_code != 0 and "--timeout-s 0.0: must be positive" in res.output


def test_predictor_chunks_long_audio_as_the_batch_path_did(tmp_path):
    """A run extracted with long_audio=chunk: the warm Predictor (the one path `predict` and
    `serve` share) equals the batch path (store, heads, ensemble CSV) on the Test1 files."""
    pytest.importorskip("torch")
    import csv

    from jax_ifmvse.predictor import Predictor

    run, audio = build_tiny_run(tmp_path, n=8, extra=("audio.long_audio=chunk",))
    with open(run / "ensemble" / "Test1.csv") as f:  # unclipped; the Predictor clips to 1..7
        batch = {r["FileName"]: [float(r[a]) for a in ATTRIBUTES] for r in csv.DictReader(f)}
    assert sorted(batch) == ["u03.wav", "u07.wav"]  # u07: 2.25 s, two chunks of the 2-s crop
    long = tmp_path / "long.wav"
    sf.write(long, tone(4.5, 22050, 260, 3), 22050)  # three 2-s chunks, the last 0.5 s
    pred = Predictor(run, max_clips=4)
    pred.warm_up()
    seen = []  # the heads' inputs (measured for the bound's magnitudes only)
    score = pred.score
    pred.score = lambda f: seen.append(f) or score(f)
    got = pred.predict_files([audio / k for k in sorted(batch)] + [long])
    # Chunks' features are a length-weighted mean: no larger than the chunks' chain bound.
    bound = batch_path_bound(run, score, seen[0])[: len(batch) + 1]  # (3, 3): + long.wav
    for g, k, b in zip(got[:-1], sorted(batch), bound[:-1], strict=True):
        assert g.prediction.fallback == ""
        assert_within(g.prediction.values, np.clip(batch[k], 1, 7), b, f"chunked {k}")
    assert_exceeds(got[1].prediction.values, np.clip(batch["u03.wav"], 1, 7), bound[0], "u07")
    rs = "resampled from 22050 Hz"  # every file here is at 22.05 kHz, the run at 16 kHz
    assert [g.flags for g in got] == [(rs,), ("chunked", rs), ("chunked", rs)]  # 1.25, 2.25, 4.5 s
    assert got[-1].duration_s == 4.5  # 99225 frames / 22050 Hz
    # `predict_files` is a call of the same Predictor, built anew: same numbers.
    (again,) = predict_files([long], run)
    assert_within(again.values, got[-1].prediction.values, bound[-1], "predict_files again")
    # Chunking changes the numbers: the first 2 s alone score differently.
    sf.write(tmp_path / "head.wav", tone(4.5, 22050, 260, 3)[: 2 * 22050], 22050)
    (head,) = pred.predict_files([tmp_path / "head.wav"])
    assert_exceeds(head.prediction.values, got[-1].prediction.values, bound[-1], "first 2 s")


class _Undecodable(_Gated):
    """The real Predictor, handed an undecodable file in place of every upload (as if a file
    passed the server's header checks and then failed to decode)."""

    def __init__(self, inner, broken: Path):
        super().__init__(inner)
        self.broken = broken
        self.warm_gate.set()
        self.run_gate.set()

    def predict_files(self, files):
        return self.inner.predict_files([self.broken for _ in files])


def test_a_file_no_backbone_could_read_is_422_not_the_label_mean(tiny, tmp_path):
    """`predict` gives such a file no values and its reason; the server refuses it with it."""
    from starlette.testclient import TestClient

    from jax_ifmvse.predictor import Predictor
    from jax_ifmvse.serve import Limits, create_app

    run, files, _ = tiny
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF" + b"\0" * 60)
    inner = Predictor(run, max_clips=4)
    (direct,) = inner.predict_files([broken])
    assert direct.prediction.fallback == "" and direct.prediction.failed
    assert direct.prediction.values is None  # nothing stood in
    assert direct.prediction.error.startswith("not audio or corrupt")
    app = create_app(run, Limits(max_clips=4), predictor=_Undecodable(inner, broken))
    with TestClient(app) as c:
        t_end = time.monotonic() + 60
        while c.get("/health").status_code != 200 and time.monotonic() < t_end:
            time.sleep(0.1)
        body = files[0].read_bytes()
        r = c.post("/predict", content=body, headers={"content-type": "audio/wav"})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err.startswith("body: not audio or corrupt") and "broken.wav" not in err
    assert "\n" not in err
