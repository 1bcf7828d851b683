"""Hold a process to N cores: CPU affinity for every thread, thread-count variables, XLA flags.

A Ray task's `num_cpus` is only a reservation: the process it runs in may use every core of the
node (JAX's CPU client sizes its thread pools to the cores the process may run on). `limit_cpus`
makes the reservation real before JAX starts its backend: it picks N cores of the node that no
other limited process on the node holds (one lock file per core under the temporary folder,
released when the process ends), binds every thread of the process to them (new threads inherit
it, so XLA's pools, created at the backend's first use, have N threads and run on those cores),
and sets the usual thread-count variables for libraries and child processes started later.
Standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import tempfile
from pathlib import Path

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
_held: list[int] = []  # lock file descriptors of the cores this process holds (never closed)


def _slots_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"ifmvse-cpu-slots-{os.getuid()}"
    d.mkdir(exist_ok=True)
    return d


def _take_cores(allowed: list[int], want: int) -> list[int]:
    """`want` cores of `allowed` that no other limited process holds (the first ones if too
    few are free: the limit still holds, only the placement overlaps)."""
    got: list[int] = []
    for cpu in allowed:
        if len(got) == want:
            break
        fd = os.open(_slots_dir() / f"cpu{cpu}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held.append(fd)
        got.append(cpu)
    return got + [c for c in allowed if c not in got][: want - len(got)]


def limit_cpus(cpus: float) -> list[int]:
    """Bind this process (every thread) to ceil(cpus) cores and set thread-count variables;
    returns the cores. Call it before JAX's backend starts (its thread pools are sized then)."""
    allowed = sorted(os.sched_getaffinity(0))
    want = max(1, min(len(allowed), math.ceil(cpus)))
    cores = sorted(_take_cores(allowed, want))
    for tid in os.listdir("/proc/self/task"):  # threads already running (Ray's, BLAS pools)
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cores)
    os.sched_setaffinity(0, cores)
    for var in THREAD_VARS:
        os.environ[var] = str(want)
    flags = os.environ.get("XLA_FLAGS", "")
    if want == 1 and "xla_cpu_multi_thread_eigen" not in flags:  # no Eigen pool for one core
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    return cores
