"""Whisper transcription in JAX: batched greedy decoding with a key/value cache, one jit per bucket.

The model is transformers' `FlaxWhisperForConditionalGeneration` (its decoder keeps the
self-attention keys and values in a preallocated cache); the loop around it is ours, so that
one compiled program per (batch, token budget) decodes a whole batch in a `lax.while_loop`
and also returns what the store keeps: the detected language, the no-speech probability (of
`<|nospeech|>` at the start-of-transcript position, as OpenAI's and transformers' detectors
compute it) and the average log-probability of the chosen tokens.

The decoding rule is transformers' PyTorch `generate` for a short-form clip with
`return_timestamps=False`: prompt `<|startoftranscript|> [<|lang|> <|transcribe|>]
<|notimestamps|>`, `suppress_tokens` masked at every step and `begin_suppress_tokens` at the
first, argmax, stop at `<|endoftext|>`. The tests check the tokens equal PyTorch's.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_ifmvse.errors import BadSource

SAMPLE_RATE = 16_000
CHUNK_SECONDS = 30.0
FRAME_SAMPLES = 320  # one encoder frame: two 10-ms mel hops (50 frames per second)
# Token budgets (decoded tokens at most) by clip length: speech runs at most ~4 tokens/s in
# Whisper's BPE, so 8/s + 24 leaves twice the room; one compiled program per budget used.
TOKEN_BUDGETS = (32, 64, 128, 224)
# OpenAI Whisper's `transcribe` rule for a segment without speech (whisper/transcribe.py:
# no_speech_threshold=0.6, logprob_threshold=-1.0): both conditions -> no text.
NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0
SILENT_RMS = 1e-4  # digital silence: the clip is not decoded at all


def _silent(wave: np.ndarray) -> bool:
    """Empty or digital silence (RMS below `SILENT_RMS`): not decoded."""
    return wave.size == 0 or float(np.sqrt(np.mean(wave.astype(np.float64) ** 2))) < SILENT_RMS


def token_budget(seconds: float) -> int:
    """The smallest budget that holds 8 tokens per second of audio + 24."""
    need = 24 + 8 * math.ceil(min(seconds, CHUNK_SECONDS))
    return next((b for b in TOKEN_BUDGETS if b >= need), TOKEN_BUDGETS[-1])


@dataclasses.dataclass(frozen=True)
class Special:
    """The special token ids decoding needs."""

    sot: int
    eot: int
    transcribe: int | None
    no_timestamps: int
    no_speech: int | None
    languages: dict[str, int]  # "en" -> id of <|en|>; empty for English-only models
    suppress: tuple[int, ...]
    begin_suppress: tuple[int, ...]

    @property
    def multilingual(self) -> bool:
        """Whether the prompt carries a language and a task token."""
        return bool(self.languages)


def special_ids(generation_config: Any, tokenizer: Any) -> Special:
    """Special ids from a transformers GenerationConfig and the checkpoint's tokenizer."""
    g = generation_config
    vocab = tokenizer.get_vocab()
    no_speech = vocab.get("<|nospeech|>", vocab.get("<|nocaptions|>"))
    multilingual = bool(getattr(g, "is_multilingual", False))
    langs = {k.strip("<|>"): int(v) for k, v in (getattr(g, "lang_to_id", None) or {}).items()}
    task = (getattr(g, "task_to_id", None) or {}).get("transcribe")
    return Special(
        sot=int(g.decoder_start_token_id),
        eot=int(g.eos_token_id if not isinstance(g.eos_token_id, list) else g.eos_token_id[0]),
        transcribe=int(task) if multilingual and task is not None else None,
        no_timestamps=int(g.no_timestamps_token_id),
        no_speech=None if no_speech is None else int(no_speech),
        languages=langs if multilingual else {},
        suppress=tuple(int(t) for t in (g.suppress_tokens or [])),
        begin_suppress=tuple(int(t) for t in (g.begin_suppress_tokens or [])),
    )


