"""Frozen, typed configuration loaded from `configs/*.yaml` with `a.b=value` overrides.

Every rule is checked here as the config loads, before a command reads or writes any file: each
field's own rule (`choice`, `bounded`, `checked`) and the rules between settings (`RULES`),
including the settings a command would not read (refused, not ignored).
"""

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


# ---------------------------------------------------------------------------------------------
# Declarative checks. An enumerated or bounded setting declares its rule in its own line, e.g.
#     sampler: str = choice("shuffle", "balanced")  # the first choice is the default
#     pooling: str = choice("mean", "attentive")
#     tasks: tuple[str, ...] = choice("arousal", "valence", "category", default=("arousal",))
#     dropout: float = bounded(0.5, ge=0.0, lt=1.0)
# and every section checks its fields when it is built (`_Checked.__post_init__`), so a config
# is validated as it loads, before any file is read. A tuple field's rule applies to each item.


def choice(*choices: str, default: Any = None) -> Any:
    """A field whose value (or, for a tuple, each item) must be one of `choices`; the default
    is the first choice unless given."""
    default = choices[0] if default is None else default
    return dataclasses.field(default=default, metadata={"choices": tuple(choices)})


def bounded(
    default: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    multiple_of: float | None = None,
) -> Any:
    """A numeric field (or tuple of numbers) within a range, optionally a multiple of a step."""
    rng = {"gt": gt, "ge": ge, "lt": lt, "le": le, "multiple_of": multiple_of}
    return dataclasses.field(
        default=default, metadata={"range": {k: v for k, v in rng.items() if v is not None}}
    )


def checked(default: Any, check: typing.Callable[[Any], bool], expected: str) -> Any:
    """A field whose value must satisfy `check`; `expected` says what is accepted."""
    return dataclasses.field(default=default, metadata={"check": (check, expected)})


_RANGE_TEXT = {"gt": "> {}", "ge": ">= {}", "lt": "< {}", "le": "<= {}"}
_RANGE_OK = {
    "gt": lambda v, b: v > b,
    "ge": lambda v, b: v >= b,
    "lt": lambda v, b: v < b,
    "le": lambda v, b: v <= b,
}


def _field_problem(meta: typing.Mapping[str, Any], value: Any) -> str | None:
    """Why `value` breaks the field's declared rule (None if it does not)."""
    items = value if isinstance(value, tuple) else (value,)
    if "choices" in meta:
        bad = [v for v in items if v not in meta["choices"]]
        if bad:
            return f"expected one of {', '.join(map(str, meta['choices']))}"
    if "range" in meta:
        rng = meta["range"]
        bounds = [(k, b) for k, b in rng.items() if k in _RANGE_OK]
        text = " and ".join(_RANGE_TEXT[k].format(b) for k, b in bounds)
        step = rng.get("multiple_of")
        if step is not None:
            text = f"{text}, a multiple of {step}" if text else f"a multiple of {step}"
        for v in items:
            if isinstance(v, bool) or not isinstance(v, int | float):
                return f"expected a number {text}"
            if not all(_RANGE_OK[k](v, b) for k, b in bounds):
                return f"expected a number {text}"
            if step is not None and abs(v / step - round(v / step)) > 1e-6:
                return f"expected a number {text}"
    if "check" in meta:
        fn, expected = meta["check"]
        if not fn(value):
            return f"expected {expected}"
    return None


