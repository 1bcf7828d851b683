"""Benchmark: WavLM-large extraction, our jitted Flax model vs transformers' PyTorch, same weights.

    python bench/bench_extract.py              # 24 layers, 16 clips of 2-12 s
    python bench/bench_extract.py --quick      # 6 layers, 6 clips of 2-4 s (< 2 minutes)
    python bench/bench_extract.py --source /path/to/wavlm-large   # real weights

On a GPU machine (JAX's backend is `gpu`) both sides run there in bfloat16 (PyTorch on CUDA, the
model cast with `.to(torch.bfloat16)`), on 512 clips in batches of up to 960 s of audio, and the
yardstick is the measured bfloat16 matmul peak (target: half of it).

Two comparisons: (1) the same padded (B, T) batches (from our length-bucket plan) through both,
pure compute; (2) each side's natural way: PyTorch one utterance at a time at its own length
(as the challenge baseline evaluates), ours the bucketed `Extractor` from the list of clips
(host padding and transfers included, compilation excluded and reported apart). Each side first
runs one untimed pass over every shape (a shape's first run is ~10 % slower, paid once per run),
then timed passes alternate between the sides (the best of each is kept). Both sides
produce the masked mean of the last hidden state. FLOPs are counted analytically (matmuls and
convolutions only, on the shapes actually computed, padding included); XLA's own
`cost_analysis()` of the largest compiled batch is reported as a cross-check.

`bench_extract(...)` returns one dict row for `bench/run_all.py`.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import WavLMConfig, WavLMModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    best_interleaved,
    fmt_rate,
    on_gpu,
    peak_for,
    set_torch_threads,
    torch_device,
    torch_sync,
    verdict,
)

from jax_ifmvse.backbones.conv_frontend import feat_extract_output_lengths  # noqa: E402
from jax_ifmvse.backbones.wavlm import WavLMBackbone, convert_state_dict  # noqa: E402
from jax_ifmvse.config import AudioConfig, Config, ExtractConfig  # noqa: E402
from jax_ifmvse.encode import Extractor, batch_plan, plan_items  # noqa: E402

SR = 16000
# transformers' WavLM passes a bool key mask with a float bias; harmless, and noisy.
warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
TARGET_SAME = 1.2  # ours / PyTorch on the same batches (issue 5)
TARGET_PEAK = 0.75  # fraction of the measured float32 matmul peak on CPU
TARGET_PEAK_GPU = 0.5  # fraction of the measured bfloat16 matmul peak on a GPU
TARGET_NATURAL = 2.0  # ours bucketed / PyTorch one utterance at a time


def wavlm_large_config(num_layers: int = 24, **overrides) -> WavLMConfig:
    """microsoft/wavlm-large's shape (stable layer norm, layer-norm conv stack), random weights."""
    kw = dict(
        hidden_size=1024,
        num_hidden_layers=num_layers,
        num_attention_heads=16,
        intermediate_size=4096,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        conv_bias=True,
        conv_dim=(512,) * 7,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16,
        num_buckets=320,
        max_bucket_distance=800,
    )
    kw.update(overrides)
    return WavLMConfig(**kw)


