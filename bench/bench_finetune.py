"""Fine-tuning train step: ours (JAX `finetune_step`) next to PyTorch transformers, same shapes.

    python bench/bench_finetune.py            # WavLM-base-sized (12 x 768), 2 x 4 s, CPU: minutes
    python bench/bench_finetune.py --quick    # a 2-layer toy WavLM, seconds

Both sides run the baseline's training step on the same random batch: WavLM (CNN frozen) ->
attentive statistics pooling -> EmotionRegression -> sum of 1 - CCC -> backward -> AdamW, no
dropout (ours: bfloat16 off, remat off unless --remat). Each side runs in its own child process,
so its peak resident memory (VmHWM: weights, optimizer state, activations, compiled programs,
imports) is its own; the children alternate twice and the best step time of each side counts,
so both see the same machine load. FLOPs per step come from XLA's cost analysis of our compiled
step; the share of peak is FLOP/s against a float32 matmul measured in the JAX child.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

BASE = dict(  # WavLM-base's shape (transformers' WavLMConfig defaults), random weights
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    feat_extract_norm="group", do_stable_layer_norm=False,
)  # fmt: skip
TOY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    conv_dim=(16,) * 7, feat_extract_norm="layer", do_stable_layer_norm=True,
    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_buckets=16,
    max_bucket_distance=24,
)  # fmt: skip


def _shape(quick: bool) -> dict:
    if quick:
        return {"config": TOY, "batch": 2, "seconds": 0.5, "reps": 2, "head": 16}
    return {"config": BASE, "batch": 2, "seconds": 4.0, "reps": 3, "head": 1024}


def _batch(b: int, t: int):
    rng = np.random.default_rng(0)
    lengths = np.asarray([t - (i * t) // (4 * b) for i in range(b)], np.int32)
    waves = (0.3 * rng.standard_normal((b, t))).astype(np.float32)
    waves[np.arange(t)[None] >= lengths[:, None]] = 0
    labels = rng.uniform(0, 1, (b, 3)).astype(np.float32)
    return waves, lengths, labels


def child_jax(shape: dict, remat: bool) -> dict:
    """Time our jitted, donated `finetune_step`; report its FLOPs and the matmul peak."""
    import jax
    import jax.numpy as jnp
    from bench_store import own_peak_rss
    from common import compiled_flops, peak_for
    from transformers import WavLMConfig

    from jax_ifmvse.backbones.wavlm import WavLMBackbone
    from jax_ifmvse.config import load_config
    from jax_ifmvse.finetune.model import frozen_labels, init_params, make_spec
    from jax_ifmvse.finetune.run import make_finetune_step, make_optimizer
    from jax_ifmvse.trainer.state import TrainState

    config = WavLMConfig(**shape["config"])
    bb = WavLMBackbone(config, WavLMBackbone.init_params(config, jax.random.key(0)), {})
    cfg = load_config(
        "finetune",
        [f"finetune.head_hidden={shape['head']}", "finetune.head_dropout=0",
         "finetune.accumulation_steps=1", f"train.batch_size={shape['batch']}",
         f"finetune.remat={str(remat).lower()}"],
    )  # fmt: skip
    spec = make_spec(bb, cfg)
    params = init_params(spec, bb.params, jax.random.key(1))
    del bb
    labels = frozen_labels(spec, params, True)
    tx = make_optimizer(cfg, labels)
    state = TrainState(jnp.zeros((), jnp.int32), params, jax.jit(tx.init)(params))
    step = make_finetune_step(spec, tx, labels, jax.random.key(2))
    w, n, y = _batch(shape["batch"], int(shape["seconds"] * 16000))
    batch = {"waves": w, "lengths": n, "labels": y, "weights": np.ones(len(n), np.float32)}
    batch = jax.tree.map(jnp.asarray, batch)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    flops = compiled_flops(compiled)
    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(shape["reps"]):
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    return {
        "step_s": min(times),
        "peak_rss": own_peak_rss(),
        "flops": flops,
        "compile_s": compile_s,
        "loss": float(m["loss"]),
        "matmul_peak_flops": peak_for("float32"),
    }


def child_torch(shape: dict) -> dict:
    """Time the same step in PyTorch: transformers WavLMModel + the baseline's pooling and head."""
    import torch
    from bench_store import own_peak_rss
    from common import set_torch_threads
    from transformers import WavLMConfig, WavLMModel

    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_finetune_twin import BaselineASP, BaselineRegression, baseline_ccc

    threads = set_torch_threads()
    torch.manual_seed(0)
    config = WavLMConfig(**shape["config"])
    model = WavLMModel(config).eval()  # eval: no dropout / layerdrop / SpecAugment, as ours
    model.freeze_feature_encoder()
    d = config.hidden_size
    pool, head = BaselineASP(d), BaselineRegression(2 * d, shape["head"])
    params = [p for m in (model, pool, head) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    w, n, y = _batch(shape["batch"], int(shape["seconds"] * 16000))
    w, y = torch.from_numpy(w), torch.from_numpy(y)
    am = torch.from_numpy((np.arange(w.shape[1])[None] < n[:, None]).astype(np.int64))
    feat_lens = [int(x) for x in model._get_feat_extract_output_lengths(torch.from_numpy(n))]

    def step():
        hidden = model(w, attention_mask=am).last_hidden_state
        loss = torch.sum(1.0 - baseline_ccc(head(pool(hidden, feat_lens)), y))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step()  # warm-up
    times = []
    for _ in range(shape["reps"]):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return {"step_s": min(times), "peak_rss": own_peak_rss(), "threads": threads,
            "loss": float(loss)}  # fmt: skip


def _run_child(side: str, quick: bool, remat: bool) -> dict:
    args = [sys.executable, str(Path(__file__).resolve()), "--child", side]
    args += ["--quick"] * quick + ["--remat"] * remat
    out = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"bench_finetune {side} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_finetune(quick: bool = False, remat: bool = False, rounds: int = 2) -> dict:
    """Both sides, alternating `rounds` times; best step time, peak RSS, FLOPs, ratios."""
    from common import load_average

    shape = _shape(quick)
    load = load_average()
    runs = {"jax": [], "torch": []}
    for _ in range(rounds):
        for side in runs:
            runs[side].append(_run_child(side, quick, remat))
    ours = min(runs["jax"], key=lambda r: r["step_s"])
    ref = min(runs["torch"], key=lambda r: r["step_s"])
    flops_s = ours["flops"] / ours["step_s"]
    return {
        "model": "toy WavLM 2x32" if quick else "WavLM-base 12x768 (random)",
        "batch": shape["batch"],
        "seconds": shape["seconds"],
        "remat": remat,
        "ours_step_s": ours["step_s"],
        "torch_step_s": ref["step_s"],
        "speedup": ref["step_s"] / ours["step_s"],
        "ours_peak_rss": max(r["peak_rss"] for r in runs["jax"]),
        "torch_peak_rss": max(r["peak_rss"] for r in runs["torch"]),
        "memory_ratio": max(r["peak_rss"] for r in runs["jax"])
        / max(r["peak_rss"] for r in runs["torch"]),
        "flops_per_step": ours["flops"],
        "ours_flops_s": flops_s,
        "matmul_peak_flops": ours["matmul_peak_flops"],
        "share_of_peak": flops_s / ours["matmul_peak_flops"],
        "compile_s": ours["compile_s"],
        "torch_threads": ref["threads"],
        "loss": (ours["loss"], ref["loss"]),
        "load_avg": (load, load_average()),
    }


def report(r: dict) -> str:
    """The printed summary: times, memory, ratios, FLOPs and share of the measured peak."""
    gb = 2**30
    return "\n".join(
        [
            f"fine-tune step, {r['model']}, batch {r['batch']} x {r['seconds']:g} s, CNN frozen,"
            f" remat {r['remat']}:",
            f"  step time   ours {r['ours_step_s']:.3f} s   PyTorch ({r['torch_threads']} thr)"
            f" {r['torch_step_s']:.3f} s   PyTorch / ours {r['speedup']:.2f}x",
            f"  peak RSS    ours {r['ours_peak_rss'] / gb:.2f} GiB   PyTorch"
            f" {r['torch_peak_rss'] / gb:.2f} GiB   ours / PyTorch {r['memory_ratio']:.2f}x",
            f"  FLOPs/step  {r['flops_per_step'] / 1e9:.1f} GFLOP (XLA cost analysis) ->"
            f" {r['ours_flops_s'] / 1e9:.1f} GFLOP/s = {r['share_of_peak']:.0%} of the measured"
            f" matmul peak {r['matmul_peak_flops'] / 1e9:.1f} GFLOP/s",
            f"  (compile {r['compile_s']:.1f} s excluded; load {r['load_avg'][0][0]:.1f} ->"
            f" {r['load_avg'][1][0]:.1f})",
        ]
    )


def finetune_rows(r: dict) -> list[tuple[str, ...]]:
    """run_all.py's table rows (benchmark, ours, reference, ours / ref, FLOP/s, target)."""
    gb = 2**30
    name = f"finetune step {r['model']}, {r['batch']} x {r['seconds']:g} s"
    rate = f"{r['ours_flops_s'] / 1e9:.1f} GFLOP/s ({r['share_of_peak']:.0%})"
    return [
        (f"{name} (s/step)", f"{r['ours_step_s']:.3f}",
         f"{r['torch_step_s']:.3f} PyTorch ({r['torch_threads']} thr)",
         f"{r['speedup']:.2f}x", rate, ""),
        (f"{name} (peak RSS GiB)", f"{r['ours_peak_rss'] / gb:.2f}",
         f"{r['torch_peak_rss'] / gb:.2f} PyTorch", f"{r['memory_ratio']:.2f}x", "", ""),
    ]  # fmt: skip


def main() -> None:
    """Command-line entry."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a toy WavLM: seconds")
    ap.add_argument("--remat", action="store_true", help="gradient checkpointing on our side")
    ap.add_argument("--child", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        shape = _shape(args.quick)
        out = child_jax(shape, args.remat) if args.child == "jax" else child_torch(shape)
        print(json.dumps(out))
        return
    print(report(bench_finetune(args.quick, args.remat)))


if __name__ == "__main__":
    main()
