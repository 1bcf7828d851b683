"""Frame-level features beside a store: ragged float16 rows, resumable like pooled rows."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import frames_job
import numpy as np
import pytest
from tolerances import (
    assert_exceeds,
    assert_within,
    chain,
    encoder_ops,
    float16_storage,
    two_orders,
)

from featurestore import StoreError, create_store
from featurestore.frames import (
    FrameWriter,
    check_disk,
    estimate_bytes,
    finalize_frames,
    frames_filled,
    missing_frames,
    read_frames,
)

JOB = Path(__file__).with_name("frames_job.py")


def _run(path, wait=True):
    proc = subprocess.Popen([sys.executable, str(JOB), str(path)], cwd=JOB.parent)
    if wait:
        assert proc.wait(timeout=300) == 0
    return proc


def _all(path):
    x, lengths = read_frames(path, "v", np.arange(frames_job.N))
    return [x[i, :n] for i, n in enumerate(lengths)]


def test_frames_of_a_killed_extraction_resume_like_pooled_rows(tmp_path):
    rng = random.Random(7)
    path = tmp_path / "s.h5"
    kills, mid = 0, 0
    while kills < 8:
        before = frames_filled(path, "v").sum() if path.exists() else 0
        proc = _run(path, wait=False)
        # Kill once this run has written something (interpreter start-up varies with load),
        # a random moment later: inside a batch, between batches or inside a merge.
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            if path.exists() and frames_filled(path, "v").sum() > before:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:
            break  # finished between kills
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if path.exists():
            done = frames_filled(path, "v")
            mid += 0 < done.sum() < frames_job.N
            # Every row a killed job left is whole and equal to the function of its row.
            x, lengths = read_frames(path, "v", np.flatnonzero(done))
            for i, r in enumerate(np.flatnonzero(done)):
                want = frames_job.frames(int(r)).astype(np.float16)
                np.testing.assert_array_equal(x[i, : lengths[i]], want)
    _run(path)  # resume to completion
    assert len(missing_frames(path, "v")) == 0
    got = _all(path)
    ref = tmp_path / "ref.h5"
    _run(ref)
    for a, b, i in zip(got, _all(ref), range(frames_job.N), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, frames_job.frames(i).astype(np.float16))
    assert mid >= 4, f"only {mid} of {kills} kills landed mid-job"
    assert not list((tmp_path / "s.h5.frames" / "v").glob("batch-*.npz"))  # all merged
    finalize_frames(path, "v", min_age_s=0)  # a killed writer's temporary files go too
    assert not list((tmp_path / "s.h5.frames" / "v").iterdir())


def test_read_frames_pads_and_sees_pending_batches(tmp_path):
    path = tmp_path / "s.h5"
    create_store(
        path, ids=list("abcd"), splits=["Train"] * 4, durations=[1] * 4, paths=list("abcd")
    )
    w = FrameWriter(path, "v", 2)
    w.write([2, 0], [np.ones((3, 2)), np.full((1, 2), 2.0)])
    finalize_frames(path, "v")
    w.write([3], [np.full((5, 2), 3.0)])  # pending, not merged
    x, lengths = read_frames(path, "v", [3, 1, 0, 2])
    assert x.dtype == np.float16 and x.shape == (4, 5, 2)
    np.testing.assert_array_equal(lengths, [5, 0, 1, 3])
    assert (
        (x[0] == 3).all() and (x[1] == 0).all() and (x[2, 0] == 2).all() and (x[2, 1:] == 0).all()
    )
    np.testing.assert_array_equal(missing_frames(path, "v"), [1])
    with pytest.raises(StoreError, match=r"must be \(T, 2\)"):
        w.write([1], [np.ones((2, 3))])


def test_size_estimate_and_disk_check(tmp_path):
    assert estimate_bytes([10, 20], dim=4, layers=2) == 30 * 4 * 2 * 2
    path = tmp_path / "s.h5"
    assert check_disk(path, 1) > 0
    with pytest.raises(StoreError, match="GB free") as e:
        check_disk(path, 1 << 62)
    assert "\n" not in str(e.value)


def test_extract_frames_resumes_and_equals_each_utterance_alone(tmp_path, capsys):
    """`extract.frames` (`ifmvse extract --frames`): an interrupted extraction resumes; every
    stored row is the backbone's valid frames of that utterance alone, and their mean is the
    pooled row."""
    import jax
    import soundfile as sf
    from tiny_models import save_tiny_whisper

    from featurestore import FeatureStore
    from jax_ifmvse.backbones import load_backbone
    from jax_ifmvse.config import load_config
    from jax_ifmvse.data.audio import load_audio
    from jax_ifmvse.data.corpus import load_manifest
    from jax_ifmvse.encode import make_loader
    from jax_ifmvse.extract import run_extract

    ckpt = tmp_path / "tw"
    save_tiny_whisper(ckpt, d_model=16, encoder_attention_heads=2, encoder_ffn_dim=32)
    rng = np.random.default_rng(0)
    rows = ["path,split"]
    for i in range(7):
        n = int(rng.uniform(0.4, 2.5) * 16000)
        sf.write(tmp_path / f"a{i}.wav", (0.2 * rng.standard_normal(n)).astype(np.float32), 16000)
        rows.append(f"a{i}.wav,Train")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(
        None,
        [f"extract.cache_dir={tmp_path / 'c'}", "audio.max_seconds=2", "extract.frames=last",
         "extract.whisper_window_s=2", "extract.batch_seconds=4", "extract.max_batch=2"],
    )  # fmt: skip
    corpus = load_manifest(tmp_path / "m.csv")
    bb = load_backbone(str(ckpt), cache_dir=tmp_path / "c")

    def run(store, **kw):
        return run_extract(corpus, {"w": bb}, store, cfg, loader=make_loader(cfg, corpus), **kw)

    def stop(name, n, seconds):
        raise KeyboardInterrupt

    store = tmp_path / "s.h5"
    with pytest.raises(KeyboardInterrupt):
        run(store, progress=stop)
    assert "frames of 7 rows need about" in capsys.readouterr().err
    assert 0 < frames_filled(store, "w").sum() < 7
    run(store)
    assert len(missing_frames(store, "w")) == 0
    x, lengths = read_frames(store, "w", np.arange(7))
    pooled = FeatureStore(store).load(None, ["w"]).features["w"]  # (7, D)
    bbw = bb.with_window(2.0)
    hs = jax.jit(bbw.hidden_states)
    for r in range(7):
        wav = load_audio(corpus.abspath(corpus.utterances[r]), max_seconds=2.0)
        hidden, mask = hs(bbw.params, wav[None], np.asarray([len(wav)], np.int32))
        want = np.asarray(hidden[-1, 0])[np.asarray(mask[0]).astype(bool)]  # (F, D)
        assert lengths[r] == len(want)
        # The extraction's batch vs this row alone (the tiny Whisper: 2 layers, k = 80 mel x 3),
        # then one rounding to float16 of the stored frame.
        big = float(np.abs(want).max())
        delta = chain(encoder_ops(2, 3), 240, big)
        bound = delta + float16_storage(np.abs(want) + delta)
        got = x[r, : lengths[r]].astype(np.float32)
        assert_within(got, want, bound, f"stored frames row {r}")
        # The pooled row (the batch's float32 frames' mean) vs the stored frames' mean: the
        # roundings to float16 (at most one each) + two orders of the F-term float32 means.
        mean_bound = delta + float16_storage(big + delta) + two_orders(len(want), 2 * big)
        assert_within(got.mean(0), pooled[r], mean_bound, f"pooled row {r}")
        if r == 0:  # the layer before (the last but one hidden state) falls outside
            other = np.asarray(hidden[-2, 0])[np.asarray(mask[0]).astype(bool)]
            assert_exceeds(got, other, bound, "the layer before")
    with pytest.raises(StoreError, match="GB free"):
        check_disk(store, 1 << 62)


def _pending_store(tmp_path, rows=96, frames=64, dim=256, batch=4):
    """A store with `rows` rows of pending frames, `batch` rows a file, in shuffled order."""
    path = tmp_path / "s.h5"
    ids = [f"u{i:03d}" for i in range(rows)]
    create_store(path, ids=ids, splits=["Train"] * rows, durations=[1.0] * rows, paths=ids)
    w = FrameWriter(path, "v", dim)
    order = np.random.default_rng(0).permutation(rows)
    for s in range(0, rows, batch):
        r = order[s : s + batch]
        w.write(r, [np.full((frames + i % 5, dim), i, np.float16) for i in r])
    return path


def test_merge_holds_one_batch_not_the_pending_bytes(tmp_path):
    """24 pending files of 1 MB: the merge's numpy peak stays near one file's, not 24 MB."""
    import tracemalloc

    path = _pending_store(tmp_path, frames=256, dim=512)
    one_batch = 4 * 260 * 512 * 2
    pending = sum(p.stat().st_size for p in (tmp_path / "s.h5.frames" / "v").glob("*.npz"))
    tracemalloc.start()
    try:
        assert finalize_frames(path, "v") == 24
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * one_batch < pending / 5, (peak, one_batch, pending)
    x, lengths = read_frames(path, "v", np.arange(96))
    np.testing.assert_array_equal(lengths, 256 + np.arange(96) % 5)
    assert all(
        (x[i, : lengths[i]] == i).all() and (x[i, lengths[i] :] == 0).all() for i in range(96)
    )


def test_a_later_merge_writes_only_its_batches_and_listing_reads_only_rows(tmp_path, monkeypatch):
    import featurestore.frames as fr

    path = _pending_store(tmp_path)
    finalize_frames(path, "v")
    seg = sorted((tmp_path / "s.h5.frames").glob("v.seg-*.h5"))
    before = seg[0].stat().st_mtime_ns
    w = FrameWriter(path, "v", 256)
    w.write([5, 200 % 96], [np.full((3, 256), -1, np.float16), np.full((2, 256), -2, np.float16)])

    def no_data(p):
        raise AssertionError("listing read frame data")

    monkeypatch.setattr(fr, "_read_batch", no_data)
    assert frames_filled(path, "v").all() and len(missing_frames(path, "v")) == 0
    monkeypatch.undo()
    assert finalize_frames(path, "v") == 1
    segs = sorted((tmp_path / "s.h5.frames").glob("v.seg-*.h5"))
    assert len(segs) == 2 and segs[0].stat().st_mtime_ns == before  # old segment untouched
    x, lengths = read_frames(path, "v", [5, 8, 6])
    assert list(lengths) == [3, 2, 64 + 6 % 5] and (x[0, :3] == -1).all() and (x[1, :2] == -2).all()


def test_writer_merges_periodically_and_another_merger_is_not_waited_for(tmp_path):
    from featurestore.store import finalize_lock

    path = _pending_store(tmp_path, rows=8)
    w = FrameWriter(path, "v", 256, merge_bytes=3 * 64 * 256 * 2)  # every third row
    for r in range(8):
        w.write([r], [np.full((64, 256), r, np.float16)])
    assert w.merges == 2 and len(list((tmp_path / "s.h5.frames" / "v").glob("*.npz"))) == 2
    with finalize_lock(path):  # someone else merging: the writer goes on without waiting
        for r in range(8):
            w.write([r], [np.full((64, 256), r, np.float16)])
    assert w.merges == 2


def test_an_index_written_before_segments_is_read_and_kept(tmp_path):
    """The one-file layout (data, offsets, filled) of earlier stores: read, then merged onto."""
    import h5py

    path = tmp_path / "s.h5"
    ids = [f"u{i}" for i in range(4)]
    create_store(path, ids=ids, splits=["Train"] * 4, durations=[1.0] * 4, paths=ids)
    (tmp_path / "s.h5.frames").mkdir()
    with h5py.File(tmp_path / "s.h5.frames" / "v.h5", "w") as f:
        f["data"] = np.arange(5 * 2, dtype=np.float16).reshape(5, 2)
        f["offsets"] = np.array([0, 2, 2, 5, 5])
        f["filled"] = np.array([True, False, True, False])
    np.testing.assert_array_equal(missing_frames(path, "v"), [1, 3])
    FrameWriter(path, "v", 2).write([3], [np.ones((1, 2), np.float16)])
    finalize_frames(path, "v")
    x, lengths = read_frames(path, "v", np.arange(4))
    assert list(lengths) == [2, 0, 3, 1]
    np.testing.assert_array_equal(x[2, :3], np.arange(4, 10).reshape(3, 2))
    np.testing.assert_array_equal(x[3, :1], [[1, 1]])


@pytest.mark.slow
def test_merge_peak_rss_does_not_grow_with_the_pending_bytes(tmp_path):
    """A child process merges 40 MB and then 400 MB of pending frames: same peak RSS (within
    two batches), far below 400 MB."""
    code = (
        "import sys; from featurestore.frames import finalize_frames\n"
        "finalize_frames(sys.argv[1], 'v')\n"
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
    )
    peaks, batch = [], 16 * 300 * 1024 * 2  # 9.8 MB files, as WavLM-large writes them
    for rows in (16 * 8, 16 * 80):
        d = tmp_path / str(rows)
        d.mkdir()
        path = _pending_store(d, rows=rows, frames=300, dim=1024, batch=16)
        r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                           cwd=Path(__file__).parent.parent, check=True)  # fmt: skip
        peaks.append(int(r.stdout.split()[-1]) * 1024)
        shutil.rmtree(d)
    assert peaks[1] - peaks[0] < 2 * batch and peaks[1] < 200e6, peaks
