"""Emotion over time: a long recording cut into segments, each scored as a clip of its own.

`plan_file` reads a file's header and lays out segments: fixed windows (`Segmentation.window_s`
long, every `hop_s`; by default the run's shortest backbone input capped at `WINDOW_CAP_S`, no
overlap) or the speech regions of a voice-activity detector (WebRTC VAD, `vad_spans`), cut to
at most one window. `cut_segments` decodes the file as a stream of soundfile blocks and yields
the segments in batches, so host memory holds one batch of segments and one block whatever the
file's length. Each batch is scored by `score_batch` through the predictor: `Predictor.
predict_audio` prepares each segment's samples as `load_audio` prepares a file (mono mix, soxr
resampling of that span alone, crop, normalisation), so a segment scores as the same span cut
out and saved as a file (tested); any other predictor (`predict_files` only) gets the segments
as temporary files. A segment is flagged `silent` (no values: never scores presented as
speech), `short` (shorter than the window, or than `SHORT_VAD_S` from the VAD) or `clipped`
(samples at full scale). A corrupt or truncated tail stops decoding: the segments before it
are kept and `Decode.stop` names where and why. `summarize` gives a file's time-weighted mean,
spread and share of time per class; `write_rows` streams CSV or JSON Lines.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from jax_ifmvse.categories import CLASS_CODES
from jax_ifmvse.config import ATTRIBUTES
from jax_ifmvse.data.audio import is_silent, probe_audio
from jax_ifmvse.errors import IfmvseError

WINDOW_CAP_S = 6.0  # default window: at most this (MSP-Podcast segments are 2.75 to 11 s long)
SHORT_VAD_S = 1.0  # a speech segment shorter than this is flagged short
CLIP_PEAK = 0.999  # a sample at or above this magnitude sits at full scale
CLIP_SHARE = 1e-3  # ... and a segment with more than this share of such samples is clipped
BLOCK_S = 10.0  # seconds decoded per soundfile block
BATCH_BYTES = 64 * 1024 * 1024  # decoded samples (float32) of the segments scored per call
MAX_BATCH = 512  # segments per call at most (a call's fixed cost is spread over this many)
FINE_FRAMES = 4096  # after a failed block, read again in steps this small to find the spot
MAX_TIMELINE_S = 24 * 3600.0  # longest file a timeline accepts (decoded as a stream)
VAD_RATE = 16000  # the rate the WebRTC VAD is run at
VAD_FRAME = 480  # 30 ms at 16 kHz, the VAD's longest frame
VAD_GAP_S = 0.3  # speech regions closer than this are joined (pauses between words)
VAD_MIN_S = 0.25  # speech regions shorter than this are dropped (clicks, breaths)
SEGMENT_COLUMNS = ("file", "index", "start_s", "end_s", *ATTRIBUTES, "flags", "error")


class TimelineError(IfmvseError, ValueError):
    """Segmentation settings that cannot be used; one line says why."""


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """How a file is cut: fixed windows, or speech regions from the VAD cut to the window."""

    mode: str = "fixed"  # fixed | vad
    window_s: float | None = None  # None: `default_window` of the run
    hop_s: float | None = None  # None: the window (no overlap); fixed mode only
    vad_level: int = 2  # WebRTC VAD aggressiveness 0 (keeps most) .. 3 (keeps least)

    def resolved(self, predictor: Any) -> Segmentation:
        """These settings with the run's defaults filled in, checked (TimelineError)."""
        if self.mode not in ("fixed", "vad"):
            raise TimelineError(f"segments {self.mode!r}: must be fixed or vad")
        if getattr(predictor, "text", None) is not None:
            raise TimelineError(
                f"{predictor.run}: segments of a run with text views are not scored (a segment"
                " would need its own transcript); score whole files with predict"
            )
        longest = input_seconds(predictor)
        window = self.window_s if self.window_s is not None else default_window(predictor)
        if not 0 < window <= longest + 1e-9:
            raise TimelineError(
                f"--window-s {window:g}: must be positive and at most {longest:g} s, the run's"
                " shortest backbone input (a longer segment would be cropped or chunked)"
            )
        hop = window if self.hop_s is None else self.hop_s
        if not 0 < hop <= window:
            raise TimelineError(
                f"--hop-s {hop:g}: must be positive and at most the window ({window:g} s), so"
                " every instant lies in some segment"
            )
        if self.vad_level not in (0, 1, 2, 3):
            raise TimelineError(f"--vad-level {self.vad_level}: must be 0, 1, 2 or 3")
        return dataclasses.replace(self, window_s=float(window), hop_s=float(hop))


