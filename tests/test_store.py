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

from featurestore import FeatureStore, StoreError, StoreWriter, create_store, finalize
from jax_ifmvse.cli import cli

JOB = Path(__file__).with_name("store_job.py")


def run_job(path, *args, wait=True, slow_merge=False):
    cmd = [sys.executable, str(JOB), str(path), *args]
    # This checkout's featurestore, not an installed copy's.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(JOB.parent), str(JOB.parent.parent)])}
    if slow_merge:
        env["STORE_JOB_SLOW_MERGE"] = "1"
    if wait:
        subprocess.run(cmd, check=True, env=env)
        return None
    return subprocess.Popen(cmd, env=env)


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
    np.testing.assert_allclose(norm[filled], np.linalg.norm(pooled[filled], axis=1), rtol=1e-6)
    assert np.isnan(norm[~filled]).all() and (flags == "").all()
    path = tmp_path / "s.h5"
    run_job(path)
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == 2
        # Rows grouped by split (a split is one contiguous range), each with its API row number.
        split = f["utterances/split"].asstr()[()]
        assert list(split) == ["Train"] * (n - n // 5) + ["Development"] * (n // 5)
        rows = f["utterances/row"][()]
        assert sorted(rows) == list(range(n)) and (rows % 5 != 0)[: n - n // 5].all()
        # Features live in one file per backbone, reached through external links.
        link = f["features/toy"].get("pooled", getlink=True)
        assert isinstance(link, h5py.ExternalLink) and link.filename == "s.h5.features/toy.h5"
        assert f["features/toy/pooled"].chunks is None  # contiguous: merges write rows in place
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
        proc = run_job(path, wait=False)
        time.sleep(rng.uniform(0.05, 1.2))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            filled = check_consistent(path) if path.exists() else 0
            mid_progress += 0 < filled < store_job.N - store_job.N // 11
        else:
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
    assert mid_progress >= 5, f"only {mid_progress} of {kills} kills landed mid-job"


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
    expected_norm = np.linalg.norm(
        store_job.features(np.flatnonzero(np.arange(store_job.N) % 11))[0], axis=1
    ).mean()
    assert toy["mean_norm"] == pytest.approx(expected_norm, rel=1e-3)
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
