"""Audio loading (resampling, mono mix, crop/chunk, bad files, normalization) and bucketing."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from tolerances import (
    U32,
    assert_exceeds,
    assert_within,
    fft_filter,
    mean_std,
    pairwise_depth,
)

from jax_ifmvse.data.audio import (
    AudioError,
    AudioIOError,
    is_silent,
    load_audio,
    load_many,
    normalize,
    train_stats,
    znorm,
)
from jax_ifmvse.data.buckets import pad_batch, padding_fraction, plan_batches


def _sine(freq, sr, seconds=1.0, amp=0.5):
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x, sr=16000):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)]


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
@pytest.mark.parametrize("freq", [440.0, 1234.0])
def test_resampled_sine_keeps_its_frequency(tmp_path, sr, freq):
    path = tmp_path / f"s{sr}.wav"
    sf.write(path, _sine(freq, sr), sr, subtype="PCM_16")
    x = load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - 16000) <= 1
    assert abs(_peak_hz(x) - freq) < 2.0
    assert np.abs(x).max() <= 1.0
    np.testing.assert_allclose(np.sqrt(np.mean(x[100:-100] ** 2)), 0.5 / np.sqrt(2), rtol=0.02)


def test_stereo_mixes_to_mono_and_formats(tmp_path):
    left, right = _sine(300, 16000), _sine(300, 16000, amp=0.1)
    for ext in ("wav", "flac", "ogg"):
        p = tmp_path / f"st.{ext}"
        sf.write(p, np.stack([left, right], axis=1), 16000)
        x = load_audio(p)
        assert x.ndim == 1 and len(x) == 16000
        # (0.5 + 0.1) / 2 amplitude; ogg is lossy, so a looser tolerance there
        rms = np.sqrt(np.mean(x**2))
        np.testing.assert_allclose(rms, 0.3 / np.sqrt(2), rtol=0.01 if ext != "ogg" else 0.1)


def _soxr_filter(trace: str):
    """(taps h, dh, FFT length, decimation M) of soxr's one FFT stage, from its SOXR_TRACE lines."""
    lpf = re.search(r"make_lpf\(n=(\d+) Fc=(\S+) beta=(\S+) rho=(\S+) scale=(\S+)\)", trace)
    stage = re.search(r"fir_len=(\d+) dft_length=(\d+) .* (\d+)/(\d+)\n", trace)
    assert lpf and stage, trace  # one stage: a Kaiser-windowed sinc applied by FFTs
    n, fc, beta, rho, scale = int(lpf[1]), *map(float, lpf.group(2, 3, 4, 5))
    taps, dft, up, m = map(int, stage.groups())
    assert (taps, up) == (n, 1), trace

    def kaiser_sinc(fc, beta):  # libsoxr's lsx_make_lpf
        z = np.arange(n) - (n - 1) / 2
        w = np.i0(beta * np.sqrt(1 - (z / ((n - 1) / 2 + rho)) ** 2)) / np.i0(beta)
        return fc * np.sinc(fc * z) * w * scale

    h = kaiser_sinc(fc, beta)
    # the trace prints Fc to 7 significant digits and beta to 6: half a unit of the last one
    dfc, db = (0.5 * 10.0 ** (np.floor(np.log10(v)) - d + 1) for v, d in ((fc, 7), (beta, 6)))
    corners = [kaiser_sinc(fc + a * dfc, beta + b * db) for a in (-1, 1) for b in (-1, 1)]
    return h, np.max([np.abs(c - h) for c in corners], axis=0), dft, m


