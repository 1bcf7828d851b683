"""Multi-host extraction with real processes on loopback: one plan, agreement, lost peers.

Every scenario of issue 19 runs here with two or three `ifmvse extract` processes, a tiny
Whisper and a 40-clip corpus; each is bounded in time. The store either ends equal to a
single-process run with every row filled, or every process exits non-zero with a one-line error
and a rerun completes it.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from tiny_models import save_tiny_whisper

from featurestore import FeatureStore
from featurestore.jobs import Job, JobError, jobs_dir, share_order
from jax_ifmvse.cli import cli
from jax_ifmvse.distributed import Layout, Session, first_difference, resolve_layout

HERE = Path(__file__).parent
N_CLIPS = 40
TIMEOUT = 6  # --peer-timeout in these tests: seconds before a silent peer counts as lost


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Corpus of 40 short clips, two tiny Whispers (and a third with other weights), reference."""
    d = tmp_path_factory.mktemp("mh")
    rng = np.random.default_rng(1)
    rows = ["path,split,arousal,valence,dominance"]
    for i in range(N_CLIPS):
        n = int(rng.uniform(0.2, 1.6) * 16000)
        x = 0.2 * np.sin(2 * np.pi * (120 + 17 * i) * np.arange(n) / 16000)
        sf.write(d / f"c{i}.wav", x.astype(np.float32), 16000)
        rows.append(f"c{i}.wav,{('Train', 'Development', 'Test1')[i % 3]},{i % 7 + 1},3,4")
    (d / "m.csv").write_text("\n".join(rows) + "\n")
    kw = dict(d_model=16, encoder_attention_heads=2, encoder_ffn_dim=32)
    ckpt = {k: save_tiny_whisper(d / k, seed=s, **kw) for k, s in (("a", 0), ("b", 1), ("c", 2))}
    base = [
        "--manifest",
        str(d / "m.csv"),
        "--max-seconds",
        "2",
        "--set",
        "extract.whisper_window_s=2",
        "--set",
        "extract.workers=1",
        "--set",
        f"extract.cache_dir={d / 'cache'}",
        "--peer-timeout",
        str(TIMEOUT),
    ]
    two = ["--backbone", f"a={ckpt['a']}", "--backbone", f"b={ckpt['b']}"]
    return {"dir": d, "base": base, "ckpt": ckpt, "two": two}