class _Checked:
    """Mixin of every config section: its declared rules are checked when it is built."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            problem = _field_problem(f.metadata, value)
            if problem:
                raise ConfigError(f"{f.name}={value!r}: {problem}")


def declared_rules(cls: type, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every declared rule of a config class and its sections, by dotted key (for docs, tests)."""
    out: dict[str, dict[str, Any]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(declared_rules(tp, key + "."))
        elif typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            out.update(declared_rules(typing.get_args(tp)[0], key + "[]."))
        elif f.metadata:
            out[key] = {**f.metadata, "per_item": typing.get_origin(tp) is tuple}
    return out


def describe_rule(meta: typing.Mapping[str, Any]) -> str:
    """What a declared rule accepts, in words (the settings table of docs/cli.md)."""
    each = "each item " if meta.get("per_item") else ""
    if "choices" in meta:
        return each + "one of " + ", ".join(f"`{c}`" for c in meta["choices"])
    if "range" in meta:
        rng = meta["range"]
        parts = [_RANGE_TEXT[k].format(b) for k, b in rng.items() if k in _RANGE_TEXT]
        if "multiple_of" in rng:
            parts.append(f"a multiple of {rng['multiple_of']}")
        return each + "a number " + " and ".join(parts)
    return meta["check"][1]


def _layers_spec(spec: Any) -> bool:
    """`last`, `all`, or comma-separated integers (their range is checked per backbone)."""
    if spec in ("last", "all"):
        return True
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    return bool(parts) and all(p.lstrip("-").isdigit() for p in parts)


@dataclasses.dataclass(frozen=True)
class CorpusConfig(_Checked):
    kind: str = choice("msp", "manifest", "demo")
    path: str = ""  # corpus root (msp) or manifest file (manifest)
    audio_root: str = ""  # manifest: the folder its paths lie in ("" = the manifest's folder)
    normalize_labels: bool = True  # train on (y - 1) / 6, report on 1..7 (challenge baseline)


@dataclasses.dataclass(frozen=True)
class AudioConfig(_Checked):
    sample_rate: int = bounded(16000, gt=0)
    max_seconds: float = bounded(12.0, gt=0)  # the challenge baseline crops at 12 s
    long_audio: str = choice("crop", "chunk")
    normalize: str = choice("none", "utterance", "train")
    bucket_seconds: tuple[float, ...] = bounded((2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0), gt=0)


def _frames_spec(v: Any) -> bool:
    """`extract.frames`: empty (none), `last`, or one non-negative integer."""
    return isinstance(v, str) and (v in ("", "last") or v.isdigit())


@dataclasses.dataclass(frozen=True)
class ExtractConfig(_Checked):
    backbones: tuple[tuple[str, str], ...] = ()  # (store name, SOURCE) pairs
    layers: str = checked("last", _layers_spec, "last, all or comma-separated layer indices")
    dtype: str = choice("float32", "float16")  # storage dtype
    compute_dtype: str = choice("float32", "bfloat16")
    # padded audio seconds per batch (all local devices together)
    batch_seconds: float = bounded(160.0, gt=0)
    max_batch: int = bounded(64, ge=1)  # cap on utterances per batch (short buckets)
    workers: int = bounded(2, ge=1)  # CPU decode workers
    prefetch: int = bounded(4, ge=1)  # batches decoded ahead of the device
    # Converted-parameter cache; empty = the one cache root `$IFMVSE_CACHE` (default
    # ~/.cache/jax_ifmvse, `backbones.sources.cache_root()`); set only to override it.
    cache_dir: str = ""
    # Whisper's padded input window; < 30 is a speed option (different features, not the paper's).
    # A multiple of one encoder frame (2 mel hops of 10 ms), at most the 30 s Whisper was built for.
    whisper_window_s: float = bounded(30.0, gt=0, le=30.0, multiple_of=0.02)
    # Extra store views made of one stored hidden state of another backbone, (name, "src:index")
    # pairs, e.g. {base_mid: "base:3"}; the index must be among `layers` (no recompute).
    layer_views: tuple[tuple[str, str], ...] = ()
    # Also store frame-level features of one hidden state (float16, ragged, beside the store:
    # featurestore/frames.py), for `model.pooling: attentive`; "" = none, "last" or an index.
    frames: str = checked("", _frames_spec, "empty, last or one layer index")
    # A file that cannot be read (EIO, ESTALE, a timeout, gone since planning) is tried again
    # this many times, waiting io_backoff_s, then twice that, ...; if it still fails its row is
    # left missing (a rerun or requeue does it) and the shard exits non-zero. Never recorded.
    io_retries: int = bounded(3, ge=0)
    io_backoff_s: float = bounded(0.5, ge=0)
    # Pending frame batches are merged into the frames file (featurestore.frames) whenever this
    # many GB of them are waiting, so pending files and the merge stay bounded.
    frames_merge_gb: float = bounded(2.0, gt=0)


@dataclasses.dataclass(frozen=True)
class ScoreSetConfig(_Checked):
    name: str = "S1"
    kind: str = choice("mlp", "fusion")
    views: tuple[str, ...] = ()  # store backbone names: one for mlp, two for fusion


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Checked):
    # views of another width are projected to this before fusion
    common_dim: int = bounded(1024, ge=1)
    hidden: int = bounded(512, ge=1)
    dropout: float = bounded(0.5, ge=0.0, lt=1.0)
    mlp_branches: int = bounded(
        1, ge=1
    )  # 2 = the "dual-branch" reading of the paper (two MLP paths, averaged)
    # Initial draws of every Linear: "torch" = torch.nn.Linear's defaults (the paper trained in
    # PyTorch), "flax" = flax.linen.Dense's (LeCun-normal weights, zero biases).
    init: str = choice("torch", "flax")
    # Center every view with its Train-split mean per dimension and divide by the view's overall
    # spread (RUN/view_stats.npz). Pooled hidden states often share a large offset with little
    # spread, which a plain MLP can fail to leave (it predicts a constant); this removes that.
    standardize: bool = True
    layer_weights: bool = False  # softmax-weighted sum over stored layers (s3prl style)
    # mean: the store's pooled vectors (the paper's); attentive: attentive statistics pooling
    # (the baseline's) of stored frames (`extract.frames`), padding masked (docs/task1.md).
    pooling: str = choice("mean", "attentive")
    score_sets: tuple[ScoreSetConfig, ...] = (
        ScoreSetConfig("S1", "mlp", ("whisper",)),
        ScoreSetConfig("S2", "fusion", ("whisper", "wavlm")),
        ScoreSetConfig("S3", "mlp", ("wavlm",)),
        ScoreSetConfig("S4", "fusion", ("hubert", "wavlm")),
        ScoreSetConfig("S5", "mlp", ("hubert",)),
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Checked):
    attributes: tuple[str, ...] = choice(*ATTRIBUTES, default=ATTRIBUTES)
    multitask: bool = False  # one model for all three attributes (mean of the three losses)
    batch_size: int = bounded(32, ge=1)
    learning_rate: float = bounded(1e-5, gt=0)
    weight_decay: float = bounded(1e-2, ge=0)
    epochs: int = bounded(80, ge=1)
    seed: int = 0
    # False (torch DataLoader's default): an epoch's last partial batch is trained on too.
    drop_last: bool = False
    train_split: str = "Train"
    dev_split: str = "Development"
    test_splits: tuple[str, ...] = ("Test1",)
    # Save the latest checkpoint every N epochs (and at the end); a new best is always saved.
    # Resuming recomputes at most N-1 epochs, with identical results (data order and dropout
    # depend only on seed, epoch and step).
    checkpoint_every: int = bounded(1, ge=1)
    # Also save every N steps within an epoch (0: off), so a killed run continues mid-epoch with
    # identical results: epochs fed from the host only (attentive frames streamed, fine-tuning).
    checkpoint_steps: int = bounded(0, ge=0)
    # Challenge tasks trained on the same views (docs/task1.md): attributes (task 2, the paper's),
    # category (task 1, eight classes, macro-F1) and gender (an auxiliary, only with another
    # task). Two or more give one joint model per score set with one output per task.
    tasks: tuple[str, ...] = choice("attributes", "category", "gender", default=("attributes",))
    # Loss weights of a joint model: sum of weight x task loss (the 1st-placed team: gender 0.1).
    attributes_weight: float = bounded(1.0, ge=0.0)
    category_weight: float = bounded(1.0, ge=0.0)
    gender_weight: float = bounded(0.1, ge=0.0)
    # shuffle: every row once per epoch; balanced: class-balanced undersampling (needs category),
    # each class's count of the rarest present class, redrawn every epoch.
    sampler: str = choice("shuffle", "balanced")


