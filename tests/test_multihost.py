"""Multi-host extraction as stateless shards: real `ifmvse` processes that never talk.

Every scenario of issue 22 runs here with real processes (`tests/multihost_job.py`), each bounded
in time: a tiny Whisper, a 40-clip corpus, batches of 4 so kills land between journal files. The
store either ends equal, bit for bit, to one process's, or the missing rows are named by shard
and a rerun of only those shards completes it. The runs of the real extractor are `slow` (tens
of seconds each on 2 cores); the pieces and the one-line errors that stop before any model is
loaded run in the default suite.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from tiny_models import save_tiny_whisper
from tolerances import assert_exceeds, assert_within, chain, encoder_ops

from featurestore import FeatureStore, StoreWriter, create_store, finalize
from featurestore.jobs import (
    ShardError,
    job_path,
    jobs_dir,
    parse_shard,
    record_job,
    shard_lock,
    shard_of,
    shard_rows,
)
from jax_ifmvse.cli import cli

HERE = Path(__file__).parent
ROOT = HERE.parent
N_CLIPS = 40
LIMIT = 300  # seconds any one process of these tests may take (2 loaded cores)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Corpus of 40 short clips, tiny Whispers a and b (c: other weights), shared XLA cache."""
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
    base = ["--manifest", str(d / "m.csv"), "--max-seconds", "2", "--batch-seconds", "8"]
    for s in ("extract.whisper_window_s=2", "extract.workers=1", f"extract.cache_dir={d}/cache"):
        base += ["--set", s]
    two = ["--backbone", f"a={ckpt['a']}", "--backbone", f"b={ckpt['b']}"]
    # One compile cache for every process of the module: a shard's (4, 32000) program is
    # compiled once, not once per process.
    env = {"IFMVSE_COMPILE_CACHE": str(d / "xla"), "USE_TORCH": "0"}
    return {"dir": d, "base": base, "ckpt": ckpt, "two": two, "env": env}


@pytest.fixture(scope="module")
def reference(setup):
    """The store one plain process makes of the same job."""
    ref = setup["dir"] / "ref.h5"
    p = _proc(setup, ["extract", *setup["base"], *setup["two"], "--out", str(ref)])
    out = p.communicate(timeout=LIMIT)
    assert p.returncode == 0 and FeatureStore(ref).filled("b").all(), out
    return ref


