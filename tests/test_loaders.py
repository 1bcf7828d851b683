"""Frame batches streamed from the frame file (jax_ifmvse.data.loaders), host memory bounded."""

from __future__ import annotations

import numpy as np
import pytest
from tolerances import assert_exceeds, assert_within, float16_storage
from toy_store import write_toy_store

from featurestore.frames import FrameWriter, finalize_frames, read_frames
from jax_ifmvse.data.loaders import (
    LoaderError,
    LoaderSettings,
    StreamedFrames,
    eval_plan,
    frame_index,
    plan_buffers,
    train_plan,
)


def _store(tmp_path, n=37, d=6, views=("a",), merge=True, seed=0):
    rng = np.random.default_rng(seed)
    store = tmp_path / "s.h5"
    write_toy_store(
        store, ["Train"] * n, rng.uniform(1, 7, (n, 3)), {v: rng.normal(size=(n, d)) for v in views}
    )
    frames = {}
    for v in views:
        frames[v] = [rng.normal(size=(int(rng.integers(1, 40)), d)) for _ in range(n)]
        frames[v][5] = np.zeros((0, d))  # a row without frames
        w = FrameWriter(store, v, d)
        for s in range(0, n, 10):
            w.write(np.arange(s, min(n, s + 10)), frames[v][s : s + 10])
        if merge:
            finalize_frames(store, v)
    return store, frames


def test_plan_without_buckets_is_the_in_memory_epoch_and_buckets_cut_padding():
    import jax

    from jax_ifmvse.train import epoch_batches

    n, b = 203, 16
    key = jax.random.key(3)
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 2), n))
    idx, w = train_plan(order, np.ones(n), b)
    ref_idx, ref_w = epoch_batches(key, 2, n, b)
    np.testing.assert_array_equal(w, np.asarray(ref_w))
    real = w > 0
    np.testing.assert_array_equal(idx[real], np.asarray(ref_idx)[real])
    assert (idx[~real] == -1).all() and idx.shape == (13, 16)
    # Buckets: every row once, the same batch count, far less padding on ragged lengths.
    lengths = np.random.default_rng(0).integers(50, 600, n)
    bidx, bw = train_plan(order, lengths, b, bucket_window=8, seed=1, epoch=2)
    assert sorted(bidx[bw > 0].tolist()) == list(range(n)) and bidx.shape == idx.shape

    def padded(ix):
        return sum(lengths[r[r >= 0]].max() * b for r in ix)

    assert padded(bidx) < 0.75 * padded(idx)
    again, _ = train_plan(order, lengths, b, bucket_window=8, seed=1, epoch=2)
    other, _ = train_plan(order, lengths, b, bucket_window=8, seed=1, epoch=3)
    np.testing.assert_array_equal(bidx, again)  # deterministic from (seed, epoch)
    assert not np.array_equal(bidx, other)
    dropped, dw = train_plan(order, lengths, b, drop_last=True)
    assert dropped.shape == (12, 16) and (dw == 1).all()
    e, ew = eval_plan(lengths[:20], 8)
    assert e.shape == (3, 8) and sorted(e[ew > 0].tolist()) == list(range(20))
    assert (np.diff(lengths[:20][e[ew > 0]]) >= 0).all()


def test_streamed_batches_equal_read_frames_standardized_and_padded(tmp_path):
    store, frames = _store(tmp_path, views=("a", "b"))
    rows = np.arange(3, 37)
    mean = np.linspace(-1, 1, 6).astype(np.float32)
    stats = {"a": (mean, np.full(6, 2.0, np.float32))}
    sf = StreamedFrames(store, ["a", "b"], rows, LoaderSettings(pad_frames=8), stats)
    y = np.arange(len(rows), dtype=np.float32)[:, None] * 10
    order = np.random.default_rng(1).permutation(len(rows))
    seen = []
    for batch in sf.train_stream(order, 8, targets={"labels": y}):
        pos = batch["positions"]
        real = pos >= 0
        assert batch["a"].dtype == np.float16 and batch["a"].shape[1] % 8 == 0
        np.testing.assert_array_equal(batch["labels"][real], y[pos[real]])
        np.testing.assert_array_equal(batch["weights"], real.astype(np.float32))
        for v in ("a", "b"):
            ref, lens = read_frames(store, v, rows[pos[real]])  # (B, T, D)
            np.testing.assert_array_equal(batch[f"{v}:mask"][real].sum(1), lens)
            for i, j in enumerate(np.flatnonzero(real)):
                want = ref[i, : lens[i]].astype(np.float32)
                if v == "a":
                    want = (want - mean) / 2.0
                got = batch[v][j, : lens[i]].astype(np.float32)
                # Same stored float16 values, same float32 arithmetic: only the batch's one
                # rounding of the standardized value to float16 differs.
                assert_within(got, want, float16_storage(want), f"standardized frames {v}")
                if v == "a" and lens[i] > 0:  # the raw frames (not standardized) fall outside
                    raw16 = ref[i, : lens[i]].astype(np.float32)
                    assert_exceeds(got, raw16, float16_storage(raw16), "not standardized")
                # Independent of the store's own reader: the frames as written.
                raw = frames[v][rows[pos[j]]]
                assert len(raw) == lens[i]
            assert not batch[f"{v}:mask"][~real].any()
        seen += pos[real].tolist()
    assert sorted(seen) == list(range(len(rows)))
    assert not sf.have()["a"][5 - 3] and sf.have()["a"].sum() == len(rows) - 1


