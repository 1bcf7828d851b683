"""Audio input: decode (soundfile), mix to mono, resample (soxr), crop or chunk, normalize.

`load_audio` raises `AudioError(path, reason)` with a one-line message for any file it cannot
use; `load_many` turns those into per-file results so a run over a corpus goes on. Silent audio
is returned as is; `is_silent` flags it.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import re
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jax_ifmvse.errors import IfmvseError

SAMPLE_RATE = 16000
MAX_FILE_SECONDS = 3600.0  # anything longer is not an utterance; refuse before decoding it
SILENCE_PEAK = 1e-4  # about -80 dBFS: below this the whole file counts as silent


class AudioError(IfmvseError):
    """A file that cannot be used as audio; `str()` is one line naming the file and reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class AudioIOError(AudioError):
    """The file could not be read (EIO, ESTALE, a timeout, gone): may pass; retry, don't record.

    `errno` is the OS error number (None for a timeout without one)."""

    def __init__(self, path: str | os.PathLike, reason: str, errno: int | None = None):
        self.errno = errno
        super().__init__(path, reason)


_READ_WHOLE_BYTES = 256 << 20  # files up to this are read by Python first: I/O errors keep errno


def audio_formats() -> set[str]:
    """File suffixes (lower case, no dot) that the decoder reads."""
    import soundfile as sf

    return {k.lower() for k in sf.available_formats()} | {"oga", "opus"}


def _read(path: Path, max_seconds: float | None, max_file_seconds: float) -> tuple[np.ndarray, int]:
    """Decode to float32 (frames, channels) at the file's rate, checking every failure mode."""
    import soundfile as sf

    ext = path.suffix.lower().lstrip(".")
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise AudioError(path, "not a regular file")
        if ext not in audio_formats():
            raise AudioError(path, f"unsupported format {path.suffix or '(no extension)'!r}")
        # Python reads the bytes, the decoder parses them: an I/O error (a shared disk that
        # drops out) keeps its errno and is told apart from a file that is not audio.
        src: Any = io.BytesIO(path.read_bytes()) if st.st_size <= _READ_WHOLE_BYTES else str(path)
    except FileNotFoundError:
        raise AudioIOError(path, "file not found", errno.ENOENT) from None
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else type(e).__name__
        raise AudioIOError(path, f"I/O error ({why})", e.errno) from None
    if st.st_size == 0:
        raise AudioError(path, "empty file (0 bytes)")
    try:
        info = sf.info(src)
    except Exception as e:
        raise AudioError(path, f"not audio or corrupt ({_decoder_reason(e, src)})") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(path, "empty audio (no samples)")
    seconds = info.frames / info.samplerate
    if seconds > max_file_seconds:
        raise AudioError(path, f"absurd length {seconds:.0f} s (limit {max_file_seconds:.0f} s)")
    # Cropping at the source rate avoids decoding and resampling audio that is thrown away.
    frames = -1 if max_seconds is None else int(np.ceil(max_seconds * info.samplerate))
    if isinstance(src, io.BytesIO):
        src.seek(0)
    try:
        x, sr = sf.read(src, frames=frames, dtype="float32", always_2d=True)
    except OSError as e:  # read by libsndfile from the path (a file over _READ_WHOLE_BYTES)
        raise AudioIOError(path, f"I/O error ({_one_line(e)})", e.errno) from None
    except Exception as e:
        raise AudioError(path, f"not audio or corrupt ({_decoder_reason(e, src)})") from None
    if x.shape[0] == 0:
        raise AudioError(path, "zero length")
    if not np.isfinite(x).all():
        raise AudioError(path, "contains NaN or inf samples")
    return x, sr


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _decoder_reason(e: Exception, src: Any) -> str:
    """The decoder's complaint as one line that calls its input "the file" (libsndfile names
    what it was given: the in-memory bytes' repr, `<_io.BytesIO object at 0x...>`, or the path)."""
    why = _one_line(e)
    for name in (f"'{src}'", repr(src), str(src)):
        why = why.replace(name, "the file")
    return re.sub(r"<[\w.]+ object at 0x[0-9a-fA-F]+>", "the file", why)


@dataclasses.dataclass(frozen=True)
class AudioProbe:
    """What a file's header says before any decoding: its length and rate, or why it is unusable."""

    duration_s: float | None  # None when the header cannot be read
    sample_rate: int | None
    problem: str | None = None  # one line without the file name: "empty file (0 bytes)", ...


