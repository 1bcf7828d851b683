"""`limit_cpus` holds a real process (every thread, JAX's included) to the cores it is given."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHILD = r"""
import json, os, sys, time
from jax_ifmvse.cpu_limit import limit_cpus
cores = limit_cpus(float(sys.argv[1])) if sys.argv[1] != "none" else None
import jax, jax.numpy as jnp
f = jax.jit(lambda a: (a @ a).sum())
x = jnp.ones((384, 384))
f(x).block_until_ready()
t0, c0 = time.perf_counter(), time.process_time()
while time.perf_counter() - t0 < float(sys.argv[2]):
    f(x).block_until_ready()
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
tasks = os.listdir("/proc/self/task")
masks = set()
for t in tasks:
    with open(f"/proc/self/task/{t}/status") as fh:
        masks.add(fh.read().split("Cpus_allowed_list:")[1].split()[0])
print(json.dumps({"cores": cores, "ratio": cpu / wall, "masks": sorted(masks),
                  "threads": len(tasks), "xla": os.environ.get("XLA_FLAGS", "")}))
"""


def _start(limit: str, seconds: float = 1.5) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, limit, str(seconds)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def _result(p: subprocess.Popen) -> dict:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


def test_a_process_limited_to_one_cpu_runs_jax_on_one_core():
    r = _result(_start("1"))
    (core,) = r["cores"]
    assert r["masks"] == [str(core)]  # every thread, JAX's pools included, may run on it only
    assert r["ratio"] <= 1.05, r  # CPU time per wall second of a JAX matmul loop: one core
    assert "--xla_cpu_multi_thread_eigen=false" in r["xla"]


def test_limited_processes_on_one_node_take_different_cores():
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("one core: nothing to spread (the limit itself is the test above)")
    a, b, free = _start("1", 2.0), _start("1", 2.0), _start("none", 0.2)
    ra, rb, rf = _result(a), _result(b), _result(free)
    assert set(ra["cores"]).isdisjoint(rb["cores"]), (ra, rb)
    assert ra["threads"] < rf["threads"], (ra, rf)  # XLA's pools sized to one core, not all
    r = _result(_start(str(len(cores) + 5), 0.2))  # more than the node has: all of them
    assert r["cores"] == cores and "multi_thread_eigen" not in r["xla"]