def flax_params(state_dict: dict[str, np.ndarray], config: Any) -> dict[str, Any]:
    """WhisperForConditionalGeneration PyTorch keys -> FlaxWhisperForConditionalGeneration params."""
    from flax.traverse_util import flatten_dict, unflatten_dict
    from transformers.models.whisper.modeling_flax_whisper import (
        FlaxWhisperForConditionalGenerationModule,
    )

    module = FlaxWhisperForConditionalGenerationModule(config)
    feats = jnp.zeros((1, config.num_mel_bins, 2 * config.max_source_positions), jnp.float32)
    ids = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), feats, ids, ids, ids, ids))[
        "params"
    ]
    flat = {}
    for path, leaf_shape in flatten_dict(shapes).items():
        *mod, leaf = path
        key = ".".join([*mod, "bias" if leaf == "bias" else "weight"])
        if key not in state_dict:
            raise KeyError(f"missing Whisper tensor {key!r}")
        value = np.asarray(state_dict[key], np.float32)
        if leaf == "kernel":  # Linear (out, in) -> (in, out); conv (out, in, k) -> (k, in, out)
            value = value.T if value.ndim == 2 else value.transpose(2, 1, 0)
        if value.shape != tuple(leaf_shape.shape):
            raise ValueError(f"Whisper tensor {key!r} has shape {value.shape}, want {leaf_shape}")
        flat[path] = np.ascontiguousarray(value)
    return unflatten_dict(flat)


@dataclasses.dataclass
class Transcript:
    """One utterance's transcription, as the store keeps it."""

    text: str
    language: str
    avg_logprob: float
    no_speech_prob: float
    tokens: tuple[int, ...]
    flags: str  # comma-separated: silent, no-speech, empty, budget (stopped at the budget)