@dataclasses.dataclass(frozen=True)
class EnsembleConfig(_Checked):
    coarse_step: float = bounded(0.1, gt=0, le=1)
    fine_step: float = bounded(0.01, gt=0, le=1)
    fine_radius: float = bounded(0.1, ge=0)  # fine grid spans best +- radius per weight
    simplex: bool = True  # weights sum to 1 (paper); False = free weights in [0, 1]
    chunk: int = bounded(65536, ge=1)  # candidates evaluated per device batch


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(_Checked):
    """`ifmvse finetune` only (configs/finetune.yaml says where each default comes from)."""

    # Micro-batches of train.batch_size / this per optimizer step.
    accumulation_steps: int = bounded(4, ge=1)
    freeze_feature_encoder: bool = True  # the CNN feature encoder (Whisper: conv1, conv2)
    remat: bool = False  # gradient checkpointing per transformer layer
    compute_dtype: str = choice("float32", "bfloat16")  # master weights stay float32
    # attributes: task 2 (CCC on arousal/valence/dominance); category: task 1 (8 EmoClass logits,
    # class-weighted cross-entropy, best epoch by Development macro-F1).
    task: str = choice("attributes", "category")
    head_hidden: int = bounded(1024, ge=1)
    head_layers: int = bounded(1, ge=1)
    head_dropout: float = bounded(0.5, ge=0.0, lt=1.0)
    # Pooling + head learning rate; 0 = train.learning_rate for everything (the baseline).
    head_learning_rate: float = bounded(0.0, ge=0.0)
    # A data-dependent start, same architecture (off in the baseline): Train's frame mean/std
    # folded into the pooling's sap_linear (attention vector / sqrt(D)), the pooled vectors'
    # mean/std into the head's first Linear.
    head_init_from_data: bool = False
    # The backbone's training-time regularization (transformers' config names); -1 = the
    # checkpoint's own value from its config.json, as the baseline's `ssl_model.train()`.
    hidden_dropout: float = bounded(-1.0, ge=-1.0, lt=1.0)
    attention_dropout: float = bounded(-1.0, ge=-1.0, lt=1.0)
    activation_dropout: float = bounded(-1.0, ge=-1.0, lt=1.0)
    feat_proj_dropout: float = bounded(-1.0, ge=-1.0, lt=1.0)
    layerdrop: float = bounded(-1.0, ge=-1.0, lt=1.0)
    mask_time_prob: float = bounded(-1.0, ge=-1.0, le=1.0)
    mask_time_length: int = bounded(-1, ge=-1)
    mask_feature_prob: float = bounded(-1.0, ge=-1.0, le=1.0)
    mask_feature_length: int = bounded(-1, ge=-1)
    eval_batch: int = bounded(8, ge=1)  # rows per Development / test batch
    cache_audio_gb: float = bounded(2.0, ge=0.0)  # keep decoded audio in memory when it fits
    workers: int = bounded(2, ge=1)  # CPU decode threads