def probe_audio(path: str | os.PathLike, max_file_seconds: float = MAX_FILE_SECONDS) -> AudioProbe:
    """Check a file from its header (`ifmvse predict` and `ifmvse serve` refuse the same files).

    Names the reason a file cannot be scored: not found, not a regular file, empty, unsupported
    format, not audio or corrupt, no samples, truncated (a WAV cut short, which libsndfile
    would otherwise read up to where it ends), absurd length. Decoding may still fail later
    (NaN samples, a corrupt stream); those reasons come from `load_audio`.
    """
    import re

    import soundfile as sf

    path = Path(path)
    if not path.exists():
        return AudioProbe(None, None, "file not found")
    if not path.is_file():
        return AudioProbe(None, None, "not a regular file")
    if path.stat().st_size == 0:
        return AudioProbe(None, None, "empty file (0 bytes)")
    if path.suffix.lower().lstrip(".") not in audio_formats():
        return AudioProbe(None, None, f"unsupported format {path.suffix or '(no extension)'!r}")
    try:
        info = sf.info(str(path))
    except Exception as e:  # noqa: BLE001 - any decoder complaint means not usable audio
        why = _one_line(e).replace(f"'{path}'", "the file").replace(str(path), "the file")
        return AudioProbe(None, None, f"not audio or corrupt ({why})")
    if info.frames <= 0 or info.samplerate <= 0:
        return AudioProbe(0.0, info.samplerate or None, "empty audio (no samples)")
    seconds = info.frames / info.samplerate
    # libsndfile reads a cut-off WAV up to where it ends and notes "data : N (should be M)".
    m = re.search(r"data\s*:\s*(\d+)\s*\(should be (\d+)\)", info.extra_info or "")
    if m and int(m.group(1)) > int(m.group(2)) and int(m.group(1)) < 0xFFFFFFFF:
        why = f"truncated (header says {m.group(1)} data bytes, file has {m.group(2)})"
        return AudioProbe(seconds, info.samplerate, why)
    if seconds > max_file_seconds:
        why = f"absurd length {seconds:.0f} s (limit {max_file_seconds:.0f} s)"
        return AudioProbe(seconds, info.samplerate, why)
    return AudioProbe(seconds, int(info.samplerate))