class WhisperASR:
    """A Whisper checkpoint for transcription: params, config, tokenizer and special ids."""

    def __init__(
        self, config: Any, params: Any, tokenizer: Any, generation_config: Any, info: dict,
        dtype: Any = jnp.float32, batch: int = 8,
    ):  # fmt: skip
        from transformers import FlaxWhisperForConditionalGeneration

        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.generation_config = generation_config
        self.special = special_ids(generation_config, tokenizer)
        self.source_info = info
        self.batch = int(batch)
        self.dtype = jnp.dtype(dtype)
        self.model = FlaxWhisperForConditionalGeneration(
            config, dtype=jnp.dtype(dtype), _do_init=False
        )
        self._programs: dict[tuple[int, int], Any] = {}
        self._id_to_lang = {v: k for k, v in self.special.languages.items()}

    @property
    def window_s(self) -> float:
        """Seconds of audio the encoder sees (zero-padded): 30 unless `with_window` cut it."""
        return self.window_samples / SAMPLE_RATE

    @property
    def window_samples(self) -> int:
        """Samples of the padded encoder input (480000 for Whisper's 30 s)."""
        return int(self.config.max_source_positions) * FRAME_SAMPLES

    def with_window(self, seconds: float) -> WhisperASR:
        """A copy whose encoder sees a `seconds`-long padded window instead of 30 s.

        A speed option, not Whisper's setting (like `WhisperBackbone.with_window` for the
        speech views): the encoder's positional embeddings are sliced to the window's frames
        (50 per second), so clips longer than the window are cropped to it and the transcripts
        of shorter ones can differ from the 30-s ones.
        """
        from jax_ifmvse.backbones.whisper import window_config

        try:
            config = window_config(self.config, seconds)
        except ValueError as e:
            raise BadSource(str(e)) from None
        if config is None:
            return self
        frames = int(config.max_source_positions)
        enc = self.params["model"]["encoder"]
        table = enc["embed_positions"]["embedding"][:frames]  # (frames, D)
        params = {**self.params, "model": {**self.params["model"],
                  "encoder": {**enc, "embed_positions": {"embedding": table}}}}  # fmt: skip
        info = {**self.source_info, "window_s": float(seconds)}
        return WhisperASR(config, params, self.tokenizer, self.generation_config, info,
                          self.model.dtype, self.batch)  # fmt: skip

    # -- the compiled decoding program --------------------------------------------------------
    def _run(self, params, waves, lang, budget: int):
        """waves (B, T), lang (B,) given language token or -1 -> tokens (B, budget), stats."""
        from jax_ifmvse.backbones.whisper import log_mel

        sp, model = self.special, self.model
        mel = log_mel(waves, int(self.config.num_mel_bins), self.window_samples)  # (B, M, 3000)
        enc = model.encode(mel, params=params)
        b = waves.shape[0]
        prompt_len = 4 if sp.multilingual else 2
        max_len = prompt_len + budget
        cache = model.init_cache(b, max_len, enc)
        mask = jnp.ones((b, max_len), jnp.int32)

        def step(tokens, pos, cache):
            out = model.decode(
                tokens, enc, decoder_attention_mask=mask,
                decoder_position_ids=jnp.broadcast_to(pos, tokens.shape), past_key_values=cache,
                params=params,
            )  # fmt: skip
            return out.logits[:, -1].astype(jnp.float32), out.past_key_values  # (B, V)

        sot = jnp.full((b, 1), sp.sot, jnp.int32)
        logits0, cache = step(sot, jnp.zeros((1, 1), jnp.int32), cache)  # (B, V)
        probs0 = jax.nn.softmax(logits0, axis=-1)
        no_speech = probs0[:, sp.no_speech] if sp.no_speech is not None else jnp.full((b,), -1.0)
        if sp.multilingual:
            ids = jnp.asarray(sorted(sp.languages.values()), jnp.int32)
            detected = ids[jnp.argmax(logits0[:, ids], axis=-1)]
            lang = jnp.where(lang >= 0, lang, detected).astype(jnp.int32)
            rest = jnp.stack(
                [lang, jnp.full((b,), sp.transcribe), jnp.full((b,), sp.no_timestamps)], axis=1
            ).astype(jnp.int32)  # (B, 3)
        else:
            rest = jnp.full((b, 1), sp.no_timestamps, jnp.int32)
        logits, cache = step(rest, jnp.arange(1, prompt_len)[None, :], cache)
        vocab = logits.shape[-1]
        suppress = jnp.zeros((vocab,), bool).at[jnp.asarray(sp.suppress, jnp.int32)].set(True)
        begin = jnp.zeros((vocab,), bool).at[jnp.asarray(sp.begin_suppress, jnp.int32)].set(True)

        def pick(logits, i):
            banned = suppress | ((i == 0) & begin)
            logits = jnp.where(banned[None, :], -jnp.inf, logits)
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # (B,)
            logp = jax.nn.log_softmax(logits, axis=-1)
            return token, jnp.take_along_axis(logp, token[:, None], axis=1)[:, 0]

        out = jnp.full((b, budget), sp.eot, jnp.int32)

        def cond(state):
            i, _, _, _, done, _, _ = state
            return (i < budget) & ~jnp.all(done)

        def body(state):
            i, logits, cache, out, done, total, count = state
            token, lp = pick(logits, i)
            token = jnp.where(done, sp.eot, token)
            total = total + jnp.where(done, 0.0, lp)
            count = count + (~done).astype(jnp.int32)
            out = out.at[:, i].set(token)
            done = done | (token == sp.eot)
            pos = jnp.full((1, 1), prompt_len, jnp.int32) + i
            logits, cache = step(token[:, None], pos, cache)
            return i + 1, logits, cache, out, done, total, count

        init = (
            jnp.int32(0), logits, cache, out, jnp.zeros((b,), bool),
            jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.int32),
        )  # fmt: skip
        _, _, _, out, done, total, count = jax.lax.while_loop(cond, body, init)
        avg = total / jnp.maximum(count, 1)
        return out, lang if sp.multilingual else jnp.full((b,), -1), avg, no_speech, done

    def program(self, batch: int, budget: int):
        """The compiled program for one (batch, token budget), compiled once."""
        key = (batch, budget)
        if key not in self._programs:
            fn = jax.jit(lambda p, w, lang: self._run(p, w, lang, budget))
            w = jax.ShapeDtypeStruct((batch, self.window_samples), jnp.float32)
            lang = jax.ShapeDtypeStruct((batch,), jnp.int32)
            self._programs[key] = fn.lower(self.params, w, lang).compile()
        return self._programs[key]

    # -- the host side ----------------------------------------------------------------------
    def language_id(self, language: str | None) -> int:
        """Token id of a given language code, or -1 (detect); English-only models take en."""
        if language is None:
            return -1
        if not self.special.multilingual:
            if language != "en":
                raise BadSource(f"language {language!r}: this Whisper checkpoint is English-only")
            return -1
        if language not in self.special.languages:
            raise BadSource(
                f"language {language!r} is not one of this checkpoint's languages"
                f" ({', '.join(sorted(self.special.languages)[:8])}, ...)"
            )
        return self.special.languages[language]

    def plan(self, waves: Sequence[np.ndarray]) -> list[tuple[int, list[int]]]:
        """(token budget, clip indices) per batch, silent clips left out.

        Batches follow budget order and each is decoded at its largest budget: at most one
        partial batch (filled with dummy silent rows) per call, at most len(TOKEN_BUDGETS)
        programs.
        """
        n_max = self.window_samples
        todo = sorted(
            (token_budget(min(len(w), n_max) / SAMPLE_RATE), i)
            for i, w in enumerate(waves)
            if not _silent(np.asarray(w, np.float32)[:n_max])
        )
        chunks = [todo[s : s + self.batch] for s in range(0, len(todo), self.batch)]
        return [(max(b for b, _ in c), [i for _, i in c]) for c in chunks]

    def transcribe(
        self, waves: Sequence[np.ndarray], language: str | None = None
    ) -> list[Transcript]:
        """16-kHz clips (each at most 30 s is decoded) -> one Transcript per clip, in order."""
        n_max = self.window_samples
        lang_id = self.language_id(language)
        results: list[Transcript | None] = [None] * len(waves)
        for i, w in enumerate(waves):
            if _silent(np.asarray(w, np.float32)[:n_max]):
                results[i] = Transcript("", language or "", float("nan"), 1.0, (), "silent")
        for budget, part in self.plan(waves):
            run = self.program(self.batch, budget)
            batch = np.zeros((self.batch, n_max), np.float32)  # dummy rows stay silent
            for j, i in enumerate(part):
                w = np.asarray(waves[i], np.float32)[:n_max]
                batch[j, : w.size] = w
            lang = np.full((self.batch,), lang_id, np.int32)
            out, langs, avg, nsp, done = jax.device_get(run(self.params, batch, lang))
            for j, i in enumerate(part):
                results[i] = self._result(out[j], int(langs[j]), float(avg[j]),
                                          float(nsp[j]), bool(done[j]), language)  # fmt: skip
        return results  # type: ignore[return-value]

    def _result(self, tokens, lang, avg, nsp, done, language) -> Transcript:
        eot = self.special.eot
        toks = tuple(int(t) for t in tokens)
        toks = toks[: toks.index(eot)] if eot in toks else toks
        code = self._id_to_lang.get(
            lang, language or ("en" if not self.special.multilingual else "")
        )
        flags = [] if done else ["budget"]
        text = self.tokenizer.decode(list(toks), skip_special_tokens=True).strip()
        nsp = float("nan") if nsp < 0 else nsp
        if nsp > NO_SPEECH_THRESHOLD and avg < LOGPROB_THRESHOLD:
            text, flags = "", [*flags, "no-speech"]  # OpenAI's rule: no invented text
        elif not text:
            flags.append("empty")
        return Transcript(text, code, avg, nsp, toks, ",".join(flags))


