"""Training of the score-set heads: CCC loss, AdamW, data parallel over a `data` mesh axis, Orbax.

How a model trains:
- The whole training split of a score set's views lives on every device (replicated); one
  jitted function runs an epoch as a `lax.scan` over `train_step`, so there is no host round trip
  per step. Each step gathers its batch by index and constrains it to be sharded over the mesh's
  `data` axis; with `jit` and a sharded batch XLA averages the gradients across devices, and the
  batch CCC is a reduction over the GLOBAL batch (it is one array to the program), not per device.
- The data order of epoch e is a permutation keyed by fold_in(data_key, e); dropout of step s by
  fold_in(dropout_key, s). Both depend only on (seed, epoch, step), so a resumed run and an
  uninterrupted one make the same updates. The last partial batch of an epoch is trained on, as
  torch's DataLoader does by default (padded with weight-0 rows; `train.drop_last=true` drops it).
- CCC over batches of 32 is noisy (a batch's mean and variance are poor estimates): the loss is
  computed on each batch as the paper does, but model selection uses the CCC over the FULL
  development split after every epoch, and `train.batch_size` may be raised.
- Checkpoints: ONE Orbax CheckpointManager per model under `<model dir>/checkpoints`, saving each
  epoch with two items, `state` (step, params, opt_state) and `history` (every epoch's metrics so
  far). Its preservation policy keeps the latest checkpoint (resume) and the best by development
  CCC (`best_step()`, used for predictions); everything else is deleted.
- Labels are trained on (y - 1) / 6 when `corpus.normalize_labels`; predictions go back to 1..7.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import yaml
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ifmvse
from jax_ifmvse.config import ATTRIBUTES, Config, ScoreSetConfig, TrainConfig, to_dict
from jax_ifmvse.data.corpus import from_unit, to_unit
from jax_ifmvse.heads import HeadConfigError, build_score_model
from jax_ifmvse.losses import ccc_loss
from jax_ifmvse.metrics import ccc_np


class TrainError(ValueError):
    """A training run that cannot start: bad data, a conflicting RUN/ directory, bad settings."""


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree saved whole by Orbax."""

    step: jax.Array  # () int32, global step count: keys dropout via fold_in
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class ModelResult:
    """What training one model leaves behind."""

    best_epoch: int
    best_dev_ccc: float
    history: list[dict]
    params: Any  # best-development parameters


# ---------------------------------------------------------------------------------------------
# Pure pieces.


def to_train_scale(y: np.ndarray, normalize: bool) -> np.ndarray:
    """Corpus scale 1..7 -> training targets ((y - 1) / 6 when normalising)."""
    return to_unit(y) if normalize else y


def to_corpus_scale(y: np.ndarray, normalize: bool) -> np.ndarray:
    """Training scale -> corpus scale 1..7, unclipped (dev CCC and the ensemble see raw scores)."""
    return from_unit(y, clip=False) if normalize else y


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with the configured learning rate and weight decay, as torch.optim.AdamW."""
    # Same values as torch.optim.AdamW's defaults (betas 0.9/0.999, eps 1e-8 added to the
    # bias-corrected sqrt(v)), no lr schedule, no clipping, every parameter decayed (biases too).
    # torch decays first (p *= 1 - lr * wd) and then subtracts lr * m_hat / (sqrt(v_hat) + eps);
    # optax subtracts lr * (m_hat / (sqrt(v_hat) + eps) + wd * p) with the same old p: equal in
    # value (tests/test_torch_twin.py checks it over hundreds of steps).
    return optax.adamw(cfg.learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)


def init_state(
    model: nn.Module, tx: optax.GradientTransformation, example: Mapping[str, Any], key: jax.Array
) -> TrainState:
    """Fresh parameters and optimizer state from one example batch of features."""
    params = model.init(key, example, train=False)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    dropout_key: jax.Array,
    batch_sharding: NamedSharding | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure `train_step(state, batch) -> (state, metrics)` with loss 1 - CCC over the batch."""

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        rng = jax.random.fold_in(dropout_key, state.step)

        def loss_fn(params):
            pred = model.apply(
                {"params": params}, batch["features"], train=True, rngs={"dropout": rng}
            )  # (B, K)
            # (B,) 0/1 row weights: a padded last partial batch is the CCC of its real rows.
            return ccc_loss(batch["labels"], pred, batch.get("weights"))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        return new, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return train_step