def _proc(setup, args, delay=0.0, env=None):
    env = {**os.environ, **setup["env"], **(env or {}), "IFMVSE_TEST_ITEM_DELAY": str(delay)}
    return subprocess.Popen(
        [sys.executable, str(HERE / "multihost_job.py"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _shard(setup, store, k, n, backbones=None, more=(), delay=0.0):
    args = ["extract", *setup["base"], *more, *(backbones or setup["two"]), "--out", str(store)]
    return _proc(setup, [*args, "--shard", f"{k}/{n}"], delay=delay)


def _wait(procs, limit=LIMIT):
    """(returncode, stdout, stderr) per process; every process must end within `limit` s."""
    t0 = time.monotonic()
    res = []
    for p in procs:
        o, e = p.communicate(timeout=max(1.0, limit - (time.monotonic() - t0)))
        res.append((p.returncode, o, e))
    return res


def _ok(res):
    assert all(rc == 0 for rc, _, _ in res), [(rc, e[-2000:]) for rc, _, e in res]


def _one_line_error(rc, err, *words):
    """Non-zero exit, exactly one line on stderr (progress lines aside), no traceback."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("shard ")]
    assert rc not in (0, None) and rc > 0, (rc, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("Error: ") and all(w in lines[0] for w in words), lines[0]


def _to_compute(err, k, n, name="a"):
    """The row count a shard announced for a backbone ("shard k/n: a: 7 rows to compute")."""
    prefix = f"shard {k}/{n}: {name}: "
    (line,) = [ln for ln in err.splitlines() if ln.startswith(prefix)]
    return int(line[len(prefix) :].split()[0])


def _finalize_cli(store, *flags):
    r = subprocess.run(
        [sys.executable, str(HERE / "multihost_job.py"), "store", "finalize", str(store), *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return r.returncode, r.stdout, r.stderr


def _assert_equal_to_reference(reference, store, names=("a", "b"), alone=()):
    """Bit for bit, except rows in `alone` (recomputed in a batch of their own: another batch
    shape, so float32 sums may be ordered differently: `chain` through the tiny Whisper's 2
    layers, its 3 front ops and the 240-term first convolution)."""
    s, ref = FeatureStore(store), FeatureStore(reference)
    assert s.pending_journal_files == 0
    for name in names:
        assert s.filled(name).all(), (name, int(s.filled(name).sum()))
        got, want = s.load(None, [name]), ref.load(None, [name])
        np.testing.assert_array_equal(got.ids, want.ids)
        own = np.isin(got.indices, list(alone))
        g, w = got.features[name], want.features[name]
        np.testing.assert_array_equal(g[~own], w[~own])  # bit for bit
        if own.any():
            bound = chain(encoder_ops(2, 3), 240, float(np.abs(w[own]).max()))
            assert_within(g[own], w[own], bound, f"{name}: rows computed alone")
            assert_exceeds(g[own], np.roll(w, 1, axis=0)[own], bound, f"{name}: the row before")


def _journal_files(store, writer=""):
    root = store.with_name(store.name + ".journal") / "batches"
    return sorted(p.name for p in root.rglob(f"{writer}*")) if root.exists() else []


# -- real extraction processes (slow) ----------------------------------------------------------


@pytest.mark.slow
def test_one_two_three_shards_then_finalize_equal_one_process(setup, reference, tmp_path):
    """Shards started at the same moment on a store that does not exist yet; a rerun of a
    finished shard computes nothing."""
    for n in (1, 2, 3):
        store = tmp_path / f"s{n}.h5"
        res = _wait([_shard(setup, store, k, n) for k in range(n)])
        _ok(res)
        counts = [_to_compute(e, k, n, "b") for k, (_, _, e) in enumerate(res)]
        assert sum(counts) == N_CLIPS and max(counts) - min(counts) <= 1, counts
        assert FeatureStore(store).filled("b").all()  # readers see main + journal already
        rc, out, err = _finalize_cli(store, "--require-complete")
        assert rc == 0 and "a: complete" in out and "b: complete" in out, (out, err)
        _assert_equal_to_reference(reference, store)
        assert not job_path(store).exists()  # the completed job's record is retired
        assert len(list(jobs_dir(store).glob("finished-*.json"))) == 1
    ((rc, _, err),) = _wait([_shard(setup, store, 1, 3)])
    assert rc == 0 and _to_compute(err, 1, 3, "a") == _to_compute(err, 1, 3, "b") == 0, err
    assert FeatureStore(store).pending_journal_files == 0


@pytest.mark.slow
def test_killed_shard_others_finish_finalize_names_it_rerun_completes(setup, reference, tmp_path):
    store = tmp_path / "s.h5"
    procs = [_shard(setup, store, k, 3, delay=0.4 if k == 1 else 0.0) for k in range(3)]
    t0 = time.monotonic()
    while not _journal_files(store, "shard1of3-") and time.monotonic() - t0 < LIMIT:
        time.sleep(0.05)  # kill shard 1 once it has made a batch durable
    procs[1].send_signal(signal.SIGKILL)
    _ok(_wait([procs[0], procs[2]]))  # the others never look at shard 1
    procs[1].wait(timeout=10)
    rc, out, err = _finalize_cli(store, "--require-complete")
    missing = int(N_CLIPS - FeatureStore(store).filled("a").sum())
    assert 0 < missing < N_CLIPS / 3, missing
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, (out, err)
    assert f"a {missing} of {N_CLIPS} rows missing (shard 1 of 3)" in lines[0], lines[0]
    assert "rerun --shard K/3 for K in 1" in lines[0], lines[0]
    ((rc, _, err),) = _wait([_shard(setup, store, 1, 3)])
    assert rc == 0 and _to_compute(err, 1, 3, "a") == missing, err  # only its missing rows
    rc, out, err = _finalize_cli(store, "--require-complete")
    assert rc == 0, err
    _assert_equal_to_reference(reference, store)


@pytest.mark.slow
def test_stopped_shard_does_not_hold_up_the_others(setup, reference, tmp_path):
    """A shard stopped with SIGSTOP: the other exits 0 promptly; once continued it completes."""
    store = tmp_path / "s.h5"
    one = ["--backbone", f"a={setup['ckpt']['a']}"]
    stopped = _shard(setup, store, 1, 2, one)
    time.sleep(1.0)
    stopped.send_signal(signal.SIGSTOP)
    try:
        _ok(_wait([_shard(setup, store, 0, 2, one)]))
        assert stopped.poll() is None  # still stopped: nobody waited for it
        rc, _, err = _finalize_cli(store, "--require-complete")
        assert rc == 1 and "(shard 1 of 2)" in err, err
    finally:
        stopped.send_signal(signal.SIGCONT)
    _ok(_wait([stopped]))
    assert _finalize_cli(store, "--require-complete")[0] == 0
    _assert_equal_to_reference(reference, store, names=("a",))


@pytest.mark.slow
def test_finalize_while_shards_write_loses_no_row(setup, reference, tmp_path):
    store = tmp_path / "s.h5"
    procs = [_shard(setup, store, k, 2, delay=0.15) for k in range(2)]
    merged = []
    while any(p.poll() is None for p in procs):
        if store.exists():
            merged.append(finalize(store))
        time.sleep(0.2)
    _ok(_wait(procs))
    assert sum(1 for m in merged if m) >= 2, merged  # merges really ran between writes
    assert _finalize_cli(store, "--require-complete")[0] == 0
    _assert_equal_to_reference(reference, store)


@pytest.mark.slow
def test_other_weights_or_settings_stop_before_writing(setup, tmp_path):
    store = tmp_path / "s.h5"
    a, c = (["--backbone", f"a={setup['ckpt'][x]}"] for x in ("a", "c"))
    _ok(_wait([_shard(setup, store, 0, 3, a)]))
    before = _journal_files(store)
    res = _wait(
        [
            _shard(setup, store, 1, 3, c),
            _shard(setup, store, 2, 3, a, more=["--set", "audio.normalize=utterance"]),
        ]
    )
    _one_line_error(res[0][0], res[0][2], "shards disagree on backbone a sha256", "shard 1/3 has")
    _one_line_error(
        res[1][0], res[1][2], "shards disagree on audio.normalize", str(job_path(store))
    )
    assert _journal_files(store) == before  # nothing written


@pytest.mark.slow
def test_two_mismatched_first_starts_race_exactly_one_wins(setup, tmp_path):
    store = tmp_path / "s.h5"
    ck = setup["ckpt"]
    res = _wait(
        [_shard(setup, store, k, 2, ["--backbone", f"a={ck[x]}"]) for k, x in enumerate("ac")]
    )
    ok = [k for k, (rc, _, _) in enumerate(res) if rc == 0]
    assert len(ok) == 1, [(rc, e[-500:]) for rc, _, e in res]
    (lost,) = {0, 1} - set(ok)
    _one_line_error(res[lost][0], res[lost][2], "shards disagree on backbone a sha256")
    job = json.loads(job_path(store).read_text())
    assert job["recorded_by"] == f"shard {ok[0]}/2"
    assert not _journal_files(store, f"shard{lost}of2-")


@pytest.mark.slow
def test_ray_local_equal_one_process_and_a_dead_first_attempt_is_retried(
    setup, reference, tmp_path
):
    pytest.importorskip("ray")  # the `ray` extra; CI installs it
    store, marker = tmp_path / "s.h5", tmp_path / "died"
    args = [
        *setup["base"],
        *setup["two"],
        "--out",
        str(store),
        "--shards",
        "3",
        "--engine",
        "ray",
    ]
    env = {**os.environ, **setup["env"], "IFMVSE_TEST_DIE_ONCE": str(marker)}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run(
        [sys.executable, str(HERE / "ray_job.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=2 * LIMIT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert marker.exists()  # one worker really died mid-shard, after its first backbone
    assert "3 Ray shards done and finalized" in r.stdout
    # Each shard bound its process to the CPUs Ray reserved for it (2 of this 2-CPU Ray).
    bound = re.findall(r"bound to cores \[(\d+), (\d+)\]", r.stdout + r.stderr)
    assert len(bound) >= 3, r.stderr[-3000:]
    # The retried attempt computed only what the dead one had not made durable: the shards'
    # last attempts together computed every row of b, and fewer of a.
    done = {"a": 0, "b": 0}
    for line in r.stdout.splitlines():
        if "rows computed by its last attempt:" in line:
            for part in line.split(": ")[-1].split(", "):
                name, count = part.split()
                done[name] += int(count)
    assert done["b"] == N_CLIPS and 0 < done["a"] < N_CLIPS, (done, r.stdout)
    _assert_equal_to_reference(reference, store)


# -- one-line errors before any model is loaded (real processes, fast) -------------------------


def test_same_shard_started_twice_is_a_one_line_error(setup, tmp_path):
    store = tmp_path / "s.h5"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from featurestore.jobs import shard_lock\n"
            f"with shard_lock({str(store)!r}, 1, 3):\n print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        ((rc, _, err),) = _wait([_shard(setup, store, 1, 3)], limit=60)
        _one_line_error(rc, err, "shard 1/3 is already running", f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    # The OS released the dead holder's lock: the shard may run now.
    with shard_lock(store, 1, 3):
        pass


def test_shard_count_other_than_the_recorded_job_is_a_one_line_error(setup, tmp_path):
    store = tmp_path / "s.h5"
    record_job(store, {"num_shards": 4, "backbone names": "a,b"}, {"num_shards": 4}, "shard 0/4")
    ((rc, _, err),) = _wait([_shard(setup, store, 1, 3)], limit=60)
    _one_line_error(rc, err, "shards disagree on num_shards", "has 4, shard 1/3 has 3")
    assert not store.exists()


# -- the pieces, in-process (fast) -------------------------------------------------------------


def test_shards_partition_the_rows_balanced_by_duration():
    rng = np.random.default_rng(0)
    d = rng.uniform(0.5, 20.0, 1001).astype(np.float32)
    for n in (1, 2, 3, 7, 64):
        owner = shard_of(d, n)
        parts = [shard_rows(d, k, n) for k in range(n)]
        assert sorted(np.concatenate(parts)) == list(range(len(d)))  # every row once
        assert all((owner[p] == k).all() for k, p in enumerate(parts))
        sizes = [len(p) for p in parts]
        totals = [float(d[p].sum()) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        assert max(totals) - min(totals) <= 2 * float(d.max()), (n, totals)  # two utterances
    np.testing.assert_array_equal(shard_of(d, 3), shard_of(d.copy(), 3))  # pure function
    d[5] = np.nan  # an unreadable header: still assigned
    assert sorted(np.concatenate([shard_rows(d, k, 4) for k in range(4)])) == list(range(len(d)))


@pytest.mark.parametrize(
    "env, shards, want",
    [
        ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "16"}, None, (5, 16)),
        (
            {
                "SLURM_ARRAY_TASK_ID": "5",
                "SLURM_ARRAY_TASK_COUNT": "16",
                "SLURM_ARRAY_TASK_MIN": "1",
            },
            None,
            (4, 16),
        ),
        (  # --array=10-40:10: ids 10, 20, 30, 40
            {
                "SLURM_ARRAY_TASK_ID": "30",
                "SLURM_ARRAY_TASK_COUNT": "4",
                "SLURM_ARRAY_TASK_MIN": "10",
                "SLURM_ARRAY_TASK_STEP": "10",
            },
            None,
            (2, 4),
        ),
        ({"JOB_COMPLETION_INDEX": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, 8, (3, 8)),
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "OMPI_COMM_WORLD_RANK": "0"}, None, (2, 4)),
        ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, None, (1, 2)),
        (
            {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_PROCID": "0"},
            2,
            (1, 2),
        ),
        ({"PMI_RANK": "3", "PMI_SIZE": "4"}, 4, (3, 4)),
    ],
)
def test_shard_auto_reads_each_scheduler_in_order(env, shards, want):
    k, n, where = parse_shard("auto", shards, env)
    assert (k, n) == want
    first = next(
        v
        for v in ("SLURM_ARRAY", "JOB_COMPLETION", "SLURM_PROCID", "OMPI", "PMI")
        if any(key.startswith(v) for key in env)
    )
    assert where.startswith(first), where


def _slurm_array(spec: str) -> list[dict[str, str]]:
    """The environments SLURM gives the tasks of `sbatch --array=SPEC` (a range, :step, %max)."""
    rng = spec.split("%")[0]
    if "," in rng:
        ids = [int(x) for x in rng.split(",")]
        step = 1
    else:
        span, _, step_s = rng.partition(":")
        a, _, b = span.partition("-")
        step = int(step_s or 1)
        ids = list(range(int(a), int(b or a) + 1, step))
    common = {"COUNT": len(ids), "MIN": min(ids), "MAX": max(ids), "STEP": step}
    return [{f"SLURM_ARRAY_TASK_{k}": str(v) for k, v in {"ID": i, **common}.items()} for i in ids]


@pytest.mark.parametrize(
    "array, shards", [("0-15", 16), ("1-16", 16), ("10-40:10", 4), ("0-15%4", 16), ("5-5", 1)]
)
def test_every_task_of_any_slurm_array_range_runs_one_shard(array, shards):
    """With --shards N (the docs' recipe) and without: each of 0..N-1 exactly once."""
    for given in (shards, None):
        got = [parse_shard("auto", given, env)[:2] for env in _slurm_array(array)]
        assert sorted(got) == [(k, shards) for k in range(shards)], (array, given, got)


@pytest.mark.parametrize(
    "array, shards, words",
    [
        ("0-7", 16, "the SLURM array has 8 tasks (SLURM_ARRAY_TASK_ID="),
        ("1-16", 8, "SLURM_ARRAY_TASK_MIN=1, SLURM_ARRAY_TASK_MAX=16"),
        ("3,11", 16, "not one evenly stepped range"),  # rerun single shards with --shard K/N
    ],
)
def test_a_slurm_array_that_does_not_match_shards_is_refused_naming_the_variables(
    array, shards, words
):
    for env in _slurm_array(array):
        with pytest.raises(ShardError, match=None) as e:
            parse_shard("auto", shards, env)
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert f"--shards says {shards}" in str(e.value) or "evenly" in str(e.value)


@pytest.mark.parametrize(
    "spec, shards, env, words",
    [
        ("auto", None, {}, "no scheduler variables found"),
        ("auto", None, {"JOB_COMPLETION_INDEX": "0"}, "give --shards N"),
        ("auto", 3, {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, "--shards says 3"),
        ("auto", None, {"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "not an integer"),
        ("auto", 4, {"JOB_COMPLETION_INDEX": "4"}, "completions must equal --shards"),
        ("auto", 3, {"PMI_RANK": "0", "PMI_SIZE": "2"}, "PMI_RANK=0, PMI_SIZE=2 gives 2 shards"),
        ("auto", None, {"SLURM_ARRAY_TASK_ID": "3"}, "no SLURM_ARRAY_TASK_COUNT; give --shards"),
        ("3/3", None, {}, "need 0 <= K < N"),
        ("1", None, {}, "expected K/N"),
        ("1/4", 3, {}, "--shards says 3"),
        ("a/b", None, {}, "expected K/N"),
    ],
)
def test_shard_spec_errors_are_one_line(spec, shards, env, words):
    with pytest.raises(ShardError, match=words) as e:
        parse_shard(spec, shards, env)
    assert "\n" not in str(e.value)


def test_shard_auto_on_the_command_line_says_which_variables_it_used(tmp_path, monkeypatch):
    for var in ("JOB_COMPLETION_INDEX", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(var, raising=False)
    for k, v in {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "16"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    (tmp_path / "m.csv").write_text("path,split\n")
    args = ["extract", "--manifest", str(tmp_path / "m.csv"), "--backbone", "w=/nonexistent"]
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "s.h5"), "--shard", "auto"])
    assert r.output.splitlines()[0] == (
        "shard 3/16 (from SLURM_ARRAY_TASK_ID=4, SLURM_ARRAY_TASK_COUNT=16, SLURM_ARRAY_TASK_MIN=1)"
    ), r.output
    assert r.exit_code == 1 and r.output.splitlines()[-1].startswith("Error: "), r.output


def test_job_record_first_starts_race_exactly_one_wins(tmp_path):
    """Six processes record at the same moment, two fingerprints: one record, whole."""
    store = tmp_path / "s.h5"
    go = tmp_path / "go"
    code = (
        "import os, sys, time\n"
        "from featurestore.jobs import ShardError, record_job\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
        "k = int(sys.argv[1])\n"
        "try:\n"
        f"    won = record_job({str(store)!r}, {{'w': k % 2}}, {{}}, f'shard {{k}}/6')\n"
        "    print('won' if won else 'agreed')\n"
        "except ShardError as e:\n"
        "    print('refused', e)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(k)], stdout=subprocess.PIPE, text=True)
        for k in range(6)
    ]
    time.sleep(1.5)  # all started and polling
    go.touch()
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    job = json.loads(job_path(store).read_text())
    winner = int(job["recorded_by"].split()[1].split("/")[0])
    assert [o.split()[0] for o in outs].count("won") == 1, outs
    assert outs[winner] == "won"
    for k, o in enumerate(outs):
        if k % 2 == winner % 2:
            assert o in ("won", "agreed"), o
        else:
            assert o.startswith("refused shards disagree on w: the job recorded in"), o
            assert f"has {winner % 2}, shard {k}/6 has {k % 2}" in o, o


def _toy_store(tmp_path, n_shards=3, skip=(), rows=N_CLIPS):
    """A store with backbone `t` written by shards (except `skip`) of a job, 4 rows a batch."""
    store = tmp_path / "t.h5"
    ids = [f"u{i:04d}" for i in range(rows)]
    durations = np.linspace(0.5, 3.0, rows)
    create_store(store, ids=ids, splits=["Train"] * rows, durations=durations, paths=ids)
    fp = {"num_shards": n_shards, "backbone names": "t"}
    record_job(store, fp, {"num_shards": n_shards, "backbones": ["t"]}, "shard 0/3")
    for k in range(n_shards):
        if k in skip:
            continue
        w = StoreWriter(store, "t", dim=4, writer_id=f"shard{k}of{n_shards}")
        rows = shard_rows(durations, k, n_shards)
        for s in range(0, len(rows), 4):
            r = rows[s : s + 4]
            w.write(r, np.outer(r + 1, np.arange(1, 5)).astype(np.float32))
    return store, durations


def test_finalize_require_complete_names_missing_rows_by_shard_then_completes(tmp_path):
    store, durations = _toy_store(tmp_path, skip=(1,))
    want = len(shard_rows(durations, 1, 3))
    r = CliRunner().invoke(cli, ["store", "finalize", str(store), "--require-complete"])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        f"Error: {store}: incomplete: t {want} of {N_CLIPS} rows missing (shard 1 of 3);"
        " rerun --shard K/3 for K in 1"
    ], r.output
    r = CliRunner().invoke(cli, ["store", "finalize", str(store)])
    assert r.exit_code == 0 and f"t: {want} of {N_CLIPS} rows missing (shard 1 of 3)" in r.output
    assert job_path(store).exists()  # incomplete: the job goes on
    w = StoreWriter(store, "t", dim=4, writer_id="shard1of3")
    rows = shard_rows(durations, 1, 3)
    w.write(rows, np.outer(rows + 1, np.arange(1, 5)).astype(np.float32))
    r = CliRunner().invoke(cli, ["store", "finalize", str(store), "--require-complete"])
    assert r.exit_code == 0 and "t: complete" in r.output, r.output
    assert not job_path(store).exists() and list(jobs_dir(store).glob("finished-*.json"))
    feats = FeatureStore(store).load(None, ["t"])
    np.testing.assert_array_equal(
        feats.features["t"], np.outer(feats.indices + 1, np.arange(1, 5)).astype(np.float32)
    )


def test_finalize_derives_the_jobs_layer_views_once_their_source_is_written(tmp_path):
    store = tmp_path / "v.h5"
    ids = [f"u{i:02d}" for i in range(N_CLIPS)]
    create_store(store, ids=ids, splits=["Train"] * N_CLIPS, durations=[1.0] * N_CLIPS, paths=ids)
    extra = {"num_shards": 1, "backbones": ["t"], "layer_views": [["t_mid", "t:1"]]}
    record_job(store, {"num_shards": 1}, extra, "shard 0/1")
    r = CliRunner().invoke(cli, ["store", "finalize", str(store)])  # t not written yet: later
    assert r.exit_code == 0 and f"t: {N_CLIPS} of {N_CLIPS} rows missing" in r.output, r.output
    w = StoreWriter(store, "t", dim=4, num_layers=2, attrs={"layers_stored": "0,1"})
    rows = np.arange(N_CLIPS)
    pooled = np.outer(rows + 1, np.arange(1, 5)).astype(np.float32)  # (N, 4)
    w.write(rows, pooled, np.stack([pooled, 2 * pooled], axis=1))
    r = CliRunner().invoke(cli, ["store", "finalize", str(store), "--require-complete"])
    assert r.exit_code == 0 and "t_mid: complete" in r.output, r.output
    view = FeatureStore(store).load(None, ["t_mid"])
    np.testing.assert_array_equal(view.features["t_mid"], 2 * pooled[view.indices])


def test_sigkill_during_finalize_then_the_next_finalize_completes(tmp_path):
    store, _ = _toy_store(tmp_path, rows=1200)  # 300 journal files
    marker = Path(str(store) + ".in-merge")
    env = {**os.environ, "IFMVSE_TEST_SLOW_MERGE": str(store), "IFMVSE_COMPILE_CACHE": "off"}
    p = subprocess.Popen(
        [sys.executable, str(HERE / "multihost_job.py"), "store", "finalize", str(store)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    t0 = time.monotonic()
    while not marker.exists() and p.poll() is None and time.monotonic() - t0 < 60:
        time.sleep(0.01)
    assert marker.exists(), p.communicate()
    p.send_signal(signal.SIGKILL)  # as the merge starts writing
    assert p.wait(timeout=10) == -signal.SIGKILL  # killed inside finalize, not finished
    assert FeatureStore(store).pending_journal_files > 0  # before it removed the journal
    r = CliRunner().invoke(cli, ["store", "finalize", str(store), "--require-complete"])
    assert r.exit_code == 0 and "t: complete" in r.output, r.output
    s = FeatureStore(store)
    assert s.pending_journal_files == 0
    feats = s.load(None, ["t"])
    np.testing.assert_array_equal(
        feats.features["t"], np.outer(feats.indices + 1, np.arange(1, 5)).astype(np.float32)
    )


@pytest.mark.parametrize(
    "flag",
    [
        "--coordinator=h:1",
        "--num-processes=2",
        "--process-id=1",
        "--distributed",
        "--peer-timeout=5",
    ],
)
def test_removed_flags_are_one_line_naming_the_new_form(flag, tmp_path):
    args = ["extract", "--manifest", "m.csv", "--backbone", "w=x", "--out", "s.h5", flag]
    r = CliRunner().invoke(cli, args)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    name = flag.split("=")[0]
    assert lines[0].startswith(f"Error: {name} was removed") and "--shard K/N" in lines[0]
    assert name not in CliRunner().invoke(cli, ["extract", "--help"]).output  # hidden


def test_shards_without_an_engine_or_ray_without_shards_are_one_line(tmp_path):
    (tmp_path / "m.csv").write_text("path,split\n")
    base = ["extract", "--manifest", str(tmp_path / "m.csv"), "--backbone", "w=x"]
    base += ["--out", str(tmp_path / "s.h5")]
    for extra, words in (
        (["--shards", "3"], "--shards N goes with --engine ray"),
        (["--engine", "ray"], "give --shards N"),
        (["--engine", "ray", "--shards", "2", "--shard", "0/2"], "give --shards N, not --shard"),
    ):
        r = CliRunner().invoke(cli, [*base, *extra])
        assert r.exit_code == 1 and r.output.strip().splitlines() == [
            f"Error: {r.output[7:].strip()}"
        ]
        assert words in r.output, r.output


def test_no_socket_code_or_private_jax_import_in_the_package():
    bad = (
        "import socket",
        "from socket",
        "socket.",
        "import select",
        "jax._src",
        "jax_ifmvse.distributed",
    )
    # The one socket allowed: the hub reachability probe before a download (not coordination).
    allowed = {("jax_ifmvse/backbones/sources.py", "socket")}
    hits = []
    for pkg in ("jax_ifmvse", "featurestore"):
        for p in sorted((ROOT / pkg).rglob("*.py")):
            rel = str(p.relative_to(ROOT))
            for i, line in enumerate(p.read_text().splitlines(), 1):
                found = [b for b in bad if b in line]
                if found and not all((rel, b.split()[-1].rstrip(".")) in allowed for b in found):
                    hits.append(f"{rel}:{i}: {line.strip()}")
    assert not hits, hits
    assert not (ROOT / "jax_ifmvse" / "distributed.py").exists()


def test_store_finalize_of_a_missing_store_is_one_line(tmp_path):
    r = CliRunner().invoke(cli, ["store", "finalize", str(tmp_path / "none.h5")])
    assert r.exit_code == 1 and r.output.strip() == f"Error: {tmp_path / 'none.h5'}: no such store"
    assert list(tmp_path.iterdir()) == []  # no lock file or anything else left behind


def test_finalize_reports_failed_rows_by_reason_and_rows_without_frames(tmp_path):
    """Six rows of shard 2 failed, frames missing for four rows of shard 0: finalize says so,
    --require-complete refuses (failed rows only with --allow-failed), the job stays open."""
    from featurestore.frames import FrameWriter

    store, durations = _toy_store(tmp_path, skip=(2,))
    rows2 = shard_rows(durations, 2, 3)
    w = StoreWriter(store, "t", dim=4, writer_id="shard2of3")
    w.write(rows2[6:], np.outer(rows2[6:] + 1, np.arange(1, 5)).astype(np.float32))
    reasons = ["not audio or corrupt (Format not recognised)"] * 4 + [
        "empty audio (no samples)"
    ] * 2
    w.fail(rows2[:6], reasons)
    fw = FrameWriter(store, "t", dim=4)
    no_frames = shard_rows(durations, 0, 3)[:4]
    with_frames = np.setdiff1d(np.arange(N_CLIPS), np.concatenate([no_frames, rows2[:6]]))
    fw.write(with_frames, [np.full((3, 4), r, np.float16) for r in with_frames])
    r = CliRunner().invoke(cli, ["store", "finalize", str(store)])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[1] == (
        "  t: 4 rows without frames (shard 0 of 3): 34 done, 6 failed (not audio or corrupt 4,"
        " empty audio 2), frames of 30"
    ), r.output
    assert job_path(store).exists()  # rows without frames: the job goes on
    r = CliRunner().invoke(cli, ["store", "finalize", str(store), "--require-complete"])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        f"Error: {store}: incomplete: t 4 rows without frames (shard 0 of 3); t 6 failed (not"
        " audio or corrupt 4, empty audio 2), more than --allow-failed 0; rerun --shard K/3 for"
        " K in 0; extract --retry-failed [REASON] recomputes failed rows"
    ], r.output
    fw.write(no_frames, [np.full((2, 4), r, np.float16) for r in no_frames])  # the rerun
    r = CliRunner().invoke(cli, ["store", "finalize", str(store), "--require-complete"])
    assert r.exit_code == 1 and "t 6 failed" in r.output and "frames" not in r.output, r.output
    args = ["store", "finalize", str(store), "--require-complete", "--allow-failed", "6"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "t: complete: 34 done, 6 failed (not audio or corrupt 4, empty audio 2)" in r.output
    assert not job_path(store).exists()  # nothing missing: retired


def test_finalize_reports_transcripts_done_flagged_failed_and_missing_by_shard(tmp_path):
    """A transcript set written by shards 0 and 2 of 3 (one row empty, one cropped, one failed):
    the finalize process reports it, --require-complete refuses naming shard 1, then passes once
    shard 1 has written (its failed row allowed by --allow-failed)."""
    from jax_ifmvse.text import transcripts as tx

    store, durations = _toy_store(tmp_path)  # every backbone row written
    tx.start(store, "asr", {"kind": "asr", "model": "tiny"})
    rows = {k: shard_rows(durations, k, 3) for k in range(3)}
    odd = {rows[0][0]: ("", "empty"), rows[0][1]: ("", "failed: decode error (bad header)")}
    odd[rows[2][0]] = ("long talk", "cropped")

    def write(k):
        recs = [{"row": int(r), "id": f"u{r:04d}", "text": odd.get(r, ("hi", ""))[0],
                 "flags": odd.get(r, ("hi", ""))[1]} for r in rows[k]]  # fmt: skip
        tx.write(store, "asr", f"shard{k}of3", recs)

    write(0)
    write(2)
    left, done = len(rows[1]), len(rows[0]) + len(rows[2]) - 1
    rc, out, err = _finalize_cli(store)
    assert rc == 0, err
    assert out.splitlines()[1:] == [
        f"  t: complete: {N_CLIPS} done",
        f"  transcripts asr: {left} of {N_CLIPS} rows missing (shard 1 of 3): {done} done"
        " (cropped 1, empty 1), 1 failed (decode error 1)",
    ], out
    rc, out, err = _finalize_cli(store, "--require-complete")
    assert rc == 1 and err.strip().splitlines() == [
        f"Error: {store}: incomplete: transcripts asr {left} of {N_CLIPS} rows missing (shard 1"
        " of 3); transcripts asr 1 failed (decode error 1), more than --allow-failed 0; rerun"
        " transcribe --name asr --shard K/3 for K in 1"
    ], (out, err)
    write(1)
    rc, out, err = _finalize_cli(store, "--require-complete")
    assert rc == 1 and "transcripts asr 1 failed" in err and "missing" not in err, err
    rc, out, err = _finalize_cli(store, "--require-complete", "--allow-failed", "1")
    assert rc == 0, err
    assert f"  transcripts asr: complete: {N_CLIPS - 1} done (cropped 1, empty 1), 1 failed" in out


def test_inspect_and_train_say_which_rows_of_each_split_they_leave_out(tmp_path):
    from featurestore.frames import FrameWriter
    from featurestore.summary import left_out, left_out_lines

    store = tmp_path / "t.h5"
    ids = [f"u{i}" for i in range(12)]
    splits = ["Train"] * 8 + ["Development"] * 4
    create_store(store, ids=ids, splits=splits, durations=[1.0] * 12, paths=ids)
    w = StoreWriter(store, "t", dim=2)
    w.write(np.arange(6), np.ones((6, 2), np.float32))  # Train 6, 7 and Development: not yet
    w.fail([6, 8], ["not audio or corrupt (x)", "empty audio (no samples)"])
    FrameWriter(store, "t", 2).write([0, 1, 2], [np.ones((2, 2), np.float16)] * 3)
    assert left_out_lines(left_out(store, ["t"])) == [
        "Train: 2 of 8 rows left out (t: 1 failed, 1 no features)",
        "Development: 4 of 4 rows left out (t: 1 failed, 3 no features)",
    ]
    assert left_out_lines(left_out(store, ["t"], frames=True))[0] == (
        "Train: 5 of 8 rows left out (t: 1 failed, 1 no features, 3 no frames)"
    )
    r = CliRunner().invoke(cli, ["inspect", str(store)])
    assert r.exit_code == 0, r.output
    assert (
        "t leaves out: Train 1 failed, 1 no features, 3 no frames; Development 1 failed,"
        " 3 no features"
    ) in " ".join(r.output.split()), r.output


@pytest.mark.slow
def test_a_file_unreadable_now_is_left_missing_and_computed_by_the_rerun(
    setup, reference, tmp_path
):
    """EIO on every read of one file: its shard retries, leaves the row missing (never failed)
    and exits non-zero in one line; finalize names the shard; the rerun computes the row and
    the store equals one process's."""
    store = tmp_path / "s.h5"
    fast = ["--set", "extract.io_retries=2", "--set", "extract.io_backoff_s=0.01"]
    owner = int(shard_of(FeatureStore(reference).durations, 2)[3])  # c3.wav's shard
    procs = [
        _proc(
            setup,
            ["extract", *setup["base"], *fast, *setup["two"], "--out", str(store),
             "--shard", f"{k}/2"],
            env={"IFMVSE_TEST_EIO": "c3.wav"},
        )
        for k in range(2)
    ]  # fmt: skip
    res = _wait(procs)
    assert res[1 - owner][0] == 0, res[1 - owner][2][-2000:]
    rc, _, err = res[owner]
    _one_line_error(rc, err, "2 row(s) left missing after I/O errors", "c3.wav: I/O error")
    s = FeatureStore(store)
    assert not s.failed("a").any() and not s.failed("b").any()  # nothing recorded as failed
    rc, out, err = _finalize_cli(store, "--require-complete")
    assert rc == 1 and f"a 1 of {N_CLIPS} rows missing (shard {owner} of 2)" in err, err
    ((rc, _, err),) = _wait([_shard(setup, store, owner, 2)])  # the disk is back
    assert rc == 0 and _to_compute(err, owner, 2, "a") == 1, err
    assert _finalize_cli(store, "--require-complete")[0] == 0
    _assert_equal_to_reference(reference, store, alone=[3])


@pytest.mark.slow
def test_a_kill_between_pooled_and_frame_write_is_reported_and_redone(setup, tmp_path):
    """SIGKILL after a batch's pooled rows, before its frames: finalize reports the rows
    without frames by shard and keeps the job; a rerun of the shard redoes exactly them."""
    from featurestore.frames import missing_frames, read_frames

    frames = ["--set", "extract.frames=last"]
    one = ["--backbone", f"a={setup['ckpt']['a']}"]
    ref = tmp_path / "ref.h5"
    ((rc, _, err),) = _wait([_proc(setup, ["extract", *setup["base"], *frames, *one, "--out",
                                           str(ref)])])  # fmt: skip
    assert rc == 0, err[-2000:]
    store = tmp_path / "s.h5"
    args = ["extract", *setup["base"], *frames, *one, "--out", str(store), "--shard", "0/1"]
    p = _proc(setup, args, env={"IFMVSE_TEST_DIE_BEFORE_FRAMES": "2"})
    assert p.wait(timeout=LIMIT) == -signal.SIGKILL
    s = FeatureStore(store)
    lost = np.flatnonzero(s.filled("a") & np.isin(np.arange(N_CLIPS), missing_frames(store, "a")))
    assert 0 < len(lost) <= 8, lost
    rc, out, err = _finalize_cli(store)
    assert rc == 0 and f"{len(lost)} rows without frames (shard 0 of 1)" in out, out
    rc, out, err = _finalize_cli(store, "--require-complete")
    assert rc == 1 and f"a {len(lost)} rows without frames" in err, err
    assert job_path(store).exists()
    todo = N_CLIPS - int(s.filled("a").sum()) + len(lost)  # never computed, and no frames
    ((rc, _, err),) = _wait([_proc(setup, args)])
    assert rc == 0 and _to_compute(err, 0, 1, "a") == todo, err
    rc, out, err = _finalize_cli(store, "--require-complete")
    assert rc == 0 and "a: complete" in out, (out, err)
    _assert_equal_to_reference(ref, store, names=("a",))
    rows = np.arange(N_CLIPS)
    got, want = read_frames(store, "a", rows), read_frames(ref, "a", rows)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize(
    "nodes, asked, want",
    [
        # CPU nodes of 16 cores: one shard per node (JAX uses every core), never 16 on one node.
        ([{"Resources": {"CPU": 16.0, "memory": 64e9}}], {}, {"num_cpus": 16.0, "num_gpus": 0.0}),
        # 8 GPUs and 64 cores: one GPU and 8 cores per shard, 8 shards per node.
        ([{"Resources": {"CPU": 64.0, "GPU": 8.0}}], {}, {"num_cpus": 8.0, "num_gpus": 1.0}),
        (
            [{"Resources": {"CPU": 16.0, "memory": 64e9}}],
            {"cpus": 4, "memory_gb": 12},
            {"num_cpus": 4, "num_gpus": 0.0, "memory": 12e9},
        ),
        (  # a dead node does not count
            [{"Resources": {"CPU": 4.0}}, {"Alive": False, "Resources": {"CPU": 96.0}}],
            {},
            {"num_cpus": 4.0, "num_gpus": 0.0},
        ),
    ],
)
def test_ray_shard_resources_never_oversubscribe_a_node(nodes, asked, want):
    from jax_ifmvse.ray_engine import ShardResources, shard_resources

    got = shard_resources(nodes, ShardResources(**asked))
    assert got == want
    for node in nodes[:1]:  # shards that fit on a node together use at most its cores
        per = node["Resources"].get("GPU", 0) // got["num_gpus"] if got["num_gpus"] else 1
        assert per * got["num_cpus"] <= node["Resources"]["CPU"]


def test_ray_resources_past_every_node_and_ray_options_without_ray_are_one_line(tmp_path):
    from jax_ifmvse.ray_engine import RayEngineError, ShardResources, shard_resources

    with pytest.raises(RayEngineError, match="asks for 2 GPUs but the largest node has 0"):
        shard_resources([{"Resources": {"CPU": 8.0}}], ShardResources(gpus=2))
    (tmp_path / "m.csv").write_text("path,split\n")
    args = ["extract", "--manifest", str(tmp_path / "m.csv"), "--backbone", "w=x", "--out"]
    r = CliRunner().invoke(
        cli, [*args, str(tmp_path / "s.h5"), "--shard", "0/2", "--ray-cpus", "2"]
    )
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        "Error: --ray-cpus, --ray-gpus and --ray-memory-gb go with --engine ray"
    ], r.output


def test_ray_driver_progress_line_reads_each_shards_progress_file(tmp_path):
    from featurestore.jobs import write_progress
    from jax_ifmvse.ray_engine import _progress_line

    store = tmp_path / "s.h5"
    write_progress(store, 0, {"a": (10, 14), "b": (0, 14)})
    write_progress(store, 2, {"a": (3, 13)})
    line = _progress_line(str(store), 4, {1}, time.monotonic())
    assert line.endswith("shards 0:10/28 1:done 2:3/13 3:waiting"), line