def input_seconds(predictor: Any) -> float:
    """The longest span every backbone of the run takes as one input (its crop length)."""
    sources = getattr(predictor, "sources", None)
    if sources:
        return float(min(s.max_s for s in sources))
    model = getattr(predictor, "model", None)  # finetune.FinetunedPredictor
    if model is not None and getattr(model, "max_s", None):
        return float(model.max_s)
    return WINDOW_CAP_S


def default_window(predictor: Any) -> float:
    """The run's shortest backbone input, capped at `WINDOW_CAP_S`: never cropped or chunked,
    and within the 2.75 to 11 s the heads learnt from on MSP-Podcast."""
    return min(WINDOW_CAP_S, input_seconds(predictor))


@dataclasses.dataclass(frozen=True)
class Plan:
    """A file's header and its segments (frames at the file's rate), or why it cannot be read."""

    file: str
    sample_rate: int
    frames: int  # from the header
    channels: int
    spans: tuple[tuple[int, int], ...]
    segmentation: Segmentation
    problem: str | None = None  # the file is unusable (no segments)
    truncated: str | None = None  # the header promises more than the file holds

    @property
    def duration_s(self) -> float:
        """The header's duration in seconds."""
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def fixed_spans(frames: int, sr: int, window_s: float, hop_s: float) -> list[tuple[int, int]]:
    """Windows (start, stop) in frames over `frames`: every `hop_s`, `window_s` long, the last
    one ending at the end of the file (shorter); one window for a file shorter than one."""
    w, h = max(1, round(window_s * sr)), max(1, round(hop_s * sr))
    spans, s = [], 0
    while True:
        spans.append((s, min(s + w, frames)))
        if s + w >= frames:
            return spans
        s += h


def plan_file(path: str | Path, seg: Segmentation, max_file_s: float = MAX_TIMELINE_S) -> Plan:
    """The segments of one file from its header (fixed) or a VAD pass over it (vad); a file
    whose header is unusable gets `problem`, a truncated one is planned to its header's end."""
    import soundfile as sf

    pr = probe_audio(path, max_file_seconds=max_file_s)
    truncated = None
    if pr.problem is not None:
        if not pr.problem.startswith("truncated") or not pr.duration_s:
            return Plan(str(path), pr.sample_rate or 0, 0, 0, (), seg, problem=pr.problem)
        truncated = pr.problem
    info = sf.info(str(path))
    sr, frames = int(info.samplerate), int(info.frames)
    if truncated:  # planned over the length the header gives; decoding stops where data ends
        m = re.search(r"header says (\d+) data bytes, file has (\d+)", truncated)
        if m:
            frames = round(frames * int(m.group(1)) / max(int(m.group(2)), 1))
    if seg.mode == "vad":
        try:
            spans = vad_spans(path, seg)
        except _Stopped:
            spans = []  # the segment pass stops at the same place and says where
    else:
        spans = fixed_spans(frames, sr, seg.window_s, seg.hop_s)
    return Plan(str(path), sr, frames, int(info.channels), tuple(spans), seg, truncated=truncated)


class _Stopped(Exception):
    """Decoding stopped before the header's end: at frame `at`, for `reason`."""

    def __init__(self, at: int, reason: str):
        super().__init__(reason)
        self.at = at
        self.reason = reason


