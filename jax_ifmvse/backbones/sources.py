"""Resolve a backbone SOURCE (local folder, hub id, built-in name) to a loaded Backbone, cached."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from jax_ifmvse.backbones import ct2
from jax_ifmvse.backbones.ct2 import BUILTINS
from jax_ifmvse.errors import BadSource

# model_type -> (module under jax_ifmvse.backbones, Backbone class name); imported lazily by name
# so whisper works before the SSL ports exist.
FAMILIES: dict[str, tuple[str, str]] = {
    "whisper": ("whisper", "WhisperBackbone"),
    "wavlm": ("wavlm", "WavLMBackbone"),
    "hubert": ("hubert", "HubertBackbone"),
    "data2vec-audio": ("data2vec", "Data2VecAudioBackbone"),
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CACHE_FORMAT = 1  # bump when the cached param layout changes
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_root() -> Path:
    """The one cache root (`$IFMVSE_CACHE`, else ~/.cache/jax_ifmvse): params, XLA programs."""
    return Path(os.environ.get("IFMVSE_CACHE") or "~/.cache/jax_ifmvse").expanduser()


def family_module(model_type: str):
    """The module and Backbone class for a config.json model_type."""
    if model_type not in FAMILIES:
        raise BadSource(f"unknown model_type {model_type!r} (supported: {', '.join(FAMILIES)})")
    mod_name, cls_name = FAMILIES[model_type]
    try:
        mod = importlib.import_module(f"jax_ifmvse.backbones.{mod_name}")
    except ModuleNotFoundError as e:
        if e.name == f"jax_ifmvse.backbones.{mod_name}":
            raise BadSource(f"model_type {model_type!r} is not implemented yet") from None
        raise
    return mod, getattr(mod, cls_name)


def sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _config_class(model_type: str):
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


# --- reading a local Hugging Face checkpoint folder -----------------------------------------------


def read_checkpoint_config(cfg_path: Path, what: str = "checkpoint folder") -> dict[str, Any]:
    """A checkpoint's config.json as a dict; missing or corrupt is a one-line BadSource."""
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadSource(f"{cfg_path}: missing config.json in the {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadSource(f"{cfg_path}: corrupt config.json ({e})") from None


def _check_folder(folder: Path) -> tuple[dict[str, Any], Path]:
    if not folder.is_dir():
        raise BadSource(f"{folder}: no such checkpoint folder")
    cfg_path = folder / "config.json"
    cfg = read_checkpoint_config(cfg_path)
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise BadSource(
            f"{cfg_path}: unknown model_type {model_type!r} (supported: {', '.join(FAMILIES)})"
        )
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return cfg, folder / name
    raise BadSource(f"{folder}: no weights file (expected {' or '.join(WEIGHT_FILES)})")


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a model.safetensors or pytorch_model.bin (torch.load weights_only) as float32 numpy."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            out = {}
            # The flax framework reads bfloat16 too (numpy has no bfloat16).
            with safe_open(str(path), framework="flax") as f:
                for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    out[k] = np.asarray(f.get_tensor(k), dtype=np.float32)
            return out
        import torch  # lazy: only .bin checkpoints need it

        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in sd.items() if hasattr(v, "float")}
    except BadSource:
        raise
    except Exception as e:  # corrupt/truncated files raise many different types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadSource(f"{path}: corrupt weights file ({reason})") from None


# --- the on-disk cache of converted params --------------------------------------------------------


def _cache_paths(cache_dir: Path, model_type: str, digest: str) -> tuple[Path, Path]:
    d = cache_dir / f"{model_type}-{digest[:24]}-v{CACHE_FORMAT}"
    return d / "params.msgpack", d / "meta.json"


def _save_cache(
    cache_dir: Path, model_type: str, digest: str, params: Any, config_dict: dict
) -> None:
    from flax.serialization import msgpack_serialize

    params_path, meta_path = _cache_paths(cache_dir, model_type, digest)
    params_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(params_path, msgpack_serialize(params))
    _write_atomic(meta_path, json.dumps({"model_type": model_type, "config": config_dict}).encode())


def _write_atomic(final: Path, data: bytes) -> None:
    """Write-then-rename, so an interrupted run never leaves a half cache entry behind."""
    # The temporary name is the writer's own: the processes of a multi-host job (or two runs on one
    # machine) convert the same checkpoint at the same moment, and a shared name let one process
    # rename the other's half-written file away.
    tmp = final.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex}-{final.name}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _load_cache(cache_dir: Path, model_type: str, digest: str) -> tuple[Any, dict] | None:
    from flax.serialization import msgpack_restore

    params_path, meta_path = _cache_paths(cache_dir, model_type, digest)
    if not (params_path.is_file() and meta_path.is_file()):
        return None
    try:
        params = msgpack_restore(params_path.read_bytes())
        meta = json.loads(meta_path.read_text())
    except Exception:  # a damaged cache entry is just a miss; it is rewritten
        return None
    return params, meta["config"]


