"""Training of the score-set heads: CCC loss, AdamW, data parallel over a `data` mesh axis, Orbax.

How a model trains:
- The whole training split of a score set's views lives on every device (replicated); one
  jitted function runs an epoch as a `lax.scan` over the step (`trainer.train_step`), so there is no host round trip
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
- Epochs, checkpoints and resume are `trainer.fit`'s: ONE Orbax CheckpointManager per model
  under `<model dir>/checkpoints`, saving an epoch with two items, `state` (step, params,
  opt_state) and `history` (every epoch's metrics so far). Its preservation policy keeps the latest checkpoint (resume) and the best by development
  CCC (`best_step()`, used for predictions); everything else is deleted.
- Labels are trained on (y - 1) / 6 when `corpus.normalize_labels`; predictions go back to 1..7.
- `train.tasks` (docs/task1.md): beyond the paper's attributes, task 1's eight classes and a
  gender auxiliary, alone or jointly in one model (`model_specs`); their loss and development
  metrics live in `objective.Objective`, passed through `make_train_step` and `train_model` (the
  attributes-only default keeps its own 1 - CCC path). `train.sampler=balanced` draws each
  epoch class-balanced (`balanced_order`).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ifmvse
from featurestore import FeatureStore
from jax_ifmvse.categories import (
    CLASS_CODES,
    N_CLASSES,
    CategoryError,
    class_weights,
    store_classes,
    store_genders,
)
from jax_ifmvse.config import (
    ATTRIBUTES,
    Config,
    TrainConfig,
    check_command,
    to_dict,
)
from jax_ifmvse.data.loaders import LoaderError, LoaderSettings, StreamedFrames, frame_index
from jax_ifmvse.data.views import (
    frame_views,
    ids_sha256,
    layered_views,
    load_all_rows,
    load_views,
    save_stats,
    standardize,
    train_label_mean,
    view_keys,
    view_stats,
)
from jax_ifmvse.errors import TrainError
from jax_ifmvse.heads import HeadConfigError
from jax_ifmvse.heads.specs import (
    build_model,
    model_specs,
    to_corpus_scale,
    to_train_scale,
)
from jax_ifmvse.objective import Objective, ccc_mean_loss
from jax_ifmvse.objective import dev_ccc as _dev_ccc
from jax_ifmvse.parallel import data_mesh, make_predict, predict_rows
from jax_ifmvse.plots import plot_confusion, plot_curves, plot_scatter
from jax_ifmvse.provenance import store_corpus
from jax_ifmvse.trainer import optim
from jax_ifmvse.trainer.fit import InEpoch, fit, run_steps
from jax_ifmvse.trainer.rundir import check_rerun, mark_complete, write_json
from jax_ifmvse.trainer.state import TrainState, init_state, make_step


@dataclasses.dataclass(frozen=True)
class ModelResult:
    """What training one model leaves behind."""

    best_epoch: int
    best_dev_ccc: float  # NaN for a model without attributes
    history: list[dict]
    params: Any  # best-development parameters
    best_dev_score: float = float("nan")  # what picked the epoch (the dev CCC without an objective)


# ---------------------------------------------------------------------------------------------
# Pure pieces.


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with the configured learning rate and weight decay, as torch.optim.AdamW."""
    return optim.make_optimizer(cfg.learning_rate, cfg.weight_decay)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    dropout_key: jax.Array,
    batch_sharding: NamedSharding | None = None,
    objective: Objective | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`trainer.train_step` of a head on `objective`'s loss (default the paper's 1 - CCC), bound:
    `(state, batch) -> (state, metrics)`, not jitted (`make_train_epoch` scans it)."""

    def apply(params, batch, rng):
        return model.apply(
            {"params": params}, batch["features"], train=True, rngs={"dropout": rng}
        )  # (B, K)

    loss = ccc_mean_loss if objective is None else objective.loss
    return make_step(apply, loss, tx, dropout_key, batch_sharding=batch_sharding, jit=False)


def epoch_batches(
    data_key: jax.Array,
    epoch: jax.Array,
    n_rows: int,
    batch_size: int,
    drop_last: bool = False,
    order: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Row indices (steps, B) of one shuffled epoch and their 0/1 weights (steps, B).

    With `drop_last=False` (torch DataLoader's default) the last partial batch is kept, padded to
    B rows of weight 0 so that every step has one shape (one scan, one compiled step).
    `order(data_key, epoch)` replaces the permutation of all rows (e.g. `balanced_order`); it
    must return `n_rows` row indices.
    """
    if order is None:
        perm = jax.random.permutation(jax.random.fold_in(data_key, epoch), n_rows)  # (N,)
    else:
        perm = order(data_key, epoch)  # (n_rows,)
    full, rest = divmod(n_rows, batch_size)
    if drop_last or rest == 0:
        idx = perm[: full * batch_size].reshape(full, batch_size)
        return idx, jnp.ones(idx.shape, jnp.float32)
    pad = full * batch_size + batch_size - n_rows
    idx = jnp.concatenate([perm, perm[:pad]]).reshape(full + 1, batch_size)
    weights = (jnp.arange((full + 1) * batch_size) < n_rows).astype(jnp.float32)
    return idx, weights.reshape(full + 1, batch_size)