def epoch_batches(
    data_key: jax.Array, epoch: jax.Array, n_rows: int, batch_size: int, drop_last: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Row indices (steps, B) of one shuffled epoch and their 0/1 weights (steps, B).

    With `drop_last=False` (torch DataLoader's default) the last partial batch is kept, padded to
    B rows of weight 0 so that every step has one shape (one scan, one compiled step).
    """
    perm = jax.random.permutation(jax.random.fold_in(data_key, epoch), n_rows)  # (N,)
    full, rest = divmod(n_rows, batch_size)
    if drop_last or rest == 0:
        idx = perm[: full * batch_size].reshape(full, batch_size)
        return idx, jnp.ones(idx.shape, jnp.float32)
    pad = full * batch_size + batch_size - n_rows
    idx = jnp.concatenate([perm, perm[:pad]]).reshape(full + 1, batch_size)
    weights = (jnp.arange((full + 1) * batch_size) < n_rows).astype(jnp.float32)
    return idx, weights.reshape(full + 1, batch_size)


def make_train_epoch(
    train_step: Callable,
    n_rows: int,
    batch_size: int,
    data_key: jax.Array,
    drop_last: bool = False,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """Jitted `(state, data, epoch) -> (state, mean metrics)`: scan over a shuffled epoch."""

    def train_epoch(state: TrainState, data: dict, epoch: jax.Array):
        idx, weights = epoch_batches(data_key, epoch, n_rows, batch_size, drop_last)

        def body(state, xs):
            ix, w = xs
            batch = jax.tree.map(lambda x: x[ix], data)  # gather on device
            return train_step(state, {**batch, "weights": w})

        state, metrics = jax.lax.scan(body, state, (idx, weights))
        return state, jax.tree.map(jnp.mean, metrics)

    return jax.jit(train_epoch, donate_argnums=0)


def make_predict(model: nn.Module) -> Callable[[Any, dict], jax.Array]:
    """Jitted inference `(params, features) -> (N, K)` (dropout off)."""
    return jax.jit(lambda params, feats: model.apply({"params": params}, feats, train=False))


def predict_np(
    predict: Callable,
    params: Any,
    features: Mapping[str, np.ndarray],
    mesh: Mesh,
    chunk: int = 8192,
) -> np.ndarray:
    """Predictions for N rows, run in fixed-size chunks sharded over the mesh (rows padded)."""
    n = len(next(iter(features.values())))
    ndev = mesh.devices.size
    size = ndev * math.ceil(min(max(n, 1), chunk) / ndev)
    sharding = NamedSharding(mesh, P("data"))
    outs = []
    for s in range(0, n, size):
        part = {}
        for k, v in features.items():
            x = v[s : s + size]
            if len(x) < size:
                x = np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])
            part[k] = jax.device_put(x, sharding)
        outs.append(np.asarray(predict(params, part))[: min(size, n - s)])
    return np.concatenate(outs) if outs else np.zeros((0, 1), np.float32)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with a `data` axis over every (or the given) device."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def _dev_metric(metrics: dict) -> float:
    return float(metrics["dev_ccc"])


def checkpoint_manager(directory: Path) -> ocp.CheckpointManager:
    """One manager per model keeping the latest and the best-development checkpoint."""
    policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [
            ocp.checkpoint_managers.LatestN(n=1),
            ocp.checkpoint_managers.BestN(get_metric_fn=_dev_metric, n=1),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        best_fn=_dev_metric,
        best_mode="max",
        enable_async_checkpointing=False,  # the next epoch donates the state buffers
        create=True,
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def _abstract(state: TrainState, sharding: NamedSharding) -> TrainState:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def restore_state(mngr: ocp.CheckpointManager, step: int, like: TrainState, sharding) -> TrainState:
    """The `state` item of checkpoint `step`, laid out like `like` with `sharding`."""
    out = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(like, sharding)))
    )
    return out["state"]


def restore_history(mngr: ocp.CheckpointManager, step: int) -> list[dict]:
    """The per-epoch metrics saved with checkpoint `step`."""
    return list(
        mngr.restore(step, args=ocp.args.Composite(history=ocp.args.JsonRestore()))["history"]
    )


# ---------------------------------------------------------------------------------------------
# One model.


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _dev_ccc(y_true: np.ndarray, y_pred: np.ndarray) -> list[float]:
    """Per-column CCC on the rows whose label is known."""
    out = []
    for k in range(y_true.shape[1]):
        ok = np.isfinite(y_true[:, k])
        out.append(float(ccc_np(y_true[ok, k], y_pred[ok, k])) if ok.sum() > 1 else float("nan"))
    return out


def train_model(
    model: nn.Module,
    train: tuple[dict[str, np.ndarray], np.ndarray],
    dev: tuple[dict[str, np.ndarray], np.ndarray],
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    targets: Sequence[str],
    normalize: bool = True,
    mesh: Mesh | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> ModelResult:
    """Train (or resume) one model; `train`/`dev` are (features, labels (N, K) on the corpus scale)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mesh = mesh or data_mesh()
    ndev = mesh.devices.size
    feats, labels = train
    n = len(labels)
    batch = min(cfg.batch_size, n) // ndev * ndev  # whole rows per device
    if batch < 2 or batch % ndev:
        raise TrainError(
            f"{out_dir}: {n} training rows cannot make batches of {cfg.batch_size} over {ndev} devices"
        )
    replicated = NamedSharding(mesh, P())
    root = jax.random.key(cfg.seed)
    init_key, data_key, dropout_key = (jax.random.fold_in(root, i) for i in range(3))
    tx = make_optimizer(cfg)
    example = {k: v[:1] for k, v in feats.items()}
    # One compiled init instead of dozens of eagerly compiled initializer ops.
    state = jax.jit(partial(init_state, model, tx), out_shardings=replicated)(example, init_key)
    data = jax.device_put(
        {"features": feats, "labels": to_train_scale(labels, normalize).astype(np.float32)},
        replicated,
    )
    step_fn = make_train_step(model, tx, dropout_key, NamedSharding(mesh, P("data")))
    train_epoch = make_train_epoch(step_fn, n, batch, data_key, cfg.drop_last)
    predict = make_predict(model)

    mngr = checkpoint_manager(out_dir / "checkpoints")
    history: list[dict] = []
    start = mngr.latest_step() or 0
    if start:
        state = restore_state(mngr, start, state, replicated)
        history = [h for h in restore_history(mngr, start) if h["epoch"] <= start]
    _write_jsonl(out_dir / "metrics.jsonl", history)

    dev_feats, dev_labels = dev
    best_so_far = max((h["dev_ccc"] for h in history), default=-np.inf)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        state, m = train_epoch(state, data, jnp.asarray(epoch, jnp.int32))
        pred = to_corpus_scale(predict_np(predict, state.params, dev_feats, mesh), normalize)
        per = _dev_ccc(dev_labels, pred)
        dev_ccc = float(np.nanmean(per)) if np.isfinite(per).any() else -1.0
        rec = {
            "epoch": epoch + 1,
            "step": int(state.step),
            "train_loss": float(m["loss"]),
            "grad_norm": float(m["grad_norm"]),
            "dev_ccc": dev_ccc,
            **{f"dev_ccc_{t}": c for t, c in zip(targets, per)},
            "seconds": round(time.perf_counter() - t0, 3),
        }
        history.append(rec)
        last = epoch + 1 == cfg.epochs
        if dev_ccc > best_so_far or last or (epoch + 1) % max(1, cfg.checkpoint_every) == 0:
            mngr.save(
                epoch + 1,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)
                ),
                metrics={"dev_ccc": dev_ccc},
            )
        best_so_far = max(best_so_far, dev_ccc)
        with open(out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if on_epoch is not None:
            on_epoch(rec)
    mngr.wait_until_finished()
    best = mngr.best_step()
    if best is None:
        raise TrainError(f"{out_dir}: no checkpoint to select from (train.epochs = {cfg.epochs})")
    best_params = restore_state(mngr, best, state, replicated).params
    mngr.close()
    best_rec = next(h for h in history if h["epoch"] == best)
    return ModelResult(best, best_rec["dev_ccc"], history, best_params)


# ---------------------------------------------------------------------------------------------
# Plots.


def plot_curves(history: Sequence[dict], path: Path, title: str = "") -> None:
    """Training loss and development CCC per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(ep, [h["train_loss"] for h in history])
    ax[0].set(xlabel="epoch", ylabel="train loss (1 - CCC)")
    for k in sorted(k for k in history[0] if k.startswith("dev_ccc")):
        ax[1].plot(ep, [h[k] for h in history], label=k)
    ax[1].set(xlabel="epoch", ylabel="development CCC")
    ax[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_scatter(
    y_true: np.ndarray, y_pred: np.ndarray, targets: Sequence[str], path: Path, title=""
) -> None:
    """Predicted against true development score per attribute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(targets), figsize=(3.3 * len(targets), 3.2), squeeze=False)
    for k, (ax, t) in enumerate(zip(axes[0], targets)):
        ok = np.isfinite(y_true[:, k])
        ax.scatter(y_true[ok, k], y_pred[ok, k], s=4, alpha=0.4)
        lo = float(np.nanmin([y_true[ok, k].min(initial=1), y_pred[:, k].min(initial=1)]))
        hi = float(np.nanmax([y_true[ok, k].max(initial=7), y_pred[:, k].max(initial=7)]))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ccc = ccc_np(y_true[ok, k], y_pred[ok, k]) if ok.sum() > 1 else float("nan")
        ax.set(xlabel=f"true {t}", ylabel=f"predicted {t}", title=f"CCC {float(ccc):.3f}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# A whole run: every score set, every attribute, scores for Development and the test splits.


def _ids_sha256(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()


def _load_views(store, split: str, views: Sequence[str], layer_views: set[str]):
    """(ids, {view: (N, D) or (N, L, D)}, labels (N, 3) corpus scale) of rows filled for all views."""
    # Layered views stay float16 as stored (half the memory; they become float32 on the device,
    # inside the model): Train's (84k, 25, 1024) is 4.3 GB instead of 8.6 GB.
    parts = {
        v: store.load(split, [v], layers=v in layer_views, dtype=None if v in layer_views else "f4")
        for v in views
    }
    common = None
    for p in parts.values():
        common = p.indices if common is None else np.intersect1d(common, p.indices)
    feats = {}
    for v in views:
        p = parts.pop(v)  # one view in memory at a time, never loaded and indexed copies at once
        # common is a subset of p.indices: the same length means the same rows (no copy).
        same = len(p.indices) == len(common)
        feats[v] = p.features[v] if same else p.features[v][np.searchsorted(p.indices, common)]
        del p
    labels = np.stack(
        [store.labels.get(a, np.full(store.n, np.nan, np.float32))[common] for a in ATTRIBUTES], -1
    ).astype(np.float32)  # (N, 3)
    return store.ids[common], feats, labels


def load_all_rows(store, split: str, views: Sequence[str], layer_views: set[str]):
    """Every row of a split: ids, {view: features, zeros where missing}, {view: (N,) have},
    labels (N, 3), and per row why views are missing ("" when none is)."""
    from jax_ifmvse.data.corpus import submission_name

    rows = np.sort(store.split_indices(split))
    feats, have = {}, {}
    for v in views:
        # Layered views as stored (float16), as `_load_views` reads them for training.
        p = store.load(
            split, [v], layers=v in layer_views, dtype=None if v in layer_views else "f4"
        )
        x = p.features[v]
        feats[v] = np.zeros((len(rows), *x.shape[1:]), x.dtype)
        pos = np.searchsorted(rows, p.indices)
        feats[v][pos] = x
        have[v] = np.zeros(len(rows), bool)
        have[v][pos] = True
        del p, x  # the loaded copy of this view, before the next view is loaded
    failed = {(uid, b): why for uid, b, why in store.failures()}
    ids = store.ids[rows]
    why = []
    for n, uid in enumerate(ids):
        parts = [
            f"no {v} features ({failed.get((str(uid), v), 'not extracted')})"
            for v in views
            if not have[v][n]
        ]
        why.append("; ".join(parts))
    labels = np.stack(
        [store.labels.get(a, np.full(store.n, np.nan, np.float32))[rows] for a in ATTRIBUTES], -1
    ).astype(np.float32)  # (N, 3)
    files = [submission_name(str(store.paths[r]), str(store.ids[r])) for r in rows]
    return ids, feats, have, labels, files, why


def train_label_mean(store, split: str) -> list[float | None]:
    """Mean corpus-scale label per attribute over a split's labelled rows (the last fallback)."""
    rows = store.split_indices(split)
    out = []
    for a in ATTRIBUTES:
        y = store.labels.get(a, np.full(store.n, np.nan, np.float32))[rows].astype(np.float64)
        out.append(float(np.nanmean(y)) if np.isfinite(y).any() else None)
    return out


def view_stats(store, split: str, views: Sequence[str], layer_views: set[str]) -> dict:
    """Per-view (mean per dimension, one scale per view or layer) over a split's filled rows."""
    stats = {}
    for v in views:
        n, s1, s2 = 0, 0.0, 0.0
        # In chunks, in float64: a layered view of MSP-Podcast's Train split is ~8 GB in float32.
        for batch in store.iter_batches(split, [v], 4096, layers=v in layer_views):
            x = batch.features[v].astype(np.float64)
            n, s1, s2 = n + len(x), s1 + x.sum(0), s2 + (x * x).sum(0)
        if n == 0:
            raise TrainError(f"{store.path}: no filled rows of {v!r} in split {split!r}")
        mean = s1 / n
        var = np.maximum(s2 / n - mean * mean, 0.0)
        # One scale per view (per layer for layered views), not per dimension: z-scoring each
        # dimension would blow near-constant dimensions up to unit variance. Measured on the demo:
        # Test1 ensemble CCC about 0.55 with this, 0.49 with per-dimension z-scores.
        scale = np.sqrt(var.mean(axis=-1, keepdims=True))
        std = np.broadcast_to(np.maximum(scale, 1e-6), mean.shape)
        stats[v] = (mean.astype(np.float32), std.astype(np.float32))
    return stats


def standardize(
    feats: Mapping[str, np.ndarray], stats: Mapping[str, tuple], inplace: bool = False
) -> dict:
    """z-score the views that have stats; others pass through. float16 views stay float16.

    `inplace=True` overwrites the given arrays (no second copy of a view in memory).
    """
    out = {}
    for v, x in feats.items():
        if v not in stats:
            out[v] = x
        elif x.dtype == np.float16:  # in float32 row chunks: never a float32 copy of the view
            mean, std = stats[v]
            y = x if inplace else np.empty_like(x)
            for s in range(0, len(x), 4096):
                y[s : s + 4096] = (x[s : s + 4096].astype(np.float32) - mean) / std
            out[v] = y
        elif inplace:
            x -= stats[v][0]
            x /= stats[v][1]
            out[v] = x
        else:
            out[v] = (x - stats[v][0]) / stats[v][1]
    return out


def _save_stats(path: Path, stats: Mapping[str, tuple]) -> None:
    tmp = path.with_suffix(".tmp.npz")
    arrays = {f"{v}/{k}": a for v, (m, sd) in stats.items() for k, a in (("mean", m), ("std", sd))}
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_stats(path: Path) -> dict:
    """View statistics saved by `train_run` (empty when the run does not standardize)."""
    if not path.exists():
        return {}
    with np.load(path) as z:
        views = {k.split("/")[0] for k in z.files}
        return {v: (z[f"{v}/mean"], z[f"{v}/std"]) for v in views}


def _targets(cfg: Config) -> list[tuple[str, list[str]]]:
    """(directory name, attributes) of each model trained per score set."""
    attrs = list(cfg.train.attributes)
    bad = [a for a in attrs if a not in ATTRIBUTES]
    if bad:
        raise TrainError(f"train.attributes: unknown {bad} (known: {list(ATTRIBUTES)})")
    if cfg.train.multitask:
        return [("multitask", list(ATTRIBUTES))]
    return [(a, [a]) for a in attrs]


def _layer_views(cfg: Config, backbones: Mapping[str, Any]) -> set[str]:
    if not cfg.model.layer_weights:
        return set()
    return {name for name, info in backbones.items() if info.num_layers is not None}


def _model_for(cfg: Config, ss: ScoreSetConfig, view_dims: dict[str, int], n_out: int) -> nn.Module:
    return build_score_model(ss, cfg.model, view_dims, n_out)


def train_run(
    store_path: str | Path,
    cfg: Config,
    out_dir: str | Path,
    overrides: Sequence[str] = (),
    progress: Callable[[dict], None] | None = None,
    mesh: Mesh | None = None,
) -> dict:
    """Train every score set of `cfg.model.score_sets` and write RUN/ (resumes an interrupted run)."""
    from featurestore import FeatureStore

    store_path = Path(store_path).absolute()
    out = Path(out_dir)
    store = FeatureStore(store_path)
    backbones = store.backbones
    view_dims = {name: info.dim for name, info in backbones.items()}
    layer_views = _layer_views(cfg, backbones)
    targets = _targets(cfg)
    mesh = mesh or data_mesh()
    # Check everything cheap before writing anything, so a bad setting leaves no RUN/ behind.
    for ss in cfg.model.score_sets:
        try:
            _model_for(cfg, ss, view_dims, 1)
        except HeadConfigError as e:
            raise TrainError(f"{store_path}: {e}") from None
    for split in (cfg.train.train_split, cfg.train.dev_split):
        store.split_indices(split)
    cfg_dict = to_dict(cfg)
    sha = _ids_sha256(store.ids)
    manifest_path = out / "manifest.json"
    out.mkdir(parents=True, exist_ok=True)
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("store_ids_sha256") != sha or old.get("config") != cfg_dict:
            raise TrainError(
                f"{manifest_path}: this RUN/ was made from another store or config; use another --out"
            )
    score_sets = [
        {"name": s.name, "kind": s.kind, "views": list(s.views)} for s in cfg.model.score_sets
    ]
    manifest = {
        "store": str(store_path),
        "store_ids_sha256": sha,
        "config": cfg_dict,
        "overrides": list(overrides),
        "attributes": [a for a in ATTRIBUTES if any(a in t[1] for t in targets)],
        "targets": [t[0] for t in targets],
        "score_sets": score_sets,
        "view_dims": {
            v: view_dims[v] for s in cfg.model.score_sets for v in s.views if v in view_dims
        },
        "view_layers": {v: backbones[v].num_layers for v in sorted(layer_views)},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "version": jax_ifmvse.__version__,
        "complete": False,
        "best": {},
        # The prediction of an utterance with no features for any score set (ensemble, predict).
        "train_label_mean": dict(
            zip(ATTRIBUTES, train_label_mean(store, cfg.train.train_split), strict=True)
        ),
    }
    _write_json(manifest_path, manifest)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))

    # Every row of an evaluated split is scored: a score set gives NaN where its views have no
    # features, and the ensemble falls back for those rows (RUN/ensemble/fallbacks_<split>.csv).
    all_views = sorted({v for s in cfg.model.score_sets for v in s.views})
    eval_splits = [cfg.train.dev_split] + [
        s for s in cfg.train.test_splits if s != cfg.train.dev_split
    ]
    present = set(store.splits.tolist())
    skipped = [s for s in eval_splits if s not in present]
    eval_splits = [s for s in eval_splits if s in present]
    if cfg.train.dev_split not in present:
        raise TrainError(f"{store_path}: no rows in dev split {cfg.train.dev_split!r}")
    stats = (
        view_stats(store, cfg.train.train_split, all_views, layer_views)
        if cfg.model.standardize
        else {}
    )
    if stats:
        _save_stats(out / "view_stats.npz", stats)
    evals = {}
    for s in eval_splits:
        ids, feats, have, labels, files, why = load_all_rows(store, s, all_views, layer_views)
        evals[s] = (ids, standardize(feats, stats, inplace=True), labels, have, files, why)
        del feats
    scores = {
        s: np.full((len(cfg.model.score_sets), len(e[0]), 3), np.nan, np.float32)
        for s, e in evals.items()
    }
    normalize = cfg.corpus.normalize_labels

    for k, ss in enumerate(cfg.model.score_sets):
        tr_ids, tr_feats, tr_labels = _load_views(
            store, cfg.train.train_split, ss.views, layer_views
        )
        # Once on the device (float16 as stored for layered views), the host copy is dropped:
        # on CPU the device is host memory, and Train's layered view is 4.3 GB (MSP-Podcast).
        tr_feats = jax.block_until_ready(
            jax.device_put(standardize(tr_feats, stats, inplace=True), NamedSharding(mesh, P()))
        )
        # device_put leaves the host arrays in a reference cycle (measured with jax 0.10 on CPU:
        # freed only by the cyclic collector, which ran well into training: +4.7 GB of RSS).
        gc.collect()
        # Development rows with every view of this score set, from the evaluation copy (already
        # standardized; the same rows and values `_load_views` would read again).
        _, ev_feats, ev_labels, ev_have, _, _ = evals[cfg.train.dev_split]
        dok = np.all([ev_have[v] for v in ss.views], axis=0)  # (N,)
        dv_feats = {v: ev_feats[v] if dok.all() else ev_feats[v][dok] for v in ss.views}
        dv_labels = ev_labels[dok]
        for tname, attrs in targets:
            cols = [ATTRIBUTES.index(a) for a in attrs]
            keep = np.isfinite(tr_labels[:, cols]).all(-1)
            dkeep = np.isfinite(dv_labels[:, cols]).any(-1)
            if keep.sum() < 2 or dkeep.sum() < 2:
                raise TrainError(f"{store_path}: too few labelled rows for {ss.name}/{tname}")
            model = _model_for(cfg, ss, view_dims, len(cols))
            mdir = out / ss.name / tname
            name = f"{ss.name}/{tname}"

            def report(rec, name=name):
                if progress is not None:
                    progress({"model": name, "epochs": cfg.train.epochs, **rec})

            rows = None if keep.all() else jnp.asarray(np.flatnonzero(keep))
            res = train_model(
                model,
                (
                    {v: x if rows is None else x[rows] for v, x in tr_feats.items()},
                    tr_labels[keep][:, cols],
                ),
                (
                    {v: x if dkeep.all() else x[dkeep] for v, x in dv_feats.items()},
                    dv_labels[dkeep][:, cols],
                ),
                cfg.train,
                mdir,
                targets=attrs,
                normalize=normalize,
                mesh=mesh,
                on_epoch=report,
            )
            predict = make_predict(model)
            for split, (_, feats, labels, have, _, _) in evals.items():
                pred = to_corpus_scale(
                    predict_np(predict, res.params, {v: feats[v] for v in ss.views}, mesh),
                    normalize,
                )
                ok = np.all([have[v] for v in ss.views], axis=0)  # (N,)
                pred[~ok] = np.nan  # zeros stood in for the missing features
                scores[split][k][:, cols] = pred
                if split == cfg.train.dev_split:
                    plot_scatter(labels[ok][:, cols], pred[ok], attrs, mdir / "scatter.png", name)
            plot_curves(res.history, mdir / "curves.png", name)
            for a in attrs:
                rec = next(h for h in res.history if h["epoch"] == res.best_epoch)
                manifest["best"].setdefault(ss.name, {})[a] = {
                    "epoch": res.best_epoch,
                    "dev_ccc": rec.get(f"dev_ccc_{a}", rec["dev_ccc"]),
                    "model": tname,
                }
            _write_json(manifest_path, manifest)

    names = np.asarray([s.name for s in cfg.model.score_sets])
    (out / "scores").mkdir(exist_ok=True)
    for split, (ids, _, labels, _, files, why) in evals.items():
        tmp = out / "scores" / f"{split}.tmp.npz"
        np.savez(
            tmp,
            ids=np.asarray(ids, dtype=str),
            files=np.asarray(files, dtype=str),  # the official FileName, with its extension
            missing=np.asarray(why, dtype=str),  # why some views lack features ("" = none)
            scores=scores[split],
            labels=labels,
            score_sets=names,
            attributes=np.asarray(ATTRIBUTES),
        )
        os.replace(tmp, out / "scores" / f"{split}.npz")
    manifest["complete"] = True
    manifest["splits"] = eval_splits
    manifest["skipped_splits"] = skipped
    _write_json(manifest_path, manifest)
    return manifest


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def load_heads(
    run_dir: str | Path, *, fused: bool = False
) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """A scorer `features {view: (N, D)} -> (K, N, 3)` corpus-scale scores from best checkpoints.

    `fused=True` runs every head in one jitted call (one dispatch and one transfer instead of one
    per score set and attribute group: what a server scoring a few rows at a time pays for).
    """
    from jax_ifmvse.config import load_config

    run = Path(run_dir)
    manifest_path = run / "manifest.json"
    if not manifest_path.exists():
        raise TrainError(
            f"{manifest_path}: not found; is {run} a RUN/ directory from `ifmvse train`?"
        )
    manifest = json.loads(manifest_path.read_text())
    cfg = load_config(run / "config.yaml")
    view_dims = manifest["view_dims"]
    mesh = data_mesh()
    replicated = NamedSharding(mesh, P())
    tx = make_optimizer(cfg.train)
    models = []  # (k, cols, model, params)
    for k, ss in enumerate(cfg.model.score_sets):
        for tname, attrs in _targets(cfg):
            cols = [ATTRIBUTES.index(a) for a in attrs]
            model = _model_for(cfg, ss, view_dims, len(cols))
            mngr = checkpoint_manager(run / ss.name / tname / "checkpoints")
            best = mngr.best_step()
            if best is None:
                raise TrainError(f"{run / ss.name / tname}: no checkpoint (was training finished?)")
            like = jax.eval_shape(
                lambda model=model, ss=ss: init_state(
                    model,
                    tx,
                    {v: jnp.zeros(_example_shape(manifest, v), jnp.float32) for v in ss.views},
                    jax.random.key(0),
                )
            )
            params = restore_state(mngr, best, like, replicated).params
            mngr.close()
            models.append((k, cols, model, make_predict(model), params))
    normalize = cfg.corpus.normalize_labels
    n_sets = len(cfg.model.score_sets)
    stats = load_stats(run / "view_stats.npz")

    needed = sorted({v for m in models for v in m[2].views})

    def score(features: Mapping[str, np.ndarray]) -> np.ndarray:
        missing = [v for v in needed if v not in features]
        if missing:
            raise TrainError(f"{run}: features for {missing} are needed by its score sets")
        n = len(features[needed[0]])
        out = np.full((n_sets, n, 3), np.nan, np.float32)
        for k, cols, model, predict, params in models:
            feats = standardize(
                {v: np.asarray(features[v], np.float32) for v in model.views}, stats
            )
            out[k][:, cols] = to_corpus_scale(predict_np(predict, params, feats, mesh), normalize)
        return out

    if not fused:
        return score

    def apply_all(all_params: list, feats: dict) -> list:
        return [
            model.apply({"params": p}, {v: feats[v] for v in model.views}, train=False)
            for (_, _, model, _, _), p in zip(models, all_params, strict=True)
        ]

    apply_jit = jax.jit(apply_all)
    all_params = [m[4] for m in models]
    rows = NamedSharding(mesh, P("data"))

    def score_fused(features: Mapping[str, np.ndarray]) -> np.ndarray:
        missing = [v for v in needed if v not in features]
        if missing:
            raise TrainError(f"{run}: features for {missing} are needed by its score sets")
        n = len(features[needed[0]])
        size = mesh.devices.size * math.ceil(max(n, 1) / mesh.devices.size)  # rows per device
        feats = standardize({v: np.asarray(features[v], np.float32) for v in needed}, stats)
        part = {
            v: jax.device_put(
                np.concatenate([x, np.zeros((size - n, *x.shape[1:]), x.dtype)]), rows
            )
            for v, x in feats.items()
        }
        ys = jax.device_get(apply_jit(all_params, part))  # K x (size, cols)
        out = np.full((n_sets, n, 3), np.nan, np.float32)
        for (k, cols, *_), y in zip(models, ys, strict=True):
            out[k][:, cols] = to_corpus_scale(np.asarray(y)[:n], normalize)
        return out

    return score_fused


def _example_shape(manifest: dict, view: str) -> tuple[int, ...]:
    layers = manifest.get("view_layers", {}).get(view)
    dim = manifest["view_dims"][view]
    return (1, layers, dim) if layers else (1, dim)