# --- SOURCE kinds ---------------------------------------------------------------------------------


def _load_folder(folder: Path, cache_dir: Path) -> tuple[str, Any, Any, dict[str, Any]]:
    cfg, weights = _check_folder(folder)
    model_type = cfg["model_type"]
    mod, _ = family_module(model_type)
    digest = sha256_files([folder / "config.json", weights])
    config = _config_class(model_type).from_dict(cfg)
    cached = _load_cache(cache_dir, model_type, digest)
    if cached is not None:
        params = cached[0]
    else:
        state_dict = read_state_dict(weights)
        try:
            params = mod.convert_state_dict(state_dict, config)
        except (KeyError, ValueError) as e:
            msg = str(e.args[0]) if e.args else type(e).__name__
            raise BadSource(f"{weights}: does not match config.json ({msg})") from None
        _save_cache(cache_dir, model_type, digest, params, cfg)
    info = {
        "resolved_path": str(weights),
        "sha256": digest,
        "model_type": model_type,
        "config": json.dumps(cfg, sort_keys=True),
    }
    # The SSL checkpoints differ in whether waveforms are z-normalized first (hubert-large-ls960-ft
    # and data2vec-audio-large-960h are; wavlm-large is not): follow the checkpoint's own file.
    pre = folder / "preprocessor_config.json"
    if pre.exists():
        try:
            info["do_normalize"] = bool(json.loads(pre.read_text()).get("do_normalize", False))
        except (json.JSONDecodeError, AttributeError):
            raise BadSource(f"{pre}: not valid JSON") from None
    return model_type, config, params, info


def _load_builtin(name: str, cache_dir: Path) -> tuple[str, Any, Any, dict[str, Any]]:
    parts, _ = ct2.builtin_files(name)  # fails fast if the package is missing
    digest = ct2.builtin_digest(name)
    cached = _load_cache(cache_dir, "whisper", digest)
    if cached is not None:
        params, cfg = cached
        config = _config_class("whisper").from_dict(cfg)
    else:
        loaded = ct2.load_builtin(name)  # verifies the SHA-256
        config = loaded.config
        params = ct2.to_flax_encoder_params(loaded.model, config)
        cfg = config.to_dict()
        _save_cache(cache_dir, "whisper", digest, params, cfg)
    path = " + ".join(str(p) for p in parts)
    info = {
        "resolved_path": path,
        "sha256": digest,
        "model_type": "whisper",
        "config": json.dumps(cfg, sort_keys=True),
    }
    return "whisper", config, params, info


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether huggingface.co answers within `timeout` s (DNS included); never blocks longer."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    # getaddrinfo ignores socket timeouts, so the probe runs in a thread we stop waiting for.
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(result and result[0])


def _fetch_hub(repo_id: str, cache_dir: Path) -> Path:
    local = cache_dir / "hub" / repo_id.replace("/", "--")
    if not hub_reachable():
        raise BadSource(
            f"{repo_id}: no such local folder and offline (Hugging Face hub unreachable); "
            f"put config.json, preprocessor_config.json and model.safetensors (or pytorch_model.bin) from https://huggingface.co/{repo_id} "
            f"into {local} and pass that folder as SOURCE"
        )
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id,
            allow_patterns=["config.json", "preprocessor_config.json", *WEIGHT_FILES],
            local_dir=str(local),
        )
    except Exception as e:
        raise BadSource(f"{repo_id}: hub download failed ({str(e).splitlines()[0]})") from None
    return Path(path)


def load_backbone(source: str, *, dtype: str = "float32", cache_dir: str | Path | None = None):
    """Load a backbone from a checkpoint folder, a hub id `org/name`, or a built-in Whisper name."""
    import jax.numpy as jnp

    cache = Path(cache_dir).expanduser() if cache_dir else cache_root()
    source = str(source)
    path = Path(source).expanduser()
    if source in BUILTINS and not path.exists():
        model_type, config, params, info = _load_builtin(source, cache)
    elif path.exists() or not _HUB_ID.match(source):
        model_type, config, params, info = _load_folder(path, cache)
    else:
        model_type, config, params, info = _load_folder(_fetch_hub(source, cache), cache)
    _, cls = family_module(model_type)
    info = {"source": source, **info}
    if model_type == "whisper":
        return cls(config, params, info, jnp.dtype(dtype))
    return cls(config, params, info, jnp.dtype(dtype), do_normalize=info.get("do_normalize", False))
