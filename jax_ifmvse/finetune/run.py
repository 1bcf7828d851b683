"""`ifmvse finetune`: fine-tune a backbone end to end, the challenge baseline's recipe, in JAX.

The model is the backbone's Flax module (WavLM, HuBERT, Data2Vec-audio or the Whisper encoder)
-> its last hidden state -> the baseline's AttentiveStatisticsPooling over valid frames -> its
EmotionRegression head -> three outputs (arousal, valence, dominance on the (y - 1) / 6 scale),
trained under sum_k (1 - CCC_k) per micro-batch as `train_dim_ser.py` does. Every setting and its
source is in configs/finetune.yaml.

How it runs (on `trainer`, as head training does):
- `make_finetune_step` is `trainer.train_step` on `forward` and the baseline's `Objective`
  (`make_objective`), jitted once with the state donated (one program per length bucket). The
  optimizer is `trainer.optim`'s AdamW in `optax.MultiSteps`, so a state update happens every
  `finetune.accumulation_steps` micro-batches with their mean gradient; the frozen parts (the CNN
  feature encoder) get no gradient (the step's trainable mask: stop_gradient) and no update or
  weight decay (the `frozen` group: `set_to_zero`), as torch skips parameters whose grad is None.
- Master weights are float32; `finetune.compute_dtype=bfloat16` runs the backbone in bfloat16.
  `finetune.remat` recomputes each transformer layer in the backward pass (gradient checkpointing).
- Batches come from length buckets (`data/buckets.py`) with a fixed row count, padded rows having
  CCC weight 0; the Whisper encoder sees its fixed window as extraction does (`backbone_plan`).
  Batches are sharded over the `data` mesh axis; the CCC is over the global micro-batch.
- Data order of epoch e depends on (seed, e), dropout of micro-step s on fold_in(key, s).
  `trainer.fit` runs the epochs (`host_epoch` over the decoded batches): its Orbax manager keeps
  the latest and the best-Development checkpoint, a rerun resumes from the latest, and a run
  killed and restarted ends with the same weights. `trainer.rundir` refuses a rerun with other
  settings (`config.same_settings`: a setting added since, at its default, is no change).
- At the end the best epoch's model is exported: RUN/hf/ is a transformers checkpoint folder
  (usable as any SOURCE: `ifmvse extract --backbone NAME=RUN/hf`), RUN/head.safetensors the
  pooling and head weights under the baseline's PyTorch names.
"""

from __future__ import annotations

import datetime
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ifmvse
from jax_ifmvse.backbones import load_backbone
from jax_ifmvse.categories import CLASS_CODES, class_weights
from jax_ifmvse.config import ATTRIBUTES, Config, check_command, to_dict
from jax_ifmvse.data.corpus import load_corpus
from jax_ifmvse.data.views import ids_sha256
from jax_ifmvse.encode import backbone_plan, make_loader
from jax_ifmvse.finetune.data import (
    AudioFeed,
    PlanIterator,
    Rows,
    batch_arrays,
    corpus_rows,
    epoch_seed,
    plan,
    predict_rows,
    usable,
)
from jax_ifmvse.finetune.export import (
    export_hf,
    write_category_predictions,
    write_head,
    write_predictions,
)
from jax_ifmvse.finetune.model import (
    FinetuneError,
    Spec,
    check_source_family,
    forward,
    frozen_labels,
    init_params,
    make_frame_moments,
    make_pooled,
    make_predict,
    make_spec,
    standardize_head_input,
    standardize_pool_input,
)
from jax_ifmvse.objective import Objective
from jax_ifmvse.parallel import data_mesh
from jax_ifmvse.plots import plot_curves
from jax_ifmvse.report import make_console
from jax_ifmvse.trainer import optim
from jax_ifmvse.trainer.checkpoints import latest_step, saved_within_epoch
from jax_ifmvse.trainer.fit import fit, host_epoch
from jax_ifmvse.trainer.rundir import check_rerun, mark_complete, write_json
from jax_ifmvse.trainer.state import TrainState, make_step

