"""Benchmark: Whisper transcription, ours (JAX, `jax_ifmvse.text.asr`) vs transformers' PyTorch
`generate`, same weights, same 16-kHz audio, same text normalisation, in one run.

Audio: Debian's `asterisk-core-sounds-en-wav` (recorded English prompts, 8 kHz, resampled to
16 kHz by our loader for both systems); references: `asterisk-core-sounds-en`'s
`core-sounds-en.txt`. Prompts whose reference is a bracketed description (`[beep tone]`) are
the non-speech set: there the right answer is no text.

    apt-get install asterisk-core-sounds-en-wav asterisk-core-sounds-en
    python bench/bench_asr.py --model whisper-base --out asr-base.jsonl   # all prompts
    python bench/bench_asr.py --model whisper-base --out asr-base.jsonl --report   # table so far

Prompts run in a fixed random order, chunk by chunk (ours, then PyTorch, on the same chunk),
one fsynced JSON line per chunk: a run stopped early resumes, and its table covers an unbiased
subset on which both systems ran.
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


_TORCH: dict = {}


def torch_generate(model_name: str, waves: list[np.ndarray], batch: int, language: str):
    """transformers' PyTorch generate on the same weights: (token lists, seconds)."""
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from jax_ifmvse.backbones import ct2

    if model_name not in _TORCH:  # loaded once per process
        loaded = ct2.load_builtin(model_name)
        sd = ct2.to_torch_state_dict(loaded.model, loaded.config)
        model = WhisperForConditionalGeneration(loaded.config).eval()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
        gen = ct2.generation_config(loaded.config, loaded.extras_dir)
        if not gen.is_multilingual:
            # An English-only model's config carries empty language/task tables; with them
            # PyTorch generate "detects" a language among no language tokens (argmax of all
            # -inf: token 0, "!") and puts it in the prompt. Without them it prompts <|sot|>
            # <|notimestamps|>.
            del gen.lang_to_id, gen.task_to_id
        model.generation_config = gen
        fe = WhisperFeatureExtractor(feature_size=loaded.config.num_mel_bins)
        _TORCH[model_name] = model, fe
    model, fe = _TORCH[model_name]
    multilingual = model.generation_config.is_multilingual
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


def order(speech: list, seed: int = 0) -> list:
    """A fixed random order, so that a run stopped early covers an unbiased subset."""
    return [speech[i] for i in np.random.default_rng(seed).permutation(len(speech))]


def run_chunks(args, speech, asr, out: Path) -> None:
    """Ours then PyTorch on each chunk of prompts; one JSON line per chunk (resumable)."""
    import json
    import os

    from jax_ifmvse.data.audio import load_audio

    done = (
        {json.loads(line)["chunk"] for line in out.read_text().splitlines()}
        if out.exists()
        else set()
    )
    chunks = [speech[s : s + args.chunk] for s in range(0, len(speech), args.chunk)]
    for c, part in enumerate(chunks):
        if c in done:
            continue
        waves = [load_audio(p, max_seconds=30.0) for p, _ in part]
        load0 = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        ours = asr.transcribe(waves, language=args.language)
        ours_s, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
        c0 = time.process_time()
        theirs, torch_s = torch_generate(args.model, waves, args.batch, args.language)
        torch_cpu = time.process_time() - c0  # CPU seconds this process got (all threads)
        tok = asr.tokenizer
        row = {
            "chunk": c, "audio_s": sum(len(w) for w in waves) / 16000,
            "ours_s": ours_s, "torch_s": torch_s, "load1": [load0, os.getloadavg()[0]],
            "ours_cpu_s": ours_cpu, "torch_cpu_s": torch_cpu,
            "names": [p.name for p, _ in part], "refs": [t for _, t in part],
            "ours": [r.text for r in ours], "ours_tokens": [list(r.tokens) for r in ours],
            "torch": [tok.decode(t, skip_special_tokens=True).strip() for t in theirs],
            "torch_tokens": theirs,
        }  # fmt: skip
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(f"chunk {c + 1}/{len(chunks)}: ours {ours_s:.1f} s, torch {torch_s:.1f} s,"
              f" load {load0:.1f}", flush=True)  # fmt: skip