@pytest.fixture(scope="module")
def reference(setup):
    """The store one process makes of the same job."""
    ref = setup["dir"] / "ref.h5"
    r = _proc([*setup["base"], *setup["two"], "--store", str(ref)]).communicate(timeout=300)
    assert FeatureStore(ref).filled("b").all(), r
    return ref


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _proc(args, delay=0.0, env=None):
    env = {**os.environ, **(env or {}), "IFMVSE_TEST_ITEM_DELAY": str(delay)}
    return subprocess.Popen(
        [sys.executable, str(HERE / "multihost_job.py"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _hosts(setup, store, n, port, *, ids=None, counts=None, extra=None, delays=None, more=()):
    """Start n processes of one job; per-process ids, counts, extra args and delays."""
    out = []
    for k in range(n):
        args = [
            *setup["base"],
            *more,
            *(extra[k] if extra else setup["two"]),
            "--store",
            str(store),
            "--coordinator",
            f"localhost:{port}",
            "--num-processes",
            str(counts[k] if counts else n),
            "--process-id",
            str(ids[k] if ids else k),
        ]
        out.append(_proc(args, delay=delays[k] if delays else 0.0))
    return out


def _wait(procs, limit=240):
    """(returncode, stdout, stderr) per process; every process must end within `limit` s."""
    t0 = time.monotonic()
    res = []
    for p in procs:
        o, e = p.communicate(timeout=max(1.0, limit - (time.monotonic() - t0)))
        res.append((p.returncode, o, e))
    return res, time.monotonic() - t0


def _one_line_error(rc, err, *words):
    """Non-zero exit, exactly one line on stderr, no traceback, naming every word."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc not in (0, None) and rc > 0, (rc, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("Error: ") and all(w in lines[0] for w in words), lines[0]


def _assert_equal_to_reference(reference, store):
    s, ref = FeatureStore(store), FeatureStore(reference)
    assert s.pending_journal_files == 0
    for name in ("a", "b"):
        assert s.filled(name).all(), (name, int(s.filled(name).sum()))
        got, want = s.load(None, [name]), ref.load(None, [name])
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_allclose(got.features[name], want.features[name], atol=1e-5)


def _slurm(k, n, port):
    """The variables srun sets for task k of n on one node (plus the port jax would read)."""
    return {
        "SLURM_JOB_ID": "42",
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_NTASKS": str(n),
        "SLURM_PROCID": str(k),
        "SLURM_LOCALID": "0",
        "JAX_COORDINATOR_PORT": str(port),
    }


@pytest.mark.slow  # one whole job that runs ~20 s longer by design
def test_slow_peer_two_backbones_finishing_apart_under_slurm(setup, reference, tmp_path):
    """Process 1 is ~20 s (> 3 peer timeouts) slower: no row lost, finalized once at the end.

    The layout comes from SLURM's variables through `--distributed` (no three flags).
    """
    store = tmp_path / "s.h5"
    port = _free_port()
    args = [*setup["base"], *setup["two"], "--store", str(store), "--distributed"]
    procs = [_proc(args, delay=[0.0, 0.5][k], env=_slurm(k, 2, port)) for k in range(2)]
    res, _ = _wait(procs)
    assert all(rc == 0 for rc, _, _ in res), res
    assert [f"process {k}/2" in o for k, (_, o, _) in enumerate(res)] == [True, True]
    _assert_equal_to_reference(reference, store)
    (job,) = [d for d in jobs_dir(store).iterdir()]
    done = {k: (job / f"done-p{k}.json").stat().st_mtime for k in range(2)}
    assert done[1] - done[0] > 2 * TIMEOUT  # finished apart, and nobody timed out
    # Whoever sees both shares done first finalizes: usually process 1, the last to finish, but
    # process 0's poll may see its done file first. Either way once, after both shares.
    final = json.loads((job / "finalized.json").read_text())
    assert final["by"] in (0, 1) and final["at"] >= max(done.values()), (final, done)
    plan = json.loads((job / "plan.json").read_text())
    assert sorted(plan["order"]["b"]) == list(range(N_CLIPS))  # every row planned, once


def test_other_weights_under_same_name_stop_both_before_writing(setup, tmp_path):
    store = tmp_path / "s.h5"
    c = setup["ckpt"]
    extra = [setup["two"], ["--backbone", f"a={c['a']}", "--backbone", f"b={c['c']}"]]
    res, took = _wait(_hosts(setup, store, 2, _free_port(), extra=extra), limit=120)
    for rc, _, err in res:
        _one_line_error(rc, err, "backbone b sha256", "process 0 has", "process 1 has")
    assert not store.exists() and not jobs_dir(store).exists()  # nothing written


def test_process_count_mismatch_either_way(setup, tmp_path):
    for counts in ([2, 3], [3, 2]):
        store = tmp_path / f"s{counts[0]}.h5"
        res, took = _wait(_hosts(setup, store, 2, _free_port(), counts=counts), limit=60)
        for rc, _, err in res:
            _one_line_error(rc, err, "num_processes", f"process 0 has {counts[0]}")
        assert not store.exists()


def test_duplicate_process_id_stops_all_three(setup, tmp_path):
    store = tmp_path / "s.h5"
    res, took = _wait(_hosts(setup, store, 3, _free_port(), ids=[0, 1, 1], counts=[2, 2, 2]))
    for rc, _, err in res:
        _one_line_error(rc, err, "process id 1 given twice (from 127.0.0.1 and 127.0.0.1)")
    assert not store.exists()


@pytest.mark.slow  # two whole jobs with a kill between (~25 s CPU)
def test_lost_peer_one_line_error_then_rerun_completes(setup, reference, tmp_path):
    store = tmp_path / "s.h5"
    port = _free_port()
    small = ["--batch-seconds", "4"]  # 2 clips a batch: a kill lands between journal files
    procs = _hosts(setup, store, 2, port, delays=[0.3, 0.3], more=small)
    journal = store.with_name(store.name + ".journal") / "batches" / "a"
    t0 = time.monotonic()
    while not list(journal.glob("p1-*")) and time.monotonic() - t0 < 120:
        time.sleep(0.1)  # kill process 1 once it has written something
    assert procs[0].poll() is None
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    res, _ = _wait(procs[:1], limit=TIMEOUT + 30)
    assert time.monotonic() - killed < TIMEOUT + 30
    _one_line_error(res[0][0], res[0][2], "process 1 lost", "rerun")
    kept = int(FeatureStore(store).filled("a").sum())
    assert 0 < kept < N_CLIPS  # what both wrote is kept
    r = CliRunner().invoke(cli, ["store", "finalize", str(store)])
    assert r.exit_code == 0 and FeatureStore(store).pending_journal_files == 0, r.output
    assert f"a: {N_CLIPS - kept} of {N_CLIPS} rows missing" in r.output
    assert "shares of processes [0, 1] not done" in r.output and "process 1 lost" in r.output
    res, _ = _wait(_hosts(setup, store, 2, _free_port(), more=small))
    assert all(rc == 0 for rc, _, _ in res), res
    _assert_equal_to_reference(reference, store)


def test_peer_silent_before_the_plan_stops_process_zero_with_one_line(setup, tmp_path):
    """A peer that joined and then went silent (as if SIGSTOPped): one line after the timeout."""
    port = _free_port()
    (p0,) = _hosts(setup, tmp_path / "s.h5", 1, port, counts=[2])
    for _ in range(300):
        with contextlib.suppress(OSError):
            peer = socket.create_connection(("localhost", port))
            break
        time.sleep(0.1)
    try:
        with peer:  # joins as process 1, then neither reads nor sends
            peer.sendall(b'{"hello": 1, "num_processes": 2}\n')
            res, took = _wait([p0], limit=60)
    finally:
        p0.kill()
    _one_line_error(res[0][0], res[0][2], f"process 1 sent nothing for {TIMEOUT} s", "stopped")
    assert not (tmp_path / "s.h5").exists()


# -- in-process checks of the pieces (fast) ----------------------------------------------------


def _plan_store(tmp_path, n, rows=10):
    store = tmp_path / "s.h5"
    durations = np.linspace(3.0, 0.5, rows)
    order = {"w": share_order(np.arange(rows), durations)}
    job_id, sha = Job.create(store, n, order, {"num_processes": n})
    return store, job_id, sha, order


def test_job_shares_cover_every_planned_row_once(tmp_path):
    store, job_id, sha, order = _plan_store(tmp_path, 3)
    shares = [Job.open(store, job_id, k, sha).rows("w") for k in range(3)]
    together = np.concatenate(shares)
    assert sorted(together) == list(range(10)) and len(together) == 10
    assert list(order["w"][:3]) == [9, 8, 7]  # shortest first, so shares mix lengths
    with pytest.raises(JobError, match="differs"):
        Job.open(store, job_id, 1, "0" * 64)
    with pytest.raises(JobError, match="shares"):
        Job.open(store, "nope", 1, sha)


def test_job_sees_lost_and_failed_peers(tmp_path):
    store, job_id, sha, _ = _plan_store(tmp_path, 2)
    p0, p1 = (Job.open(store, job_id, k, sha) for k in range(2))
    p0.start(peer_timeout=0.6, interval=0.1)
    p1.beat()
    p0.check()  # p1 just beat: fine
    time.sleep(1.0)
    with pytest.raises(JobError, match="process 1 lost"):
        p0.check()
    p1.fail("disk full\nmore detail")
    time.sleep(0.1)  # check() looks at the files at most twice a heartbeat interval
    with pytest.raises(JobError, match="process 1 failed: disk full; rows written"):
        p0.check()
    p0.stop()


def test_job_finish_waits_for_live_peers_and_finalizes_once(tmp_path):
    import threading

    store, job_id, sha, _ = _plan_store(tmp_path, 2)
    jobs = [Job.open(store, job_id, k, sha).start(peer_timeout=1.0, interval=0.1) for k in range(2)]
    calls, results = [], {}
    first = threading.Thread(target=lambda: results.update(p0=jobs[0].finish({}, calls.append)))
    first.start()
    time.sleep(3.0)  # three peer timeouts: p1 is slow but alive, so p0 keeps waiting
    assert first.is_alive() and not calls
    results["p1"] = jobs[1].finish({}, lambda: calls.append(1))
    first.join(timeout=10)
    assert calls == [1] and results == {"p0": False, "p1": True}
    for j in jobs:
        j.stop()


def _sessions(n, prints, make_plan=lambda: {"job": "x"}, timeout=10.0, only=None, between=None):
    """Run n (or `only`) Sessions in threads on one loopback port; each one's result or error.

    `between[k](session)` runs in process k after its join, before its agree (model loading).
    """
    import threading

    port, out = _free_port(), {}

    def run(k):
        s = Session(Layout(f"localhost:{port}", n, k), timeout=timeout)
        try:
            s.join()
            if between and k in between:
                between[k](s)
            out[k] = s.agree(prints[k], make_plan)
            s.ack()
        except Exception as e:  # noqa: BLE001 - the test compares what each process raised
            out[k] = e

    threads = [threading.Thread(target=run, args=(k,)) for k in range(only or n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return {**out, "port": port} if only else out


def test_session_sends_one_plan_or_one_error_to_all():
    same = {"num_processes": 3, "backbone w sha256": "aa"}
    plans = iter([{"job": "only-once"}])
    out = _sessions(3, [same] * 3, make_plan=lambda: next(plans))
    assert out == {k: {"job": "only-once"} for k in range(3)}
    other = {**same, "backbone w sha256": "bb"}
    out = _sessions(3, [same, same, other])
    assert all(isinstance(e, JobError) for e in out.values())
    assert {str(e) for e in out.values()} == {
        "processes disagree on backbone w sha256: process 0 has aa, process 2 has bb"
    }


def test_session_absent_process_fails_the_others_within_the_timeout():
    t0 = time.monotonic()
    out = _sessions(3, [{"a": 1}] * 3, timeout=1.0, only=2)
    assert time.monotonic() - t0 < 10
    port = out.pop("port")
    want = (
        f"processes [2] did not join within 1 s (coordinator localhost:{port}; see --peer-timeout)"
    )
    assert [str(e) for e in out.values()] == [want] * 2


def _stopped(seconds):
    """Between join and agree: as a SIGSTOPped process, neither read nor send for `seconds`."""

    def hang(session):
        getattr(session, "_stop_beat", lambda: None)()  # the keep-alive thread stops too
        time.sleep(seconds)

    return hang


def test_session_stopped_peer_fails_the_others_after_the_timeout():
    t0 = time.monotonic()
    out = _sessions(3, [{"a": 1}] * 3, timeout=1.0, between={2: _stopped(5.0)})
    want = "process 2 sent nothing for 1 s while process 0 waited for every fingerprint"
    assert all(isinstance(out[k], JobError) and want in str(out[k]) for k in (0, 1)), out
    assert "see --peer-timeout" in str(out[0])
    assert time.monotonic() - t0 < 10


def test_session_stopped_process_zero_fails_the_others_after_the_timeout():
    t0 = time.monotonic()
    out = _sessions(3, [{"a": 1}] * 3, timeout=1.0, between={0: _stopped(5.0)}, only=3)
    port = out.pop("port")
    want = (
        f"process 0 (localhost:{port}) sent nothing for 1 s before the plan;"
        " is it stopped or hung? (see --peer-timeout)"
    )
    assert [str(out[k]) for k in (1, 2)] == [want] * 2, out
    assert time.monotonic() - t0 < 10


def test_session_peers_loading_longer_than_the_timeout_keep_the_job():
    # Loading (or converting) a large backbone takes minutes: alive is not silent.
    slow = {0: lambda s: time.sleep(3.0), 2: lambda s: time.sleep(2.0)}
    out = _sessions(3, [{"a": 1}] * 3, timeout=0.8, between=slow)
    assert out == {k: {"job": "x"} for k in range(3)}


def test_session_stray_clients_are_turned_away():
    def strays(session):
        port = session.port
        for line in (b"5\n", b'"hello"\n', b'{"hello": "x", "num_processes": 2}\n', b""):
            with socket.create_connection(("localhost", port)) as c:
                c.sendall(line)
            time.sleep(0.1)

    out = _sessions(2, [{"a": 1}] * 2, timeout=2.0, between={1: strays})
    assert out == {0: {"job": "x"}, 1: {"job": "x"}}


def test_session_peer_stalling_mid_message_is_a_one_line_job_error():
    import threading

    port, out = _free_port(), {}

    def zero():
        try:
            out[0] = Session(Layout(f"localhost:{port}", 2, 0), timeout=1.0)
            out[0].join()
            out[0] = out[0].agree({"a": 1}, lambda: {"job": "x"})
        except Exception as e:  # noqa: BLE001 - the test looks at what it raised
            out[0] = e

    t = threading.Thread(target=zero)
    t.start()
    for _ in range(50):
        try:
            c = socket.create_connection(("localhost", port))
            break
        except OSError:
            time.sleep(0.1)
    with c:
        c.sendall(b'{"hello": 1, "num_processes": 2}\n')
        got = b""
        while b"joined" not in got:  # keep-alives may come first
            got += c.recv(4096)
        c.sendall(b'{"fingerprint": {"a"')  # and then nothing: a line that never ends
        t.join(timeout=10)
    assert isinstance(out[0], JobError), out
    assert (
        str(out[0]) == "process 1 sent part of a message, then nothing for 1 s (see --peer-timeout)"
    )


def test_session_second_process_zero_cannot_listen():
    port = _free_port()
    first = Session(Layout(f"localhost:{port}", 2, 0), timeout=5.0)
    first._server = first._listen()
    with pytest.raises(JobError, match=f"cannot listen on port {port}.*another process 0"):
        Session(Layout(f"localhost:{port}", 2, 0), timeout=5.0).join()
    first.close()


def test_session_plan_failure_reaches_every_process():
    def broken():
        raise ValueError("/x/s.h5: id set conflicts with the store's")

    out = _sessions(2, [{"a": 1}] * 2, make_plan=broken)
    assert isinstance(out[1], JobError) and "id set conflicts" in str(out[1])
    assert isinstance(out[0], ValueError)


def test_resolve_flags_or_cluster(monkeypatch):
    for var in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "PMIX_SERVER_URI2"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_layout(None, None, None) is None
    assert resolve_layout("h:1", 2, 1) == Layout("h:1", 2, 1)
    with pytest.raises(JobError, match="need 0 <= process id"):
        resolve_layout("h:1", 2, 2)
    with pytest.raises(JobError, match="HOST:PORT"):
        resolve_layout("h", 2, 1)
    with pytest.raises(JobError, match="no cluster environment.*--coordinator"):
        resolve_layout(None, None, None, distributed=True)
    assert first_difference({"a": 1, "b": 2}, {"a": 1, "b": 3}) == ("b", 2, 3)
    assert first_difference({"a": 1}, {"a": 1}) is None


def test_cli_layout_error_is_one_line_and_debug_shows_it(tmp_path):
    args = ["extract", "--manifest", str(tmp_path / "m.csv"), "--backbone", "w=x"]
    args += ["--out", str(tmp_path / "s.h5"), "--num-processes", "2", "--process-id", "2"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        "Error: --process-id 2 --num-processes 2: need 0 <= process id < processes"
    ]
    r = CliRunner().invoke(cli, [*args, "--debug"])
    assert isinstance(r.exception, JobError) and r.exit_code == 1


def test_store_finalize_of_a_missing_store_is_one_line(tmp_path):
    r = CliRunner().invoke(cli, ["store", "finalize", str(tmp_path / "none.h5")])
    assert r.exit_code == 1 and r.output.strip() == f"Error: {tmp_path / 'none.h5'}: no such store"
    assert list(tmp_path.iterdir()) == []  # no lock file or anything else left behind