# Test hook: SIGKILL this process right after micro-step N (tests/test_finetune.py resume test).
KILL_AT_STEP_ENV = "IFMVSE_TEST_KILL_AT_STEP"


def make_optimizer(cfg: Config, labels: Any) -> optax.GradientTransformation:
    """`trainer.optim`'s AdamW: the backbone at `train.learning_rate`, pooling and head at
    `finetune.head_learning_rate`, frozen parts untouched, one update per
    `finetune.accumulation_steps` micro-batches (mean gradient)."""
    tc = cfg.train
    head_lr = cfg.finetune.head_learning_rate or tc.learning_rate
    return optim.make_optimizer(
        tc.learning_rate,
        tc.weight_decay,
        labels=labels,
        group_learning_rates={"train": tc.learning_rate, "head": head_lr},
        accumulation=cfg.finetune.accumulation_steps,
    )


def make_objective(task: str, class_weights: Any = None, normalize: bool = True) -> Objective:
    """The baseline's loss and metrics: task 2 the sum over attributes of 1 - CCC (dev CCC),
    task 1 the class-weighted cross-entropy (dev macro-F1)."""
    if task == "category":
        cw = None if class_weights is None else tuple(float(w) for w in class_weights)
        return Objective(category=True, class_weights=cw, normalize=normalize)
    return Objective(attributes=ATTRIBUTES, reduction="sum", normalize=normalize)