def resample(x: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Resample a mono float signal with soxr (high quality); no-op at equal rates."""
    if sr_in == sr_out:
        return np.asarray(x, np.float32)
    import soxr

    return soxr.resample(np.asarray(x, np.float32), sr_in, sr_out, quality="HQ").astype(np.float32)


def chunk_spans(num_samples: int, chunk: int, min_samples: int = 1) -> list[tuple[int, int]]:
    """Consecutive (start, stop) chunks of `chunk` samples over decoded audio.

    A trailing chunk shorter than `min_samples` (the backbone's shortest input giving a frame)
    is dropped with its weight, so a chunked utterance is the length-weighted mean of real
    chunks only; a lone chunk is kept however short. Samples at the target rate.
    """
    spans = [(s, min(s + chunk, num_samples)) for s in range(0, num_samples, chunk)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < min_samples:
        spans.pop()
    return spans


def load_audio(
    path: str | os.PathLike,
    *,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = None,
    long_audio: str = "crop",
    max_file_seconds: float = MAX_FILE_SECONDS,
    min_samples: int = 1,
) -> np.ndarray | list[np.ndarray]:
    """Decode to mono float32 in [-1, 1] at `sample_rate`.

    `long_audio="crop"` returns one 1-D array holding at most `max_seconds` (the first part, as
    the challenge baseline crops at 12 s). `long_audio="chunk"` returns a list of consecutive
    1-D chunks of `max_seconds` each (the last one shorter, dropped when below `min_samples`;
    one chunk if the file is short), cut from the decoded, resampled samples (`chunk_spans`).
    """
    if long_audio not in ("crop", "chunk"):
        raise ValueError(f"long_audio must be 'crop' or 'chunk', got {long_audio!r}")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    path = Path(path)
    x, sr = _read(path, max_seconds if long_audio == "crop" else None, max_file_seconds)
    return prepare_audio(x, sr, sample_rate=sample_rate, max_seconds=max_seconds,
                         long_audio=long_audio, min_samples=min_samples)  # fmt: skip


def prepare_audio(
    x: np.ndarray,
    sr: int,
    *,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = None,
    long_audio: str = "crop",
    min_samples: int = 1,
) -> np.ndarray | list[np.ndarray]:
    """Decoded float32 samples (T, C) at the file's rate `sr` -> what `load_audio` returns for
    a file holding them (mono mix, soxr resampling, clipping, crop or chunks), so audio cut from
    a longer stream is prepared exactly as the same span saved as a file of its own."""
    if long_audio not in ("crop", "chunk"):
        raise ValueError(f"long_audio must be 'crop' or 'chunk', got {long_audio!r}")
    if max_seconds is not None and long_audio == "crop":
        x = x[: int(np.ceil(max_seconds * sr))]  # as `_read` crops at the source rate
    x = x.mean(axis=1)  # (T,) mono mix
    x = np.clip(resample(x, sr, sample_rate), -1.0, 1.0)  # soxr may overshoot slightly
    if max_seconds is None:
        return [x] if long_audio == "chunk" else x
    n = int(round(max_seconds * sample_rate))
    if long_audio == "crop":
        return x[:n]
    return [x[a:b] for a, b in chunk_spans(len(x), n, min_samples)]


def is_silent(x: np.ndarray, peak: float = SILENCE_PEAK) -> bool:
    """Whether a waveform never rises above `peak` (about -80 dBFS by default)."""
    x = np.asarray(x)
    return x.size == 0 or float(np.max(np.abs(x))) <= peak


def znorm(x: np.ndarray, mean: float | None = None, std: float | None = None) -> np.ndarray:
    """Zero-mean unit-variance: per utterance, or with given (train-set) mean and std."""
    x = np.asarray(x, np.float32)
    m = float(x.mean()) if mean is None else mean
    s = float(x.std()) if std is None else std
    return ((x - m) / max(s, 1e-7)).astype(np.float32)  # silent audio stays finite


def normalize(x: np.ndarray, mode: str, stats: tuple[float, float] | None = None) -> np.ndarray:
    """Apply `AudioConfig.normalize`: none | utterance | train (needs `stats` from train_stats)."""
    if mode == "none":
        return np.asarray(x, np.float32)
    if mode == "utterance":
        return znorm(x)
    if mode == "train":
        if stats is None:
            raise ValueError("normalize='train' needs stats=(mean, std) from train_stats()")
        return znorm(x, *stats)
    raise ValueError(f"normalize must be none, utterance or train, got {mode!r}")


@dataclasses.dataclass(frozen=True)
class AudioResult:
    """One file's outcome in a run: audio (crop mode) or chunks, or an error message."""

    path: str
    audio: np.ndarray | list[np.ndarray] | None
    error: str | None = None
    silent: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


def load_many(paths: Iterable[str | os.PathLike], **kwargs) -> list[AudioResult]:
    """`load_audio` over many files; a bad file becomes an error result and the run goes on."""
    out = []
    for p in paths:
        try:
            x = load_audio(p, **kwargs)
        except AudioError as e:
            out.append(AudioResult(str(p), None, error=str(e)))
            continue
        chunks = x if isinstance(x, list) else [x]
        out.append(AudioResult(str(p), x, silent=all(is_silent(c) for c in chunks)))
    return out


@dataclasses.dataclass(frozen=True)
class TrainStats:
    """The Train split's waveform mean and std (`audio.normalize: train`), with what failed.

    `key` identifies the input (sample rate and the file list), so a stored copy is reused only
    for the same files; `failures` lists (path, reason) of every file that could not be decoded.
    """

    mean: float
    std: float
    files: int  # decoded files
    samples: int
    failures: tuple[tuple[str, str], ...] = ()
    key: str = ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (failures as [{path, reason}])."""
        d = dataclasses.asdict(self)
        d["failures"] = [{"path": p, "reason": r} for p, r in self.failures]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainStats:
        """Inverse of `to_json`."""
        fails = tuple((f["path"], f["reason"]) for f in d.get("failures", ()))
        return cls(
            float(d["mean"]), float(d["std"]), int(d["files"]), int(d["samples"]), fails,
            str(d.get("key", "")),
        )  # fmt: skip


def stats_key(paths: Sequence[str | os.PathLike], sample_rate: int) -> str:
    """sha256 of the sample rate and the file list: what a stored TrainStats was computed on."""
    import hashlib

    h = hashlib.sha256(f"{sample_rate}\n".encode())
    h.update("\n".join(str(p) for p in paths).encode())
    return h.hexdigest()


def _stats_part(
    paths: Sequence[str], sample_rate: int, max_seconds: float | None
) -> tuple[int, int, float, float, list[tuple[str, str]]]:
    """One worker's share: (files, samples, sum, sum of squares, [(path, reason)])."""
    files, total, s1, s2, fails = 0, 0, 0.0, 0.0, []
    for p in paths:
        try:
            x = load_audio(p, sample_rate=sample_rate, max_seconds=max_seconds)
        except AudioError as e:
            fails.append((str(p), e.reason))
            continue
        x64 = x.astype(np.float64)
        files += 1
        total += x64.size
        s1 += float(x64.sum())
        s2 += float(np.dot(x64, x64))
    return files, total, s1, s2, fails


def compute_train_stats(
    paths: Sequence[str | os.PathLike],
    *,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = None,
    workers: int = 0,
    chunk: int = 256,
) -> TrainStats:
    """Mean and std over all samples of the given files, decoded by `workers` processes
    (0: one per CPU; 1: in this process), every undecodable file listed in `failures`.

    Pooled over every sample (not a mean of per-file means), like the baseline's wav mean/std;
    float64 sums per share of `chunk` files, added in file order.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    paths = [str(p) for p in paths]
    parts = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(parts) <= 1:
        results = [_stats_part(part, sample_rate, max_seconds) for part in parts]
    else:
        # forkserver: the caller may hold JAX's threads, which a plain fork would copy.
        ctx = mp.get_context("forkserver")
        with cf.ProcessPoolExecutor(min(workers, len(parts)), mp_context=ctx) as pool:
            futs = [pool.submit(_stats_part, part, sample_rate, max_seconds) for part in parts]
            results = [f.result() for f in futs]
    files = sum(r[0] for r in results)
    total = sum(r[1] for r in results)
    s1 = float(np.sum([r[2] for r in results], dtype=np.float64))
    s2 = float(np.sum([r[3] for r in results], dtype=np.float64))
    fails = tuple(f for r in results for f in r[4])
    if total == 0:
        raise AudioError(
            paths[0] if paths else "(no files)", "no readable audio among the Train files"
        )
    mean = s1 / total
    std = float(np.sqrt(max(s2 / total - mean * mean, 0.0)))
    return TrainStats(mean, std, files, total, fails, stats_key(paths, sample_rate))


def stored_train_stats(
    path: str | os.PathLike,
    paths: Sequence[str | os.PathLike] | Callable[[], Sequence[str | os.PathLike]],
    *,
    sample_rate: int = SAMPLE_RATE,
    workers: int = 0,
    key: str | None = None,
) -> tuple[TrainStats, bool]:
    """TrainStats read from `path` when it holds them for these files, else computed once and
    written there; (stats, computed). A lock file lets concurrent processes (extraction shards)
    compute them once: the others wait and read. `paths` may be a function, called only when
    the statistics are computed, with `key` naming its files (checking 84k paths costs ~10 s)."""
    import fcntl
    import json

    path = Path(path)
    if key is None:
        paths = list(paths() if callable(paths) else paths)
        key = stats_key([str(p) for p in paths], sample_rate)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            try:
                st = TrainStats.from_json(json.loads(path.read_text()))
            except (ValueError, KeyError, TypeError):
                st = None  # unreadable: recompute
            if st is not None and st.key == key:
                return st, False
        files = list(paths() if callable(paths) else paths)
        st = compute_train_stats(files, sample_rate=sample_rate, workers=workers)
        st = dataclasses.replace(st, key=key)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(st.to_json(), indent=1))
        os.replace(tmp, path)
    return st, True


def train_stats(
    paths: Sequence[str | os.PathLike],
    *,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = None,
    workers: int = 1,
) -> tuple[float, float, list[AudioError]]:
    """Mean and std over all samples of the given (train-split) files, plus the files skipped
    (`compute_train_stats` as a tuple)."""
    try:
        st = compute_train_stats(
            paths, sample_rate=sample_rate, max_seconds=max_seconds, workers=workers
        )
    except AudioError:
        raise ValueError("train_stats: no readable audio among the given files") from None
    return st.mean, st.std, [AudioError(p, r) for p, r in st.failures]