def load_asr(
    source: str, *, dtype: str = "float32", batch: int = 8, cache_dir: str | Path | None = None
) -> WhisperASR:
    """A built-in Whisper name (whisper-base, whisper-tiny.en) or a Whisper checkpoint folder."""
    from transformers import AutoTokenizer, GenerationConfig, WhisperConfig

    from jax_ifmvse.backbones import ct2
    from jax_ifmvse.backbones.sources import read_state_dict, sha256_files

    path = Path(source).expanduser()
    if source in ct2.BUILTINS and not path.exists():
        loaded = ct2.load_builtin(source)
        config = loaded.config
        state = ct2.to_torch_state_dict(loaded.model, config)
        folder = loaded.extras_dir
        gen = ct2.generation_config(config, folder)
        info = {
            "source": source,
            "resolved_path": loaded.path,
            "sha256": ct2.builtin_digest(source),
        }
    else:
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise BadSource(f"{source}: not a built-in ({', '.join(ct2.BUILTINS)}) nor a folder"
                            " with config.json")  # fmt: skip
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if cfg.get("model_type") != "whisper":
            raise BadSource(f"{cfg_path}: model_type {cfg.get('model_type')!r} is not whisper")
        weights = next((path / w for w in ("model.safetensors", "pytorch_model.bin")
                        if (path / w).is_file()), None)  # fmt: skip
        if weights is None:
            raise BadSource(f"{path}: no weights file (model.safetensors or pytorch_model.bin)")
        if not (path / "generation_config.json").is_file():
            raise BadSource(f"{path}: no generation_config.json (special token ids)")
        config = WhisperConfig.from_dict(cfg)
        state = read_state_dict(weights)
        folder = path
        gen = GenerationConfig.from_pretrained(path)
        info = {"source": source, "resolved_path": str(weights),
                "sha256": sha256_files([cfg_path, weights])}  # fmt: skip
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        raise BadSource(f"{folder}: the Whisper checkpoint has no tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception:  # a bare tokenizer.json (the CTranslate2 packages)
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    try:
        params = flax_params(state, config)
    except (KeyError, ValueError) as e:
        raise BadSource(f"{source}: weights do not match the config ({e.args[0]})") from None
    return WhisperASR(config, params, tokenizer, gen, info, jnp.dtype(dtype), batch)