def wavlm_flops(cfg: WavLMConfig, batch: int, samples: int) -> float:
    """Analytic forward FLOPs of one (batch, samples) input: convs, projections, attention, FFN.

    Counts 2 per multiply-add in matmuls and convolutions; norms, softmax, GELU are left out.
    """
    flops, length, c_in = 0.0, samples, 1
    for c_out, k, s in zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride, strict=True):
        length = (length - k) // s + 1
        flops += 2 * length * k * c_in * c_out
        c_in = c_out
    f, d, i = length, cfg.hidden_size, cfg.intermediate_size
    flops += 2 * f * c_in * d  # feature projection
    flops += 2 * f * cfg.num_conv_pos_embeddings * d * (d // cfg.num_conv_pos_embedding_groups)
    per_layer = 8 * f * d * d + 4 * f * d * i + 4 * f * f * d + 16 * f * d  # qkvo, FFN, attn, gate
    flops += cfg.num_hidden_layers * per_layer
    return float(batch * flops)


def make_clips(n: int, min_s: float, max_s: float, seed: int = 0) -> list[np.ndarray]:
    """n noise clips with lengths uniform in [min_s, max_s] (fixed seed), float32 16 kHz."""
    rng = np.random.default_rng(seed)
    secs = rng.uniform(min_s, max_s, n)
    return [(0.1 * rng.standard_normal(int(s * SR))).astype(np.float32) for s in secs]


def build_models(
    cfg: WavLMConfig, source: str | None = None, dtype: str = "float32", device: str = "cpu"
):
    """(PyTorch model, our backbone) with identical weights, both computing in `dtype`."""
    if source:
        tm = WavLMModel.from_pretrained(source).eval()
        cfg = tm.config
    else:
        torch.manual_seed(0)
        tm = WavLMModel(cfg).eval()
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    params = convert_state_dict(sd, cfg)
    del sd
    tm = tm.to(device=device, dtype=getattr(torch, dtype))
    bb = WavLMBackbone(cfg, params, {"source": source or "random"}, jnp.dtype(dtype))
    return tm, bb, cfg


def plan(clips: list[np.ndarray], batch_seconds: float = 160.0):
    """Our extraction plan as `ifmvse extract` makes it: the default buckets up to the crop length."""
    au = AudioConfig()
    durs = np.array([len(c) / SR for c in clips])
    buckets = tuple(b for b in au.bucket_seconds if b < au.max_seconds) + (au.max_seconds,)
    cfg = Config(extract=ExtractConfig(batch_seconds=batch_seconds))
    items = plan_items(durs, np.arange(len(clips)), au.max_seconds, au.long_audio)
    return batch_plan(items, cfg, 1, buckets), buckets


def pad_batch(clips: list[np.ndarray], b) -> tuple[np.ndarray, np.ndarray]:
    """The padded (B, T) waves and (B,) lengths of one planned batch (dummy rows are zeros)."""
    waves = np.zeros((len(b.indices), b.padded_len), np.float32)
    for r, (i, n) in enumerate(zip(b.indices, b.lengths, strict=True)):
        if i >= 0:
            waves[r, :n] = clips[i][:n]
    return waves, b.lengths.astype(np.int32)


def torch_pooled(
    tm, cfg, waves: np.ndarray, lengths: np.ndarray, layer: int | None = None
) -> np.ndarray:
    """transformers forward with attention mask, then the masked mean of the last state (B, D)
    (or of hidden state `layer`, e.g. -2: the layer before)."""
    p = next(tm.parameters())
    w = torch.from_numpy(waves).to(p.device, p.dtype)
    am = (torch.arange(w.shape[1])[None, :] < torch.from_numpy(lengths)[:, None]).long()
    out = tm(w, attention_mask=am.to(p.device), output_hidden_states=layer is not None)
    h = (out.last_hidden_state if layer is None else out.hidden_states[layer]).float()  # (B, F, D)
    n = torch.from_numpy(np.asarray(feat_extract_output_lengths(lengths, cfg)))  # (B,)
    m = (torch.arange(h.shape[1])[None, :] < n[:, None]).float()[..., None].to(p.device)
    return ((h * m).sum(1) / m.sum(1).clamp(min=1.0)).cpu().numpy()  # (B, D)


def torch_one(tm, clip: np.ndarray) -> np.ndarray:
    """The challenge baseline's way: one utterance at its own length, mean of the last state."""
    p = next(tm.parameters())
    w = torch.from_numpy(clip)[None].to(p.device, p.dtype)
    return tm(w).last_hidden_state.float().mean(1).cpu().numpy()


def dtype_errors(
    cfg: WavLMConfig,
    clips: list[np.ndarray],
    dtype: str = "bfloat16",
    device: str = "cpu",
    batch_seconds: float = 160.0,
) -> dict:
    """Each side in `dtype` against ITS OWN float32 result on the same padded batches.

    PyTorch's CPU bfloat16 path is no reference for ours: on AMX CPUs (Sapphire Rapids and
    later, `amx_bf16`) it was measured 0.476 off its own float32 result on the tiny test WavLM
    where ours was 4.0e-3 off, while in float32 the two sides agree to 2.4e-7. So each side is
    judged against itself, and the two sides are compared with each other in float32 only.
    Returns max-abs errors (`ours_err`, `torch_err`), relative L2 errors (`*_rel`), the float32
    cross-side difference `f32_cross`, the float32 scale `scale` (max |pooled|), and the dtypes
    each side really computed in (`torch_dtype`: the last hidden state's; `ours_dtype`: our
    hidden states'), so a side that silently stays in float32 is seen. For the checks' wrong
    computation, the same differences with ours pooled from the layer before (the same pass):
    `ours_err_layer_before` (ours in `dtype`, the layer before, vs ours float32) and
    `f32_cross_layer_before` (ours float32, the layer before, vs PyTorch float32).
    """
    batches, _ = plan(clips, batch_seconds=batch_seconds)
    padded = [pad_batch(clips, b) for b in batches]
    valid = [b.indices >= 0 for b in batches]
    out = {}
    for dt in ("float32", dtype):
        tm, bb, _ = build_models(cfg, None, dt, device)
        ex = Extractor(bb, layers=[cfg.num_hidden_layers - 1])  # the layer before, too
        got = [ex(w, n) for w, n in padded]
        ours = [np.asarray(g[0], np.float32)[v] for g, v in zip(got, valid, strict=True)]
        before = [np.asarray(g[1][:, 0], np.float32)[v] for g, v in zip(got, valid, strict=True)]
        with torch.inference_mode():
            theirs = [
                torch_pooled(tm, cfg, w, n)[v] for (w, n), v in zip(padded, valid, strict=True)
            ]
            w0 = torch.from_numpy(padded[0][0][:1]).to(
                next(tm.parameters()).device, getattr(torch, dt)
            )
            tdt = str(tm(w0).last_hidden_state.dtype).removeprefix("torch.")
        w, n = padded[0]
        hs = jax.eval_shape(bb.hidden_states, bb.params, jnp.asarray(w), jnp.asarray(n))[0]
        out[dt] = (*(np.concatenate(x) for x in (ours, theirs, before)), tdt, str(hs.dtype))
    (o32, t32, b32, _, _), (o16, t16, b16, tdt, odt) = out["float32"], out[dtype]

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    return {
        "dtype": dtype,
        "torch_dtype": tdt,
        "ours_dtype": odt,
        "scale": float(np.abs(o32).max()),
        "ours_err": float(np.abs(o16 - o32).max()),
        "torch_err": float(np.abs(t16 - t32).max()),
        "ours_rel": rel(o16, o32),
        "torch_rel": rel(t16, t32),
        "f32_cross": float(np.abs(o32 - t32).max()),
        "ours_err_layer_before": float(np.abs(b16 - o32).max()),
        "f32_cross_layer_before": float(np.abs(b32 - t32).max()),
    }


def bench_extract(
    clips: int = 16,
    min_s: float = 2.0,
    max_s: float = 12.0,
    num_layers: int = 24,
    source: str | None = None,
    config: WavLMConfig | None = None,
    seed: int = 0,
    peak_n: int = 2048,
    dtype: str | None = None,
    batch_seconds: float | None = None,
    reps: int = 1,
) -> dict:
    """Time both comparisons once each (after warm-up); one row with throughput, ratios, FLOP/s.

    dtype: compute dtype of both sides (default bfloat16 on a GPU, float32 on CPU).
    reps: timed passes per side after one warm-up pass (the best is kept).
    """
    threads = set_torch_threads()
    gpu = on_gpu()
    dtype = dtype or ("bfloat16" if gpu else "float32")
    device = torch_device()
    peak_before = peak_for(dtype, peak_n)
    cfg = config or wavlm_large_config(num_layers)
    t0 = time.perf_counter()
    tm, bb, cfg = build_models(cfg, source, dtype, device)
    build_s = time.perf_counter() - t0
    data = make_clips(clips, min_s, max_s, seed)
    audio_s = sum(len(c) for c in data) / SR
    batch_seconds = batch_seconds or (160.0 if config is None else 8 * max_s)
    batches, buckets = plan(data, batch_seconds=batch_seconds)
    padded = [pad_batch(data, b) for b in batches]
    flops = sum(wavlm_flops(cfg, *w.shape) for w, _ in padded)

    ex = Extractor(bb, layers=None)
    for w, _ in padded:
        ex.compile(*w.shape)
    compile_s = ex.compile_s
    big = max(ex._compiled, key=lambda s: s[0] * s[1])
    xla_flops = ex._compiled[big].cost_analysis()
    xla_flops = float((xla_flops[0] if isinstance(xla_flops, list) else xla_flops)["flops"])
    xla_vs_analytic = xla_flops / wavlm_flops(cfg, *big)

    # Warm-up both sides on the smallest batch (thread pools, allocator), untimed.
    small = min(range(len(padded)), key=lambda k: padded[k][0].size)
    jax.block_until_ready(ex(*padded[small]))
    # On a busy shared box PyTorch's OpenMP threads can slow each other down badly: keep the
    # faster of `cores` threads and 1 thread on the warm-up batch (credit PyTorch the better).
    with torch.inference_mode():
        torch_pooled(tm, cfg, *padded[small])
        torch_one(tm, data[0])
        warm = {}
        for n in sorted({threads, 1}, reverse=True) if device == "cpu" else [threads]:
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            torch_pooled(tm, cfg, *padded[small])
            warm[n] = time.perf_counter() - t0
    threads = min(warm, key=warm.get)
    torch.set_num_threads(threads)
    torch_sync()

    # (1) the same padded batches, pure compute; (2) each side's natural way: ours from the list of
    # clips through the buckets, PyTorch one utterance at a time.
    def ours_same():
        outs = [ex(w, n) for w, n in padded]  # dispatch all, then wait
        return [np.asarray(o[0]) for o in outs]

    def ours_natural():
        outs = [ex(*pad_batch(data, b)) for b in batches]
        return [np.asarray(o[0]) for o in outs]

    def torch_same():
        with torch.inference_mode():
            return [torch_pooled(tm, cfg, w, n) for w, n in padded]

    def torch_natural():
        with torch.inference_mode():
            return [torch_one(tm, c) for c in data]

    # One untimed pass of each side over every shape first: a shape's first run was measured ~10 %
    # slower (likely fresh buffers and per-shape kernel setup: oneDNN primitives, XLA's
    # allocations), which a long run pays once. ours_natural runs the shapes ours_same warmed.
    for fn in (ours_same, torch_same, torch_natural):
        fn()
    times, (ours, theirs, _, _) = best_interleaved(
        (ours_same, torch_same, ours_natural, torch_natural), reps
    )
    ours_same_s, torch_same_s, ours_nat_s, torch_nat_s = times
    max_diff = max(
        float(np.abs(a[b.indices >= 0] - t[b.indices >= 0]).max())
        for a, t, b in zip(ours, theirs, batches, strict=True)
    )
    # The pooled values' size: the scale of the bound on max_diff (tests/tolerances.py's `chain`).
    max_pooled = max(
        float(np.abs(a[b.indices >= 0]).max()) for a, b in zip(ours, batches, strict=True)
    )
    torch_nat_flops = sum(wavlm_flops(cfg, 1, len(c)) for c in data)

    # The box is shared: take the better of the peak before and after, the stricter yardstick.
    peak = max(peak_before, peak_for(dtype, peak_n))
    target_peak = TARGET_PEAK_GPU if gpu else TARGET_PEAK
    return {
        "bench": "extract",
        "model": f"wavlm {cfg.hidden_size}x{cfg.num_hidden_layers}",
        "weights": source or "random (seed 0)",
        "device": f"{jax.devices()[0].device_kind} / torch {device}",
        "torch_device": device,
        "dtype": dtype,
        "clips": clips,
        "audio_s": audio_s,
        "buckets_s": list(buckets),
        "batch_shapes": [list(w.shape) for w, _ in padded],
        "padding_fraction": 1 - audio_s * SR / sum(w.size for w, _ in padded),
        "torch_threads": threads,
        "build_s": build_s,
        "compile_s": compile_s,
        "ours_same_s": ours_same_s,
        "torch_same_s": torch_same_s,
        "ours_same_xrt": audio_s / ours_same_s,
        "torch_same_xrt": audio_s / torch_same_s,
        "ratio_same": torch_same_s / ours_same_s,
        "ours_nat_s": ours_nat_s,
        "torch_nat_s": torch_nat_s,
        "ours_nat_xrt": audio_s / ours_nat_s,
        "torch_nat_xrt": audio_s / torch_nat_s,
        "ratio_natural": torch_nat_s / ours_nat_s,
        "flops_counted": "analytic (matmul + conv, padded shapes)",
        "ours_flops": flops / ours_same_s,
        "torch_same_flops": flops / torch_same_s,
        "torch_nat_flops": torch_nat_flops / torch_nat_s,
        "xla_cost_vs_analytic": xla_vs_analytic,
        "matmul_peak_flops": peak,
        "ours_peak_fraction": flops / ours_same_s / peak,
        "max_abs_diff": max_diff,
        "max_abs_pooled": max_pooled,
        "pass_same": verdict(torch_same_s / ours_same_s, TARGET_SAME),
        "target_peak": target_peak,
        "pass_peak": verdict(flops / ours_same_s / peak, target_peak),
        "pass_natural": verdict(torch_nat_s / ours_nat_s, TARGET_NATURAL),
        # What each ratio target asks of ours, as a fraction of the measured peak: the target times
        # PyTorch's achieved FLOP/s (for the natural way on the unpadded work, the least any
        # implementation must do). Above 100 % no implementation can meet it on this machine.
        "needs_peak_same": TARGET_SAME * (flops / torch_same_s) / peak,
        "needs_peak_natural": TARGET_NATURAL * (torch_nat_flops / torch_nat_s) / peak,
    }


def print_row(r: dict) -> None:
    """Human-readable side-by-side summary of one extraction row."""
    print(
        f"{r['model']} ({r['weights']}) in {r['dtype']} on {r['device']}, {r['clips']} clips,"
        f" {r['audio_s']:.1f} s audio,"
        f" buckets {r['buckets_s']} s, shapes {r['batch_shapes']},"
        f" padding {r['padding_fraction']:.0%}; torch threads {r['torch_threads']}\n"
        f"  compile (ours, excluded) {r['compile_s']:.1f} s; weights built in {r['build_s']:.1f} s;"
        f" max |ours - torch| pooled {r['max_abs_diff']:.2e}"
        f" (max |pooled| {r['max_abs_pooled']:.3g})\n"
        f"  {'':28s}{'ours':>12s}{'PyTorch':>12s}{'ratio':>8s}{'target':>8s}\n"
        f"  {'(1) same batches, x RT':28s}{r['ours_same_xrt']:12.2f}{r['torch_same_xrt']:12.2f}"
        f"{r['ratio_same']:8.2f}{TARGET_SAME:8.1f}  {r['pass_same']}\n"
        f"  {'(2) natural way, x RT':28s}{r['ours_nat_xrt']:12.2f}{r['torch_nat_xrt']:12.2f}"
        f"{r['ratio_natural']:8.2f}{TARGET_NATURAL:8.1f}  {r['pass_natural']}\n"
        f"  achieved (analytic FLOPs): ours {fmt_rate(r['ours_flops'])}, torch same batches"
        f" {fmt_rate(r['torch_same_flops'])}, torch one-by-one {fmt_rate(r['torch_nat_flops'])};"
        f" measured {r['dtype']} matmul peak {fmt_rate(r['matmul_peak_flops'])}\n"
        f"  the ratio targets need ours at {r['needs_peak_same']:.0%} (same batches) and"
        f" {r['needs_peak_natural']:.0%} (natural way) of the peak\n"
        f"  ours = {r['ours_peak_fraction']:.0%} of peak (target {r['target_peak']:.0%})"
        f"  {r['pass_peak']}; XLA cost_analysis / analytic = {r['xla_cost_vs_analytic']:.2f}"
    )


def main() -> None:
    """Command-line entry."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=None, help="number of clips (16; quick 6)")
    ap.add_argument("--quick", action="store_true", help="6 layers, clips of 2-4 s")
    ap.add_argument("--source", default=None, help="local wavlm folder for real weights")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on a GPU)")
    args = ap.parse_args()
    print_row(run_default(args.quick, args.clips, args.source, args.dtype))


def run_default(quick: bool = False, clips: int | None = None, source=None, dtype=None) -> dict:
    """The standard sizes: full (24 layers, 2-12 s) or quick (6 layers, 2-4 s); more on a GPU."""
    gpu = on_gpu()
    if quick:
        return bench_extract(
            clips or (64 if gpu else 6), 2.0, 4.0, 6, source, dtype=dtype, reps=3 if gpu else 1
        )
    # A GPU needs many more clips and bigger batches than a CPU to be measured busy.
    return bench_extract(
        clips or (512 if gpu else 16),
        2.0,
        12.0,
        24,
        source,
        dtype=dtype,
        batch_seconds=960.0 if gpu else None,
        reps=3 if gpu else 1,  # a CPU pass takes minutes; a GPU one a second
    )


if __name__ == "__main__":
    main()
