"""Warm start: JAX's persistent compilation cache under `$IFMVSE_CACHE/xla`.

A compiled XLA program is stored on disk keyed by a hash of its HLO, the compile options and
flags, the devices (platform, kind, count) and the jax/jaxlib version, so a second `ifmvse
predict` (extract, train, serve, demo) loads its programs instead of compiling them again. Any
change of shapes, dtypes, flags, devices or JAX version is a new key: the old entry is simply
not used. `IFMVSE_COMPILE_CACHE=off` (or `ifmvse --no-compile-cache`) switches it off; a path
there moves it. Importing this module does not import JAX.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "IFMVSE_COMPILE_CACHE"
_OFF = ("0", "off", "false", "no", "none")
_ON = ("", "1", "on", "true", "yes")


def compile_cache_dir(setting: str | None = None) -> Path | None:
    """Where compiled programs are kept: `$IFMVSE_CACHE/xla`, the setting's path, or None (off)."""
    value = (os.environ.get(ENV, "") if setting is None else setting).strip()
    if value.lower() in _OFF:
        return None
    if value.lower() in _ON:
        # lazy: the backbones package imports JAX and transformers; this module must not
        from jax_ifmvse.backbones.sources import cache_root

        return cache_root() / "xla"
    return Path(value).expanduser()


def enable_compile_cache(setting: str | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at `compile_cache_dir()`, caching every program.

    Call before the first compile. Returns the directory, or None when switched off or when the
    directory cannot be created (then a one-line warning, and the command runs uncached).
    """
    import jax

    path = compile_cache_dir(setting)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"warning: {path}: compile cache off ({e.strerror or e})", file=sys.stderr)
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # JAX's defaults skip programs compiled in under 1 s; on a CPU most of ours are, and the
    # sum of many small compiles is what a warm start saves. -1: no minimum size either.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path