def balanced_rows(y: np.ndarray) -> tuple[np.ndarray, ...]:
    """Row indices of each class present in `y` (class indices; -1 rows are never drawn)."""
    return tuple(np.flatnonzero(y == c) for c in range(N_CLASSES) if (y == c).any())


def balanced_order(
    data_key: jax.Array, epoch: jax.Array, class_rows: Sequence[np.ndarray]
) -> jax.Array:
    """One class-balanced epoch: m rows of every class (m = the rarest class's count), drawn
    without replacement from fold_in(data_key, epoch) and shuffled together; (m * classes,)."""
    key = jax.random.fold_in(data_key, epoch)
    m = min(len(r) for r in class_rows)
    parts = [
        jax.random.permutation(jax.random.fold_in(key, c + 1), jnp.asarray(r, jnp.int32))[:m]
        for c, r in enumerate(class_rows)
    ]
    return jax.random.permutation(jax.random.fold_in(key, 0), jnp.concatenate(parts))


def make_train_epoch(
    train_step: Callable,
    n_rows: int,
    batch_size: int,
    data_key: jax.Array,
    drop_last: bool = False,
    order: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """Jitted `(state, data, epoch) -> (state, mean metrics)`: scan over a shuffled epoch
    (`n_rows` rows of `order(data_key, epoch)` when given, see `epoch_batches`)."""

    def train_epoch(state: TrainState, data: dict, epoch: jax.Array):
        idx, weights = epoch_batches(data_key, epoch, n_rows, batch_size, drop_last, order)

        def body(state, xs):
            ix, w = xs
            batch = jax.tree.map(lambda x: x[ix], data)  # gather on device
            return train_step(state, {**batch, "weights": w})

        state, metrics = jax.lax.scan(body, state, (idx, weights))
        return state, jax.tree.map(jnp.mean, metrics)

    return jax.jit(train_epoch, donate_argnums=0)


def streamed_epoch(
    train_step: Callable,
    frames: Any,
    targets: Mapping[str, np.ndarray],
    n_rows: int,
    batch_size: int,
    data_key: jax.Array,
    mesh: Mesh,
    drop_last: bool = False,
    order: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    seed: int = 0,
) -> Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict]]:
    """`make_train_epoch`'s `(state, data, epoch) -> (state, mean metrics)` for frames streamed
    from disk (`loaders.StreamedFrames`; `data` is unused): the same permutation of rows, batches
    read by the loader while the jitted step runs, each sharded over the mesh's `data` axis."""
    step = jax.jit(train_step, donate_argnums=0)
    sharding = NamedSharding(mesh, P("data"))
    keys = view_keys(frames.views, True)

    def one(state: TrainState, b: dict) -> tuple[TrainState, dict]:
        batch = {"features": {k: b[k] for k in keys}, "weights": b["weights"]}
        batch |= {k: b[k] for k in targets}
        return step(state, jax.device_put(batch, sharding))

    def run(
        state: TrainState, data: Any, epoch: jax.Array, within: InEpoch | None = None
    ) -> tuple[TrainState, dict]:
        e = jnp.asarray(epoch, jnp.int32)
        perm = (
            jax.random.permutation(jax.random.fold_in(data_key, e), n_rows)
            if order is None
            else order(data_key, e)
        )  # (n_rows,) positions, as `epoch_batches`
        stream = frames.train_stream(
            np.asarray(perm), batch_size, targets=targets, drop_last=drop_last, seed=seed,
            epoch=int(e),
        )  # fmt: skip
        state, metrics = run_steps(state, one, stream, within)  # within: saves, resumes
        mean = lambda *x: jnp.mean(jnp.stack([jnp.float32(v) for v in x]))  # noqa: E731
        return state, jax.tree.map(mean, *metrics)

    return run


