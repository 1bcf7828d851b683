"""The persistent compilation cache: where it lives, that it fills, and that a rerun hits it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from jax_ifmvse.compile_cache import compile_cache_dir

ROOT = Path(__file__).resolve().parents[1]

# A fresh process compiles two small programs (well under JAX's default 1-s threshold) through
# jit and the AOT path Extractor uses, and prints how many came from the persistent cache.
SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from jax_ifmvse.compile_cache import enable_compile_cache
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(1) if name == "/jax/compilation_cache/cache_hits" else None)
path = enable_compile_cache()
f = jax.jit(lambda x: jnp.tanh(x) @ x.T)
f(jnp.ones((8, 8))).block_until_ready()
g = jax.jit(lambda x: jnp.cumsum(x) * 3).lower(jax.ShapeDtypeStruct((16,), jnp.float32)).compile()
g(jnp.ones(16)).block_until_ready()
print(json.dumps({"dir": None if path is None else str(path), "hits": len(hits)}))
"""


def _run(env_extra: dict[str, str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **env_extra}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_loads_programs_from_the_cache(tmp_path):
    cache = tmp_path / "xla"
    first = _run({"IFMVSE_COMPILE_CACHE": str(cache)})
    assert first == {"dir": str(cache), "hits": 0}
    entries = [p for p in cache.iterdir() if p.is_file()]
    assert len(entries) >= 2  # both small programs were written despite compiling fast
    second = _run({"IFMVSE_COMPILE_CACHE": str(cache)})
    assert second["hits"] >= 2


def test_cache_off_and_default_location(tmp_path):
    off = _run({"IFMVSE_COMPILE_CACHE": "off", "IFMVSE_CACHE": str(tmp_path)})
    assert off == {"dir": None, "hits": 0}
    assert not (tmp_path / "xla").exists()
    on = _run({"IFMVSE_COMPILE_CACHE": "", "IFMVSE_CACHE": str(tmp_path)})
    assert on["dir"] == str(tmp_path / "xla") and any((tmp_path / "xla").iterdir())


def test_compile_cache_dir_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("IFMVSE_CACHE", str(tmp_path))
    assert compile_cache_dir("") == tmp_path / "xla"
    assert compile_cache_dir("on") == tmp_path / "xla"
    assert compile_cache_dir("OFF") is None and compile_cache_dir("0") is None
    assert compile_cache_dir(str(tmp_path / "elsewhere")) == tmp_path / "elsewhere"
    monkeypatch.setenv("IFMVSE_COMPILE_CACHE", "false")
    assert compile_cache_dir() is None