def make_finetune_step(
    spec: Spec,
    tx: optax.GradientTransformation,
    labels: Any,
    dropout_key: jax.Array,
    batch_sharding: NamedSharding | None = None,
    class_weights: Any = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`trainer.train_step` of the fine-tuned model, jitted once with the state donated (one
    program per length bucket); the parts labelled frozen get no gradient."""

    def apply(params, batch, rng):
        return forward(spec, params, batch["waves"], batch["lengths"], train=True, rng=rng)

    objective = make_objective(spec.task, class_weights)
    trainable = jax.tree.map(lambda lab: lab != optim.FROZEN, labels)
    return make_step(
        apply, objective.loss, tx, dropout_key, trainable=trainable, batch_sharding=batch_sharding
    )


def settings_fingerprint(cfg: Config) -> dict:
    """The settings a fine-tuning RUN/ is bound to (what changes nothing in the result is left out)."""
    settings = {k: v for k, v in to_dict(cfg).items() if k != "corpus"}
    # Where the cache lives and how audio is decoded change nothing in the result.
    settings["extract"] = {k: v for k, v in settings["extract"].items() if k != "cache_dir"}
    settings["finetune"] = {
        k: v for k, v in settings["finetune"].items() if k not in ("workers", "cache_audio_gb")
    }
    return {
        "config": settings,
        "corpus": {k: v for k, v in to_dict(cfg.corpus).items() if k != "path"},
    }


def finetune_run(
    cfg: Config,
    name: str,
    source: str,
    out_dir: str | Path,
    *,
    progress: Callable[[dict], None] | None = None,
    mesh: Mesh | None = None,
) -> dict:
    """Fine-tune `source` on cfg.corpus, write RUN/ (resumes an interrupted run); the manifest."""
    tc, fc = cfg.train, cfg.finetune
    out = Path(out_dir)
    check_command(cfg, "finetune")  # batch / accumulation, unread train.* settings refused
    check_source_family(source)
    corpus = load_corpus(cfg.corpus.kind, cfg.corpus.path, cfg.corpus.audio_root or None)
    present = corpus.splits()
    for split in (tc.train_split, tc.dev_split):
        if split not in present:
            raise FinetuneError(f"{corpus.source or corpus.root}: no rows in split {split!r}")
    train_rows = corpus_rows(corpus, tc.train_split)
    dev_rows = corpus_rows(corpus, tc.dev_split)
    category = fc.task == "category"
    for split, rows in ((tc.train_split, train_rows), (tc.dev_split, dev_rows)):
        if category and not (rows.classes >= 0).any():
            raise FinetuneError(
                f"{corpus.source or corpus.root}: split {split!r} has no rows coded "
                f"{','.join(CLASS_CODES)} in EmoClass (finetune.task=category needs them)"
            )
        if not category and np.isfinite(rows.labels).all(1).sum() < 2:
            raise FinetuneError(
                f"{corpus.source or corpus.root}: split {split!r} has fewer than 2 labelled rows"
            )

    bb = load_backbone(source, dtype="float32", cache_dir=cfg.extract.cache_dir or None)
    bb, _, max_s, buckets = backbone_plan(bb, cfg)
    spec = make_spec(bb, cfg)
    mesh = mesh or data_mesh()
    ndev = mesh.devices.size
    sr = cfg.audio.sample_rate
    micro = tc.batch_size // fc.accumulation_steps
    micro = -(-micro // ndev) * ndev  # whole rows per device
    eval_rows = -(-fc.eval_batch // ndev) * ndev

    # One RUN/ per (config, backbone, corpus): a resume with anything else is refused.
    fingerprint = {
        **settings_fingerprint(cfg),
        "backbone": {"name": name, "sha256": bb.source_info.get("sha256", "")},
        "train_ids_sha256": ids_sha256(train_rows.ids),
        "dev_ids_sha256": ids_sha256(dev_rows.ids),
    }
    manifest_path = out / "finetune.json"
    default = settings_fingerprint(Config())
    check_rerun(manifest_path, fingerprint, default, FinetuneError, key="fingerprint")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "kind": "finetune",
        "fingerprint": fingerprint,
        "config": to_dict(cfg),
        "backbone": {"name": name, "source": source, **bb.source_info, "family": bb.family},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "version": jax_ifmvse.__version__,
        "micro_batch": micro,
        "complete": False,
    }
    manifest["backbone"].pop("config", None)  # the whole config.json: RUN/hf/ has it
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    # What `FinetunedPredictor` answers for a file it cannot decode (as the ensemble does).
    manifest["train_label_mean"] = {
        a: float(np.nanmean(train_rows.labels[:, k])) for k, a in enumerate(ATTRIBUTES)
    }
    # Task 1: the baseline's class weights, counted on the Train split's coded rows.
    cls_w = class_weights(train_rows.classes) if category else None
    if category:
        manifest["class_weights"] = dict(zip(CLASS_CODES, map(float, cls_w), strict=True))
    write_json(manifest_path, manifest)

    skipped: dict[str, str] = {}
    train_rows = usable(train_rows, skipped)
    dev_rows = usable(dev_rows, skipped)

    def report(st, computed):  # normalize=train: every undecodable Train file is listed
        for p, why in st.failures:
            skipped.setdefault(p, f"Train statistics pass: {why}")
        manifest["normalize_stats_failures"] = len(st.failures)
        manifest["normalize_stats_computed"] = computed  # False: read back (a resume)

    # Computed once (in parallel) into RUN/normalize_stats.json; a resume reads them back.
    loader = make_loader(cfg, corpus, stats_path=out / "normalize_stats.json", report=report)
    if loader.stats is not None:  # normalize=train: predict must use the same statistics
        manifest["normalize_stats"] = [float(x) for x in loader.stats]
        write_json(manifest_path, manifest)
    total_s = float(np.sum(np.minimum(train_rows.durations, max_s)))
    total_s += float(np.sum(np.minimum(dev_rows.durations, max_s)))
    cache = total_s * sr * 4 <= fc.cache_audio_gb * 2**30
    feed = AudioFeed(loader, int(round(max_s * sr)), fc.workers, cache)

    root = jax.random.key(tc.seed)
    init_key, dropout_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 2)
    replicated = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))
    # `fit` resumes from the latest epoch saved, or from a save within an epoch
    start = latest_step(out / "checkpoints") or saved_within_epoch(out)
    params = init_params(spec, bb.params, init_key)
    if fc.head_init_from_data and not start:  # a resume restores the folded head
        # At most 16 Train batches in plan order (deterministic, so a restart redoes it alike).
        first = plan(train_rows, buckets, micro, sr, None)[:16]
        moments = make_frame_moments(spec)
        s1, s2, cnt = 0.0, 0.0, 0.0
        for _, waves, lengths in feed.batches(train_rows, first):
            a, b2, c = moments(params, jax.device_put(waves, data), jax.device_put(lengths, data))
            s1, s2, cnt = (
                s1 + np.asarray(a, np.float64),
                s2 + np.asarray(b2, np.float64),
                cnt + float(c),
            )
        mean = s1 / max(cnt, 1.0)
        std = np.sqrt(np.maximum(s2 / max(cnt, 1.0) - mean**2, 0.0))
        std = np.maximum(std, 1e-3 * max(float(std.max()), 1e-12))
        params = standardize_pool_input(params, mean, std)
        pooled_fn = make_pooled(spec)
        vecs = []
        for b, waves, lengths in feed.batches(train_rows, first):
            v = np.asarray(
                pooled_fn(params, jax.device_put(waves, data), jax.device_put(lengths, data))
            )
            vecs.append(v[(b.indices >= 0) & (lengths > 0)])
        params = standardize_head_input(params, np.concatenate(vecs).astype(np.float64))
    labels = frozen_labels(spec, params, fc.freeze_feature_encoder)
    tx = make_optimizer(cfg, labels)
    opt_state = jax.jit(tx.init)(params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
    state = jax.device_put(state, replicated)
    step_fn = make_finetune_step(spec, tx, labels, dropout_key, data, cls_w)
    predict = make_predict(spec)
    normalize = cfg.corpus.normalize_labels

    objective = make_objective(fc.task, cls_w, normalize)
    n_train = len(plan(train_rows, buckets, micro, sr, epoch_seed(tc.seed, 0)))
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0") or 0)
    score_key = "dev_macro_f1" if category else "dev_ccc"  # the best-epoch rule

    def batches(epoch: int) -> PlanIterator:
        order = plan(train_rows, buckets, micro, sr, epoch_seed(tc.seed, epoch))

        def make(start: int):  # a resume within the epoch decodes from its next batch on
            for b, waves, lengths in feed.batches(train_rows, order[start:]):
                arrays = batch_arrays(train_rows, b, waves, lengths, normalize, fc.task)
                yield jax.device_put(arrays, data)

        return PlanIterator(epoch, make)

    def on_step(state: TrainState, epoch: int, k: int) -> None:
        if kill_at and int(state.step) >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # the resume test's crash
        if progress:
            progress({"kind": "step", "epoch": epoch + 1, "step": k + 1})

    def labels_of(rows: Rows) -> dict[str, np.ndarray]:
        return {"attributes": rows.labels, "category": rows.classes}

    def evaluate(params) -> dict:
        pred = predict_rows(
            predict, params, dev_rows, feed, buckets, eval_rows, sr, data, spec.n_outputs
        )
        return objective.dev_metrics(labels_of(dev_rows), pred)

    def on_start(done: int) -> None:
        if progress:
            progress({"kind": "start", "epochs": tc.epochs, "steps": n_train, "done": done})

    try:
        res = fit(
            state,
            directory=out,
            epochs=tc.epochs,
            train_epoch=host_epoch(step_fn, batches, on_step),
            evaluate=evaluate,
            score_key=score_key,
            sharding=replicated,
            checkpoint_every=tc.checkpoint_every,
            checkpoint_steps=tc.checkpoint_steps,
            on_start=on_start,
            on_epoch=(lambda rec: progress({"kind": "epoch", **rec})) if progress else None,
        )
        best_params = res.best_params
        plot_curves(res.history, out / "curves.png", f"finetune {name}")

        export_hf(spec, jax.device_get(best_params["backbone"]), out / "hf")
        write_head(jax.device_get(best_params), spec, out)
        ccc_by_split, f1_by_split = {}, {}
        (out / "predictions").mkdir(exist_ok=True)
        splits = [tc.dev_split] + [s for s in tc.test_splits if s != tc.dev_split]
        for split in splits:
            if split not in present:
                continue
            rows = usable(corpus_rows(corpus, split), skipped)
            pred = predict_rows(
                predict, best_params, rows, feed, buckets, eval_rows, sr, data, spec.n_outputs
            )
            if category:
                write_category_predictions(out / "predictions" / f"{split}.csv", rows, pred)
                if (rows.classes >= 0).any():
                    m = objective.dev_metrics(labels_of(rows), pred)
                    f1_by_split[split] = {
                        "macro_f1": m["dev_macro_f1"],
                        "accuracy": m["dev_accuracy"],
                    }
                continue
            write_predictions(
                out / "predictions" / f"{split}.csv", rows, objective.outputs(pred)["attributes"]
            )
            if np.isfinite(rows.labels).any():
                m = objective.dev_metrics(labels_of(rows), pred)
                per = {a: m[f"dev_ccc_{a}"] for a in ATTRIBUTES}
                finite = np.isfinite(list(per.values())).any()
                ccc_by_split[split] = {**per, "mean": m["dev_ccc"] if finite else float("nan")}
    finally:
        feed.close()
    skipped.update(feed.failed)
    with open(out / "skipped.csv", "w") as f:
        f.write("path,reason\n")
        f.writelines(f'"{p}","{r}"\n' for p, r in sorted(skipped.items()))
    return mark_complete(
        manifest_path,
        manifest,
        best={"epoch": res.best_epoch, score_key: res.best[score_key]},
        ccc=ccc_by_split,
        **({"f1": f1_by_split} if category else {}),
        skipped=len(skipped),
        steps_per_epoch=n_train,
    )


def finetune_main(cfg: Config, name: str, source: str, out: str | Path) -> dict:
    """`ifmvse finetune`: run with a progress bar, then print the best epoch, CCCs, skipped clips."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = make_console(stderr=True)
    category = cfg.finetune.task == "category"
    metric = "dev macro-F1" if category else "dev CCC"
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "loss {task.fields[loss]}  " + metric + " {task.fields[ccc]}  best {task.fields[best]}"
        ),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        ids: dict[str, Any] = {}
        best = [float("-inf")]

        def progress(e: dict) -> None:
            if e["kind"] == "start":
                ids["epochs"] = bar.add_task(
                    f"finetune {name}", total=e["epochs"], completed=e["done"],
                    loss="-", ccc="-", best="-",
                )  # fmt: skip
                ids["steps"] = bar.add_task("  micro-batches", total=e["steps"], loss="-",
                                            ccc="-", best="-")  # fmt: skip
            elif e["kind"] == "step":
                bar.update(ids["steps"], completed=e["step"])
            else:
                score = e["dev_macro_f1"] if category else e["dev_ccc"]
                best[0] = max(best[0], score)
                bar.update(
                    ids["epochs"], completed=e["epoch"], loss=f"{e['train_loss']:.4f}",
                    ccc=f"{score:.4f}", best=f"{best[0]:.4f}",
                )  # fmt: skip
                bar.reset(ids["steps"])

        manifest = finetune_run(cfg, name, source, out, progress=progress)
    table = Table(title=f"finetune {name} -> {out} (best epoch {manifest['best']['epoch']})")
    table.add_column("split")
    cols, scores = ((*ATTRIBUTES, "mean"), manifest["ccc"])
    if category:
        cols, scores = ("macro_f1", "accuracy"), manifest["f1"]
    for col in cols:
        table.add_column(col, justify="right")
    for split, per in scores.items():
        table.add_row(split, *(f"{per[c]:.4f}" for c in cols))
    stdout = make_console()
    stdout.print(table)
    if manifest["skipped"]:
        lines = (Path(out) / "skipped.csv").read_text().splitlines()[1:]
        shown = ", ".join(line.split(",")[0].strip('"') for line in lines[:20])
        more = f" and {len(lines) - 20} more" if len(lines) > 20 else ""
        stdout.print(f"{len(lines)} clip(s) skipped (unreadable): {shown}{more}; see skipped.csv")
    stdout.print(f"checkpoint: {Path(out) / 'hf'} (use as --backbone NAME={Path(out) / 'hf'})")
    return manifest
