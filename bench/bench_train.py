"""Benchmark: training the five score models, ours (jitted `lax.scan` epochs) vs plain PyTorch.

    python bench/bench_train.py            # 200 steps of batch 32 per model
    python bench/bench_train.py --quick    # 40 steps

The PyTorch side is `torch_reference.py` (also the yardstick of tests/test_torch_twin.py): the
same layer sizes and equations (eq. 2-6, MLP 1024-512-1, dropout 0.5), AdamW with the same
settings, loss 1 - CCC over the batch, eager, on the same random features, as many steps. FLOPs
are analytic: 6 x (weights in matmuls) x samples (forward 2, backward 4 per multiply-add), so
both sides are credited the same work.

`bench_train(...)` returns one dict row per score model for `bench/run_all.py`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax.traverse_util import flatten_dict
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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

# The PyTorch side: the same modules and parameter names as our heads (bench/torch_reference.py).
from torch_reference import load_flax_params, torch_ccc_loss, torch_model  # noqa: E402, F401

from jax_ifmvse.config import ModelConfig, ScoreSetConfig, TrainConfig  # noqa: E402
from jax_ifmvse.heads import build_score_model  # noqa: E402
from jax_ifmvse.parallel import data_mesh  # noqa: E402
from jax_ifmvse.train import (  # noqa: E402
    init_state,
    make_optimizer,
    make_train_epoch,
    make_train_step,
)

# The paper's five score sets at their widths (Whisper-large-v3 1280, WavLM/HuBERT-large 1024).
SCORE_SETS = (
    ScoreSetConfig("S1", "mlp", ("whisper",)),
    ScoreSetConfig("S2", "fusion", ("whisper", "wavlm")),
    ScoreSetConfig("S3", "mlp", ("wavlm",)),
    ScoreSetConfig("S4", "fusion", ("hubert", "wavlm")),
    ScoreSetConfig("S5", "mlp", ("hubert",)),
)
VIEW_DIMS = {"whisper": 1280, "wavlm": 1024, "hubert": 1024}
PAPER_EPOCHS, PAPER_UTTERANCES, PAPER_ATTRIBUTES = 80, 84_260, 3
TARGET_FUSION = 2.5  # ours / PyTorch samples per second for fusion models on CPU (issue 9)


# ---------------------------------------------------------------------------------------------
# Benchmark


def matmul_params(params) -> int:
    """Weights that take part in matmuls (Linear weights; biases and layer weights excluded)."""
    return sum(int(np.prod(v.shape)) for p, v in flatten_dict(params).items() if p[-1] == "weight")


def random_data(ss: ScoreSetConfig, view_dims, n: int, seed: int = 0):
    """Random features {view: (n, D)} float32 and labels (n, 1) with some signal."""
    rng = np.random.default_rng(seed)
    feats = {v: rng.standard_normal((n, view_dims[v])).astype(np.float32) for v in ss.views}
    y = 0.5 + 0.1 * feats[ss.views[0]][:, :8].mean(1, keepdims=True)
    return feats, y.astype(np.float32)


def ours_runner(model, feats, labels, steps: int, batch: int):
    """Our path, compiled: jitted epoch = lax.scan over `steps` steps, as `train_model` runs it.

    Returns (run, first_call_s, params_fn): `run()` trains one epoch and blocks.
    """
    tc = TrainConfig(batch_size=batch)
    tx = make_optimizer(tc)
    root = jax.random.key(0)
    mesh = data_mesh()
    # As `train_model`: the state and the data replicated on the mesh. A state left on one device
    # comes back from the epoch (whose batches are sharded over the mesh) replicated on it: a
    # new input sharding, so the second call would trace and compile the epoch again.
    replicated = NamedSharding(mesh, P())
    state = jax.jit(lambda ex, k: init_state(model, tx, ex, k), out_shardings=replicated)(
        {k: v[:1] for k, v in feats.items()}, jax.random.fold_in(root, 0)
    )
    data = jax.device_put({"features": feats, "labels": labels}, replicated)
    step = make_train_step(model, tx, jax.random.fold_in(root, 2), NamedSharding(mesh, P("data")))
    epoch = make_train_epoch(step, steps * batch, batch, jax.random.fold_in(root, 1))
    box = {"state": state, "e": 0}

    def run():
        # The state is donated every epoch, so keep threading the new one.
        box["state"], m = epoch(box["state"], data, jnp.asarray(box["e"], jnp.int32))
        box["e"] += 1
        return jax.block_until_ready(m)

    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0, lambda: box["state"].params


def torch_runner(tmodel, feats, labels, views, steps: int, batch: int):
    """The plain PyTorch loop: shuffled batches, forward, 1 - CCC, backward, AdamW step.

    Returns `run()`, which trains `steps` steps (after a short untimed warm-up here).
    """
    tc = TrainConfig(batch_size=batch)
    dev = next(tmodel.parameters()).device
    # On CUDA, AdamW's fused kernel is PyTorch's fastest; on CPU the default (foreach) is.
    fused = {"fused": True} if dev.type == "cuda" else {}
    opt = torch.optim.AdamW(
        tmodel.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay, **fused
    )
    xs = [torch.from_numpy(feats[v]).to(dev) for v in views]
    y = torch.from_numpy(labels).to(dev)
    tmodel.train()
    g = torch.Generator().manual_seed(0)

    def run(n_steps=steps):
        perm = torch.randperm(len(y), generator=g)[: n_steps * batch].view(n_steps, batch)
        for ix in perm.to(dev):
            loss = torch_ccc_loss(y[ix], tmodel(*[x[ix] for x in xs]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        torch_sync()
        return loss

    run(min(steps, 5))  # warm-up: allocator, thread pool, AdamW state
    return run


def _with_threads(fn, n: int):
    """fn run with PyTorch intra-op threads set to n."""

    def run():
        torch.set_num_threads(n)
        return fn()

    return run


def optimizer_runner(params, steps: int):
    """Our AdamW update alone, `steps` times in one jitted scan: the memory-bound part of a step.

    Returns `run()`. Every step reads parameters, gradients and both moments and writes three of
    them back, whatever the matmuls cost; with the matmul FLOPs at the measured peak this bounds
    how fast any implementation of the same training can be on this machine.
    """
    tx = make_optimizer(TrainConfig())
    params = jax.tree.map(jnp.copy, params)  # ours donates its state: keep our own buffers
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

    def body(carry, _):
        p, o = carry
        updates, o = tx.update(grads, o, p)
        return (optax.apply_updates(p, updates), o), None

    run_scan = jax.jit(lambda p, o: jax.lax.scan(body, (p, o), None, length=steps)[0])
    state = (params, tx.init(params))
    jax.block_until_ready(run_scan(*state))
    return lambda: jax.block_until_ready(run_scan(*state))


def bench_train(
    steps: int = 200,
    batch: int = 32,
    reps: int = 3,
    score_sets=SCORE_SETS,
    view_dims=VIEW_DIMS,
    model_cfg: ModelConfig | None = None,
    peak_n: int = 2048,
) -> list[dict]:
    """One row per score model: samples/s ours and PyTorch, ratio, FLOP/s vs the matmul peak."""
    threads = set_torch_threads()
    device = torch_device()
    # Thread counts matter to PyTorch on CPU only.
    thread_options = sorted({threads, 1}, reverse=True) if device == "cpu" else [threads]
    if device == "cuda":
        # JAX's default float32 matmul precision on GPUs uses TF32 tensor cores: let PyTorch too.
        torch.backends.cuda.matmul.allow_tf32 = True
    mc = model_cfg or ModelConfig()
    peak_before = peak_for("float32", peak_n)
    rows = []
    for ss in score_sets:
        feats, labels = random_data(ss, view_dims, steps * batch)
        model = build_score_model(ss, mc, view_dims, 1)
        run_ours, first_s, get_params = ours_runner(model, feats, labels, steps, batch)
        tm = torch_model(ss, mc, view_dims, 1).to(device)
        load_flax_params(tm, get_params())  # same architecture; timing does not depend on it
        run_torch = torch_runner(tm, feats, labels, ss.views, steps, batch)
        # On a busy shared box PyTorch's OpenMP threads can slow each other down badly (measured
        # 3x at 2 threads vs 1); time both thread counts and credit PyTorch with the better.
        run_opt = optimizer_runner(get_params(), steps)
        fns = [run_ours, run_opt] + [_with_threads(run_torch, n) for n in thread_options]
        (ours_s, opt_s, *torch_times), _ = best_interleaved(fns, reps)
        torch_s = min(torch_times)
        best_threads = thread_options[int(np.argmin(torch_times))]
        n_mm = matmul_params(get_params())
        samples = steps * batch
        flops = 6.0 * n_mm * samples
        ours_sps, torch_sps = samples / ours_s, samples / torch_s
        paper = PAPER_EPOCHS * PAPER_UTTERANCES * PAPER_ATTRIBUTES  # samples per model
        rows.append(
            {
                "bench": "train",
                "model": ss.name,
                "kind": ss.kind,
                "views": "+".join(f"{v}{view_dims[v]}" for v in ss.views),
                "matmul_params": n_mm,
                "steps": steps,
                "batch": batch,
                "torch_threads": best_threads,
                "torch_device": device,
                "ours_sps": ours_sps,
                "torch_sps": torch_sps,
                "ratio": ours_sps / torch_sps,
                "ours_first_call_s": first_s,
                "flops_counted": "analytic: 6 x matmul weights x samples",
                "ours_flops": flops / ours_s,
                "torch_flops": flops / torch_s,
                "ours_peak_fraction": None,  # filled in below against the final peak
                "optimizer_s": opt_s,
                "torch_s": torch_s,
                "paper_ours_s": paper / ours_sps,
                "paper_torch_s": paper / torch_sps,
                "target": TARGET_FUSION if ss.kind == "fusion" else None,
                "pass": verdict(ours_sps / torch_sps, TARGET_FUSION) if ss.kind == "fusion" else "",
            }
        )
    # The box is shared: the better of the peaks before and after is the stricter yardstick.
    peak = max(peak_before, peak_for("float32", peak_n))
    for r in rows:
        r["matmul_peak_flops"] = peak
        r["ours_peak_fraction"] = r["ours_flops"] / peak
        # Where a step's time goes: the matmuls at the measured peak would take `matmul_at_peak_s`;
        # the AdamW update alone (memory-bound: it streams parameters, gradients and both moments)
        # takes `optimizer_s`. Together they say how far from the machine's limits ours is.
        r["matmul_at_peak_s"] = 6.0 * r["matmul_params"] * r["steps"] * r["batch"] / peak
        r["optimizer_share"] = r["optimizer_s"] / (r["steps"] * r["batch"] / r["ours_sps"])
        if r["target"]:
            # To reach the target, the step must take PyTorch's time / target; with the AdamW
            # update's measured time taken out, what is left must hold all the matmuls.
            left = r["torch_s"] / r["target"] - r["optimizer_s"]
            flops = 6.0 * r["matmul_params"] * r["steps"] * r["batch"]
            r["needs_peak"] = flops / left / peak if left > 0 else float("inf")
    return rows


def paper_schedule(rows: list[dict]) -> tuple[float, float]:
    """Projected seconds of the paper's schedule (80 epochs x 84,260 x 5 models x 3): ours, torch."""
    return sum(r["paper_ours_s"] for r in rows), sum(r["paper_torch_s"] for r in rows)