@dataclasses.dataclass(frozen=True)
class LoaderConfig(_Checked):
    """How `model.pooling=attentive` reads frames (jax_ifmvse/data/loaders.py, docs/training.md)."""

    # stream: batches read from the frame file through Grain, host memory bounded; memory: the
    # whole split padded in memory and on every device (the old path; small stores only).
    frames: str = choice("stream", "memory")
    # Every batch in flight (prefetched, being read, being copied to the devices) fits in this.
    host_memory_gb: float = bounded(4.0, gt=0.0)
    # Grain worker processes reading batches; 0 reads in threads of the training process.
    workers: int = bounded(0, ge=0)
    # Batches per length-sorting window: 1 = the in-memory path's batches exactly; more puts rows
    # of similar length together (less padding read and computed), batch order shuffled per epoch.
    bucket_window: int = bounded(1, ge=1)
    pad_frames: int = bounded(50, ge=1)  # a batch's frames padded to a multiple (1 s at 50 Hz)
    eval_batch: int = bounded(64, ge=1)  # rows per evaluation batch (rounded up to the devices)


@dataclasses.dataclass(frozen=True)
class Config:
    corpus: CorpusConfig = CorpusConfig()
    audio: AudioConfig = AudioConfig()
    extract: ExtractConfig = ExtractConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    loader: LoaderConfig = LoaderConfig()

    def __post_init__(self) -> None:
        check_rules(self)  # the rules between settings that bind every command


# ---------------------------------------------------------------------------------------------
# Rules between settings. A rule compares settings of one or more sections; it is checked when a
# Config is built (every `load_config`, `dataclasses.replace`), so a bad combination stops a
# command before it reads or writes any file. A rule bound to commands is checked where the
# command loads its config (`load_config(..., command=...)`) and where its library entry point
# starts (`check_command`). docs/cli.md lists every rule (tests/test_config.py checks it).


@dataclasses.dataclass(frozen=True)
class Rule:
    """A rule between settings: what it requires, in words, and the problem when broken."""

    keys: tuple[str, ...]  # the settings it compares
    text: str  # what it requires (the docs' settings table)
    problem: typing.Callable[[Config], str | None]  # one line naming the values, or None
    commands: tuple[str, ...] = ()  # the commands it binds; () = every config


def _distinct(key: str, items: tuple[str, ...]) -> str | None:
    if not items or len(set(items)) != len(items):
        return f"{key}={list(items)}: expected distinct names, at least one"
    return None


