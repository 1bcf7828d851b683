"""Audio to backbone vectors, shared by extraction, prediction and fine-tuning.

The backbone plan (Whisper window, stored layers, crop length, length buckets), the audio
loader that reproduces a store's input, the item and batch plans over length buckets, and the
`Extractor` (one backbone compiled per bucket shape over a mesh of local devices). The commands
`extract` and `predict`, the predictors and fine-tuning build on these; this module imports no
command.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ifmvse.backbones.base import masked_mean
from jax_ifmvse.config import Config
from jax_ifmvse.data.audio import chunk_spans, load_audio, normalize, prepare_audio
from jax_ifmvse.data.buckets import Batch, plan_batches
from jax_ifmvse.errors import IfmvseError
from jax_ifmvse.stream import Item


class ExtractError(IfmvseError, ValueError):
    """Extraction settings that cannot be used with this store or backbone; one line says why."""


def layer_selection(spec: str, num_hidden_states: int) -> list[int] | None:
    """Which hidden states to store as `layers`: None for `last`, all, or listed indices."""
    if spec == "last":
        return None
    if spec == "all":
        return list(range(num_hidden_states))
    try:
        idx = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ExtractError(
            f"--layers {spec!r}: expected last, all or comma-separated indices"
        ) from None
    bad = [i for i in idx if not -num_hidden_states <= i < num_hidden_states]
    if bad or not idx:
        raise ExtractError(f"--layers {spec!r}: indices must lie in 0..{num_hidden_states - 1}")
    return [i % num_hidden_states for i in idx]


def plan_items(
    durations: np.ndarray,
    rows: np.ndarray,
    max_seconds: float,
    long_audio: str,
    sample_rate: int = 16000,
    min_samples: int = 1,
) -> list[Item]:
    """Items for the rows to compute: long audio cropped to max_seconds, or cut into chunks.

    Header durations only estimate the plan (bucket and chunk count); `Streamer` re-cuts each
    utterance from its decoded, resampled samples and plans again what did not fit.
    """
    chunk = int(round(max_seconds * sample_rate))
    items = []
    for r in rows:
        d = float(durations[r]) if np.isfinite(durations[r]) else max_seconds
        if long_audio == "chunk" and d > max_seconds:
            spans = chunk_spans(int(round(d * sample_rate)), chunk, min_samples)
            items += [
                Item(int(r), k, (b - a) / sample_rate, len(spans)) for k, (a, b) in enumerate(spans)
            ]
        else:
            items.append(Item(int(r), 0, min(d, max_seconds), 1, bool(np.isfinite(durations[r]))))
    return items


def batch_plan(
    items: Sequence[Item], cfg: Config, multiple: int, bucket_seconds: Sequence[float]
) -> list[Batch]:
    """Length-bucketed batches over items, each bucket's batch size a multiple of `multiple`.

    Rounding up to the device count keeps exactly one (B, T) shape per bucket while every
    device gets an equal slice; the extra rows are dummies (index -1, length 0). A bucket with a
    single, partial batch is trimmed to what it holds: still one shape for that bucket, and
    small corpora do not pay for a full batch of dummies.
    """
    batches = plan_batches(
        [it.seconds for it in items],
        bucket_seconds=bucket_seconds,
        batch_seconds=cfg.extract.batch_seconds,
        max_batch=cfg.extract.max_batch,
        sample_rate=cfg.audio.sample_rate,
    )
    per_bucket = collections.Counter(b.bucket for b in batches)
    out = []
    for b in batches:
        if per_bucket[b.bucket] == 1:
            real = int((b.indices >= 0).sum())
            b = dataclasses.replace(b, indices=b.indices[:real], lengths=b.lengths[:real])
        extra = -len(b.indices) % multiple
        out.append(
            dataclasses.replace(
                b,
                indices=np.pad(b.indices, (0, extra), constant_values=-1),
                lengths=np.pad(b.lengths, (0, extra)),
            )
        )
    return out


class Extractor:
    """One backbone compiled for a set of bucket shapes over a mesh of local devices."""

    def __init__(
        self,
        backbone: Any,
        layers: list[int] | None,
        devices: Sequence[Any] | None = None,
        frames_layer: int | None = None,
    ):
        self.backbone = backbone
        self.layers = layers
        self.mesh = Mesh(np.asarray(devices or jax.local_devices()), ("data",))
        self.n_devices = self.mesh.size
        self._data = NamedSharding(self.mesh, P("data"))
        replicated = NamedSharding(self.mesh, P())
        self.params = jax.device_put(backbone.params, replicated)
        keep = None if layers is None else jnp.asarray(layers)

        def run(params, waves, lengths):
            if frames_layer is not None:  # one encoder pass for the pooled rows and the frames
                hidden, mask = backbone.hidden_states(params, waves, lengths)  # (L, B, F, D)
                pooled = jnp.swapaxes(masked_mean(hidden, mask), 0, 1)  # (B, L, D)
                frames = (hidden[frames_layer].astype(jnp.float16), mask.sum(-1))  # (B, F, D)
            else:
                pooled, frames = backbone.pooled(params, waves, lengths), ()  # (B, L, D)
            last = pooled[:, -1]  # (B, D)
            # (B, D), (B, L', D), then (frames (B, F, D), frame counts (B,)) when asked for
            return (last, None if keep is None else pooled[:, keep], *frames)

        self._jit = jax.jit(run, in_shardings=(replicated, self._data, self._data))
        self._compiled: dict[tuple[int, int], Any] = {}
        self.compile_s = 0.0

    def compile(self, batch: int, samples: int) -> None:
        """Compile ahead of time for one (batch, samples) shape and record the time taken."""
        if (batch, samples) in self._compiled:
            return
        t = time.perf_counter()
        w = jax.ShapeDtypeStruct((batch, samples), jnp.float32, sharding=self._data)
        n = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=self._data)
        self._compiled[(batch, samples)] = self._jit.lower(self.params, w, n).compile()
        self.compile_s += time.perf_counter() - t

    def __call__(
        self, waves: np.ndarray, lengths: np.ndarray
    ) -> tuple[jax.Array, jax.Array | None]:
        """Dispatch one padded batch (asynchronously); returns device arrays."""
        key = waves.shape
        self.compile(*key)  # no-op after warm-up: a new shape here would mean a planning bug
        w = jax.device_put(waves, self._data)
        n = jax.device_put(lengths.astype(np.int32), self._data)
        return self._compiled[key](self.params, w, n)


FRAMES_PER_SECOND = 50  # every supported encoder: 20 ms frames (Whisper, WavLM, HuBERT, data2vec)


def layer_selection_one(spec: str, bb: Any) -> int:
    """`extract.frames`: "last" or one hidden-state index -> that index."""
    n = bb.num_hidden_states
    if spec == "last":
        return n - 1
    try:
        k = int(spec)
    except ValueError:
        raise ExtractError(f"extract.frames: {spec!r} is not 'last' or one layer index") from None
    if not 0 <= k < n:
        raise ExtractError(f"extract.frames: layer {k} is outside 0..{n - 1}")
    return k


def backbone_plan(bb: Any, cfg: Config) -> tuple[Any, list[int] | None, float, tuple[float, ...]]:
    """(backbone with its Whisper window, stored layers, crop seconds, bucket seconds) for a config."""
    ex_cfg, au = cfg.extract, cfg.audio
    if hasattr(bb, "with_window") and ex_cfg.whisper_window_s < bb.input_seconds:
        bb = bb.with_window(ex_cfg.whisper_window_s)  # speed option: a shorter padded window
    layers = layer_selection(ex_cfg.layers, bb.num_hidden_states)
    # A model with a fixed input window (Whisper's 30 s) costs the same for any length:
    # one bucket at the crop length saves compiles and loses nothing.
    max_s = min(au.max_seconds, bb.input_seconds or np.inf)
    buckets = (
        (max_s,)
        if bb.input_seconds
        else tuple(b for b in au.bucket_seconds if b < max_s) + (max_s,)
    )
    return bb, layers, max_s, buckets


# Per-backbone store attributes that fix a backbone's input; `predict` reproduces them.
INPUT_ATTRS = (
    "sample_rate",
    "max_seconds",
    "long_audio",
    "chunk_min_samples",
    "normalize",
    "normalize_mean",
    "normalize_std",
    "whisper_window_s",
)


@dataclasses.dataclass(frozen=True)
class Loader:
    """Audio loader: 16 kHz mono float32, cropped (not in chunk mode), normalized."""

    sample_rate: int
    max_seconds: float | None  # crop at the source; None keeps the whole file (chunk mode)
    normalize: str  # none | utterance | train
    stats: tuple[float, float] | None = None  # train-split (mean, std) for normalize=train

    def __call__(self, path: Path) -> np.ndarray:
        """Decode, resample, crop and normalize one file."""
        x = load_audio(path, sample_rate=self.sample_rate, max_seconds=self.max_seconds)
        return normalize(x, self.normalize, self.stats)

    def from_samples(self, x: np.ndarray, sr: int) -> np.ndarray:
        """What `__call__` returns for a file holding the decoded samples `x` (T, C) at `sr`."""
        x = prepare_audio(x, sr, sample_rate=self.sample_rate, max_seconds=self.max_seconds)
        return normalize(x, self.normalize, self.stats)

    @property
    def attrs(self) -> dict[str, Any]:
        """The store attributes that reproduce this input: mode and, for train, the statistics."""
        out: dict[str, Any] = {"sample_rate": self.sample_rate, "normalize": self.normalize}
        if self.stats is not None:
            out["normalize_mean"], out["normalize_std"] = map(float, self.stats)
        return out


def make_loader(
    cfg: Config,
    corpus: Any,
    stats: tuple[float, float] | None = None,
    stats_path: str | Path | None = None,
    report: Any = None,
) -> Loader:
    """Audio loader for the config; normalize=train uses `stats`, else the corpus' Train split's.

    Those are computed in parallel (one process per CPU) and, with `stats_path`, stored there
    and read back by every later start (a resume, the other shards of a job) for the same
    files. `report(TrainStats, computed)` sees them, failures included.
    """
    from jax_ifmvse.data.audio import compute_train_stats, stored_train_stats

    au = cfg.audio
    if au.normalize == "train" and stats is None:
        train = [corpus.abspath(u) for u in corpus.utterances if u.split == cfg.train.train_split]
        # Over the whole training audio (not cropped), as the challenge baseline computes them.
        if stats_path is not None:
            st, computed = stored_train_stats(stats_path, train, sample_rate=au.sample_rate)
        else:
            st, computed = compute_train_stats(train, sample_rate=au.sample_rate), True
        if report is not None:
            report(st, computed)
        stats = (st.mean, st.std)
    max_s = None if au.long_audio == "chunk" else au.max_seconds
    return Loader(au.sample_rate, max_s, au.normalize, stats if au.normalize == "train" else None)


def stats_path_for(store: str | Path) -> Path:
    """Where an extraction job keeps its Train statistics: beside the store, shared by shards."""
    store = Path(store)
    return store.with_name(store.name + ".normalize_stats.json")
