"""`ifmvse transcribe`: transcripts of a store's utterances (Whisper in JAX, or the corpus' own)
and text-encoder views of them in the store, beside the speech views."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featurestore import FeatureStore, StoreWriter, finalize
from featurestore.jobs import shard_rows, share_order
from jax_ifmvse.text import transcripts as tx


@dataclasses.dataclass
class TranscribeStats:
    """What one run did: rows, audio seconds, wall time, flags."""

    done: int = 0
    failed: int = 0
    audio_s: float = 0.0
    wall_s: float = 0.0
    flags: dict[str, int] = dataclasses.field(default_factory=dict)


def audio_path(store: FeatureStore, row: int, audio_root: str | None) -> Path:
    """Absolute audio path of a store row (relative paths lie under the corpus root)."""
    p = Path(str(store.paths[row]))
    if p.is_absolute():
        return p
    base = audio_root or str(store.attrs.get("corpus", "")) or "."
    return Path(base) / p


def _rows_todo(store: FeatureStore, done_missing: np.ndarray, shard: tuple[int, int] | None):
    if shard is None:
        return share_order(done_missing, store.durations)
    mine = shard_rows(store.durations, *shard)
    return mine[np.isin(mine, done_missing)]


def transcribe_store(
    store_path: str | Path,
    name: str,
    asr: Any,
    *,
    language: str | None = None,
    audio_root: str | None = None,
    shard: tuple[int, int] | None = None,
    loader: Callable[[Path], np.ndarray] | None = None,
    progress: Callable[[int], None] | None = None,
) -> TranscribeStats:
    """Transcribe the rows of set `name` still missing (shard k of n only, if given)."""
    from jax_ifmvse.data.audio import load_audio
    from jax_ifmvse.errors import first_line

    store = FeatureStore(store_path)
    source = {
        "kind": "asr",
        **{k: v for k, v in asr.source_info.items() if k in ("source", "sha256")},
        "language": language or "detected",
        "compute_dtype": asr.dtype.name,  # predict transcribes new clips in it too
        "window_s": asr.window_s,  # 30, or the `with_window` speed option
        "decoding": f"greedy, no timestamps, {asr.window_s:g}-s window (transformers generate"
        " rule)",
    }
    tx.start(store_path, name, source)
    todo = _rows_todo(store, tx.missing(store_path, name, store.n), shard)
    load = loader or (lambda p: load_audio(p, max_seconds=asr.window_s))
    writer = "p0" if shard is None else f"shard{shard[0]}of{shard[1]}"
    st = TranscribeStats()
    t0 = time.perf_counter()
    step = max(asr.batch * 4, 1)  # rows decoded and written per file
    for s in range(0, len(todo), step):
        rows = todo[s : s + step]
        waves, ok, records = [], [], []
        for r in rows:
            try:
                waves.append(np.asarray(load(audio_path(store, int(r), audio_root)), np.float32))
                ok.append(int(r))
            except Exception as e:  # an unreadable file is recorded, not fatal
                records.append({"row": int(r), "id": store.ids[r], "text": "", "language": "",
                                "avg_logprob": float("nan"), "no_speech_prob": float("nan"),
                                "flags": f"failed: {first_line(e)}"})  # fmt: skip
                st.failed += 1
        for r, w, res in zip(ok, waves, asr.transcribe(waves, language=language), strict=True):
            flags = [f for f in res.flags.split(",") if f]
            if float(store.durations[r]) > asr.window_s + 0.01:  # decoded the first window
                flags.append("cropped")
            records.append({"row": r, "id": store.ids[r], "text": res.text,
                            "language": res.language, "avg_logprob": res.avg_logprob,
                            "no_speech_prob": res.no_speech_prob,
                            "flags": ",".join(flags)})  # fmt: skip
            st.audio_s += len(w) / 16000
            for f in flags:
                st.flags[f] = st.flags.get(f, 0) + 1
            st.done += 1
        tx.write(store_path, name, writer, records)
        if progress:
            progress(len(rows))
    st.wall_s = time.perf_counter() - t0
    return st


def load_transcripts(store_path: str | Path, name: str, path: str | Path) -> int:
    """Load a corpus' own transcripts (CSV or folder of .txt) as set `name`; returns rows."""
    store = FeatureStore(store_path)
    texts = tx.read_corpus_transcripts(path, store.ids, store.paths)
    tx.start(store_path, name, {"kind": "corpus", "source": str(Path(path).resolve())})
    have = tx.read(store_path, name)
    rows = [r for r in sorted(texts) if r not in have]
    tx.write(store_path, name, "corpus", [
        {"row": r, "id": store.ids[r], "text": texts[r], "language": "", "avg_logprob": float("nan"),
         "no_speech_prob": float("nan"), "flags": "" if texts[r] else "empty"}
        for r in rows
    ])  # fmt: skip
    return len(texts)