# One model.


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
    objective: Objective | None = None,
) -> ModelResult:
    """Train (or resume) one model; `train`/`dev` are (features, labels (N, K) on the corpus scale).

    With an `objective`, labels are {attributes (N, K) corpus scale, category (N,), gender (N,)}
    as `Objective.targets` takes them, and the best epoch is the best `dev_score`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mesh = mesh or data_mesh()
    ndev = mesh.devices.size
    feats, labels = train
    streamed = not isinstance(feats, Mapping)  # loaders.StreamedFrames: read batch by batch
    n = len(feats) if streamed else len(next(iter(feats.values())))
    order = None
    if cfg.sampler == "balanced":  # config rule: balanced needs the category task
        rows = balanced_rows(np.asarray(labels["category"]))
        if not rows:
            raise TrainError(f"{out_dir}: no training row has a class (A, S, H, U, F, D, C, N)")
        order = partial(balanced_order, class_rows=rows)
        n = min(len(r) for r in rows) * len(rows)  # rows per balanced epoch
    batch = min(cfg.batch_size, n) // ndev * ndev  # whole rows per device
    if batch < 2 or batch % ndev:
        raise TrainError(
            f"{out_dir}: {n} training rows cannot make batches of {cfg.batch_size} over {ndev} devices"
        )
    replicated = NamedSharding(mesh, P())
    root = jax.random.key(cfg.seed)
    init_key, data_key, dropout_key = (jax.random.fold_in(root, i) for i in range(3))
    tx = make_optimizer(cfg)
    example = feats.example() if streamed else {k: v[:1] for k, v in feats.items()}
    # One compiled init instead of dozens of eagerly compiled initializer ops.
    state = jax.jit(partial(init_state, model, tx), out_shardings=replicated)(example, init_key)
    if objective is None:
        targets_np = {"labels": to_train_scale(labels, normalize).astype(np.float32)}
    else:
        targets_np = objective.targets(labels)
    step_fn = make_train_step(model, tx, dropout_key, NamedSharding(mesh, P("data")), objective)
    if streamed:  # the devices receive batches, never the split
        data = None
        train_epoch = streamed_epoch(
            step_fn, feats, targets_np, n, batch, data_key, mesh, cfg.drop_last, order, cfg.seed
        )
    else:
        data = jax.device_put({"features": feats, **targets_np}, replicated)
        train_epoch = make_train_epoch(step_fn, n, batch, data_key, cfg.drop_last, order)
    predict = make_predict(model)

    dev_feats, dev_labels = dev

    def run_epoch(state, epoch, *within):  # within: streamed epochs only (checkpoint_steps)
        state, m = train_epoch(state, data, jnp.asarray(epoch, jnp.int32), *within)
        rec = {"train_loss": float(m["loss"]), "grad_norm": float(m["grad_norm"])}
        return state, rec | {k: float(v) for k, v in m.items() if k.startswith("loss_")}

    def evaluate(params):
        raw = predict_rows(predict, params, dev_feats, mesh)
        if objective is not None:
            return objective.dev_metrics(dev_labels, raw)
        per = _dev_ccc(dev_labels, to_corpus_scale(raw, normalize))
        dev_ccc = float(np.nanmean(per)) if np.isfinite(per).any() else -1.0
        return {"dev_ccc": dev_ccc, **{f"dev_ccc_{t}": c for t, c in zip(targets, per)}}

    key = "dev_ccc" if objective is None else "dev_score"  # what picks the best epoch
    res = fit(
        state,
        directory=out_dir,
        epochs=cfg.epochs,
        train_epoch=run_epoch,
        evaluate=evaluate,
        score_key=key,
        sharding=replicated,
        checkpoint_every=cfg.checkpoint_every,
        checkpoint_steps=cfg.checkpoint_steps if streamed else 0,
        on_epoch=on_epoch,
    )
    best = res.best
    return ModelResult(
        res.best_epoch, best.get("dev_ccc", float("nan")), res.history, res.best_params, best[key]
    )


# ---------------------------------------------------------------------------------------------
# A run: every score set.


def train_run(
    store_path: str | Path,
    cfg: Config,
    out_dir: str | Path,
    overrides: Sequence[str] = (),
    progress: Callable[[dict], None] | None = None,
    mesh: Mesh | None = None,
) -> dict:
    """Train every score set of `cfg.model.score_sets` and write RUN/ (resumes an interrupted run)."""
    check_command(cfg, "train")  # the rules bound to training (checkpoint_steps)
    store_path = Path(store_path).absolute()
    out = Path(out_dir)
    store = FeatureStore(store_path)
    backbones = store.backbones
    view_dims = {name: info.dim for name, info in backbones.items()}
    layer_views = layered_views(cfg, backbones)
    specs = model_specs(cfg)
    targets = [(m.name, list(m.attributes)) for m in specs]
    want_cat = any(m.category for m in specs)
    want_gender = any(m.gender for m in specs)
    mesh = mesh or data_mesh()
    # Check everything cheap before writing anything, so a bad setting leaves no RUN/ behind.
    for ss in cfg.model.score_sets:
        try:
            build_model(cfg, ss, view_dims, 1)
        except HeadConfigError as e:
            raise TrainError(f"{store_path}: {e}") from None
    for split in (cfg.train.train_split, cfg.train.dev_split):
        store.split_indices(split)

    def codes_of(rows: np.ndarray) -> dict[str, np.ndarray]:
        """Class and gender indices of store rows (-1 unknown) for the tasks trained."""
        try:
            out = {"category": store_classes(store, rows)} if want_cat else {}
            if want_gender:
                out["gender"] = store_genders(store, rows)
        except CategoryError as e:
            raise TrainError(str(e)) from None
        return out

    codes_of(np.zeros(0, np.int64))  # a store without task 1 labels fails before RUN/ exists
    cfg_dict = to_dict(cfg)
    sha = ids_sha256(store.ids)
    manifest_path = out / "manifest.json"
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = {"store_ids_sha256": sha, "config": cfg_dict}
    check_rerun(manifest_path, fingerprint, {"config": to_dict(Config())}, TrainError)
    score_sets = [
        {"name": s.name, "kind": s.kind, "views": list(s.views)} for s in cfg.model.score_sets
    ]
    manifest = {
        "store": str(store_path),
        "store_ids_sha256": sha,
        "config": cfg_dict,
        "overrides": list(overrides),
        "attributes": [a for a in ATTRIBUTES if any(a in t[1] for t in targets)],
        "tasks": list(cfg.train.tasks),
        "classes": list(CLASS_CODES) if want_cat else [],
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
        # What the heads learnt from (shown by predict, serve /info and the demo report).
        "corpus": store_corpus(store),
    }
    if want_cat:  # the task 1 stand-in for a row no score set scores (ensemble, predict)
        y = codes_of(store.split_indices(cfg.train.train_split))["category"]
        manifest["train_class_counts"] = np.bincount(y[y >= 0], minlength=N_CLASSES).tolist()
    write_json(manifest_path, manifest)
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
        save_stats(out / "view_stats.npz", stats)
    # Heads pool stored frames (featurestore.frames); layer weights are refused with it at load.
    attentive = cfg.model.pooling == "attentive"
    # Attentive frames are streamed from the frame file by default (`loader.frames`): a split is
    # a `StreamedFrames` (row offsets only), read batch by batch with host memory bounded.
    streamed = attentive and cfg.loader.frames == "stream"
    if streamed:
        settings = LoaderSettings.of(cfg.loader)
        try:
            indexes = {v: frame_index(store_path, v) for v in all_views}
        except LoaderError as e:
            raise TrainError(str(e)) from None

        def stream_of(views: Sequence[str], rows: np.ndarray) -> StreamedFrames:
            return StreamedFrames(store_path, views, rows, settings, stats, indexes)

    evals = {}
    for s in eval_splits:
        ids, feats, have, labels, files, why = load_all_rows(store, s, all_views, layer_views)
        feats = standardize(feats, stats, inplace=True)
        if streamed:
            feats = stream_of(all_views, store.index_of(ids))
            have = {v: have[v] & h for v, h in feats.have().items()}
        elif attentive:  # the frames replace the pooled rows; a row without frames is missing
            feats = frame_views(store_path, all_views, store.index_of(ids), stats)
            have = {v: have[v] & feats[f"{v}:mask"].any(1) for v in all_views}
        evals[s] = (ids, feats, labels, have, files, why)
        del feats
    scores = {
        s: np.full((len(cfg.model.score_sets), len(e[0]), 3), np.nan, np.float32)
        for s, e in evals.items()
    }
    # Task 1: class probabilities (K, N, 8) in the baseline's class order, NaN where not scored.
    probs = {
        s: np.full((len(cfg.model.score_sets), len(e[0]), N_CLASSES), np.nan, np.float32)
        for s, e in evals.items()
    }
    ev_codes = {
        s: codes_of(store.index_of(e[0])) if (want_cat or want_gender) else {}
        for s, e in evals.items()
    }
    normalize = cfg.corpus.normalize_labels

    for k, ss in enumerate(cfg.model.score_sets):
        tr_ids, tr_feats, tr_labels = load_views(
            store, cfg.train.train_split, ss.views, layer_views
        )
        keys = view_keys(ss.views, attentive)
        tr_frames = np.ones(len(tr_ids), bool)  # rows with frames in every view (attentive)
        if streamed:
            del tr_feats  # the pooled rows; batches of frames are read while training
            tr_feats = stream_of(ss.views, store.index_of(tr_ids))
            tr_frames = np.all(list(tr_feats.have().values()), axis=0)
        else:
            if attentive:
                tr_feats = frame_views(store_path, ss.views, store.index_of(tr_ids), {})
                tr_frames = np.all([tr_feats[f"{v}:mask"].any(1) for v in ss.views], axis=0)
            # Once on the device (float16 as stored for layered views), the host copy is dropped:
            # on CPU the device is host memory, and Train's layered view is 4.3 GB (MSP-Podcast).
            tr_feats = jax.block_until_ready(
                jax.device_put(standardize(tr_feats, stats, inplace=True), NamedSharding(mesh, P()))
            )
            # device_put leaves the host arrays in a reference cycle (measured with jax 0.10 on
            # CPU: freed only by the cyclic collector, well into training: +4.7 GB of RSS).
            gc.collect()
        # Development rows with every view of this score set, from the evaluation copy (already
        # standardized; the same rows and values `load_views` would read again).
        _, ev_feats, ev_labels, ev_have, _, _ = evals[cfg.train.dev_split]
        dok = np.all([ev_have[v] for v in ss.views], axis=0)  # (N,)
        if streamed:
            dv_feats = ev_feats.subset(None if dok.all() else dok, ss.views)
        else:
            dv_feats = {v: ev_feats[v] if dok.all() else ev_feats[v][dok] for v in keys}
        dv_labels = ev_labels[dok]
        dv_codes = {c: v[dok] for c, v in ev_codes[cfg.train.dev_split].items()}
        tr_codes = codes_of(store.index_of(tr_ids)) if (want_cat or want_gender) else {}
        for spec in specs:
            tname, attrs = spec.name, list(spec.attributes)
            cols = [ATTRIBUTES.index(a) for a in attrs]
            with_codes = spec.category or spec.gender
            if not with_codes:  # the paper's models: rows with every trained attribute
                keep = np.isfinite(tr_labels[:, cols]).all(-1)
                dkeep = np.isfinite(dv_labels[:, cols]).any(-1)
            else:  # rows with a known attribute or (task 1) a known class
                keep = np.zeros(len(tr_labels), bool)
                dkeep = np.zeros(len(dv_labels), bool)
                if cols:
                    keep |= np.isfinite(tr_labels[:, cols]).any(-1)
                    dkeep |= np.isfinite(dv_labels[:, cols]).any(-1)
                if spec.category:
                    keep |= tr_codes["category"] >= 0
                    dkeep |= dv_codes["category"] >= 0
            keep &= tr_frames
            if keep.sum() < 2 or dkeep.sum() < 2:
                raise TrainError(f"{store_path}: too few labelled rows for {ss.name}/{tname}")
            model = build_model(cfg, ss, view_dims, spec.n_out)
            mdir = out / ss.name / tname
            name = f"{ss.name}/{tname}"

            def report(rec, name=name):
                if progress is not None:
                    progress({"model": name, "epochs": cfg.train.epochs, **rec})

            if with_codes:
                tr_y = {"attributes": tr_labels[keep][:, cols]}
                tr_y |= {c: v[keep] for c, v in tr_codes.items()}
                dv_y = {"attributes": dv_labels[dkeep][:, cols]}
                dv_y |= {c: v[dkeep] for c, v in dv_codes.items()}
                # The baseline's class weights on the rows trained on; a balanced sampler
                # already draws every class equally (the same formula then gives equal weights).
                cw = (
                    class_weights(tr_y["category"])
                    if spec.category and cfg.train.sampler != "balanced"
                    else None
                )
                objective = spec.objective(cfg, cw)
            else:
                tr_y, dv_y = tr_labels[keep][:, cols], dv_labels[dkeep][:, cols]
                objective = None
            if streamed:
                tr_x = tr_feats.subset(None if keep.all() else keep)
                dv_x = dv_feats.subset(None if dkeep.all() else dkeep)
            else:
                rows = None if keep.all() else jnp.asarray(np.flatnonzero(keep))
                tr_x = {v: x if rows is None else x[rows] for v, x in tr_feats.items()}
                dv_x = {v: x if dkeep.all() else x[dkeep] for v, x in dv_feats.items()}
            res = train_model(
                model,
                (tr_x, tr_y),
                (dv_x, dv_y),
                cfg.train,
                mdir,
                targets=attrs,
                normalize=normalize,
                mesh=mesh,
                on_epoch=report,
                objective=objective,
            )
            predict = make_predict(model)
            for split, (_, feats, labels, have, _, _) in evals.items():
                x = feats.subset(views=ss.views) if streamed else {v: feats[v] for v in keys}
                raw = predict_rows(predict, res.params, x, mesh)
                ok = np.all([have[v] for v in ss.views], axis=0)  # (N,)
                outs = (
                    {"attributes": to_corpus_scale(raw, normalize)}
                    if objective is None
                    else objective.outputs(raw)
                )
                if spec.category:
                    pc = outs["category"]
                    pc[~ok] = np.nan
                    probs[split][k] = pc
                    if split == cfg.train.dev_split:
                        y = ev_codes[split]["category"]
                        plot_confusion(
                            y[ok & (y >= 0)],
                            pc[ok & (y >= 0)].argmax(-1),
                            mdir / "confusion.png",
                            name,
                        )
                if not cols:
                    continue
                pred = outs["attributes"]
                pred[~ok] = np.nan  # zeros stood in for the missing features
                scores[split][k][:, cols] = pred
                if split == cfg.train.dev_split:
                    plot_scatter(labels[ok][:, cols], pred[ok], attrs, mdir / "scatter.png", name)
            plot_curves(res.history, mdir / "curves.png", name)
            rec = next(h for h in res.history if h["epoch"] == res.best_epoch)
            for a in attrs:
                manifest["best"].setdefault(ss.name, {})[a] = {
                    "epoch": res.best_epoch,
                    "dev_ccc": rec.get(f"dev_ccc_{a}", rec.get("dev_ccc")),
                    "model": tname,
                }
            if spec.category:
                manifest["best"].setdefault(ss.name, {})["category"] = {
                    "epoch": res.best_epoch,
                    "dev_macro_f1": rec["dev_macro_f1"],
                    "model": tname,
                }
            write_json(manifest_path, manifest)

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
            **(
                {
                    "probs": probs[split],  # (K, N, 8) task 1 class probabilities
                    "class_codes": np.asarray(CLASS_CODES),
                    # The corpus's EmoClass of each row as given (X, O, "" are not scored).
                    "classes": np.asarray(store.codes["EmoClass"][store.index_of(ids)], dtype=str),
                }
                if want_cat
                else {}
            ),
        )
        os.replace(tmp, out / "scores" / f"{split}.npz")
    return mark_complete(manifest_path, manifest, splits=eval_splits, skipped_splits=skipped)
