"""The decode -> compute -> pool -> write loop of extraction, as one component.

`Streamer` takes the audio and extract settings it needs (not the whole config), an `Extractor`
(anything mapping padded waves and lengths to pooled vectors, dispatched asynchronously) and a
writer (`featurestore.StoreWriter`, or the predictor's in-memory one). CPU threads decode and
resample the next batches while the device computes the current one; the host writes batch k
while the device runs batch k+1. The decoded audio is authoritative: chunk counts and lengths come
from it, not from the header the plan used. An item whose audio does not fit its batch (a header
that under-reported the length) and chunks the plan missed are planned again with `replan` and run
after the planned batches.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import errno
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jax_ifmvse.config import AudioConfig, ExtractConfig
from jax_ifmvse.data.audio import AudioError, AudioIOError, chunk_spans, is_silent
from jax_ifmvse.data.buckets import Batch


@dataclasses.dataclass(frozen=True)
class Item:
    """One piece of audio to encode: a whole (cropped) utterance, or one chunk of a long one."""

    row: int  # store row
    chunk: int  # chunk index in the utterance (0 when cropped)
    seconds: float  # planned duration, for bucketing only: the decoded audio decides
    chunks: int  # chunks planned for this row from the header (the decode may differ)
    known: bool = True  # the header was readable when planned (a file gone since is an I/O error)


@dataclasses.dataclass
class ExtractStats:
    """What a run did, for the closing summary."""

    done: int = 0
    failed: int = 0
    audio_s: float = 0.0
    wall_s: float = 0.0
    compile_s: float = 0.0
    padded_samples: int = 0
    valid_samples: int = 0
    shapes: int = 0
    silent: int = 0
    short: int = 0  # zero-padded up to the backbone's minimum input
    io_missing: int = 0  # rows left missing after their I/O errors outlasted the retries
    io_example: tuple[int, str] | None = None  # (row, error) of the first, for the exit line

    @property
    def padding_fraction(self) -> float:
        """Fraction of computed samples that were padding."""
        return 1.0 - self.valid_samples / max(self.padded_samples, 1)

    @property
    def realtime(self) -> float:
        """Seconds of audio per second of wall time."""
        return self.audio_s / max(self.wall_s, 1e-9)


def load_item(
    loader: Callable[[Path], np.ndarray],
    path: Path,
    it: Item,
    max_samples: int,
    chunked: bool,
    min_samples: int = 1,
    retries: int = 0,
    backoff_s: float = 0.5,
):
    """Decode one item: (its audio, the utterance's real chunk count, error or None, I/O error?).

    An I/O error (`AudioIOError`, any other `OSError`, a timeout) is tried again `retries` times
    after backoff_s, 2 backoff_s, ... seconds; if it persists the last flag is True (the row is
    left missing, never recorded). A file missing now that had no readable header when planned
    never existed for us: a recorded failure. Any other error is the file's: recorded with its
    reason. Chunks are cut from the decoded, resampled samples (`chunk_spans`); a planned chunk
    past the real ones comes back empty, and the count tells the caller about chunks the plan
    missed.
    """
    for attempt in range(retries + 1):
        try:
            audio = loader(path)
            break
        except (AudioIOError, OSError, TimeoutError) as e:
            gone = getattr(e, "errno", None) == errno.ENOENT or isinstance(e, FileNotFoundError)
            if gone and not it.known:
                return None, 0, _reason(e, path), False
            if attempt == retries:
                return None, 0, _reason(e, path), True
            time.sleep(backoff_s * 2**attempt)
        except AudioError as e:
            return None, 0, e.reason, False
        except Exception as e:  # noqa: BLE001 - every failure is recorded as data, never fatal
            return None, 0, f"not audio or corrupt ({_reason(e, path)})", False
    if len(audio) == 0:
        return None, 0, "empty audio (no samples)", False
    if not chunked:
        return audio[:max_samples], 1, None, False
    spans = chunk_spans(len(audio), max_samples, min_samples)
    if it.chunk >= len(spans):
        return audio[:0], len(spans), None, False
    a, b = spans[it.chunk]
    return audio[a:b], len(spans), None, False


def _reason(e: BaseException, path: Path) -> str:
    """An error as one line without the path (the row names the file)."""
    why = getattr(e, "reason", None)
    if why is None and isinstance(e, OSError) and e.errno:
        why = f"I/O error ({os.strerror(e.errno)})"
    why = why or " ".join(str(e).split()) or type(e).__name__
    return why.replace(f"{path}: ", "").replace(str(path), "the file")


class _Rows:
    """Per-run bookkeeping of rows: real chunk counts, chunks waiting for their siblings,
    failures, flags, and the items to plan again."""

    def __init__(self, items: Sequence[Item]):
        self.items = list(items)
        self.real: dict[int, int] = {}  # row -> chunks its decoded audio really has
        self.parts: dict[int, dict[int, tuple]] = {}  # row -> chunk -> (samples, last, layers)
        self.failed: set[int] = set()  # recorded failures and rows left missing (I/O)
        self.flags: dict[int, set[str]] = collections.defaultdict(set)  # stored with the row
        self.quiet: collections.Counter = collections.Counter()  # row -> silent chunks seen
        self.extra: list[Item] = []  # items to plan again after the planned batches

    def add_chunk(self, it: Item, samples: int, last, sel):
        """Record one computed chunk; the row's (pooled, layers) once all its chunks are in."""
        got = self.parts.setdefault(it.row, {})
        got[it.chunk] = (samples, last, sel)
        n = self.real[it.row]
        if len(got) < n:
            return None
        # All real chunks in: their length-weighted mean (the row itself when one chunk).
        ps = [got[c] for c in range(n)]
        del self.parts[it.row]
        if n == 1:
            return ps[0][1], ps[0][2]
        w = np.asarray([p[0] for p in ps], np.float64)
        w /= w.sum()
        pooled = sum(wi * p[1] for wi, p in zip(w, ps, strict=True))
        layers = None if sel is None else sum(wi * p[2] for wi, p in zip(w, ps, strict=True))
        return pooled, layers


@dataclasses.dataclass(frozen=True)
class Streamer:
    """Runs batches of items through an extractor into a writer, decoding ahead on CPU threads."""

    extractor: Any  # (waves (B, T), lengths (B,)) -> (pooled (B, D), layers (B, L, D) | None)
    audio: AudioConfig
    extract: ExtractConfig
    max_s: float  # crop (or chunk) length in seconds for this backbone
    min_samples: int = 1  # shorter clips are zero-padded to this (one output frame)
    replan: Callable[[list[Item]], list[Batch]] | None = None  # new items -> batches over them
    # featurestore.frames.FrameWriter: the extractor then also returns (frames (B, F, D), frame
    # counts (B,)), and each completed row's valid frames are written there (crop mode).
    frames: Any = None
    # True (extraction): a row whose I/O errors outlast the retries is left missing for a rerun;
    # False (prediction): it is a failure like any other.
    leave_io_missing: bool = False

    def run(
        self,
        batches: Sequence[Batch],
        items: Sequence[Item],
        path_of: Callable[[int], Path],
        loader: Callable[[Path], np.ndarray],
        writer: Any,
        stats: ExtractStats,
        progress: Callable[[str, int, float], None] | None = None,
        name: str = "",
    ) -> None:
        """Compute every batch; write each row when all its chunks are in, or record its failure."""
        sr = self.audio.sample_rate
        max_samples = int(round(self.max_s * sr))
        chunked = self.audio.long_audio == "chunk"
        rows = _Rows(items)
        queue: collections.deque[Batch] = collections.deque(batches)

        def next_batch() -> Batch | None:
            """The next planned batch; once they are all out, batches over the re-planned items."""
            if not queue and rows.extra and self.replan is not None:
                new, offset = list(rows.extra), len(rows.items)
                rows.extra.clear()
                rows.items.extend(new)
                for b in self.replan(new):
                    idx = np.where(b.indices >= 0, b.indices + offset, -1)
                    queue.append(dataclasses.replace(b, indices=idx))
            return queue.popleft() if queue else None

        def decode(batch: Batch):
            """Queue every item's decode on the pool now; the main thread collects them later."""
            its = [rows.items[i] for i in batch.indices if i >= 0]
            futs = [
                pool.submit(load_item, loader, path_of(it.row), it, max_samples, chunked,
                            self.min_samples, self.extract.io_retries, self.extract.io_backoff_s)
                for it in its
            ]  # fmt: skip
            return batch, its, futs

        with cf.ThreadPoolExecutor(max(1, self.extract.workers)) as pool:
            ahead: collections.deque = collections.deque()
            while len(ahead) < max(1, self.extract.prefetch) and (b := next_batch()) is not None:
                ahead.append(decode(b))
            in_flight = None
            while ahead:
                batch, its, futs = ahead.popleft()
                waves, lengths = self._admit(batch, its, [f.result() for f in futs], rows,
                                             writer, stats)  # fmt: skip
                nxt = next_batch()  # after this batch's results, so its re-planned items are known
                if nxt is not None:
                    ahead.append(decode(nxt))
                job = (its, lengths, self.extractor(waves, lengths))  # dispatched, runs async
                if in_flight is not None:
                    self._flush(in_flight, rows, writer, stats, progress, name)
                in_flight = job
            if in_flight is not None:
                self._flush(in_flight, rows, writer, stats, progress, name)

    def _admit(self, batch: Batch, its, results, rows: _Rows, writer, st: ExtractStats):
        """Decoded items -> padded (waves (B, T), lengths (B,)); failures recorded, misfits replanned."""
        sr = self.audio.sample_rate
        max_samples = int(round(self.max_s * sr))
        size, samples = batch.shape
        waves = np.zeros((size, samples), np.float32)  # (B, T)
        lengths = np.zeros(size, np.int64)  # (B,)
        bad_rows, reasons = [], []
        for k, (it, (audio, n_real, err, io)) in enumerate(zip(its, results, strict=True)):
            if err is not None:
                if it.row not in rows.failed:
                    rows.failed.add(it.row)
                    if io and self.leave_io_missing:  # not recorded: still missing
                        st.io_missing += 1
                        st.io_example = st.io_example or (it.row, err)
                        continue
                    bad_rows.append(it.row)
                    reasons.append(err)
                continue
            if it.row not in rows.real:
                rows.real[it.row] = n_real
                # Chunks the header-based plan missed join the re-planned items.
                rows.extra.extend(
                    Item(it.row, c, self.max_s, n_real) for c in range(it.chunks, n_real)
                )
            if len(audio) == 0:
                continue  # a planned chunk past the real ones: no weight
            if len(audio) > samples and samples < max_samples:  # header under-reported
                rows.extra.append(dataclasses.replace(it, seconds=len(audio) / sr))
                continue
            audio = audio[:samples]
            if is_silent(audio):
                rows.quiet[it.row] += 1
                if rows.quiet[it.row] == rows.real[it.row]:  # the whole utterance, every chunk
                    st.silent += 1
                    rows.flags[it.row].add("silent")
            if len(audio) < self.min_samples:
                # Shorter than one output frame: every frame would be masked and the pooled
                # vector all zeros. Zero-pad to the minimum and count the padding as audio.
                # (Chunk tails this short were dropped by chunk_spans, so this is a clip.)
                st.short += 1
                rows.flags[it.row].add("short")
                audio = np.pad(audio, (0, self.min_samples - len(audio)))
            waves[k, : len(audio)] = audio
            lengths[k] = len(audio)
        if bad_rows:
            writer.fail(np.asarray(bad_rows), reasons)
            st.failed += len(bad_rows)
        for k, it in enumerate(its):  # a failed chunk fails its whole utterance
            if it.row in rows.failed:
                lengths[k] = 0
                rows.parts.pop(it.row, None)
        st.padded_samples += waves.size
        st.valid_samples += int(lengths.sum())
        st.audio_s += float(lengths.sum()) / sr
        return waves, lengths

    def _flush(self, job, rows: _Rows, writer, st: ExtractStats, progress, name: str) -> None:
        """Wait for one dispatched batch and write the rows it completes."""
        its, lengths, (last, sel, *frames) = job
        last = np.asarray(last)  # blocks until the device is done with this batch
        sel = None if sel is None else np.asarray(sel)
        done, pooled, lay, at = [], [], [], []
        for k, it in enumerate(its):
            if lengths[k] == 0 or it.row in rows.failed:
                continue  # dummy, failed, re-planned or a planned chunk past the real ones
            row = rows.add_chunk(it, lengths[k], last[k], None if sel is None else sel[k])
            if row is not None:
                done.append(it.row)
                pooled.append(row[0])
                lay.append(row[1])
                at.append(k)
        if done:
            flags = [",".join(sorted(rows.flags.pop(r, ()))) for r in done]
            writer.write(
                np.asarray(done), np.stack(pooled), None if sel is None else np.stack(lay),
                flags=flags,
            )  # fmt: skip
            if self.frames is not None:  # after the pooled rows: a kill between redoes both
                x, counts = np.asarray(frames[0]), np.asarray(frames[1])
                self.frames.write(done, [x[k, : int(counts[k])] for k in at])
            st.done += len(done)
        if progress:
            progress(name, len(done), float(sum(lengths)) / self.audio.sample_rate)