def _blocks(path: str | Path, block: int) -> Iterator[np.ndarray]:
    """The file's samples as float32 blocks (T, C); _Stopped where decoding fails or ends
    before the header's length."""
    import soundfile as sf

    at = 0
    f = sf.SoundFile(str(path))
    try:
        want, size = f.frames, block
        while at < want:
            try:
                x = f.read(min(size, want - at), dtype="float32", always_2d=True)
            except Exception as e:  # noqa: BLE001 - any decoder complaint stops the stream
                if size > FINE_FRAMES:  # find the spot: read again from here in small steps
                    f.close()
                    f = sf.SoundFile(str(path))
                    f.seek(at)
                    size = FINE_FRAMES
                    continue
                raise _Stopped(at, " ".join(str(e).split()) or type(e).__name__) from None
            if len(x) == 0:
                raise _Stopped(at, "the file ends before the length its header gives")
            bad = ~np.isfinite(x).all(axis=1)
            if bad.any():
                raise _Stopped(at + int(np.argmax(bad)), "NaN or inf samples")
            yield x
            at += len(x)
    finally:
        f.close()


def vad_spans(path: str | Path, seg: Segmentation) -> list[tuple[int, int]]:
    """Speech regions of a file (frames at its rate) from the WebRTC VAD at 16 kHz over 30-ms
    frames: gaps under `VAD_GAP_S` joined, regions under `VAD_MIN_S` dropped, long ones cut
    into windows of `seg.window_s`. Decoded as a stream; _Stopped at a corrupt tail."""
    import soundfile as sf
    import soxr
    import webrtcvad

    sr = int(sf.info(str(path)).samplerate)
    vad = webrtcvad.Vad(seg.vad_level)
    stream = None if sr == VAD_RATE else soxr.ResampleStream(sr, VAD_RATE, 1, dtype="float32")
    speech: list[bool] = []
    rest = np.zeros(0, np.float32)

    def feed(y: np.ndarray) -> np.ndarray:
        pcm = (np.clip(y, -1, 1) * 32767).astype("<i2")
        n = len(pcm) // VAD_FRAME
        for k in range(n):
            speech.append(vad.is_speech(pcm[k * VAD_FRAME : (k + 1) * VAD_FRAME].tobytes(), 16000))
        return y[n * VAD_FRAME :]

    stopped = None
    try:
        for x in _blocks(path, int(BLOCK_S * sr)):
            y = x.mean(axis=1)
            y = y if stream is None else stream.resample_chunk(y)
            rest = feed(np.concatenate([rest, y]))
    except _Stopped as e:
        stopped = e
    if stream is not None:
        rest = feed(np.concatenate([rest, stream.resample_chunk(np.zeros(0, np.float32), True)]))
    regions = _regions(np.asarray(speech, bool), VAD_FRAME / VAD_RATE)
    spans = []
    for a, b in regions:
        a_f, b_f = round(a * sr), round(b * sr)
        if stopped is not None:
            b_f = min(b_f, stopped.at)
        for s, t in fixed_spans(b_f - a_f, sr, seg.window_s, seg.window_s):
            if t > s:
                spans.append((a_f + s, a_f + t))
    return spans


def _regions(speech: np.ndarray, frame_s: float) -> list[tuple[float, float]]:
    """(start, end) seconds of runs of speech frames, short gaps joined, short runs dropped."""
    edges = np.diff(np.concatenate([[0], speech.astype(np.int8), [0]]))
    runs = list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))
    joined: list[list[int]] = []
    for a, b in runs:
        if joined and (a - joined[-1][1]) * frame_s < VAD_GAP_S:
            joined[-1][1] = b
        else:
            joined.append([int(a), int(b)])
    return [(a * frame_s, b * frame_s) for a, b in joined if (b - a) * frame_s >= VAD_MIN_S]


@dataclasses.dataclass(frozen=True)
class Cut:
    """One decoded segment: its index in the plan, frames [start, stop) and samples (T, C)."""

    index: int
    start: int
    stop: int
    samples: np.ndarray