def test_crop_and_chunk(tmp_path, capfd, monkeypatch):
    p = tmp_path / "long.wav"
    # 200.125 Hz: the 2-s crop point falls on a peak (at a zero crossing the edge hides)
    sf.write(p, _sine(200.125, 48000, seconds=5.0), 48000)
    monkeypatch.setenv("SOXR_TRACE", "1")  # libsoxr prints the filter it designs to stderr
    capfd.readouterr()
    x = load_audio(p, max_seconds=2.0)
    h, dh, dft, m = _soxr_filter(capfd.readouterr().err)
    monkeypatch.delenv("SOXR_TRACE")
    assert len(x) == 32000
    chunks = load_audio(p, max_seconds=2.0, long_audio="chunk")
    assert [len(c) for c in chunks] == [32000, 32000, 16000]
    joined = np.concatenate(chunks)
    # 48 -> 16 kHz: soxr filters by FFTs of `dft` inputs with the linear-phase h (581 taps),
    # output n centred on input m n. The crop decodes only the first `cut` inputs and soxr
    # ends on zeros, so output n differs by the taps past the crop point, sum_{j >= cut}
    # h[j - m n + half] x_j: the outputs from (cut - half) / m on (the last 96); an output whose
    # FFT block reads nothing past the crop point (n < (cut - dft + 1 + half) / m) is the same
    # arithmetic on the same inputs, bitwise equal; in between only the FFTs' roundings differ.
    raw, _ = sf.read(p, dtype="float32")  # the 48-kHz input both decodes resample
    cut, half = m * len(x), (len(h) - 1) // 2
    tail = np.where(np.arange(cut + len(h)) >= cut, raw[: cut + len(h)], 0).astype(np.float64)
    past = np.convolve(tail, h)[m * np.arange(len(x)) + half]  # h is symmetric
    exact = -(-(cut - dft + 1 + half) // m)
    assert np.array_equal(joined[:exact], x[:exact])
    assert not past[: -(-(cut - half) // m)].any()
    # each order's FFT rounding over a block of `dft` inputs, ||x||_2 <= sqrt(dft) max|x|
    bound = 2 * fft_filter(dft, h, dh) * np.sqrt(dft) * float(np.abs(raw).max())
    assert_within(joined[: len(x)] - x, past, bound, "chunks - crop vs the taps past the crop")
    assert_exceeds(joined[1 : len(x) + 1] - x, past, bound, "chunks one sample late")
    assert_exceeds(joined[: len(x)] - x, 0 * past, bound, "no taps past the crop point")
    assert len(load_audio(p, long_audio="chunk")) == 1
    with pytest.raises(ValueError, match="long_audio"):
        load_audio(p, long_audio="pad")


def _bad_files(tmp_path):
    """(path, expected reason) for each bad-input case."""
    cases = []
    cases.append((tmp_path / "missing.wav", "file not found"))
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" + bytes(range(200)))
    cases.append((corrupt, "not audio or corrupt"))
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    cases.append((empty, "empty audio"))
    nan = tmp_path / "nan.wav"
    y = _sine(100, 16000)
    y[500] = np.nan
    y[600] = np.inf
    sf.write(nan, y, 16000, subtype="FLOAT")
    cases.append((nan, "NaN or inf"))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    cases.append((text, "unsupported format '.txt'"))
    cases.append((tmp_path, "not a regular file"))
    return cases


def test_every_bad_input_raises_one_line_error(tmp_path):
    for path, reason in _bad_files(tmp_path):
        with pytest.raises(AudioError) as e:
            load_audio(path)
        msg = str(e.value)
        assert msg.startswith(str(path)) and reason in msg and "\n" not in msg, msg
        assert e.value.path == str(path)
        # Only a file that could not be read is an I/O error (retried, never recorded as data).
        assert isinstance(e.value, AudioIOError) == (reason == "file not found"), msg
        # The decoder's complaint calls its in-memory input "the file", never a BytesIO repr.
        assert "object at 0x" not in msg and "BytesIO" not in msg, msg


def test_a_corrupt_file_reason_is_clean_text(tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" + bytes(range(200)))
    with pytest.raises(AudioError) as e:
        load_audio(corrupt)
    assert e.value.reason.startswith("not audio or corrupt (Error opening the file: "), e.value


def test_an_io_error_keeps_its_errno_apart_from_bad_audio(tmp_path, monkeypatch):
    p = tmp_path / "a.wav"
    sf.write(p, _sine(100, 16000), 16000)

    def eio(self):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Path, "read_bytes", eio)
    with pytest.raises(AudioIOError) as e:
        load_audio(p)
    assert e.value.errno == errno.EIO and str(e.value) == f"{p}: I/O error (Input/output error)"


def test_absurd_length_refused_before_decoding(tmp_path):
    p = tmp_path / "long.wav"
    sf.write(p, np.zeros(8000 * 3, np.int16), 8000)  # 3 s against a 2 s limit
    with pytest.raises(AudioError, match=r"absurd length 3 s \(limit 2 s\)"):
        load_audio(p, max_file_seconds=2.0)


def test_run_goes_on_and_silence_is_flagged(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, _sine(300, 16000), 16000)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    bad = [p for p, _ in _bad_files(tmp_path)]
    results = load_many([bad[0], good, *bad[1:], silent])
    assert [r.ok for r in results] == [False, True] + [False] * (len(bad) - 1) + [True]
    by_path = {r.path: r for r in results}
    assert not by_path[str(good)].silent and len(by_path[str(good)].audio) == 16000
    assert by_path[str(silent)].silent and len(by_path[str(silent)].audio) == 16000
    assert all(str(bad[0]) in r.error for r in results[:1])
    assert is_silent(np.full(10, 1e-5)) and not is_silent(np.full(10, 1e-2))


def test_normalization_utterance_and_train(tmp_path):
    rng = np.random.default_rng(0)
    waves = [0.1 * rng.standard_normal(n).astype(np.float32) + 0.02 for n in (8000, 12000)]
    paths = []
    for i, w in enumerate(waves):
        paths.append(tmp_path / f"{i}.wav")
        sf.write(paths[-1], w, 16000, subtype="FLOAT")
    mean, std, errors = train_stats([*paths, tmp_path / "gone.wav"])
    allx = np.concatenate(waves).astype(np.float64)
    # float64 sums (ours: s2 / n - mean^2, in file order) vs numpy's two-pass float64.
    e_m, e_s = mean_std(allx)
    assert_within([mean, std], [allx.mean(), allx.std()], [e_m, e_s], "train stats vs numpy")
    assert_exceeds(std, allx.std(ddof=1), e_s, "train std vs numpy's ddof=1")
    assert len(errors) == 1 and "gone.wav" in str(errors[0])
    # Per utterance in float32 (numpy's pairwise sums): z's mean and std, taken in float64,
    # are 0 and 1 up to the float32 mean's and std's errors over the std, + 2 roundings of z.
    x0 = waves[0].astype(np.float64)
    e_m, e_s = mean_std(x0, U32, pairwise_depth(len(x0)))
    z = normalize(waves[0], "utterance").astype(np.float64)
    s0 = x0.std()
    bound = [e_m / s0 + 2 * U32 * np.abs(z).mean(), e_s / s0 + 2 * U32]
    assert_within([z.mean(), z.std()], [0.0, 1.0], bound, "utterance z's mean and std")
    assert_exceeds(z.std(ddof=1), 1.0, bound[1], "utterance z's std, ddof=1")
    zt = normalize(waves[0], "train", (mean, std))
    want = (waves[0] - mean) / std  # the same float32 arithmetic in another call: 2 roundings
    bound = 2 * U32 * (np.abs(waves[0] - mean) / std + np.abs(want))
    assert_within(zt, want, bound, "train-normalized wave")
    assert_exceeds(zt, (waves[0] - mean) / allx.std(ddof=1), bound, "train std, ddof=1")
    assert np.isfinite(znorm(np.zeros(100))).all()
    with pytest.raises(ValueError, match="needs stats"):
        normalize(waves[0], "train")


BUCKETS = (2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0)


def _realistic_durations(n=1500, seed=0):
    # MSP-Podcast-like: log-normal around 5 s, clipped to the 12 s crop.
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(5.0), 0.45, n), 1.0, 12.0)


@pytest.mark.parametrize("seed", [None, 3])
def test_buckets_bounded_shapes_each_index_once(seed):
    d = _realistic_durations()
    batches = plan_batches(d, bucket_seconds=BUCKETS, batch_seconds=120.0, seed=seed)
    shapes = {b.shape for b in batches}
    assert len(shapes) <= len(BUCKETS)
    idx = np.concatenate([b.indices[b.mask] for b in batches])
    assert sorted(idx.tolist()) == list(range(len(d)))
    for b in batches:
        real = b.indices[b.mask]
        assert (b.lengths[b.mask] <= b.padded_len).all() and (b.lengths[~b.mask] == 0).all()
        # each utterance sits in the smallest bucket that holds it
        assert (d[real] * 16000 <= b.padded_len + 1).all()
        if b.bucket > 0:
            assert (d[real] > BUCKETS[b.bucket - 1]).all()
        assert b.shape[0] * b.padded_len <= 120.0 * 16000
    frac = padding_fraction(batches)
    assert 0.0 < frac < 0.2, frac


def test_single_bucket_pads_much_more():
    d = _realistic_durations()
    one = plan_batches(d, bucket_seconds=(12.0,), batch_seconds=120.0)
    many = plan_batches(d, bucket_seconds=BUCKETS, batch_seconds=120.0)
    assert len({b.shape for b in one}) == 1
    assert padding_fraction(one) > padding_fraction(many) + 0.3


def test_long_and_unknown_durations_are_kept():
    d = np.array([0.5, 30.0, np.nan, 2.5])
    batches = plan_batches(d, bucket_seconds=(2.0, 4.0), batch_seconds=8.0, max_batch=3)
    idx = sorted(int(i) for b in batches for i in b.indices[b.mask])
    assert idx == [0, 1, 2, 3]
    long_b = next(b for b in batches if 1 in b.indices)
    assert long_b.padded_len == 64000 and long_b.lengths[list(long_b.indices).index(1)] == 64000
    assert {b.shape for b in batches} == {(3, 32000), (2, 64000)}


def test_pad_batch():
    waves = [np.ones(5, np.float32), np.full(12, 2.0, np.float32)]
    x, lengths = pad_batch(waves, 8, 3)
    assert x.shape == (3, 8) and x.dtype == np.float32 and lengths.dtype == np.int32
    assert lengths.tolist() == [5, 8, 0]
    assert x[0].tolist() == [1] * 5 + [0] * 3 and (x[1] == 2).all() and (x[2] == 0).all()
    with pytest.raises(ValueError, match="do not fit"):
        pad_batch(waves, 8, 1)


def test_train_normalization_uses_the_whole_training_audio_not_the_crop(tmp_path):
    from jax_ifmvse.config import load_config
    from jax_ifmvse.data.corpus import load_manifest
    from jax_ifmvse.encode import make_loader

    rng = np.random.default_rng(1)
    quiet_then_loud = np.concatenate(
        [0.01 * rng.standard_normal(16000), 0.15 * rng.standard_normal(32000) + 0.1]
    ).astype(np.float32)  # 3 s: the first second, the crop, is nothing like the rest
    sf.write(tmp_path / "tr.wav", quiet_then_loud, 16000, subtype="FLOAT")
    other = (0.2 * rng.standard_normal(8000)).astype(np.float32)
    sf.write(tmp_path / "te.wav", other, 16000, subtype="FLOAT")
    (tmp_path / "m.csv").write_text("path,split\ntr.wav,Train\nte.wav,Test1\n")
    corpus = load_manifest(tmp_path / "m.csv")
    cfg = load_config(None, ["audio.normalize=train", "audio.max_seconds=1"])
    got = make_loader(cfg, corpus)(tmp_path / "te.wav")
    whole = quiet_then_loud.astype(np.float64)
    # The stats' float64 errors (ours vs numpy's order) over the std, then float32: m and s
    # rounded to float32 (NumPy casts a Python float to the array's dtype), the subtraction
    # and the quotient: u |m| / s, u |x - m| / s, 2 u |z|.
    e_m, e_s = mean_std(whole)
    m, s = whole.mean(), whole.std()
    want = (other - m) / s
    x = other.astype(np.float64)
    bound = (e_m + U32 * (abs(m) + np.abs(x - m))) / s + np.abs(want) * (e_s / s + 2 * U32)
    assert_within(got, want, bound, "train-normalized wave vs numpy")
    crop = whole[:16000]
    assert_exceeds(got, (other - crop.mean()) / crop.std(), bound, "the crop's stats")