def embed_store(
    store_path: str | Path,
    view: str,
    encoder: Any,
    transcript_set: str,
    *,
    layers: str = "last",
    shard: tuple[int, int] | None = None,
    batch: int = 32,
) -> int:
    """Write text view `view`: the encoder's pooled vectors of set `transcript_set`, for every
    row that has a transcript and no vector yet. Returns the rows written."""
    from jax_ifmvse.encode import layer_selection  # lazy: encode imports JAX

    store = FeatureStore(store_path)
    record = tx.sets(store_path).get(transcript_set)
    texts = tx.read(store_path, transcript_set)
    keep = layer_selection(layers, encoder.num_hidden_states)
    attrs = {
        **encoder.source_info,
        "transcripts": transcript_set,
        "transcript_source": f"{record.get('kind')}: {record.get('source')}",
        "layers_stored": "none" if keep is None else ",".join(map(str, keep)),
        "package_version": __import__("jax_ifmvse").__version__,
    }
    known = store.backbones.get(view)
    if known is not None and known.attrs.get("transcripts") not in (None, transcript_set):
        raise tx.TranscriptError(
            f"{store_path}: view {view!r} holds embeddings of transcript set"
            f" {known.attrs.get('transcripts')!r}, not {transcript_set!r}; use another name"
        )
    missing = store.missing(view) if known is not None else np.arange(store.n)
    todo = _rows_todo(store, missing, shard)
    todo = np.asarray(
        [r for r in todo if int(r) in texts and "failed" not in texts[int(r)]["flags"]]
    )
    writer = StoreWriter(
        store_path, view, dim=encoder.hidden_size,
        num_layers=None if keep is None else len(keep), attrs=attrs,
        writer_id="p0" if shard is None else f"shard{shard[0]}of{shard[1]}",
    )  # fmt: skip
    step = batch * 8
    for s in range(0, len(todo), step):
        rows = todo[s : s + step]
        recs = [texts[int(r)] for r in rows]
        pooled, truncated = encoder.encode([r["text"] for r in recs], batch=batch)  # (B, L, D)
        flags = []
        for rec, cut in zip(recs, truncated, strict=True):
            f = [x for x in rec["flags"].split(",") if x]
            f += ["empty-transcript"] if not rec["text"] else []
            f += ["truncated"] if cut else []
            flags.append(",".join(f))
        writer.write(rows, pooled[:, -1], None if keep is None else pooled[:, keep], flags)
    if shard is None:
        finalize(store_path)
    return len(todo)


def transcribe_main(
    store_path: str,
    *,
    asr_source: str | None,
    transcripts_path: str | None,
    name: str,
    language: str | None,
    text_backbones: Sequence[tuple[str, str]],
    audio_root: str | None,
    shard: tuple[int, int] | None,
    max_tokens: int | None,
    pooling: str,
    layers: str,
    batch: int,
    compute_dtype: str,
    window_s: float | None = None,
) -> TranscribeStats | None:
    """The `ifmvse transcribe` command: refuse bad checkpoints first, then transcribe, embed.

    `window_s`: Whisper's encoder sees that many seconds instead of 30 (`WhisperASR.with_window`,
    a speed option for short clips; recorded in the transcript set's source). Returns what
    the transcription did (None when no Whisper ran).
    """
    from jax_ifmvse.text.encoders import check_text_source, load_text_encoder

    if not Path(store_path).is_file():
        raise tx.TranscriptError(f"{store_path}: no such store")
    for _, source in text_backbones:  # before any audio is read
        check_text_source(source)
    if asr_source is None and transcripts_path is None and name not in tx.sets(store_path):
        raise tx.TranscriptError(
            f"{store_path}: no transcript set {name!r}: give --asr SOURCE or --transcripts FILE|DIR"
        )
    st = None
    if transcripts_path is not None:
        n = load_transcripts(store_path, name, transcripts_path)
        print(f"{name}: {n} transcripts from {transcripts_path}", file=sys.stderr)
    elif asr_source is not None:
        from jax_ifmvse.text.asr import load_asr

        asr = load_asr(asr_source, dtype=compute_dtype, batch=batch)
        if window_s is not None:
            asr = asr.with_window(window_s)
        st = transcribe_store(
            store_path, name, asr, language=language, audio_root=audio_root, shard=shard
        )
        rt = st.audio_s / max(st.wall_s, 1e-9)
        flags = ", ".join(f"{k} {v}" for k, v in sorted(st.flags.items())) or "none"
        print(
            f"{name}: transcribed {st.done} rows ({st.failed} failed) of {st.audio_s:.1f} s audio"
            f" in {st.wall_s:.1f} s ({rt:.1f}x real time, {len(asr._programs)} programs,"
            f" {asr.window_s:g}-s window); flags: {flags}",
            file=sys.stderr,
        )
    for view, source in text_backbones:
        enc = load_text_encoder(source, max_tokens=max_tokens, pooling=pooling, dtype=compute_dtype)
        n = embed_store(store_path, view, enc, name, layers=layers, shard=shard)
        print(f"{view}: embedded {n} transcripts of {name!r} with {source}", file=sys.stderr)
    return st
