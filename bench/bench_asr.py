"""Benchmark: Whisper transcription, ours (JAX, `jax_ifmvse.text.asr`) vs transformers' PyTorch
`generate`, same weights, same 16-kHz audio, same text normalisation, in one run.

Audio: Debian's `asterisk-core-sounds-en-wav` (recorded English prompts, 8 kHz, resampled to
16 kHz by our loader for both systems); references: `asterisk-core-sounds-en`'s
`core-sounds-en.txt`. Prompts whose reference is a bracketed description (`[beep tone]`) are
the non-speech set: there the right answer is no text.

    apt-get install asterisk-core-sounds-en-wav asterisk-core-sounds-en
    python bench/bench_asr.py --model whisper-base --limit 120   # every k-th prompt, sorted
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np

from jax_ifmvse.text.wer import wer, word_errors  # noqa: F401  (tests import them from here)

SOUNDS = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
TEXTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")


def prompts(limit: int | None) -> tuple[list[tuple[Path, str]], list[Path]]:
    """(wav, reference) of the speech prompts (every k-th of the sorted list to reach `limit`)
    and the wavs of the non-speech prompts."""
    speech, other = [], []
    with gzip.open(TEXTS, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    for line in lines:
        key, sep, text = line.partition(":")
        if line.startswith(";") or not sep:
            continue
        wav = SOUNDS / f"{key.strip()}.wav"
        if not wav.is_file():
            continue
        text = text.strip()
        (other.append(wav) if text.startswith("[") else speech.append((wav, text)))
    speech.sort()
    if limit and len(speech) > limit:
        step = len(speech) / limit
        speech = [speech[int(i * step)] for i in range(limit)]
    return speech, sorted(other)


def torch_generate(model_name: str, waves: list[np.ndarray], batch: int, language: str):
    """transformers' PyTorch generate on the same weights: (token lists, seconds)."""
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from jax_ifmvse.backbones import ct2

    loaded = ct2.load_builtin(model_name)
    sd = ct2.to_torch_state_dict(loaded.model, loaded.config)
    model = WhisperForConditionalGeneration(loaded.config).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    gen = ct2.generation_config(loaded.config, loaded.extras_dir)
    multilingual = gen.is_multilingual
    if not multilingual:
        # An English-only model's config carries empty language/task tables; with them PyTorch
        # generate "detects" a language among no language tokens (argmax of all -inf: token 0,
        # "!") and puts it in the prompt. Without them it prompts <|sot|> <|notimestamps|>.
        del gen.lang_to_id, gen.task_to_id
    model.generation_config = gen
    fe = WhisperFeatureExtractor(feature_size=loaded.config.num_mel_bins)
    out, t0 = [], time.perf_counter()
    for s in range(0, len(waves), batch):
        feats = fe(waves[s : s + batch], sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            seq = model.generate(
                feats, return_timestamps=False, max_new_tokens=224,
                language=language if multilingual else None,
                task="transcribe" if multilingual else None,
            )  # fmt: skip
        eot = model.generation_config.eos_token_id
        out += [[int(t) for t in row if int(t) != eot] for row in seq]
    return out, time.perf_counter() - t0


def encoder_flops(asr, batch: int) -> float:
    """FLOPs of one batch's log-mel + encoder pass (XLA's cost analysis of the compiled program)."""
    import jax
    import jax.numpy as jnp

    from jax_ifmvse.backbones.whisper import log_mel

    def enc(params, waves):
        mel = log_mel(waves, int(asr.config.num_mel_bins))
        return asr.model.encode(mel, params=params).last_hidden_state

    w = jax.ShapeDtypeStruct((batch, 480000), jnp.float32)
    cost = jax.jit(enc).lower(asr.params, w).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """float32 matmul FLOP/s of this machine now (best of `reps`)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def main() -> None:
    """Run both systems on the prompts and print the markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="whisper-base")
    ap.add_argument("--limit", type=int, default=None, help="speech prompts (default: all)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--language", default="en")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()

    import jax
    import torch
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    from jax_ifmvse.data.audio import load_audio
    from jax_ifmvse.text.asr import load_asr

    torch.set_num_threads(args.threads)
    speech, other = prompts(args.limit)
    waves = [load_audio(p, max_seconds=30.0) for p, _ in speech]
    noise = [load_audio(p, max_seconds=30.0) for p in other]
    refs = [t for _, t in speech]
    audio_s = sum(len(w) for w in waves) / 16000

    asr = load_asr(args.model, batch=args.batch)
    t0 = time.perf_counter()
    for budget in sorted({b for b, _ in asr.plan(waves)}):
        asr.program(args.batch, budget)  # compile once, outside the timed run
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = asr.transcribe(waves, language=args.language)
    ours_s = time.perf_counter() - t0
    theirs, torch_s = torch_generate(args.model, waves, args.batch, args.language)
    enc_flops, peak = encoder_flops(asr, args.batch), matmul_peak()
    n_batches = len(asr.plan(waves))
    limit_s = n_batches * enc_flops / peak  # the encoders alone, at the measured matmul rate

    norm = EnglishTextNormalizer({})  # Whisper's English normaliser (no spelling map)
    tok = asr.tokenizer
    hyp_ours = [r.text for r in ours]
    hyp_torch = [tok.decode(t, skip_special_tokens=True).strip() for t in theirs]
    same = np.mean([list(r.tokens) == t for r, t in zip(ours, theirs, strict=True)])
    silent = asr.transcribe(noise, language=args.language)
    device = jax.devices()[0].device_kind
    print(f"{len(speech)} speech prompts ({audio_s:.0f} s audio), {args.model}, batch"
          f" {args.batch}, language {args.language}; {device}; torch threads {args.threads}")  # fmt: skip
    print()
    print(f"physical limit: {n_batches} batches x {enc_flops / 1e9:.0f} GFLOP (log-mel + encoder,"
          f" XLA cost analysis) at {peak / 1e9:.0f} GFLOP/s (float32 matmul measured in this run)"
          f" = {limit_s:.1f} s, decoder not counted")  # fmt: skip
    print()
    print("| system | WER | identical tokens | wall s | x real time |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| encoder-only bound (above) | | | {limit_s:.1f} | {audio_s / limit_s:.2f} |")
    print(f"| ours (JAX, {len(asr._programs)} programs, compile {compile_s:.0f} s not counted)"
          f" | {wer(refs, hyp_ours, norm):.2%} | {same:.1%} | {ours_s:.1f} |"
          f" {audio_s / ours_s:.2f} |")  # fmt: skip
    print(f"| transformers PyTorch generate | {wer(refs, hyp_torch, norm):.2%} | (reference) |"
          f" {torch_s:.1f} | {audio_s / torch_s:.2f} |")  # fmt: skip
    print()
    empty = sum(not r.text for r in silent)
    print(
        f"non-speech prompts ({len(noise)}): ours gives no text for {empty};"
        f" flags {[r.flags for r in silent]}; texts {[r.text for r in silent if r.text]}"
    )
    diffs = [(p.name, a, b) for (p, _), a, b in zip(speech, hyp_ours, hyp_torch) if a != b]
    for name, a, b in diffs[:10]:
        print(f"differs: {name}: ours {a!r} / torch {b!r}")


if __name__ == "__main__":
    main()