def print_rows(rows: list[dict]) -> None:
    """Human-readable table of the training rows."""
    print(
        f"{'model':6s}{'views':22s}{'ours/s':>10s}{'torch/s':>10s}{'ratio':>7s}"
        f"{'ours FLOP/s':>14s}{'of peak':>9s}{'torch FLOP/s':>14s}{'AdamW':>7s}  target"
    )
    for r in rows:
        tgt = f">= {r['target']:.1f}x {r['pass']}" if r["target"] else ""
        if r["target"] and r["pass"] == "MISS":
            tgt += f" (needs matmuls at {r['needs_peak']:.0%} of peak)"
        print(
            f"{r['model']:6s}{r['views']:22s}{r['ours_sps']:10.0f}{r['torch_sps']:10.0f}"
            f"{r['ratio']:7.2f}{fmt_rate(r['ours_flops']):>14s}{r['ours_peak_fraction']:9.0%}"
            f"{fmt_rate(r['torch_flops']):>14s}{r['optimizer_share']:7.0%}  {tgt}"
        )
    ours_s, torch_s = paper_schedule(rows)
    print(
        "AdamW = share of our step that the optimizer update alone takes (memory-bound, no FLOPs"
        " counted): time no matmul speed-up can win back"
    )
    print(
        f"measured f32 matmul peak {fmt_rate(rows[0]['matmul_peak_flops'])};"
        f" FLOPs = 6 x matmul weights x samples; {rows[0]['steps']} steps of {rows[0]['batch']}\n"
        f"paper schedule ({PAPER_EPOCHS} epochs x {PAPER_UTTERANCES:,} utterances x 5 models x"
        f" {PAPER_ATTRIBUTES} attributes): ours {ours_s / 3600:.2f} h, PyTorch {torch_s / 3600:.2f} h"
    )


def main() -> None:
    """Command-line entry."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="steps per timed epoch (200; quick 40)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    # A GPU step takes microseconds: time more of them there.
    steps = args.steps or (40 if args.quick else 2000 if on_gpu() else 200)
    print_rows(bench_train(steps=steps, reps=2 if args.quick else 3))


if __name__ == "__main__":
    main()
