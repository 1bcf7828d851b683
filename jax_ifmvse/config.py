"""Frozen, typed configuration loaded from `configs/*.yaml` with `a.b=value` overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from jax_ifmvse.errors import IfmvseError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# Canonical attribute order everywhere in the system (the submission's column order).
ATTRIBUTES = ("arousal", "valence", "dominance")
# The MSP-Podcast rating scale of every attribute (labels, reports and submissions).
LABEL_MIN, LABEL_MAX = 1.0, 7.0


class ConfigError(IfmvseError, ValueError):
    """A configuration file or override that cannot be used."""


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    kind: str = "msp"  # msp | manifest
    path: str = ""  # corpus root (msp) or manifest file (manifest)
    audio_root: str = ""  # manifest: the folder its paths lie in ("" = the manifest's folder)
    normalize_labels: bool = True  # train on (y - 1) / 6, report on 1..7 (challenge baseline)


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    sample_rate: int = 16000
    max_seconds: float = 12.0  # the challenge baseline crops at 12 s
    long_audio: str = "crop"  # crop | chunk
    normalize: str = "none"  # none | utterance | train
    bucket_seconds: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0)


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    backbones: tuple[tuple[str, str], ...] = ()  # (store name, SOURCE) pairs
    layers: str = "last"  # last | all | comma-separated indices
    dtype: str = "float32"  # storage dtype: float32 | float16
    compute_dtype: str = "float32"  # float32 | bfloat16
    batch_seconds: float = 160.0  # padded audio seconds per batch (all local devices together)
    max_batch: int = 64  # cap on utterances per batch (short buckets)
    workers: int = 2  # CPU decode workers
    prefetch: int = 4  # batches decoded ahead of the device
    # Converted-parameter cache; empty = the one cache root `$IFMVSE_CACHE` (default
    # ~/.cache/jax_ifmvse, `backbones.sources.cache_root()`); set only to override it.
    cache_dir: str = ""
    # Whisper's padded input window; < 30 is a speed option (different features, not the paper's).
    whisper_window_s: float = 30.0
    # Extra store views made of one stored hidden state of another backbone, (name, "src:index")
    # pairs, e.g. {base_mid: "base:3"}; the index must be among `layers` (no recompute).
    layer_views: tuple[tuple[str, str], ...] = ()
    # Also store frame-level features of one hidden state (float16, ragged, beside the store:
    # featurestore/frames.py), for `model.pooling: attentive`; "" = none, "last" or an index.
    frames: str = ""


@dataclasses.dataclass(frozen=True)
class ScoreSetConfig:
    name: str = "S1"
    kind: str = "mlp"  # mlp | fusion
    views: tuple[str, ...] = ()  # store backbone names: one for mlp, two for fusion


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    common_dim: int = 1024  # views of another width are projected to this before fusion
    hidden: int = 512
    dropout: float = 0.5
    mlp_branches: int = 1  # 2 = the "dual-branch" reading of the paper (two MLP paths, averaged)
    # Initial draws of every Linear: "torch" = torch.nn.Linear's defaults (the paper trained in
    # PyTorch), "flax" = flax.linen.Dense's (LeCun-normal weights, zero biases).
    init: str = "torch"
    # Center every view with its Train-split mean per dimension and divide by the view's overall
    # spread (RUN/view_stats.npz). Pooled hidden states often share a large offset with little
    # spread, which a plain MLP can fail to leave (it predicts a constant); this removes that.
    standardize: bool = True
    layer_weights: bool = False  # softmax-weighted sum over stored layers (s3prl style)
    # mean: the store's pooled vectors (the paper's); attentive: attentive statistics pooling
    # (the baseline's) of stored frames, padding masked (heads only so far: docs/task1.md).
    pooling: str = "mean"
    score_sets: tuple[ScoreSetConfig, ...] = (
        ScoreSetConfig("S1", "mlp", ("whisper",)),
        ScoreSetConfig("S2", "fusion", ("whisper", "wavlm")),
        ScoreSetConfig("S3", "mlp", ("wavlm",)),
        ScoreSetConfig("S4", "fusion", ("hubert", "wavlm")),
        ScoreSetConfig("S5", "mlp", ("hubert",)),
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    attributes: tuple[str, ...] = ATTRIBUTES
    multitask: bool = False  # one model for all three attributes (mean of the three losses)
    batch_size: int = 32
    learning_rate: float = 1e-5
    weight_decay: float = 1e-2
    epochs: int = 80
    seed: int = 0
    # False (torch DataLoader's default): an epoch's last partial batch is trained on too.
    drop_last: bool = False
    train_split: str = "Train"
    dev_split: str = "Development"
    test_splits: tuple[str, ...] = ("Test1",)
    # Save the latest checkpoint every N epochs (and at the end); a new best is always saved.
    # Resuming recomputes at most N-1 epochs, with identical results (data order and dropout
    # depend only on seed, epoch and step).
    checkpoint_every: int = 1
    # Challenge tasks trained on the same views (docs/task1.md): attributes (task 2, the paper's),
    # category (task 1, eight classes, macro-F1) and gender (an auxiliary, only with another
    # task). Two or more give one joint model per score set with one output per task.
    tasks: tuple[str, ...] = ("attributes",)
    # Loss weights of a joint model: sum of weight x task loss (the 1st-placed team: gender 0.1).
    attributes_weight: float = 1.0
    category_weight: float = 1.0
    gender_weight: float = 0.1
    # shuffle: every row once per epoch; balanced: class-balanced undersampling (needs category),
    # each class's count of the rarest present class, redrawn every epoch.
    sampler: str = "shuffle"


@dataclasses.dataclass(frozen=True)
class EnsembleConfig:
    coarse_step: float = 0.1
    fine_step: float = 0.01
    fine_radius: float = 0.1  # fine grid spans best +- radius per weight
    simplex: bool = True  # weights sum to 1 (paper); False = free weights in [0, 1]
    chunk: int = 65536  # candidates evaluated per device batch


@dataclasses.dataclass(frozen=True)
class Config:
    corpus: CorpusConfig = CorpusConfig()
    audio: AudioConfig = AudioConfig()
    extract: ExtractConfig = ExtractConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    ensemble: EnsembleConfig = EnsembleConfig()


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, dict):  # {name: source} mapping for pair tuples
            value = list(value.items())
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {value!r}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (typing.Union, types.UnionType):
        return value
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1"):
                    return True
                if value.lower() in ("false", "no", "0"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """Plain YAML/JSON-ready form of a config (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def _set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file path, or a bare name like `paper` looked up in `configs/`."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"{p}: config file not found")
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"{name_or_path}: no such config file or named config (known: {known})")
    return candidate


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a Config from YAML (or defaults when path is None) and apply `a.b=value` overrides."""
    data: dict = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key.path=value")
        key, raw = ov.split("=", 1)
        _set_path(data, key.strip(), yaml.safe_load(raw))
    try:
        return _build(Config, data, "")
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None