def _score_set_views(cfg: Config) -> str | None:
    want = {"mlp": 1, "fusion": 2}
    for ss in cfg.model.score_sets:
        if len(ss.views) != want[ss.kind] or len(set(ss.views)) != len(ss.views):
            return (
                f"model.score_sets {ss.name}: kind {ss.kind} takes {want[ss.kind]} distinct"
                f" view(s), got {list(ss.views)}"
            )
    names = [ss.name for ss in cfg.model.score_sets]
    if len(set(names)) != len(names):
        return f"model.score_sets: names {names} must be distinct (each is a RUN/ folder)"
    return None


def grid_units(e: EnsembleConfig) -> tuple[int, int, int]:
    """(units in 1.0, coarse stride, fine radius), all in `fine_step` units: the ensemble grid's
    rule, for a whole config (`RULES`) and an `EnsembleConfig` built on its own (the search)."""

    def units(x: float) -> int | None:  # x in whole fine steps, else None
        r = x / e.fine_step
        return round(r) if abs(r - round(r)) <= 1e-6 else None

    n = units(1.0)
    if n is None:
        raise ConfigError(f"ensemble.fine_step={e.fine_step}: must divide 1.0 evenly")
    m = units(e.coarse_step)
    if not m or n % m:
        raise ConfigError(
            f"ensemble.coarse_step={e.coarse_step}: must be a multiple of"
            f" ensemble.fine_step={e.fine_step} that divides 1.0 evenly"
        )
    r = units(e.fine_radius)
    if r is None:
        raise ConfigError(
            f"ensemble.fine_radius={e.fine_radius}: must be a multiple of"
            f" ensemble.fine_step={e.fine_step}"
        )
    return n, m, r


def _grid(cfg: Config) -> str | None:
    try:
        grid_units(cfg.ensemble)
    except ConfigError as e:
        return str(e)
    return None


# What fine-tuning reads of `train`: the rest are head-training settings it would ignore.
FINETUNE_IGNORES = (
    "attributes",
    "multitask",
    "drop_last",
    "tasks",
    "sampler",
    "attributes_weight",
    "category_weight",
    "gender_weight",
)


def _finetune_ignored(cfg: Config) -> str | None:
    default = TrainConfig()
    changed = [k for k in FINETUNE_IGNORES if getattr(cfg.train, k) != getattr(default, k)]
    if changed:
        return (
            f"{', '.join(f'train.{k}={to_dict(getattr(cfg.train, k))!r}' for k in changed)}:"
            " not read by"
            " fine-tuning (its task is finetune.task); leave at the default"
        )
    return None


def _accumulation(cfg: Config) -> str | None:
    b, a = cfg.train.batch_size, cfg.finetune.accumulation_steps
    if b % a:
        return (
            f"train.batch_size={b} must be a multiple of finetune.accumulation_steps={a}"
            " (micro-batches of batch_size / accumulation_steps)"
        )
    if b // a < 2:
        return (
            f"train.batch_size={b} / finetune.accumulation_steps={a}: micro-batches need at"
            " least 2 rows (the CCC loss is over a batch)"
        )
    return None


