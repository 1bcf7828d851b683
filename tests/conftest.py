"""Shared test setup: the session's environment and the fixtures any test may use.

Environment, set here before any test imports JAX (subprocesses and xdist workers inherit it):
- `IFMVSE_COMPILE_CACHE` and `JAX_COMPILATION_CACHE_DIR`: ONE on-disk XLA cache for the session,
  under a temporary folder removed at its end, so an identical tiny program compiled by one module,
  an in-process CLI call or a subprocess is loaded, not compiled again, by the next (every size:
  minimum compile time 0 s). Tests of the cache itself (`test_compile_cache.py`) set their own.
  An `IFMVSE_COMPILE_CACHE` already in the environment is kept (e.g. `off`).
- `JAX_DEFAULT_MATMUL_PRECISION=highest`: float32 matmuls in float32 on every x86 CPU (Intel
  AMX may otherwise run them as bfloat16 passes), so the bounds derived from float32 rounding hold
  on AMD EPYC and Intel alike. Code that asks for a precision or for bfloat16 itself is unchanged.

Fixtures (use them rather than building the same thing again in a module):
- `cli`: `cli("train", "--store", path, ...)` runs `ifmvse` in process; returns click's Result.
- `tiny_run` (session): a tiny trained and ensembled run (random tiny Whisper, 2-s window, two
  score sets over `w` and the derived `w_mid`; see `tiny_run.build_tiny_run`), built once per
  session (once across xdist workers, under a file lock). Fields: `run`, `audio`, `store`,
  `root`. READ-ONLY: a test that changes the run copies it first (`tiny_run_copy`).
- `tiny_run_copy`: a private copy of `tiny_run`'s RUN/ under the test's tmp_path (same store).
- `toy_store` helpers (`toy_store.write_toy_store`), the fine-tuning tone corpus
  (`tiny_corpus.write_tone_corpus`) and tiny checkpoints (`tiny_models`) are plain functions:
  each module's data differ on purpose (what it has to learn), so they stay module fixtures.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

# Helper scripts used by tests (e.g. store_job.py) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))

_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
_OWN_CACHE = None
if _WORKER is None and "IFMVSE_COMPILE_CACHE" not in os.environ:
    # The controller (or a plain run) makes the folder; xdist workers inherit the variables.
    _OWN_CACHE = Path(tempfile.mkdtemp(prefix="ifmvse-test-xla-"))
    os.environ["IFMVSE_COMPILE_CACHE"] = str(_OWN_CACHE)
if os.environ["IFMVSE_COMPILE_CACHE"].strip().lower() not in ("0", "off", "false", "no", "none"):
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["IFMVSE_COMPILE_CACHE"])
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


# Under xdist's `--dist loadfile` a free worker takes the next whole file in collection order, so
# a long file picked up last leaves the other worker idle: the longest files (from CI's
# `--durations`) go first, the rest keep their order.
LONGEST_FIRST = (
    "test_demo.py",
    "test_edges.py",
    "test_finetune.py",
    "test_multihost.py",
    "test_gpu_check.py",
    "test_backbones_whisper.py",
    "test_train.py",
    "test_text_predict.py",
    "test_torch_twin.py",
    "test_extract.py",
    "test_finetune_category.py",
    "test_task1_train.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files keep order


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture
def cli():
    """`cli(*args)`: `ifmvse ARGS` in process (arguments str()-ed); returns click's Result."""
    from click.testing import CliRunner

    from jax_ifmvse.cli import cli as group

    def invoke(*args, **kw):
        return CliRunner().invoke(group, [str(a) for a in args], **kw)

    return invoke


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The session's tiny trained, ensembled run: SimpleNamespace(run, audio, store, root)."""
    pytest.importorskip("torch")
    from filelock import FileLock
    from tiny_run import build_tiny_run

    # Under xdist every worker has its own basetemp; their parent is shared by the session.
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if _WORKER else base
    root = shared / "tiny_run"
    with FileLock(str(shared / "tiny_run.lock")):
        if not (root / "done").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            build_tiny_run(root)
            (root / "done").write_text("")
    return SimpleNamespace(
        run=root / "run", audio=root / "audio", store=root / "store.h5", root=root
    )


@pytest.fixture
def tiny_run_copy(tiny_run, tmp_path):
    """A private copy of `tiny_run`'s RUN/ (tmp_path/run) that a test may change."""
    return Path(shutil.copytree(tiny_run.run, tmp_path / "run"))
