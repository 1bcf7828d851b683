"""What a shard does with a file it cannot use: I/O errors retried then left missing, bad audio
recorded with its reason (`Streamer` with a numpy stand-in for the device, fast)."""

import errno
from pathlib import Path

import numpy as np
from tolerances import assert_exceeds, assert_within, gamma

from jax_ifmvse.config import load_config
from jax_ifmvse.data.audio import AudioError, AudioIOError
from jax_ifmvse.data.buckets import Batch
from jax_ifmvse.stream import ExtractStats, Item, Streamer, load_item


class _Writer:
    def __init__(self):
        self.rows, self.failed = {}, {}

    def write(self, indices, pooled, layers=None, flags=None):
        for r, p in zip(indices, pooled, strict=True):
            self.rows[int(r)] = np.asarray(p)

    def fail(self, indices, reasons):
        self.failed.update({int(r): why for r, why in zip(indices, reasons, strict=True)})


def _extractor(waves, lengths):
    """(B, T) -> pooled (B, 2): each row's sum and valid length (what the rows came from)."""
    return np.stack([waves.sum(1), lengths.astype(np.float32)], 1), None


class _Loader:
    """Audio of 100 * (row + 1) samples; `io` paths raise EIO the first `fails` times."""

    def __init__(self, fails: dict[str, int], bad=(), gone=()):
        self.fails, self.bad, self.gone, self.calls = dict(fails), set(bad), set(gone), []

    def __call__(self, path: Path) -> np.ndarray:
        self.calls.append(path.name)
        if path.name in self.gone:
            raise AudioIOError(path, "file not found", errno.ENOENT)
        if self.fails.get(path.name, 0) > 0:
            self.fails[path.name] -= 1
            raise OSError(errno.EIO, "Input/output error")
        if path.name in self.bad:
            raise AudioError(path, "not audio or corrupt (Format not recognised)")
        n = int(path.stem) + 1
        return np.full(100 * n, 0.01 * n, np.float32)


def _run(loader, items, leave_io_missing=True, retries=2):
    cfg = load_config(None, [f"extract.io_retries={retries}", "extract.io_backoff_s=0"])
    s = Streamer(_extractor, cfg.audio, cfg.extract, max_s=1.0, leave_io_missing=leave_io_missing)
    idx = np.arange(len(items))
    batch = Batch(indices=idx, lengths=np.full(len(items), 16000), padded_len=16000, bucket=0)
    w, st = _Writer(), ExtractStats()
    s.run([batch], items, lambda r: Path(f"{r}.wav"), loader, w, st)
    return w, st


def test_an_io_error_that_passes_is_retried_and_the_row_computed():
    items = [Item(r, 0, 0.5, 1) for r in range(4)]
    loader = _Loader({"2.wav": 2})  # fails twice, then reads: within 2 retries
    w, st = _run(loader, items)
    assert sorted(w.rows) == [0, 1, 2, 3] and not w.failed and st.io_missing == 0
    assert loader.calls.count("2.wav") == 3
    # Its own audio, not a neighbour's: 300 float32 samples of 0.03 summed (0.03 rounded once,
    # 299 adds: gamma_300 of 9), its length exact.
    assert_within(w.rows[2], [300 * 0.03, 300], [gamma(300) * 9.0, 0], "row 2's sum")
    assert_exceeds(w.rows[1], [300 * 0.03, 300], gamma(300) * 9.0, "row 1's")


def test_an_io_error_that_persists_leaves_the_row_missing_never_failed():
    items = [Item(r, 0, 0.5, 1) for r in range(4)]
    w, st = _run(_Loader({"1.wav": 99}, bad={"3.wav"}), items)
    assert sorted(w.rows) == [0, 2] and st.done == 2
    assert w.failed == {3: "not audio or corrupt (Format not recognised)"} and st.failed == 1
    assert st.io_missing == 1 and st.io_example == (1, "I/O error (Input/output error)")
    # Prediction has no rerun: there the same error is a failure like any other.
    w, st = _run(_Loader({"1.wav": 99}), items, leave_io_missing=False)
    assert w.failed == {1: "I/O error (Input/output error)"} and st.io_missing == 0


def test_a_file_gone_since_planning_is_missing_one_never_seen_is_a_failure():
    items = [Item(0, 0, 0.5, 1, known=True), Item(1, 0, 1.0, 1, known=False)]
    w, st = _run(_Loader({}, gone={"0.wav", "1.wav"}), items, retries=0)
    assert w.failed == {1: "file not found"} and st.io_missing == 1 and not w.rows


def test_load_item_records_reasons_without_the_path():
    it = Item(0, 0, 1.0, 1)

    def raises(path):
        raise ValueError(f"{path}: cannot parse {path}")

    audio, n, err, io = load_item(raises, Path("/x/a.wav"), it, 16000, False)
    assert (audio, n, io) == (None, 0, False)
    assert err == "not audio or corrupt (cannot parse the file)"
    audio, n, err, io = load_item(
        lambda p: np.zeros(0, np.float32), Path("a.wav"), it, 16000, False
    )
    assert err == "empty audio (no samples)" and not io