def test_memory_bound_sets_the_prefetch_and_refuses_a_bound_below_a_few_batches():
    mb = 10**6
    buf = plan_buffers(40 * mb, 4e9, workers=2)
    assert buf.peak_bytes <= 4e9 and buf.prefetch == 8 and buf.processes == 2
    small = plan_buffers(40 * mb, 0.4e9, workers=0)  # 10 slots: 2 here, 1 reading, 7 prefetched
    assert small.prefetch == 7 and small.peak_bytes <= 0.4e9
    with pytest.raises(LoaderError, match="loader.host_memory_gb=0.1 holds 2 batch"):
        plan_buffers(40 * mb, 0.1e9, workers=1)


def _stream_read_partway(tmp_path, batches: int):
    """(frames, order, every batch's positions of epoch 1, an iterator past `batches` of them)."""
    store, _ = _store(tmp_path)
    sf = StreamedFrames(store, ["a"], np.arange(37), LoaderSettings(bucket_window=2))
    order = np.random.default_rng(2).permutation(37)
    full = [b["positions"] for b in sf.train_stream(order, 4, seed=5, epoch=1)]
    it = sf.train_stream(order, 4, seed=5, epoch=1)
    for _ in range(batches):
        next(it)
    return sf, order, full, it


def test_resumed_stream_continues_with_the_next_batch_and_pending_frames_are_refused(tmp_path):
    sf, order, full, it = _stream_read_partway(tmp_path, 3)
    state = it.get_state()
    rest = [b["positions"] for b in sf.train_stream(order, 4, seed=5, epoch=1, state=state)]
    assert len(rest) == len(full) - 3
    for a, b in zip(rest, full[3:], strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(LoaderError, match="epoch 1, not 2"):
        sf.train_stream(order, 4, seed=5, epoch=2, state=state)
    pend, _ = _store(tmp_path / "p", merge=False)
    with pytest.raises(LoaderError, match="not merged"):
        frame_index(pend, "a")


def test_stream_saved_with_a_checkpoint_continues_after_a_restore(tmp_path):
    """Training's save within an epoch (trainer.checkpoints): the stream goes through Grain's
    Orbax handler beside the state; a fresh stream of the same epoch restored from it gives the
    remaining batches."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jax_ifmvse.parallel import data_mesh
    from jax_ifmvse.trainer.checkpoints import (
        in_epoch_manager,
        restore_in_epoch,
        restore_loader,
        save_in_epoch,
    )

    sf, order, full, it = _stream_read_partway(tmp_path, 4)
    state = {"w": jnp.arange(3.0)}
    mngr = in_epoch_manager(tmp_path / "ck")
    save_in_epoch(mngr, 4, state, [{"epoch": 1}], {"epoch": 1, "steps": 4, "metrics": []}, it)
    mngr.close()
    mngr = in_epoch_manager(tmp_path / "ck")
    got, history, pos = restore_in_epoch(mngr, 4, state, NamedSharding(data_mesh(), P()))
    fresh = sf.train_stream(order, 4, seed=5, epoch=1)
    restore_loader(mngr, 4, fresh)
    mngr.close()
    np.testing.assert_array_equal(np.asarray(got["w"]), [0.0, 1.0, 2.0])
    assert history == [{"epoch": 1}] and pos["steps"] == 4
    rest = [b["positions"] for b in fresh]
    assert len(rest) == len(full) - 4
    for a, b in zip(rest, full[4:], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(tmp_path):
    store, _ = _store(tmp_path)
    order = np.random.default_rng(3).permutation(37)
    runs = []
    for workers in (0, 2):
        sf = StreamedFrames(store, ["a"], np.arange(37), LoaderSettings(workers=workers))
        runs.append(list(sf.train_stream(order, 8)))
    for a, b in zip(*runs, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_filtered_frame_files_are_read_through_h5py_with_the_same_batches(tmp_path):
    import h5py

    store, _ = _store(tmp_path)
    order = np.random.default_rng(4).permutation(37)
    sf = StreamedFrames(store, ["a"], np.arange(37), LoaderSettings(bucket_window=3))
    assert sf.indexes["a"].addrs is not None  # raw reads of the unfiltered chunks
    raw = list(sf.train_stream(order, 8, seed=1))
    path = sf.indexes["a"].path
    with h5py.File(path, "a") as f:  # the same frames, gzip-compressed
        data = f["data"][()]
        del f["data"]
        f.create_dataset("data", data=data, chunks=(7, data.shape[1]), compression="gzip")
    sf = StreamedFrames(store, ["a"], np.arange(37), LoaderSettings(bucket_window=3))
    assert sf.indexes["a"].addrs is None
    for a, b in zip(raw, sf.train_stream(order, 8, seed=1), strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