RULES: tuple[Rule, ...] = (
    Rule(
        ("extract.frames", "audio.long_audio"),
        "frames need `audio.long_audio: crop` (chunk frames are not stored)",
        lambda c: (
            f"extract.frames={c.extract.frames!r} needs audio.long_audio=crop"
            f" (got {c.audio.long_audio}; chunk frames are not stored)"
            if c.extract.frames and c.audio.long_audio != "crop"
            else None
        ),
    ),
    Rule(
        ("model.pooling", "model.layer_weights"),
        "`attentive` pooling reads stored frames: no `layer_weights`",
        lambda c: (
            "model.pooling=attentive reads frames of one layer: set model.layer_weights=false"
            if c.model.pooling == "attentive" and c.model.layer_weights
            else None
        ),
    ),
    Rule(
        ("model.score_sets",),
        "`mlp` takes one view, `fusion` two distinct views; distinct names",
        _score_set_views,
    ),
    Rule(
        ("train.attributes",),
        "distinct names, at least one",
        lambda c: _distinct("train.attributes", c.train.attributes),
    ),
    Rule(
        ("train.tasks",),
        "distinct names, at least one; `gender` only beside another task",
        lambda c: (
            _distinct("train.tasks", c.train.tasks)
            or (
                "train.tasks=['gender']: gender is an auxiliary; add attributes or category"
                if c.train.tasks == ("gender",)
                else None
            )
        ),
    ),
    Rule(
        ("train.sampler", "train.tasks"),
        "`balanced` needs `category` in `train.tasks`",
        lambda c: (
            f"train.sampler=balanced needs the category task (train.tasks={list(c.train.tasks)})"
            if c.train.sampler == "balanced" and "category" not in c.train.tasks
            else None
        ),
    ),
    Rule(
        ("train.multitask", "train.tasks"),
        "`multitask` only with `train.tasks: [attributes]` (a joint model is one model already)",
        lambda c: (
            f"train.multitask=true goes with train.tasks=[attributes] (got {list(c.train.tasks)};"
            " a joint model already predicts every attribute)"
            if c.train.multitask and c.train.tasks != ("attributes",)
            else None
        ),
    ),
    Rule(
        ("ensemble.fine_step", "ensemble.coarse_step", "ensemble.fine_radius"),
        "`fine_step` divides 1; `coarse_step` a multiple of it dividing 1;"
        " `fine_radius` a multiple of it",
        _grid,
    ),
    Rule(
        ("train.checkpoint_steps", "model.pooling", "loader.frames"),
        "`checkpoint_steps` > 0 needs epochs fed from the host: `model.pooling: attentive` with"
        " `loader.frames: stream` (an in-memory epoch is one compiled program)",
        lambda c: (
            f"train.checkpoint_steps={c.train.checkpoint_steps} saves within epochs fed from the"
            f" host; model.pooling={c.model.pooling}, loader.frames={c.loader.frames} trains each"
            " epoch as one compiled program (use attentive with loader.frames=stream, or 0)"
            if c.train.checkpoint_steps
            and (c.model.pooling != "attentive" or c.loader.frames != "stream")
            else None
        ),
        ("train",),
    ),
    Rule(
        ("train.batch_size", "finetune.accumulation_steps"),
        "`batch_size` a multiple of `accumulation_steps`, micro-batches of at least 2 rows",
        _accumulation,
        ("finetune",),
    ),
    Rule(
        tuple(f"train.{k}" for k in FINETUNE_IGNORES),
        "left at their defaults: fine-tuning does not read them (it refuses, not ignores)",
        _finetune_ignored,
        ("finetune",),
    ),
)


def check_rules(cfg: Config) -> None:
    """Raise ConfigError for the first broken rule that binds every config."""
    for rule in RULES:
        if not rule.commands and (problem := rule.problem(cfg)):
            raise ConfigError(problem)


def check_command(cfg: Config, command: str) -> None:
    """Raise ConfigError for the first broken rule bound to `command` (`load_config` checks
    them for the CLI; a library entry point checks them again as its first line)."""
    for rule in RULES:
        if command in rule.commands and (problem := rule.problem(cfg)):
            raise ConfigError(problem)


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
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a declared rule (`_Checked`): name the full key
        raise ConfigError(f"{where}.{e}" if where else str(e)) from None


def to_dict(cfg: Any) -> Any:
    """Plain YAML/JSON-ready form of a config (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def same_settings(old: Any, new: Any, default: Any) -> bool:
    """Whether a recorded config (`to_dict` form) means `new`: keys a later version added count
    as equal when `new` holds their default there (so an older RUN/ still resumes)."""
    if isinstance(new, dict) and isinstance(old, dict):
        default = default if isinstance(default, dict) else {}
        return set(old) <= set(new) and all(
            same_settings(old[k], v, default.get(k)) if k in old else v == default.get(k)
            for k, v in new.items()
        )
    if isinstance(new, list) and isinstance(old, list):
        # A list of sections (score sets) compares item by item against its first default item.
        item_default = default[0] if isinstance(default, list) and default else None
        return len(old) == len(new) and all(
            same_settings(o, n, item_default if isinstance(n, dict) else o)
            for o, n in zip(old, new, strict=True)
        )
    return old == new


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


def load_config(
    path: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    command: str | None = None,
) -> Config:
    """Load a Config from YAML (or defaults when path is None) and apply `a.b=value` overrides;
    every rule is checked, those bound to `command` too."""
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
        cfg = _build(Config, data, "")
        if command is not None:
            check_command(cfg, command)
        return cfg
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None
