"""Text views of new audio, made as the run's store made them: `predict` and `serve` of a run
whose heads read transcripts.

Per text view the store recorded the transcript set it embeds (`attrs["transcripts"]`) and the
encoder's source, sha256, max tokens, pooling, stored layers and compute dtype; the set's
`source.json` records where its texts came from: a Whisper checkpoint (source, sha256,
language given or detected, compute dtype) or the corpus' own transcripts. `TextViews` reloads
exactly that: the same Whisper decodes each new clip (first 30 s, or the window the set
recorded, 16 kHz, as `ifmvse transcribe` read it), or, for a corpus set, the caller's transcript file names each clip's text;
the same encoder embeds it, rounded to the store's dtype. Programs are compiled per (batch,
token budget) for Whisper and per (batch, token width) for each encoder, all by `warm_up`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jax_ifmvse.errors import IfmvseError
from jax_ifmvse.text import transcripts as tx

CHUNK_SECONDS = 30.0  # as `text.stage`: Whisper hears the first 30 s (flag "cropped" beyond)
ASR_BATCH_MAX = 8  # clips per Whisper batch at most (30-s windows each), else the run's batch


class TextViewError(IfmvseError, ValueError):
    """A run's text view that cannot be reproduced for new audio; one line says why."""


@dataclasses.dataclass(frozen=True)
class RowText:
    """One clip's transcript as a text view read it (`text` None: no transcript, see `why`)."""

    text: str | None
    flags: tuple[str, ...] = ()  # silent, no-speech, empty, budget, cropped, truncated
    language: str = ""
    why: str | None = None  # why there is no transcript (text None)

    def as_dict(self) -> dict[str, Any]:
        """The fields a prediction carries: transcript, its flags and language."""
        return {
            "transcript": self.text,
            "transcript_flags": list(self.flags),
            "transcript_language": self.language,
        }


def pooling_of(attrs: Mapping[str, Any]) -> str:
    """The encoder's `pooling` argument from the description the store recorded."""
    return "first" if str(attrs.get("pooling", "")).startswith("first") else "mean"


@dataclasses.dataclass
class _Encoder:
    name: str  # the text view (source) name in the store
    encoder: Any  # text.encoders.TextEncoder
    keep: list[int] | None  # stored hidden states (layers_stored), None: last only
    dtype: np.dtype  # the store's dtype: vectors are rounded to it as stored


