"""Feature store: layout, crash safety under SIGKILL, resumption, shards, readers, bad input."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import store_job
from click.testing import CliRunner
from tolerances import (
    U32,
    U64,
    assert_exceeds,
    assert_within,
    float16_storage,
    gamma,
    written,
)

from featurestore import FeatureStore, StoreError, StoreWriter, create_store, finalize
from jax_ifmvse.cli import cli

JOB = Path(__file__).with_name("store_job.py")


def run_job(path, *args, wait=True, slow_merge=False, progress=False):
    cmd = [sys.executable, str(JOB), str(path), *args]
    # This checkout's featurestore, not an installed copy's.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(JOB.parent), str(JOB.parent.parent)])}
    if slow_merge:
        env["STORE_JOB_SLOW_MERGE"] = "1"
    if progress:  # `batches N`, then `batch b` after each batch, on stdout
        env["STORE_JOB_PROGRESS"] = "1"
    if wait:
        subprocess.run(cmd, check=True, env=env)
        return None
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE if progress else None, text=True)


def wait_for_batch(proc, rng) -> None:
    """Read the job's progress until a random batch in its first two thirds is written (or it
    ends): a kill right after lands mid-job however loaded the machine is."""
    first = proc.stdout.readline().split()
    if first[:1] != ["batches"]:
        return
    target = rng.randrange(max(1, 2 * int(first[1]) // 3))
    for line in proc.stdout:
        if line.split() == ["batch", str(target)]:
            return


def content(path):
    """Everything a finished store holds, read with plain h5py, as comparable numpy data.

    Rows are stored grouped by split; /utterances/row gives each stored row's API row number,
    so this puts them back in API order.
    """
    with h5py.File(path, "r") as f:
        g = f["features/toy"]
        api = np.argsort(f["utterances/row"][()])  # storage row of each API row
        fails = sorted(
            (r["id"].decode(), r["backbone"].decode(), r["reason"].decode())
            for r in f["failures"][()]
        )
        filled = g["filled"][()]
        pooled, layers = g["pooled"][()], g["layers"][()]
        pooled[~filled], layers[~filled] = 0, 0  # never-written rows hold no defined value
        return (
            pooled[api],
            layers[api],
            filled[api],
            fails,
            f["utterances/id"].asstr()[()][api],
            g["flags"].asstr()[()][api],
            g["norm"][()][api],
        )


def check_consistent(path):
    """The store opens with plain h5py and every filled row holds the right features."""
    with h5py.File(path, "r") as f:
        assert "utterances/id" in f
    s = FeatureStore(path)
    if "toy" not in s.backbones:
        return 0
    split = s.load(None, ["toy"], layers=True)
    pooled, layers = store_job.features(split.indices)
    np.testing.assert_array_equal(split.features["toy"], layers)
    flat = s.load(None, ["toy"])  # a writer may have added rows since the first load
    np.testing.assert_array_equal(flat.features["toy"], store_job.features(flat.indices)[0])
    np.testing.assert_array_equal(pooled, layers[:, 0])
    assert not (s.filled("toy") & s.failed("toy")).any()
    return int(s.filled("toy").sum())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.h5"
    run_job(path)
    return content(path)


def test_layout_is_plain_h5py(reference, tmp_path):
    pooled, layers, filled, fails, ids, flags, norm = reference
    n = store_job.N
    assert pooled.shape == (n, store_job.DIM) and layers.shape == (
        n,
        store_job.LAYERS,
        store_job.DIM,
    )
    cursed = np.arange(n) % 11 == 0
    np.testing.assert_array_equal(filled, ~cursed)
    assert [f[0] for f in fails] == [f"utt{i:04d}" for i in np.flatnonzero(cursed)]
    assert all(f[1] == "toy" and "cursed" in f[2] for f in fails)
    np.testing.assert_array_equal(pooled[filled], store_job.features(np.flatnonzero(filled))[0])
    # Two float32 norms of the same D values: the D squares' sum by gamma_{D+1}, halved by the
    # sqrt, + its rounding; each order, of the norm.
    want = np.linalg.norm(pooled[filled], axis=1)
    bound = (gamma(pooled.shape[1] + 1) + 4 * U32) * want
    assert_within(norm[filled], want, bound, "stored row norms vs numpy")
    assert_exceeds(norm[filled], np.roll(want, 1), bound, "another row's norm")
    assert np.isnan(norm[~filled]).all() and (flags == "").all()
    path = tmp_path / "s.h5"
    run_job(path)
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == 3
        # Rows grouped by split (a split is one contiguous range), each with its API row number.
        split = f["utterances/split"].asstr()[()]
        assert list(split) == ["Train"] * (n - n // 5) + ["Development"] * (n // 5)
        rows = f["utterances/row"][()]
        assert sorted(rows) == list(range(n)) and (rows % 5 != 0)[: n - n // 5].all()
        # Features live in one file per backbone, reached through external links.
        link = f["features/toy"].get("pooled", getlink=True)
        assert isinstance(link, h5py.ExternalLink) and link.filename == "s.h5.features/toy.h5"
        assert f["features/toy/pooled"].chunks is None  # contiguous: merges write rows in place
        # Per-row state in its own file, contiguous too: a finalize writes only its rows there.
        for key in ("filled", "norm", "flags"):
            link = f["features/toy"].get(key, getlink=True)
            assert isinstance(link, h5py.ExternalLink)
            assert link.filename == "s.h5.features/toy.state.h5"
            assert f["features/toy"][key].chunks is None and f["features/toy"][key].shape == (n,)
        link = f.get("failures", getlink=True)
        assert isinstance(link, h5py.ExternalLink) and link.filename == "s.h5.features/failures.h5"
        for key in ("id", "split", "duration_s", "path"):
            assert f["utterances"][key].shape == (n,)
        assert f["labels/arousal"].dtype == np.float32 and np.isnan(f["labels/valence"][()]).all()
        assert f["features/toy"].attrs["source"] == "toy-fn"
    assert not (tmp_path / "s.h5.journal" / "batches" / "toy").exists() or not any(
        (tmp_path / "s.h5.journal" / "batches" / "toy").iterdir()
    )


def test_sigkill_at_random_points_loses_nothing(reference, tmp_path):
    rng = random.Random(1234)
    kills, mid_progress, rounds = 0, 0, 0
    path = tmp_path / "killed.h5"
    while kills < 24:
        proc = run_job(path, wait=False, progress=True)
        if rng.random() < 0.2:  # anywhere in the start: creating the store, opening a writer
            time.sleep(rng.uniform(0.0, 0.5))
        else:  # after a random batch, then anywhere in the next one's write, fail or merge
            wait_for_batch(proc, rng)
            time.sleep(rng.uniform(0.0, 0.02))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            kills += 1
            filled = check_consistent(path) if path.exists() else 0
            mid_progress += 0 < filled < store_job.N - store_job.N // 11
        else:
            proc.stdout.close()
            assert proc.returncode == 0
            # The job finished between kills: its content must equal the uninterrupted run's.
            for a, b in zip(content(path), reference):
                np.testing.assert_array_equal(a, b)
            rounds += 1
            for p in tmp_path.iterdir():
                subprocess.run(["rm", "-rf", str(p)], check=True)
    run_job(path)  # resume to completion
    for a, b in zip(content(path), reference):
        np.testing.assert_array_equal(a, b)
    # Kills follow the job's own progress lines (24 of 24 landed mid-job on the 2-core box).
    assert mid_progress >= 12, f"only {mid_progress} of {kills} kills landed mid-job"


def test_sigkill_inside_the_merge_loses_nothing(reference, tmp_path):
    # Merges write rows in place into the backbone files; a kill mid-merge leaves half-written
    # rows there, which must stay invisible (the journal still holds them) and be merged again.
    rng = random.Random(99)
    path = tmp_path / "killed.h5"
    marker = Path(str(path) + ".in-merge")
    in_merge, kills = 0, 0
    while in_merge < 10:
        assert kills < 30, f"only {in_merge} of {kills} kills landed inside a merge"
        marker.unlink(missing_ok=True)
        proc = run_job(path, wait=False, slow_merge=True)
        while proc.poll() is None and not marker.exists():  # wait for a merge to start
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.2))  # then kill at a random point (of ~0.1-0.3 s)
        if proc.poll() is not None:  # finished: start over from an empty store
            assert proc.returncode == 0
            for p in tmp_path.iterdir():
                subprocess.run(["rm", "-rf", str(p)], check=True)
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        in_merge += marker.exists()
        if path.exists():
            check_consistent(path)
    run_job(path)  # resume to completion
    for a, b in zip(content(path), reference):
        np.testing.assert_array_equal(a, b)


def test_two_writer_shards_merge_to_the_same_store(reference, tmp_path):
    path = tmp_path / "sharded.h5"
    a = run_job(path, "p0", "0/2", wait=False)
    run_job(path, "p1", "1/2")
    a.wait()
    assert a.returncode == 0
    finalize(path)
    for x, y in zip(content(path), reference):
        np.testing.assert_array_equal(x, y)


def test_readers_run_while_a_writer_runs(tmp_path):
    path = tmp_path / "live.h5"
    proc = run_job(path, wait=False)
    reads = 0
    while proc.poll() is None:
        if path.exists():
            check_consistent(path)
            reads += 1
    assert proc.returncode == 0 and reads > 0
    assert check_consistent(path) == store_job.N - len(range(0, store_job.N, 11))


def _train_store(path, n, **kwargs):
    """A store of n Train utterances u0..u{n-1} (paths are the ids; no audio needed); the ids."""
    ids = [f"u{i}" for i in range(n)]
    create_store(path, ids=ids, splits=["Train"] * n, durations=np.ones(n), paths=ids, **kwargs)
    return ids


def test_resume_fills_only_missing_rows(tmp_path):
    path = tmp_path / "r.h5"
    _train_store(path, 6)
    with StoreWriter(path, "b", dim=2) as w:
        w.write([0, 1], np.ones((2, 2)))
        w.fail([2], ["corrupt file"])
    s = FeatureStore(path)
    np.testing.assert_array_equal(s.missing("b"), [3, 4, 5])
    assert s.failures("b") == [("u2", "b", "corrupt file")]
    # A later success clears the failure record.
    StoreWriter(path, "b", dim=2).write([2], np.full((1, 2), 3.0))
    finalize(path)
    s = FeatureStore(path)
    assert s.failures() == [] and s.filled("b").sum() == 3
    np.testing.assert_array_equal(s.load(None, ["b"]).features["b"][:, 0], [1, 1, 3])


def test_iter_batches_and_load_align_labels(tmp_path):
    path = tmp_path / "l.h5"
    ids = [f"u{i}" for i in range(9)]
    create_store(
        path,
        ids=ids,
        splits=["Train", "Development", "Test1"] * 3,
        durations=np.ones(9),
        paths=ids,
        labels={"valence": np.arange(9, dtype=np.float32)},
    )
    with StoreWriter(path, "b", dim=1) as w:
        w.write(np.arange(9), np.arange(9, dtype=np.float32)[:, None] * 10)
    split = FeatureStore(path).load("Development", ["b"])
    np.testing.assert_array_equal(split.ids, ["u1", "u4", "u7"])
    np.testing.assert_array_equal(split.features["b"][:, 0], split.labels["valence"] * 10)
    batches = list(FeatureStore(path).iter_batches(None, ["b"], 4))
    assert [len(b) for b in batches] == [4, 4, 1]
    # Batches come in storage order: splits in pipeline order, rows ascending within each.
    rows = np.concatenate([b.indices for b in batches])
    np.testing.assert_array_equal(rows, [0, 3, 6, 1, 4, 7, 2, 5, 8])
    np.testing.assert_array_equal(
        np.concatenate([b.features["b"][:, 0] for b in batches]), rows * 10
    )
    np.testing.assert_array_equal(
        np.concatenate([b.labels["valence"] for b in batches]), rows.astype(np.float32)
    )
    for _ in ("journal pending", "merged"):
        whole = FeatureStore(path).load(None, ["b"])  # load: ascending row order
        np.testing.assert_array_equal(whole.indices, np.arange(9))
        np.testing.assert_array_equal(whole.features["b"][:, 0], np.arange(9) * 10)
        assert whole.features["b"].dtype == np.float32
        finalize(path)


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_bad_input_errors_name_the_file_and_overwrite_nothing(tmp_path):
    path = tmp_path / "s.h5"
    ids = ["a", "b", "c"]
    create_store(path, ids=ids, splits=["Train"] * 3, durations=np.ones(3), paths=ids)
    StoreWriter(path, "w", dim=4).write([0], np.ones((1, 4)))
    finalize(path)
    before = _digest(path)
    cases = [
        lambda: StoreWriter(path, "w", dim=5),  # mismatched width on append
        lambda: StoreWriter(path, "w", dim=4).write([1], np.ones((1, 3))),
        lambda: create_store(
            path, ids=["a", "b", "z"], splits=["Train"] * 3, durations=np.ones(3), paths=ids
        ),
        lambda: create_store(
            tmp_path / "d.h5", ids=["a", "a"], splits=["x"] * 2, durations=[1, 1], paths=["p", "q"]
        ),
        lambda: FeatureStore(path).load("Nope", ["w"]),
        lambda: FeatureStore(path).load(None, ["unknown"]),
    ]
    for case in cases:
        with pytest.raises(StoreError) as e:
            case()
        msg = str(e.value)
        assert "\n" not in msg and (str(path) in msg or "d.h5" in msg), msg
    assert _digest(path) == before
    assert not (tmp_path / "d.h5").exists()

    not_store = tmp_path / "plain.h5"
    with h5py.File(not_store, "w") as f:
        f["x"] = 1
    text = tmp_path / "text.h5"
    text.write_text("hello")
    future = tmp_path / "future.h5"
    create_store(future, ids=ids, splits=["Train"] * 3, durations=np.ones(3), paths=ids)
    with h5py.File(future, "r+") as f:
        f.attrs["schema_version"] = 99
    for bad, reason in (
        (not_store, "not a jax_ifmvse feature store"),
        (text, "not an HDF5 file"),
        (future, "schema version 99"),
    ):
        digest = _digest(bad)
        with pytest.raises(StoreError, match=reason):
            FeatureStore(bad)
        with pytest.raises(StoreError):
            create_store(bad, ids=ids, splits=["Train"] * 3, durations=np.ones(3), paths=ids)
        assert _digest(bad) == digest


def test_inspect_prints_tables_and_json(reference, tmp_path):
    path = tmp_path / "i.h5"
    run_job(path)
    runner = CliRunner()
    res = runner.invoke(cli, ["inspect", str(path)])
    assert res.exit_code == 0, res.output
    for word in ("Train", "Development", "toy", "toy-fn", "cursed"):
        assert word in res.output
    assert res.output.index("Train") < res.output.index("Development")  # pipeline order
    res = runner.invoke(cli, ["inspect", str(path), "--json"])
    data = json.loads(res.output)
    toy = data["backbones"]["toy"]
    n_bad = len(range(0, store_job.N, 11))
    assert (toy["filled"], toy["failed"], toy["missing"]) == (store_job.N - n_bad, n_bad, 0)
    assert (
        toy["width"] == store_job.DIM and toy["layers"] == store_job.LAYERS and toy["nan_rows"] == 0
    )
    norms = np.linalg.norm(
        store_job.features(np.flatnonzero(np.arange(store_job.N) % 11))[0], axis=1
    )
    # Each norm in float32 (D squares summed, a sqrt: gamma_{D+2}), the mean written with 4
    # decimals.
    bound = written(4, norms.max()) + gamma(store_job.DIM + 2) * norms.max()
    assert_within(toy["mean_norm"], norms.mean(), bound, "inspect mean_norm")
    every = np.linalg.norm(store_job.features(np.arange(store_job.N))[0], axis=1).mean()
    assert_exceeds(toy["mean_norm"], every, bound, "failed rows counted")
    assert data["splits"]["Development"]["utterances"] == store_job.N // 5
    assert list(data["splits"]) == ["Train", "Development"]  # pipeline order, not alphabetical
    res = runner.invoke(cli, ["inspect", str(tmp_path / "missing.h5")])
    assert res.exit_code != 0 and "no such store" in res.output


@pytest.mark.parametrize("where", ["_read_batch", "read"])
def test_reader_looks_again_when_finalize_removes_a_journal_file_mid_read(
    tmp_path, monkeypatch, where
):
    # A finalize can unlink a journal file between a reader's listing and its reading of the
    # file's header (`_read_batch`) or, later, of its rows (`_Batch.read`): the reader looks again.
    import featurestore.store as store_mod

    path = tmp_path / "race.h5"
    _train_store(path, 6, labels={})
    with StoreWriter(path, "toy", dim=4) as w:
        w.write(np.arange(3), np.ones((3, 4), np.float32))
        w.write(np.arange(3, 6), 2 * np.ones((3, 4), np.float32))
    owner = store_mod if where == "_read_batch" else store_mod._Batch
    real = getattr(owner, where)
    raced = []

    def racing(*args, **kwargs):
        if not raced:
            raced.append(True)
            finalize(path)  # merges every journal file into the store and deletes them
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, where, racing)
    got = FeatureStore(path).load(None, ["toy"])
    assert raced and FeatureStore(path).pending_journal_files == 0
    np.testing.assert_array_equal(got.features["toy"][:, 0], [1, 1, 1, 2, 2, 2])
    monkeypatch.undo()
    # A journal file that exists but is corrupt is an error naming it, not a retry.
    with StoreWriter(path, "toy2", dim=4) as w:
        w.write(np.arange(6), np.ones((6, 4), np.float32))
    bad = next((Path(str(path) + ".journal") / "batches" / "toy2").glob("*.rows"))
    bad.write_bytes(b"not a batch")
    with pytest.raises(StoreError, match=bad.name):
        FeatureStore(path).load(None, ["toy2"])


def test_backbone_registration_merged_mid_listing_is_still_seen(tmp_path, monkeypatch):
    # finalize deletes a backbone's journal registration after renaming the new main file in; a
    # reader whose listing saw the registration but could not read it must still see the backbone.
    path = tmp_path / "reg.h5"
    _train_store(path, 4, labels={})
    with StoreWriter(path, "toy", dim=4) as w:
        w.write(np.arange(4), np.ones((4, 4), np.float32))
    real = Path.read_text
    raced = []

    def racing_read(self, *args, **kwargs):
        if self.suffix == ".json" and self.parent.name == "backbones" and not raced:
            raced.append(self)
            finalize(path)
            raise FileNotFoundError(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", racing_read)
    info = FeatureStore(path).backbones
    assert raced and "toy" in info and info["toy"].dim == 4


def test_featurestore_never_imports_jax():
    code = (
        "import sys, featurestore, featurestore.store, featurestore.summary; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'jax_ifmvse', 'flax'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_flags_per_row_survive_journal_and_finalize(tmp_path):
    p = tmp_path / "s.h5"
    create_store(p, ids=list("abcd"), splits=["Train"] * 4, durations=[1] * 4, paths=list("abcd"))
    w = StoreWriter(p, "bb", dim=2)
    w.write(np.array([3, 0]), np.ones((2, 2)), flags=["short", "silent,short"])
    expected = ["silent,short", "", "", "short"]
    assert FeatureStore(p).flags("bb").tolist() == expected  # journal pending
    finalize(p)
    assert FeatureStore(p).flags("bb").tolist() == expected
    StoreWriter(p, "bb", dim=2).write(np.array([1]), np.ones((1, 2)), flags=["cropped"])
    finalize(p)
    assert FeatureStore(p).flags("bb").tolist() == ["silent,short", "cropped", "", "short"]
    with pytest.raises(StoreError, match="2 rows but 1 flags"):
        w.write(np.array([1, 2]), np.ones((2, 2)), flags=["short"])


def _layered_store(path, n=10, nl=3, dim=4, splits=("Train", "Development"), failed=()):
    """A store with layered float16 backbone "L" (row r, layer k = r + k / 4) in the journal;
    rows in `failed` are recorded as failed instead."""
    ids = [f"u{i}" for i in range(n)]
    sp = [splits[i % len(splits)] for i in range(n)]
    create_store(path, ids=ids, splits=sp, durations=np.ones(n), paths=ids)
    rows = np.arange(n)
    layers = (rows[:, None, None] + np.arange(nl)[None, :, None] / 4 + np.zeros(dim)).astype(
        np.float16
    )  # (N, L, D)
    w = StoreWriter(path, "L", dim=dim, num_layers=nl, dtype="float16", attrs={"source": "t"})
    for s in range(0, n, 3):
        r = np.asarray([x for x in rows[s : s + 3][::-1] if x not in failed], np.int64)
        w.write(r, layers[r, -1], layers[r])
    if failed:
        w.fail(list(failed), ["bad audio"] * len(failed))
    return layers


def test_dtype_layer_choice_and_one_journal_read_per_call(tmp_path, monkeypatch):
    import featurestore.store as store_mod

    path = tmp_path / "d.h5"
    layers = _layered_store(path)
    calls = []
    real = store_mod._read_batch

    def counting(p, *a, **k):
        calls.append(p)
        return real(p, *a, **k)

    monkeypatch.setattr(store_mod, "_read_batch", counting)
    for state in ("journal pending", "merged"):
        s = FeatureStore(path)
        calls.clear()
        batches = list(s.iter_batches(None, ["L"], 2, layers=True, dtype=None))
        assert len(batches) == 5 and len(calls) == (4 if state == "journal pending" else 0)
        for b in batches:
            assert b.features["L"].dtype == np.float16, state
            np.testing.assert_array_equal(b.features["L"], layers[b.indices])
        got = s.load("Development", ["L"], layers=True)  # default float32, exact from float16
        assert got.features["L"].dtype == np.float32
        np.testing.assert_array_equal(got.features["L"], layers[1::2].astype(np.float32))
        one, have = s._read("L", np.array([7, 2, 5]), layers=True, dtype=None, layer=1)
        assert have.all() and one.dtype == np.float16
        np.testing.assert_array_equal(one, layers[[7, 2, 5], 1])
        finalize(path)


def test_finalize_rewrites_only_what_changed(tmp_path):
    path = tmp_path / "c.h5"
    _layered_store(path)
    with StoreWriter(path, "P", dim=2) as w:
        w.write(np.arange(10), np.ones((10, 2)))
    finalize(path)
    data = Path(str(path) + ".features")
    files = [path, *data.iterdir()]
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in files}
    assert set(before) == {"c.h5", "failures.h5", "L.h5", "P.h5", "L.state.h5", "P.state.h5"}
    w = StoreWriter(path, "P", dim=2)
    w.write([3], np.full((1, 2), 7.0), flags=["short"])
    assert finalize(path) == 1
    after = {p.name: (p.stat().st_ino, p.read_bytes()) for p in files}
    for name in ("c.h5", "failures.h5", "L.h5", "L.state.h5"):
        assert after[name] == before[name], name  # not touched: same file, same bytes

    def changed(name):
        a, b = (np.frombuffer(x[name][1], np.uint8) for x in (after, before))
        assert after[name][0] == before[name][0]  # same file, written in place ...
        return len(np.flatnonzero(a != b))

    assert 0 < changed("P.h5") <= 8  # ... at the one row's 8 bytes of features only
    assert 0 < changed("P.state.h5") <= 4 + 5  # ... and its norm and flags ("short")
    s = FeatureStore(path)
    np.testing.assert_array_equal(s.load(None, ["P"]).features["P"][:, 0], [1, 1, 1, 7] + [1] * 6)
    assert s.flags("P")[3] == "short"
    want = np.hypot(7, 7)  # exact squares and sum; float32's sqrt vs float64's
    assert_within(s.norms("P")[3], want, (U32 + 2 * U64) * want, "patched row's norm")
    assert_exceeds(7.0, want, (U32 + 2 * U64) * want, "norm of one feature")
    assert not list(data.glob(".tmp-*")) and not list(tmp_path.glob(".tmp-*"))


def test_inspect_reads_no_features(tmp_path, monkeypatch):
    import featurestore.store as store_mod
    from featurestore import summarize

    path = tmp_path / "i.h5"
    layers = _layered_store(path)

    def refuse(*a, **k):
        raise AssertionError("summarize read features")

    monkeypatch.setattr(store_mod, "_gather", refuse)
    monkeypatch.setattr(store_mod._Batch, "read", refuse)
    for _ in ("journal pending", "merged"):
        info = summarize(path)["backbones"]["L"]
        assert info["filled"] == 10 and info["nan_rows"] == 0
        norms = np.linalg.norm(layers[:, -1].astype(np.float32), axis=1)
        bound = written(4, norms.max()) + gamma(layers.shape[-1] + 2) * norms.max()
        assert_within(info["mean_norm"], norms.mean(), bound, "summary mean_norm")
        first = np.linalg.norm(layers[:, 0].astype(np.float32), axis=1).mean()
        assert_exceeds(info["mean_norm"], first, bound, "the first layer's norm")
        finalize(path)


def test_layer_view_is_streamed_in_chunks(tmp_path):
    from featurestore import write_layer_view

    path = tmp_path / "v.h5"
    layers = _layered_store(path, failed=(9,))
    finalize(path)
    written = write_layer_view(path, "L1", "L", 1, {"derived_from": "L"}, chunk=4)
    assert written == 9
    # 9 rows in chunks of 4 (memory bounded by the chunk), plus the failure record
    assert FeatureStore(path).pending_journal_files == 4
    finalize(path)
    s = FeatureStore(path)
    got = s.load(None, ["L1"], dtype=None)
    assert got.features["L1"].dtype == np.float16
    np.testing.assert_array_equal(got.indices, np.arange(9))
    np.testing.assert_array_equal(got.features["L1"], layers[:9, 1])
    assert s.failures("L1") == [("u9", "L1", "bad audio")]
    assert write_layer_view(path, "L1", "L", 1, {}, chunk=3) == 0  # resumable: nothing left


def _write_v1_store(path, n=6):
    """A schema-1 store as the previous version wrote it (by hand, with h5py), plus a pending
    schema-1 journal batch and failure."""
    ids = [f"u{i}" for i in range(n)]
    s = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.attrs["schema_version"] = 1
        f.attrs["corpus"] = "/data"
        u = f.create_group("utterances")
        u.create_dataset("id", data=np.asarray(ids, dtype=object), dtype=s)
        split = ["Development" if i % 2 else "Train" for i in range(n)]
        u.create_dataset("split", data=np.asarray(split, dtype=object), dtype=s)
        u.create_dataset("duration_s", data=np.arange(n, dtype=np.float32))
        u.create_dataset("path", data=np.asarray(ids, dtype=object), dtype=s)
        lab = f.create_group("labels")
        for k in ("arousal", "valence", "dominance"):
            lab.create_dataset(k, data=np.arange(n, dtype=np.float32) + 0.5)
        g = f.create_group("features/b")
        g.attrs["source"] = "old"
        g.attrs["dtype"] = "float32"
        pooled = np.zeros((n, 3), np.float32)
        pooled[:4] = np.arange(4)[:, None] + 1
        g.create_dataset("pooled", data=pooled, chunks=True)
        g.create_dataset("filled", data=np.arange(n) < 4)
        flags = np.asarray(["short", "", "", "silent", "", ""], dtype=object)
        g.create_dataset("flags", data=flags, dtype=s)
        fails = np.array([("u5", "b", "broken")], dtype=[("id", s), ("backbone", s), ("reason", s)])
        f.create_dataset("failures", data=fails, maxshape=(None,), chunks=True)
    j = Path(str(path) + ".journal") / "batches" / "b"
    j.mkdir(parents=True)
    with h5py.File(j / "p0-1-0000001-aaaa.h5", "w") as b:
        b["indices"] = np.array([4])
        b["pooled"] = np.full((1, 3), 9.0, np.float32)


def test_schema_1_store_errors_then_upgrades_in_place(tmp_path, monkeypatch):
    import featurestore.store as store_mod

    path = tmp_path / "old.h5"
    _write_v1_store(path)
    with pytest.raises(StoreError) as e:
        FeatureStore(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and f"ifmvse store upgrade {path}" in msg
    # A kill before the rename leaves the old store as it was.
    before = _digest(path)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod, "_write_main", killed)
    with pytest.raises(KeyboardInterrupt):
        store_mod.upgrade(path)
    assert _digest(path) == before
    monkeypatch.undo()
    res = CliRunner().invoke(cli, ["store", "upgrade", str(path)])
    assert res.exit_code == 0 and "upgraded" in res.output, res.output
    s = FeatureStore(path)
    assert s.ids.tolist() == [f"u{i}" for i in range(6)] and s.attrs["corpus"] == "/data"
    np.testing.assert_array_equal(s.durations, np.arange(6))
    np.testing.assert_array_equal(s.labels["valence"], np.arange(6) + 0.5)
    assert s.backbones["b"].attrs["source"] == "old" and s.backbones["b"].dim == 3
    got = s.load(None, ["b"])  # row 4 from the pending schema-1 journal batch
    np.testing.assert_array_equal(got.indices, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(got.features["b"][:, 0], [1, 2, 3, 4, 9])
    assert s.flags("b").tolist() == ["short", "", "", "silent", "", ""]
    assert s.failures("b") == [("u5", "b", "broken")]
    finalize(path)
    assert FeatureStore(path).load(None, ["b"]).features["b"][:, 0].tolist() == [1, 2, 3, 4, 9]
    res = CliRunner().invoke(cli, ["store", "upgrade", str(path)])
    assert res.exit_code == 0 and "already" in res.output
    res = CliRunner().invoke(cli, ["store", "upgrade", str(tmp_path / "none.h5")])
    assert res.exit_code != 0 and "no such store" in res.output


def _write_v2_store(path, n=6):
    """A schema-2 store as the previous version wrote it (by hand, with h5py): per-row state and
    failures inside the main file, features in a contiguous backbone file."""
    s = h5py.string_dtype("utf-8")
    split = ["Development" if i % 2 else "Train" for i in range(n)]
    order = np.argsort([0 if x == "Train" else 1 for x in split], kind="stable")  # API rows
    ids = np.asarray([f"u{i}" for i in range(n)], dtype=object)
    pooled = np.zeros((n, 3), np.float32)
    pooled[:4] = np.arange(4)[:, None] + 1  # API order; rows 4 and 5 not filled
    data = Path(str(path) + ".features")
    data.mkdir()
    with h5py.File(data / "b.h5", "w") as f:
        f.attrs["schema_version"] = 2
        f.create_dataset("pooled", data=pooled[order])
    with h5py.File(path, "w") as f:
        f.attrs["schema_version"] = 2
        f.attrs["corpus"] = "/data"
        u = f.create_group("utterances")
        u.create_dataset("id", data=ids[order], dtype=s)
        u.create_dataset("split", data=np.asarray(split, dtype=object)[order], dtype=s)
        u.create_dataset("duration_s", data=np.arange(n, dtype=np.float32)[order])
        u.create_dataset("path", data=ids[order], dtype=s)
        u.create_dataset("row", data=order.astype(np.int64))
        lab = f.create_group("labels")
        for k in ("arousal", "valence", "dominance"):
            lab.create_dataset(k, data=(np.arange(n, dtype=np.float32) + 0.5)[order])
        g = f.create_group("features/b")
        g.attrs.update({"source": "old", "dtype": "float32", "dim": 3, "num_layers": -1})
        filled = np.arange(n) < 4
        g.create_dataset("filled", data=filled[order])
        flags = np.asarray(["short", "", "", "silent", "", ""], dtype=object)
        g.create_dataset("flags", data=flags[order], dtype=s)
        norm = np.where(filled, np.linalg.norm(pooled, axis=1), np.nan).astype(np.float32)
        g.create_dataset("norm", data=norm[order])
        g["pooled"] = h5py.ExternalLink(f"{data.name}/b.h5", "/pooled")
        fails = np.array([("u5", "b", "broken")], dtype=[("id", s), ("backbone", s), ("reason", s)])
        f.create_dataset("failures", data=fails, maxshape=(None,), chunks=True)


def test_schema_2_store_is_read_then_migrated_once_by_finalize(tmp_path, monkeypatch):
    import featurestore.store as store_mod

    path = tmp_path / "v2.h5"
    _write_v2_store(path)

    def check(s, extra):
        assert s.ids.tolist() == [f"u{i}" for i in range(6)] and s.attrs["corpus"] == "/data"
        np.testing.assert_array_equal(s.labels["valence"], np.arange(6) + 0.5)
        got = s.load(None, ["b"])
        np.testing.assert_array_equal(got.indices, [0, 1, 2, 3, *extra])
        np.testing.assert_array_equal(got.features["b"][:, 0], [1, 2, 3, 4, *[9] * len(extra)])
        assert s.flags("b").tolist() == ["short", "", "", "silent", "hot" if extra else "", ""]
        # Exact integer squares and sums; the sqrt rounded to float32 vs float64's.
        want = np.sqrt(3) * np.arange(1, 5)
        assert_within(s.norms("b")[:4], want, (U32 + 2 * U64) * want, "v2 norms")
        wrong = np.sqrt(2) * np.arange(1, 5)  # one feature left out
        assert_exceeds(wrong, want, (U32 + 2 * U64) * want, "v2 norms, one feature left out")

    s = FeatureStore(path)  # read as it is
    check(s, [])
    assert s.failures("b") == [("u5", "b", "broken")] and s.missing("b").tolist() == [4]
    StoreWriter(path, "b", dim=3).write(np.array([4]), np.full((1, 3), 9.0), flags=["hot"])
    check(FeatureStore(path), [4])  # the journal laid over the old layout
    before = _digest(path)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod, "_write_main", killed)  # killed before the migration's rename
    with pytest.raises(KeyboardInterrupt):
        finalize(path)
    assert _digest(path) == before
    check(FeatureStore(path), [4])
    monkeypatch.undo()
    assert finalize(path) == 1
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == 3 and "migrated" in f.attrs
        assert isinstance(f["features/b"].get("filled", getlink=True), h5py.ExternalLink)
    s = FeatureStore(path)
    check(s, [4])
    assert s.failures("b") == [("u5", "b", "broken")] and s.missing("b").size == 0
    # Migrated once: the next batch's finalize leaves the main file as it is.
    stat = path.stat()
    StoreWriter(path, "b", dim=3).write(np.array([5]), np.full((1, 3), 7.0))
    assert finalize(path) == 1
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    s = FeatureStore(path)
    assert s.failures("b") == [] and s.filled("b").all()
    np.testing.assert_array_equal(s.load(None, ["b"]).features["b"][:, 0], [1, 2, 3, 4, 9, 7])
    out = CliRunner().invoke(cli, ["store", "upgrade", str(path)]).output
    assert f"{path}: already at the current schema version" in out


def test_train_keeps_layered_views_float16(tmp_path):
    from jax_ifmvse.data.views import load_views, standardize, view_stats

    path = tmp_path / "t.h5"
    layers = _layered_store(path, n=12)
    finalize(path)
    s = FeatureStore(path)
    ids, feats, labels = load_views(s, "Train", ["L"], {"L"})
    assert feats["L"].dtype == np.float16 and feats["L"].shape == (6, 3, 4)
    np.testing.assert_array_equal(feats["L"], layers[0::2])
    stats = view_stats(s, "Train", ["L"], {"L"})
    z = standardize(feats, stats)["L"]
    want = (feats["L"].astype(np.float32) - stats["L"][0]) / stats["L"][1]
    assert z.dtype == np.float16
    # The same arithmetic on the same float16 values; z is then rounded once to float16.
    assert_within(z.astype(np.float32), want, float16_storage(want), "standardized float16")
    raw = feats["L"].astype(np.float32) - stats["L"][0]  # not divided by the std
    assert_exceeds(z.astype(np.float32), raw, float16_storage(raw), "std not applied")
    # In place (as train_run standardizes what it loaded): same values, no second copy.
    pooled = s.load("Train", ["L"]).features["L"]  # (6, 4) float32
    mine = {"L": feats["L"].copy(), "P": pooled.copy()}
    pstats = {"L": stats["L"], "P": (pooled.mean(0), pooled.std(0) + 1)}
    zi = standardize(mine, pstats, inplace=True)
    assert zi["L"] is mine["L"] and zi["P"] is mine["P"] and zi["L"].dtype == np.float16
    np.testing.assert_array_equal(zi["L"], z)
    m, sd = pstats["P"]
    want = (pooled - m) / sd  # the same float32 arithmetic: two roundings each
    bound = 2 * U32 * (np.abs(pooled - m) / sd + np.abs(want))
    assert_within(zi["P"], want, bound, "in-place standardized pooled")
    assert_exceeds(zi["P"], pooled - m, bound, "in place, std not applied")


def test_missing_of_a_backbone_never_written_is_every_row(tmp_path):
    p = tmp_path / "s.h5"
    create_store(p, ids=list("abc"), splits=["Train"] * 3, durations=[1] * 3, paths=list("abc"))
    assert FeatureStore(p).missing("new").tolist() == [0, 1, 2]
    StoreWriter(p, "new", dim=2).write(np.array([1]), np.ones((1, 2)))
    assert FeatureStore(p).missing("new").tolist() == [0, 2]
    with pytest.raises(StoreError, match="no backbone 'other'"):
        FeatureStore(p).filled("other")


@pytest.mark.parametrize("damage", ["truncated", "missing", "other shape"])
def test_finalize_never_recreates_a_known_backbone_file(tmp_path, damage):
    path = tmp_path / "s.h5"
    _train_store(path, 6)
    StoreWriter(path, "b", dim=2).write([0, 1], np.full((2, 2), 5.0))
    finalize(path)
    data = Path(str(path) + ".features") / "b.h5"
    good = data.read_bytes()
    if damage == "truncated":
        with open(data, "r+b") as f:
            f.truncate(len(good) // 2)
    elif damage == "missing":
        data.unlink()
    else:
        with h5py.File(data, "w") as f:
            f.create_dataset("pooled", shape=(6, 3), dtype=np.float32)
    before = _digest(path)
    StoreWriter(path, "b", dim=2).write([2], np.full((1, 2), 7.0))
    # Recreating it empty would mark rows 0 and 1 filled over zeros: an error instead, naming
    # the file, with the main file untouched and the batch still journaled for a retry.
    with pytest.raises(StoreError, match="journal is kept") as e:
        finalize(path)
    assert str(data) in str(e.value) and "\n" not in str(e.value)
    assert _digest(path) == before and FeatureStore(path).pending_journal_files == 1
    data.write_bytes(good)
    assert finalize(path) == 1
    got = FeatureStore(path).load(None, ["b"])
    np.testing.assert_array_equal(got.indices, [0, 1, 2])
    np.testing.assert_array_equal(got.features["b"][:, 0], [5, 5, 7])


def test_finalize_replaces_a_stale_file_of_a_new_backbone(tmp_path):
    path = tmp_path / "s.h5"
    _train_store(path, 4)
    data = Path(str(path) + ".features")
    for name in ("n.h5", "n.state.h5"):  # the main file never knew "n"
        (data / name).write_bytes(b"left by a killed finalize")
    StoreWriter(path, "n", dim=2).write([1], np.ones((1, 2)))
    assert finalize(path) == 1
    np.testing.assert_array_equal(FeatureStore(path).load(None, ["n"]).features["n"], [[1, 1]])


def test_layer_view_lists_the_journal_once_whatever_the_chunks(tmp_path, monkeypatch):
    import featurestore.store as store_mod
    from featurestore import write_layer_view

    path = tmp_path / "v.h5"
    layers = _layered_store(path)  # its batches stay journaled: the view reads through them
    calls = []
    real = store_mod._list_journal

    def counting(p):
        calls.append(p)
        return real(p)

    monkeypatch.setattr(store_mod, "_list_journal", counting)
    counts = []
    for name, chunk in (("A", 5), ("B", 1)):
        calls.clear()
        assert write_layer_view(path, name, "L", 1, {}, chunk=chunk) == 10
        counts.append(len(calls))
    assert counts[0] == counts[1]  # 2 chunks or 10: the same journal listings
    finalize(path)
    got = FeatureStore(path).load(None, ["A", "B"], dtype=None)
    np.testing.assert_array_equal(got.features["A"], layers[:, 1])
    np.testing.assert_array_equal(got.features["B"], layers[:, 1])