def main() -> None:
    """Run both systems on the prompts (chunk by chunk, resumable) and print the markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="whisper-base")
    ap.add_argument("--limit", type=int, default=None, help="speech prompts (default: all)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=64, help="prompts per resumable chunk")
    ap.add_argument("--language", default="en")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", type=Path, required=True, help="JSON lines, one per chunk")
    ap.add_argument("--report", action="store_true", help="only print the table from --out")
    args = ap.parse_args()

    import json
    import os

    import jax
    import torch
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    from jax_ifmvse.data.audio import load_audio
    from jax_ifmvse.text.asr import load_asr

    torch.set_num_threads(args.threads)
    speech, other = prompts(args.limit)
    n_total = len(speech)
    speech = order(speech)
    asr = load_asr(args.model, batch=args.batch)
    compile_s = float("nan")
    if not args.report:
        t0 = time.perf_counter()
        waves = [load_audio(p, max_seconds=30.0) for p, _ in speech]
        for budget in sorted({b for b, _ in asr.plan(waves)}):
            asr.program(args.batch, budget)  # compile once, outside the timed run
        del waves
        compile_s = time.perf_counter() - t0
        run_chunks(args, speech, asr, args.out)

    rows = [json.loads(line) for line in args.out.read_text().splitlines()]
    cat = lambda key: [x for r in rows for x in r[key]]  # noqa: E731
    refs, hyp_ours, hyp_torch = cat("refs"), cat("ours"), cat("torch")
    same = np.mean([a == b for a, b in zip(cat("ours_tokens"), cat("torch_tokens"), strict=True)])
    audio_s = sum(r["audio_s"] for r in rows)
    ours_s, torch_s = sum(r["ours_s"] for r in rows), sum(r["torch_s"] for r in rows)
    loads = [x for r in rows for x in r["load1"]]
    enc_flops, peak = encoder_flops(asr, args.batch), matmul_peak()
    n_batches = sum(-(-len(r["names"]) // args.batch) for r in rows)
    limit_s = n_batches * enc_flops / peak  # the encoders alone, at the measured matmul rate
    norm = EnglishTextNormalizer({})  # Whisper's English normaliser (no spelling map)
    noise = [load_audio(p, max_seconds=30.0) for p in other]
    # --report reads the chunks only: the non-speech prompts are decoded by a full run
    silent = [] if args.report else asr.transcribe(noise, language=args.language)
    device = jax.devices()[0].device_kind
    print(f"{len(refs)} of {n_total} speech prompts ({audio_s:.0f} s audio), {args.model}, batch"
          f" {args.batch}, language {args.language}; {device}, {os.cpu_count()} CPUs; torch"
          f" threads {args.threads}; load average (1 min) at chunk starts/ends"
          f" {min(loads):.1f}-{max(loads):.1f}, mean {np.mean(loads):.1f}")  # fmt: skip
    print()
    print(f"physical limit: {n_batches} batches x {enc_flops / 1e9:.0f} GFLOP (log-mel + encoder,"
          f" XLA cost analysis) at {peak / 1e9:.0f} GFLOP/s (float32 matmul measured at the end"
          f" of this run) = {limit_s:.1f} s, decoder not counted")  # fmt: skip
    print()
    print("| system | WER | identical tokens | wall s | x real time |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| encoder-only bound (above) | | | {limit_s:.1f} | {audio_s / limit_s:.2f} |")
    compiled = "compile not counted" if args.report else f"compile {compile_s:.0f} s not counted"
    print(f"| ours (JAX, {compiled})"
          f" | {wer(refs, hyp_ours, norm):.2%} | {same:.1%} | {ours_s:.1f} |"
          f" {audio_s / ours_s:.2f} |")  # fmt: skip
    print(f"| transformers PyTorch generate | {wer(refs, hyp_torch, norm):.2%} | (reference) |"
          f" {torch_s:.1f} | {audio_s / torch_s:.2f} |")  # fmt: skip
    print()
    empty = sum(not r.text for r in silent)
    print(
        f"non-speech prompts ({len(noise)}): ours gives no text for {empty};"
        f" flags {[r.flags for r in silent]}; texts {[r.text for r in silent if r.text]}"
        if silent
        else "non-speech prompts: not decoded by --report"
    )
    cpu = [(r["ours_cpu_s"], r["torch_cpu_s"]) for r in rows if "ours_cpu_s" in r]
    if cpu:
        print(f"CPU seconds this process got: ours {sum(c[0] for c in cpu):.0f},"
              f" torch {sum(c[1] for c in cpu):.0f} (chunks that recorded it: {len(cpu)})")  # fmt: skip
    n_words = sum(len(norm(r).split()) for r in refs)
    print(f"reference words: {n_words}; per-chunk wall s ours {[round(r['ours_s']) for r in rows]},"
          f" torch {[round(r['torch_s']) for r in rows]}")  # fmt: skip
    diffs = [(n, a, b) for n, a, b in zip(cat("names"), hyp_ours, hyp_torch, strict=True) if a != b]
    print(f"texts differ on {len(diffs)} prompts")
    for name, a, b in diffs[:10]:
        print(f"differs: {name}: ours {a!r} / torch {b!r}")


if __name__ == "__main__":
    main()