class TextViews:
    """A run's text sources loaded once: Whisper or the corpus' texts, and each encoder."""

    def __init__(
        self,
        store: str | Path,
        sources: Mapping[str, Mapping[str, Any]],
        *,
        transcripts: str | Path | None = None,
        batch: int = 16,
        cache_dir: str | Path | None = None,
    ):
        """`sources`: text view name -> its store attrs (`_dtype`: the store's dtype)."""
        from jax_ifmvse.text.encoders import load_text_encoder

        self.store = Path(store)
        self.batch = max(1, int(batch))
        names = {str(a.get("transcripts")) for a in sources.values()}
        if len(names) != 1:
            raise TextViewError(
                f"{self.store}: the run's text views embed {len(names)} transcript sets"
                f" ({', '.join(sorted(names))}); predict reproduces one set per run"
            )
        self.set_name = names.pop()
        record = tx.sets(self.store).get(self.set_name)
        if record is None:
            raise TextViewError(
                f"{self.store}: transcript set {self.set_name!r} has no source record"
                f" ({tx.root(self.store) / self.set_name / 'source.json'}); its text views cannot"
                " be reproduced"
            )
        self.record = dict(record)
        self.kind = str(record.get("kind"))
        self.asr: Any = None
        self.language: str | None = None
        self.corpus_texts: Path | None = None
        views = ", ".join(repr(v) for v in sorted(sources))
        if self.kind == "asr":
            if transcripts is not None:
                raise TextViewError(
                    f"--transcripts {transcripts}: the run's text views ({views}) embed Whisper"
                    f" transcripts (set {self.set_name!r}, {record.get('source')}); predict"
                    " transcribes the clips with it, so give no transcripts"
                )
            self.asr = self._load_asr(record, cache_dir, min(self.batch, ASR_BATCH_MAX))
            lang = str(record.get("language", "detected"))
            self.language = None if lang == "detected" else lang
        elif self.kind == "corpus":
            if transcripts is None:
                raise TextViewError(
                    f"{self.store}: the run's text views ({views}) embed the corpus' own"
                    f" transcripts (set {self.set_name!r} from {record.get('source')}), which"
                    " new clips do not have: predict takes their texts with --transcripts"
                    " FILE|DIR (serve cannot)"
                )
            self.corpus_texts = Path(transcripts)
            if not self.corpus_texts.exists():
                raise TextViewError(f"{transcripts}: no such transcript file or folder")
        else:
            raise TextViewError(
                f"{self.store}: transcript set {self.set_name!r} has source kind {self.kind!r}"
                " (expected asr or corpus)"
            )
        self.encoders: list[_Encoder] = []
        for name, attrs in sources.items():
            enc = load_text_encoder(
                str(attrs["source"]),
                max_tokens=int(attrs["max_tokens"]),
                pooling=pooling_of(attrs),
                dtype=str(attrs.get("compute_dtype", "float32")),
                cache_dir=cache_dir,
            )
            _same_weights(enc.source_info, attrs, f"{self.store}: text view {name!r}")
            stored = str(attrs.get("layers_stored", "none"))
            keep = None if stored == "none" else [int(k) for k in stored.split(",")]
            self.encoders.append(_Encoder(name, enc, keep, np.dtype(str(attrs["_dtype"]))))
        self._programs: dict[tuple[str, int, int], Any] = {}  # (view, rows, width) -> compiled

    @staticmethod
    def _load_asr(record: Mapping[str, Any], cache_dir: Any, batch: int) -> Any:
        from jax_ifmvse.text.asr import load_asr

        asr = load_asr(
            str(record["source"]),
            dtype=str(record.get("compute_dtype", "float32")),
            batch=batch,
            cache_dir=cache_dir,
        )
        _same_weights(asr.source_info, record, f"transcript set source {record['source']}")
        if "window_s" in record:  # `transcribe --window-s` (the demo: the speech views' 6 s)
            asr = asr.with_window(float(record["window_s"]))
        return asr

    @property
    def window_s(self) -> float:
        """Seconds of each clip Whisper hears (30, or the window the set recorded)."""
        return float(self.asr.window_s) if self.asr is not None else CHUNK_SECONDS

    # -- compiled programs ------------------------------------------------------------------
    def widths(self, enc: _Encoder) -> list[int]:
        """The token widths an encoder pads to (its buckets up to max tokens)."""
        from jax_ifmvse.text.encoders import TOKEN_BUCKETS

        m = enc.encoder.max_tokens
        return sorted({min(b, m) for b in TOKEN_BUCKETS})

    def _program(self, enc: _Encoder, rows: int, width: int) -> Any:
        key = (enc.name, rows, width)
        if key not in self._programs:
            import jax
            import jax.numpy as jnp

            ids = jax.ShapeDtypeStruct((rows, width), jnp.int32)
            e = enc.encoder
            self._programs[key] = e._jit.lower(e.params, ids, ids).compile()
        return self._programs[key]

    def warm_up(self) -> None:
        """Compile Whisper's programs (every token budget) and each encoder's (every width)."""
        from jax_ifmvse.text.asr import TOKEN_BUDGETS

        if self.asr is not None:
            for budget in TOKEN_BUDGETS:
                self.asr.program(self.asr.batch, budget)
        for enc in self.encoders:
            for w in self.widths(enc):
                self._program(enc, self.batch, w)

    def programs(self) -> dict[str, list[list[int]]]:
        """Compiled shapes: Whisper's (batch, token budget), each encoder's (rows, token width)."""
        out = {}
        if self.asr is not None:
            out[f"asr:{self.set_name}"] = [list(k) for k in sorted(self.asr._programs)]
        for enc in self.encoders:
            out[enc.name] = sorted([r, w] for n, r, w in self._programs if n == enc.name)
        return out

    # -- transcripts and vectors ------------------------------------------------------------
    def transcribe(
        self,
        waves: Sequence[np.ndarray | None],
        names: Sequence[str],
        durations: Sequence[float],
        failures: Sequence[str | None],
    ) -> list[RowText]:
        """Each clip's transcript: Whisper on the 16-kHz samples (first 30 s; None: the audio
        could not be read, `failures` says why), or its text in the corpus transcript file."""
        if self.corpus_texts is not None:
            return self._corpus(names)
        out: list[RowText | None] = [None] * len(waves)
        ok = [i for i, w in enumerate(waves) if w is not None]
        for i, w in enumerate(waves):
            if w is None:
                out[i] = RowText(None, ("failed",), why=failures[i] or "audio not read")
        results = self.asr.transcribe([waves[i] for i in ok], language=self.language)
        for i, res in zip(ok, results, strict=True):
            flags = [f for f in res.flags.split(",") if f]
            if float(durations[i]) > self.asr.window_s + 0.01:
                flags.append("cropped")  # as `text.stage.transcribe_store` flags it
            out[i] = RowText(res.text, tuple(flags), res.language)
        return out  # type: ignore[return-value]

    def _corpus(self, names: Sequence[str]) -> list[RowText]:
        """Texts the corpus transcript file gives the clips (by file name or stem)."""
        ids = np.asarray([Path(n).stem for n in names], object)
        try:
            texts = tx.read_corpus_transcripts(self.corpus_texts, ids, np.asarray(names, object))
        except tx.TranscriptError as e:
            if "names none of" not in str(e):
                raise
            texts = {}
        return [
            RowText(texts[i], () if texts[i] else ("empty",))
            if i in texts
            else RowText(None, (), why=f"no transcript for it in {self.corpus_texts}")
            for i in range(len(names))
        ]

    def embed(
        self, rows: Sequence[RowText]
    ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray | None]], np.ndarray]:
        """(per text view: pooled vectors (N, D) and stored layers (N, L, D) or None, rounded to
        the store's dtype; which rows some encoder truncated (N,)). Rows without a transcript
        get zeros: the caller marks them missing."""
        have = [i for i, r in enumerate(rows) if r.text is not None]
        texts = [str(rows[i].text) for i in have]
        out, truncated = {}, np.zeros(len(rows), bool)
        for enc in self.encoders:
            e = enc.encoder
            pooled = np.zeros((len(rows), e.num_hidden_states, e.hidden_size), np.float32)
            got, cut = self._encode(enc, texts)  # (N', L, D), (N',)
            pooled[have] = got.astype(enc.dtype).astype(np.float32)  # as the store holds them
            out[enc.name] = (pooled[:, -1], None if enc.keep is None else pooled[:, enc.keep])
            truncated[have] |= cut
        return out, truncated

    def _encode(self, enc: _Encoder, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """`TextEncoder.encode` through programs of `self.batch` rows (padded), one per width."""
        e = enc.encoder
        n = len(texts)
        out = np.zeros((n, e.num_hidden_states, e.hidden_size), np.float32)  # (N, L, D)
        cut = np.zeros(n, bool)
        for s in range(0, n, self.batch):
            chunk = texts[s : s + self.batch]
            ids, mask, truncated = e.tokenize(chunk)  # (B, W)
            pad = self.batch - len(chunk)
            ids = np.pad(ids, ((0, pad), (0, 0)), constant_values=ids[0, 0])
            mask = np.pad(mask, ((0, pad), (0, 0)), constant_values=1)
            run = self._program(enc, self.batch, ids.shape[1])
            out[s : s + len(chunk)] = np.asarray(run(e.params, ids, mask))[: len(chunk)]
            cut[s : s + len(chunk)] = truncated
        return out, cut

    def info(self) -> dict[str, Any]:
        """What `GET /info` reports: the transcript set's source and each encoder's settings."""
        return {
            "transcript_set": self.set_name,
            "transcript_source": self.record,
            "encoders": {
                e.name: {
                    "source": e.encoder.source_info.get("source"),
                    "sha256": e.encoder.source_info.get("sha256"),
                    "max_tokens": e.encoder.max_tokens,
                    "pooling": e.encoder.pooling,
                    "layers_stored": "none" if e.keep is None else e.keep,
                }
                for e in self.encoders
            },
        }


def _same_weights(loaded: Mapping[str, Any], recorded: Mapping[str, Any], where: str) -> None:
    """Refuse weights other than the recorded ones (sha256): the heads learnt those vectors."""
    want, got = recorded.get("sha256"), loaded.get("sha256")
    if want is not None and str(want) != str(got):
        raise TextViewError(
            f"{where}: {recorded.get('source')} now has sha256 {str(got)[:12]}..., the store"
            f" recorded {str(want)[:12]}...; restore that checkpoint or re-transcribe and retrain"
        )