@dataclasses.dataclass
class Decode:
    """How far the stream of one file got: frames decoded, and where and why it stopped."""

    frames: int = 0
    stop: str | None = None  # None: decoded to the end the header gives


def batch_size(plan: Plan) -> int:
    """Segments per scoring call: as many window-long segments as `BATCH_BYTES` of decoded
    float32 samples hold at the file's rate and channels (1 to `MAX_BATCH`), so memory stays
    bounded for any rate while a call's fixed cost is spread over many segments."""
    per = max(1, round(plan.segmentation.window_s * plan.sample_rate)) * max(1, plan.channels) * 4
    return int(min(MAX_BATCH, max(1, BATCH_BYTES // per)))


def cut_segments(plan: Plan, batch: int, decode: Decode) -> Iterator[list[Cut]]:
    """The plan's segments in order, `batch` at a time, decoded as a stream of blocks; a
    segment past where decoding stopped is not yielded (`decode.stop` says where and why)."""
    if plan.problem is not None or not plan.spans:
        return
    sr = plan.sample_rate
    buf = np.zeros((0, 1), np.float32)  # (T, C) samples from frame `at`
    at = 0
    blocks = _blocks(plan.file, max(1, int(BLOCK_S * sr)))
    out: list[Cut] = []
    ended = False
    for k, (a, b) in enumerate(plan.spans):
        while at + len(buf) < b and not ended:
            try:
                x = next(blocks)
            except StopIteration:
                ended = True
                break
            except _Stopped as e:
                ended = True
                decode.stop = (
                    f"decoding stopped at {e.at / sr:.2f} s of {plan.duration_s:.2f} s ({e.reason})"
                )
                decode.frames = e.at
                break
            buf = x if len(buf) == 0 else np.concatenate([buf, x])
            decode.frames = at + len(buf)
        if at + len(buf) < b:  # the stream ended inside this segment
            if decode.stop is None:
                why = f" ({plan.truncated})" if plan.truncated else ""
                decode.stop = f"decoding stopped at {decode.frames / sr:.2f} s of {plan.duration_s:.2f} s{why}"
            break
        out.append(Cut(k, a, b, buf[a - at : b - at].copy()))
        nxt = plan.spans[k + 1][0] if k + 1 < len(plan.spans) else b
        drop = max(0, nxt - at)
        buf, at = buf[drop:], at + drop
        if len(out) == batch:
            yield out
            out = []
    if out:
        yield out
    if decode.stop is None and plan.truncated:
        decode.stop = f"decoding stopped at {decode.frames / sr:.2f} s of {plan.duration_s:.2f} s ({plan.truncated})"


@dataclasses.dataclass(frozen=True)
class SegmentRow:
    """One segment's scores (None when silent or failed), class for task 1 runs, and flags."""

    file: str
    index: int
    start_s: float
    end_s: float
    values: tuple[float, float, float] | None
    flags: tuple[str, ...] = ()  # silent, short, clipped
    error: str | None = None
    category: str | None = None
    category_prob: float | None = None
    probabilities: dict[str, float] | None = None

    def as_dict(self, name: str | None = None) -> dict[str, Any]:
        """The JSON Lines row (`name`: what to call the file, e.g. an upload's name)."""
        values = self.values or (None,) * len(ATTRIBUTES)
        out = {
            "file": self.file if name is None else name,
            "index": self.index,
            "start_s": round(self.start_s, 6),
            "end_s": round(self.end_s, 6),
            **dict(zip(ATTRIBUTES, values, strict=True)),
            "flags": list(self.flags),
            "error": self.error,
        }
        if self.probabilities is not None or self.category is not None:
            out.update(category=self.category, category_prob=self.category_prob,
                       probabilities=self.probabilities)  # fmt: skip
        return out


def segment_flags(x: np.ndarray, seconds: float, plan: Plan) -> set[str]:
    """silent / short / clipped of one segment's samples (T, C) at the file's rate."""
    flags = set()
    if is_silent(x):
        flags.add("silent")
    short = SHORT_VAD_S if plan.segmentation.mode == "vad" else plan.segmentation.window_s
    if seconds < short - 1e-9:
        flags.add("short")
    if x.size and float(np.mean(np.abs(x) >= CLIP_PEAK)) > CLIP_SHARE:
        flags.add("clipped")
    return flags


def score_batch(
    predictor: Any, plan: Plan, cuts: Sequence[Cut], name: str | None = None
) -> list[SegmentRow]:
    """Rows of one batch of segments, scored as clips of their own (see the module docstring)."""
    sr = plan.sample_rate
    file = plan.file if name is None else name
    scored = _score(predictor, plan, cuts)
    rows = []
    for c, s in zip(cuts, scored, strict=True):
        p = s.prediction
        seconds = (c.stop - c.start) / sr
        flags = segment_flags(c.samples, seconds, plan)
        flags |= {f for f in p.flags if f in ("silent", "short")}
        start, end = c.start / sr, c.stop / sr
        if "silent" in flags:  # never scores presented as speech
            rows.append(SegmentRow(file, c.index, start, end, None, tuple(sorted(flags))))
        elif p.failed or p.values is None and p.category is None:
            rows.append(SegmentRow(file, c.index, start, end, None, tuple(sorted(flags)),
                                   p.error or "not scored"))  # fmt: skip
        else:
            # An attribute the ensemble could only fill with the Train label mean (a run without
            # attribute heads) was not heard: no values, the class alone.
            values = None if "Train label mean" in (p.fallback or "") else p.values
            rows.append(
                SegmentRow(file, c.index, start, end, values, tuple(sorted(flags)), None,
                           p.category, p.category_prob, p.probabilities)
            )  # fmt: skip
    return rows


def _score(predictor: Any, plan: Plan, cuts: Sequence[Cut]) -> list[Any]:
    """The predictor's `Scored` per segment: in memory, or as temporary files when it only
    scores files."""
    sr = plan.sample_rate
    if hasattr(predictor, "predict_audio"):
        return predictor.predict_audio([(f"{plan.file}#{c.index}", c.samples, sr) for c in cuts])
    import tempfile

    import soundfile as sf

    subtype = sf.info(plan.file).subtype if Path(plan.file).suffix.lower() == ".wav" else "FLOAT"
    with tempfile.TemporaryDirectory(prefix="ifmvse-segments-") as tmp:
        paths = []
        for c in cuts:
            p = Path(tmp) / f"{c.index:06d}.wav"
            sf.write(p, c.samples, sr, subtype=subtype)
            paths.append(p)
        return predictor.predict_files(paths)


def timeline_file(
    predictor: Any,
    path: str | Path,
    seg: Segmentation,
    *,
    batch: int | None = None,
    on_rows: Callable[[list[SegmentRow]], None] | None = None,
) -> tuple[list[SegmentRow], dict[str, Any]]:
    """Every segment's row of one file (in order; also handed to `on_rows` batch by batch) and
    the file's `summarize`d summary; a file that could not be read gets no rows and its error."""
    seg = seg.resolved(predictor)
    plan = plan_file(path, seg)
    decode = Decode()
    rows: list[SegmentRow] = []
    for cuts in cut_segments(plan, batch or batch_size(plan), decode):
        got = score_batch(predictor, plan, cuts)
        rows.extend(got)
        if on_rows is not None:
            on_rows(got)
    return rows, summarize(plan, rows, decode)


def summarize(
    plan: Plan, rows: Sequence[SegmentRow], decode: Decode, name: str | None = None
) -> dict[str, Any]:
    """One file's summary: segments and flags counted, the time-weighted mean and standard
    deviation of each attribute over scored segments, and the share of scored time per class."""
    seg = plan.segmentation
    scored = [r for r in rows if r.values is not None or r.category is not None]
    w = np.asarray([r.end_s - r.start_s for r in scored], np.float64)
    out: dict[str, Any] = {
        "file": plan.file if name is None else name,
        "duration_s": round(plan.duration_s, 6),
        "decoded_s": round(decode.frames / plan.sample_rate, 6) if plan.sample_rate else 0.0,
        "mode": seg.mode,
        "window_s": seg.window_s,
        "hop_s": seg.hop_s if seg.mode == "fixed" else None,
        "segments": len(rows),
        "scored": len(scored),
        "flagged": {f: sum(f in r.flags for r in rows) for f in ("silent", "short", "clipped")},
        "failed_segments": sum(r.error is not None for r in rows),
        "scored_s": round(float(w.sum()), 6),
        "mean": None,
        "std": None,
        "share_of_time": None,
        "error": plan.problem or decode.stop,
    }
    if seg.mode == "vad":
        out["speech_s"] = round(sum(r.end_s - r.start_s for r in rows), 6)
    vals = [r for r in scored if r.values is not None]
    if vals:
        wv = np.asarray([r.end_s - r.start_s for r in vals], np.float64)
        v = np.asarray([r.values for r in vals], np.float64)  # (S, 3)
        mean = (wv[:, None] * v).sum(0) / wv.sum()
        std = np.sqrt((wv[:, None] * (v - mean) ** 2).sum(0) / wv.sum())
        out["mean"] = dict(zip(ATTRIBUTES, map(float, mean), strict=True))
        out["std"] = dict(zip(ATTRIBUTES, map(float, std), strict=True))
    cats = [r for r in scored if r.category is not None]
    if cats:
        total = sum(r.end_s - r.start_s for r in cats)
        share = {c: 0.0 for c in CLASS_CODES}
        for r in cats:
            share[r.category] += (r.end_s - r.start_s) / total
        out["share_of_time"] = share
    return out


class RowWriter:
    """Segment rows streamed to CSV (`SEGMENT_COLUMNS`, then class and probabilities for task 1
    runs) or JSON Lines (`SegmentRow.as_dict`), by the suffix (.csv, .jsonl)."""

    def __init__(self, path: str | Path, classes: Sequence[str] | None = None):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in (".csv", ".jsonl"):
            raise TimelineError(f"{self.path}: segment rows go to FILE.csv or FILE.jsonl")
        self.jsonl = suffix == ".jsonl"
        self.classes = list(classes or [])
        self.rows = 0
        self._f: TextIO = open(self.path, "w", newline="")  # noqa: SIM115 - closed by close()
        if not self.jsonl:
            self._csv = csv.writer(self._f)
            extra = ["category", "category_prob", *self.classes] if self.classes else []
            self._csv.writerow([*SEGMENT_COLUMNS, *extra])

    def write(self, rows: Sequence[SegmentRow]) -> None:
        """Append rows (flushed, so a long run's rows are on disk as they are scored)."""
        for r in rows:
            if self.jsonl:
                self._f.write(json.dumps(r.as_dict()) + "\n")
            else:
                cells = [r.file, r.index, f"{r.start_s:.6f}", f"{r.end_s:.6f}"]
                cells += ["" if r.values is None else repr(v) for v in (r.values or (0,) * 3)]
                cells += [";".join(r.flags), r.error or ""]
                if self.classes:
                    cells += [
                        r.category or "",
                        "" if r.category_prob is None else repr(r.category_prob),
                    ]
                    cells += [
                        "" if r.probabilities is None else repr(r.probabilities[c])
                        for c in self.classes
                    ]
                self._csv.writerow(cells)
        self.rows += len(rows)
        self._f.flush()

    def close(self) -> None:
        """Close the file."""
        self._f.close()


def summary_path(out: str | Path) -> Path:
    """Where the per-file summaries of `--out FILE.csv|.jsonl` go: FILE.summary.json."""
    out = Path(out)
    return out.with_name(out.stem + ".summary.json")
