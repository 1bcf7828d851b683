"""`audio.normalize: train` statistics: one parallel pass, every failure listed, stored and read back."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf
from tolerances import assert_exceeds, assert_within, mean_std

from jax_ifmvse.data.audio import compute_train_stats, stored_train_stats


def _corpus(tmp_path, n=9):
    """n float WAVs of different lengths and offsets, one corrupt file, one missing path."""
    rng = np.random.default_rng(0)
    waves, paths = [], []
    for i in range(n):
        w = (0.1 * rng.standard_normal(4000 + 1000 * i) + 0.01 * i).astype(np.float32)
        paths.append(tmp_path / f"{i}.wav")
        sf.write(paths[-1], w, 16000, subtype="FLOAT")
        waves.append(w)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00not audio")
    return waves, [*paths[:4], bad, *paths[4:], tmp_path / "gone.wav"]


def test_parallel_pass_equals_numpy_and_lists_every_failure(tmp_path):
    waves, paths = _corpus(tmp_path)
    allx = np.concatenate(waves).astype(np.float64)
    par = compute_train_stats(paths, workers=2, chunk=3)  # 4 shares over 2 processes
    one = compute_train_stats(paths, workers=1)
    bound = mean_std(allx)  # float64 sums over shares vs numpy's pairwise sum
    for st in (par, one):
        assert_within([st.mean, st.std], [allx.mean(), allx.std()], bound, "mean and std")
        assert_exceeds([st.mean, st.std], [allx.mean(), allx.std(ddof=1)], bound, "ddof 1")
        assert (st.files, st.samples) == (len(waves), allx.size)
        failed = dict(st.failures)
        assert set(failed) == {str(tmp_path / "bad.wav"), str(tmp_path / "gone.wav")}
        assert "not audio" in failed[str(tmp_path / "bad.wav")]
        assert "not found" in failed[str(tmp_path / "gone.wav")]


def test_stored_once_then_read_back_without_decoding(tmp_path):
    waves, paths = _corpus(tmp_path)
    where = tmp_path / "run" / "normalize_stats.json"
    first, computed = stored_train_stats(where, paths, workers=1)
    assert computed and json.loads(where.read_text())["files"] == len(waves)
    for p in paths:  # nothing left to decode: a second start must not need the files
        if p.exists():
            p.unlink()
    again, computed = stored_train_stats(where, paths, workers=1)
    assert not computed and again == first
    # Other files are another input: computed again (and stored in place of the old ones).
    new = tmp_path / "new.wav"
    sf.write(new, np.full(1600, 0.25, np.float32), 16000, subtype="FLOAT")
    other, computed = stored_train_stats(where, [new], workers=1)
    assert computed and other.mean == np.float32(0.25) and other.files == 1
    assert json.loads(where.read_text())["key"] == other.key != first.key
