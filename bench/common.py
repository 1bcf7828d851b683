"""Shared benchmark helpers: machine description, measured matmul peak, timing.

Every benchmark reports achieved FLOP/s against `matmul_peak()`, a MEASURED number (a large jitted
matmul on this machine now), not a datasheet figure: on a shared box the honest ceiling is what a
perfect GEMM gets under the same load.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (or the platform string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD features that bound CPU matmul speed (avx2, fma, avx512f, amx)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in ("avx2", "fma", "avx512f", "amx_tile") if x in have]
    except OSError:
        pass
    return []


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages (the box is shared: say how busy it was)."""
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def on_gpu() -> bool:
    """True when JAX runs on a GPU: PyTorch then runs on CUDA and peaks are bfloat16."""
    return jax.default_backend() == "gpu"


def torch_device() -> str:
    """The PyTorch device matching JAX's backend ('cuda' on a GPU machine, else 'cpu')."""
    import torch

    return "cuda" if on_gpu() and torch.cuda.is_available() else "cpu"


def torch_sync() -> None:
    """Wait for queued CUDA work (PyTorch, like JAX, runs GPU kernels asynchronously)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def machine_info() -> dict[str, Any]:
    """Machine and software description for the results table."""
    import flax
    import torch

    dev = jax.devices()[0]
    return {
        "cpu": cpu_model(),
        "cpu_flags": " ".join(cpu_flags()),
        "cores": cores(),
        "load_avg": tuple(round(x, 2) for x in load_average()),
        "jax_backend": jax.default_backend(),
        "device_kind": str(dev.device_kind),
        "n_devices": jax.device_count(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "torch": torch.__version__,
        "torch_device": torch_device(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def block(x: Any) -> Any:
    """Wait for every array in a pytree (JAX dispatch is asynchronous)."""
    return jax.block_until_ready(x)


def time_fn(fn: Callable[[], Any], reps: int = 3, warmup: int = 1) -> dict[str, float]:
    """Run `fn` warmup + reps times (blocking on its result); best, median and all times in s."""
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return {"best": min(times), "median": statistics.median(times), "times": times}


def best_interleaved(fns: Sequence[Callable[[], Any]], reps: int) -> tuple[list[float], list]:
    """Best-of-`reps` seconds of each fn, alternating them so all see the same machine load.

    Returns (best seconds per fn, each fn's result from its last call).
    """
    best, last = [np.inf] * len(fns), [None] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            last[i] = fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best, last


@functools.cache
def matmul_peak(n: int = 2048, dtype: str = "float32", reps: int = 5) -> float:
    """Measured matmul throughput in FLOP/s: best of `reps` jitted (n, n) @ (n, n) products."""
    dt = jnp.dtype(dtype)
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), dt)
    b = jax.random.normal(k2, (n, n), dt)
    f = jax.jit(lambda a, b: a @ b)
    t = time_fn(lambda: f(a, b), reps=reps, warmup=1)["best"]
    return 2.0 * n**3 / t


def gemm_rate(m: int, k: int, n: int, reps: int = 10) -> float:
    """Measured float32 (m, k) @ (k, n) throughput in FLOP/s (best of `reps`, jitted)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (m, k), jnp.float32)
    b = jax.random.normal(k2, (k, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    return 2.0 * m * k * n / time_fn(lambda: f(a, b), reps=reps, warmup=2)["best"]


def compiled_flops(compiled: Any) -> float:
    """FLOPs of one call of a compiled JAX program, from XLA's own cost analysis."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost  # older JAX: one dict per device
    return float(cost.get("flops", 0.0)) if cost else 0.0


def torch_matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """The same float32 matmul in PyTorch (same threads as its benchmarks), FLOP/s."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    a @ b
    best = np.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_for(dtype: str = "float32", n: int = 2048) -> float:
    """The yardstick for a benchmark: `matmul_peak` at n (8192 on a GPU, which n=2048 can't fill)."""
    return matmul_peak.__wrapped__(8192 if on_gpu() else n, dtype)


def set_torch_threads(n: int | None = None) -> int:
    """PyTorch intra-op threads = cores (XLA CPU sizes its own Eigen pool the same way)."""
    import torch

    n = n or cores()
    torch.set_num_threads(n)
    return n


def fmt_rate(x: float, unit: str = "FLOP/s") -> str:
    """1.23e11 -> '123.0 G' + unit."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.1f} {prefix}{unit}"
    return f"{x:.1f} {unit}"


def verdict(value: float, target: float) -> str:
    """PASS if the measured value reaches the target, else MISS."""
    return "PASS" if value >= target else "MISS"
