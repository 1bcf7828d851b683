"""The `ifmvse` command line: one click group, one command per pipeline stage."""

from __future__ import annotations

import json
import sys

import click

from jax_ifmvse import __version__


class UserError(click.ClickException):
    """A one-line error for bad input: names the file and the reason."""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ifmvse")
def cli() -> None:
    """IF-MVSE: predict arousal, valence and dominance of speech.

    Pipeline: demo-corpus / extract (pretrained encoders -> HDF5 store) -> train (fusion heads)
    -> ensemble (weights searched on Development) -> evaluate / predict.
    """


@cli.command()
@click.argument("store", type=click.Path(dir_okay=False))
@click.option(
    "--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables."
)
def inspect(store: str, as_json: bool) -> None:
    """Summarise a feature store: splits, labels, and each backbone's health.

    \b
    Example:
      ifmvse inspect runs/demo/store.h5
      ifmvse inspect runs/demo/store.h5 --json | jq .backbones
    """
    from featurestore import StoreError, summarize

    try:
        summary = summarize(store)
    except StoreError as e:
        raise UserError(str(e)) from None
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    from jax_ifmvse.report import print_store_summary

    print_store_summary(summary)


@cli.group()
def store() -> None:
    """Maintain a feature store: merge its journal, upgrade an older layout."""


@store.command("upgrade")
@click.argument("path", type=click.Path(dir_okay=False))
def store_upgrade(path: str) -> None:
    """Rewrite a store made by an older version in the current layout, in place (crash-safe).

    \b
    Example:
      ifmvse store upgrade runs/demo/store.h5
    """
    from featurestore import StoreError, upgrade

    try:
        done = upgrade(path)
    except StoreError as e:
        raise UserError(str(e)) from None
    click.echo(f"{path}: {'upgraded' if done else 'already'} at the current schema version")


@store.command("finalize")
@click.argument("path", type=click.Path(dir_okay=False))
def store_finalize(path: str) -> None:
    """Merge a store's pending journal (what an interrupted `extract` left) into it.

    \b
    Example:
      ifmvse store finalize runs/demo/store.h5
    """
    from featurestore import StoreError, finalize

    try:
        merged = finalize(path)
    except StoreError as e:
        raise UserError(str(e)) from None
    click.echo(f"{path}: merged {merged} journal files")


@cli.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option(
    "--free-weights", is_flag=True, help="Weights free in [0, 1] instead of summing to 1."
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override an ensemble setting (coarse_step, fine_step, fine_radius, simplex, chunk).",
)
def ensemble(run: str, free_weights: bool, overrides: tuple[str, ...]) -> None:
    """Search per-attribute weights of the score sets on Development (paper eq. 7).

    Coarse grid 0..1 step 0.1, then a fine grid step 0.01 around the best, maximising the
    development CCC. Writes RUN/ensemble/: weights.json, <split>.csv (ensembled predictions),
    submission_<split>.csv (challenge format, 1..7) and dev_ccc.png.

    \b
    Examples:
      ifmvse ensemble runs/paper
      ifmvse ensemble runs/paper --free-weights
      ifmvse ensemble runs/paper --set fine_radius=0.05 --set chunk=16384
    """
    from pathlib import Path

    from jax_ifmvse.config import ConfigError, load_config
    from jax_ifmvse.ensemble import EnsembleError, read_manifest, run_ensemble

    try:
        base = read_manifest(Path(run)).get("config", {}).get("ensemble", {}) or {}
        sets = [f"ensemble.{k}={json.dumps(v)}" for k, v in base.items()]
        sets += [o if o.startswith("ensemble.") else f"ensemble.{o}" for o in overrides]
        if free_weights:
            sets.append("ensemble.simplex=false")
        cfg = load_config(None, sets).ensemble
        summary = run_ensemble(run, cfg)
    except (ConfigError, EnsembleError) as e:
        raise UserError(str(e)) from None
    from rich.console import Console
    from rich.table import Table

    names = summary["score_sets"]
    table = Table(title=f"ensemble weights ({summary['mode']}), dev = {summary['dev_split']}")
    table.add_column("attribute")
    for nm in names:
        table.add_column(nm, justify="right")
    table.add_column("dev CCC", justify="right")
    table.add_column("best single", justify="right")
    for attr, fit in summary["attributes"].items():
        if fit["weights"] is None:
            table.add_row(attr, *["-"] * len(names), "-", "-")
            continue
        singles = [v for v in fit["dev_ccc_per_set"].values() if v is not None]
        table.add_row(
            attr,
            *(f"{fit['weights'][nm]:.2f}" for nm in names),
            f"{fit['dev_ccc']:.4f}",
            f"{max(singles):.4f}",
        )
    Console().print(table)
    click.echo(
        f"wrote {Path(run) / 'ensemble'}/ (weights.json, dev_ccc.png, "
        + ", ".join(f"submission_{s}.csv" for s in summary["splits"])
        + ")"
    )


@cli.command()
@click.argument("pred", type=click.Path(dir_okay=False))
@click.option(
    "--labels",
    "labels_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Labels CSV (FileName, EmoAct, EmoVal, EmoDom, Split_Set, ...).",
)
@click.option(
    "--split",
    default="Development",
    show_default=True,
    help="Split_Set rows to score against; '' uses every row.",
)
@click.option("--bootstrap", "n_boot", default=1000, show_default=True, help="Bootstrap resamples.")
@click.option("--seed", default=0, show_default=True, help="Bootstrap seed.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table."
)
def evaluate(
    pred: str, labels_path: str, split: str, n_boot: int, seed: int, as_json: bool
) -> None:
    """CCC per attribute and their mean for a submission CSV, with bootstrap 95% intervals.

    PRED is the challenge CSV `FileName,EmoAct,EmoVal,EmoDom` (1..7). Its ids must be exactly
    the labelled ids of the split (a `.wav` suffix on either side is ignored). CCC uses
    population variances.

    \b
    Examples:
      ifmvse evaluate runs/paper/ensemble/submission_Development.csv \\
          --labels MSP-Podcast/Labels/labels_consensus.csv --split Development
      ifmvse evaluate pred.csv --labels labels_consensus.csv --json | jq .mean.ccc
    """
    from jax_ifmvse.evaluate import EvaluateError, evaluate_files, print_table

    if n_boot < 1:
        raise UserError(f"--bootstrap {n_boot}: must be at least 1")
    try:
        result = evaluate_files(pred, labels_path, split or None, n_boot=n_boot, seed=seed)
    except EvaluateError as e:
        raise UserError(str(e)) from None
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    print_table(result)


@cli.command()
@click.option(
    "--corpus",
    "corpus_dir",
    type=click.Path(file_okay=False),
    help="MSP-Podcast-style corpus root (Labels/labels_consensus.csv, Audios/).",
)
@click.option(
    "--manifest",
    type=click.Path(dir_okay=False),
    help="CSV/TSV manifest: path, split, optional arousal/valence/dominance.",
)
@click.option(
    "--backbone",
    "backbones",
    multiple=True,
    metavar="NAME=SOURCE",
    help="Store name and SOURCE: a local HF folder, a hub id, or whisper-base / whisper-tiny.en. Repeatable.",
)
@click.option(
    "--store",
    required=True,
    type=click.Path(dir_okay=False),
    help="The HDF5 feature store to create or resume.",
)
@click.option(
    "--layers",
    help="Hidden states to keep besides the pooled last one: last (none), all, or indices like 6,12,24.",
)
@click.option(
    "--dtype", type=click.Choice(["float32", "float16"]), help="Storage dtype of the features."
)
@click.option(
    "--compute-dtype",
    type=click.Choice(["float32", "bfloat16"]),
    help="Compute dtype on the device (bfloat16 for GPUs).",
)
@click.option("--batch-seconds", type=float, help="Padded audio seconds per batch.")
@click.option(
    "--max-seconds",
    type=float,
    help="Longer audio is cropped (or chunked, audio.long_audio=chunk).",
)
@click.option("--config", "config_file", help="A configs/*.yaml file or name (e.g. paper, demo).")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Config override, e.g. --set audio.long_audio=chunk.",
)
@click.option(
    "--coordinator", help="Multi-host: coordinator HOST:PORT for jax.distributed.initialize."
)
@click.option(
    "--num-processes",
    type=int,
    default=1,
    show_default=True,
    help="Multi-host: number of processes.",
)
@click.option(
    "--process-id", type=int, default=0, show_default=True, help="Multi-host: this process's index."
)
def extract(
    corpus_dir,
    manifest,
    backbones,
    store,
    layers,
    dtype,
    compute_dtype,
    batch_seconds,
    max_seconds,
    config_file,
    overrides,
    coordinator,
    num_processes,
    process_id,
) -> None:
    """Fill a feature store with pooled embeddings of pretrained speech models.

    Audio is decoded on CPU threads while the device computes, batched by length buckets
    (one compiled program per bucket), data-parallel over every local device. Rerunning the
    same command resumes: only rows neither filled nor recorded as failed are computed.

    \b
    Examples:
      ifmvse extract --corpus MSP-Podcast --backbone wavlm=microsoft/wavlm-large \\
          --backbone whisper=openai/whisper-large-v3 --store msp.h5 --layers all
      ifmvse extract --manifest clips.csv --backbone w=whisper-base --store clips.h5
    """
    from jax_ifmvse.config import ConfigError, load_config

    ov = list(overrides)
    for key, val in (
        ("extract.layers", layers),
        ("extract.dtype", dtype),
        ("extract.compute_dtype", compute_dtype),
        ("extract.batch_seconds", batch_seconds),
        ("audio.max_seconds", max_seconds),
    ):
        if val is not None:
            ov.append(f"{key}={val}")
    if bool(corpus_dir) == bool(manifest):
        raise UserError("give exactly one of --corpus DIR or --manifest FILE")
    if corpus_dir:
        ov.append("corpus.kind=msp")
        ov.append(f"corpus.path={corpus_dir}")
    else:
        ov.append("corpus.kind=manifest")
        ov.append(f"corpus.path={manifest}")
    try:
        cfg = load_config(config_file, ov)
    except ConfigError as e:
        raise UserError(str(e)) from None
    pairs = dict(cfg.extract.backbones)
    for spec in backbones:
        if "=" not in spec:
            raise UserError(f"--backbone {spec!r}: expected NAME=SOURCE")
        name, source = spec.split("=", 1)
        pairs[name] = source
    if backbones:  # explicit --backbone options replace the config's list
        pairs = {k: v for k, v in pairs.items() if any(b.startswith(k + "=") for b in backbones)}
    if not pairs:
        raise UserError(
            "no backbones: give --backbone NAME=SOURCE or a config with extract.backbones"
        )
    from featurestore import StoreError
    from jax_ifmvse.backbones import BadSource
    from jax_ifmvse.data.corpus import CorpusError
    from jax_ifmvse.extract import extract_main

    try:
        extract_main(cfg, pairs, store, coordinator, num_processes, process_id)
    except (StoreError, BadSource, CorpusError, ValueError) as e:
        raise UserError(str(e)) from None


@cli.command("demo-corpus")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--n", "n", default=300, show_default=True, help="Number of utterances.")
@click.option("--seed", default=0, show_default=True, help="Seed: same seed, same corpus.")
def demo_corpus(out: str, n: int, seed: int) -> None:
    """Synthesize the built-in demo corpus (eSpeak NG speech, MSP-Podcast layout) into OUT.

    Labels follow documented rules (arousal from pitch, range, rate and volume; dominance from
    volume and pitch; valence from the sentence's sentiment). Written atomically; an existing
    complete corpus with the same --n and --seed is reused.

    \b
    Example:
      ifmvse demo-corpus runs/demo/corpus --n 300 --seed 0
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from jax_ifmvse.data.demo_corpus import DemoCorpusError, make_demo_corpus
    from jax_ifmvse.data.tts import TTSError

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ) as bar:
        task = bar.add_task("synthesizing", total=n)
        try:
            path = make_demo_corpus(
                out, n=n, seed=seed, progress=lambda i, total: bar.update(task, completed=i)
            )
        except (DemoCorpusError, TTSError, OSError) as e:
            raise UserError(str(e)) from None
        bar.update(task, completed=n)
    click.echo(f"demo corpus: {path} ({n} utterances, seed {seed})")


@cli.command()
@click.option(
    "--store", "store", required=True, type=click.Path(dir_okay=False), help="Feature store (HDF5)."
)
@click.option(
    "--config",
    "config_file",
    default="paper",
    show_default=True,
    help="Config file or name in configs/.",
)
@click.option(
    "--out", "out", required=True, type=click.Path(file_okay=False), help="RUN/ directory to write."
)
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override (repeatable)."
)
def train(store: str, config_file: str, out: str, overrides: tuple[str, ...]) -> None:
    """Train the score-set heads (fusion and MLP) and write RUN/: checkpoints, logs, scores.

    One model per score set and attribute (or per score set with train.multitask=true); an
    interrupted run resumes from each model's latest checkpoint when started again.

    \b
    Example:
      ifmvse train --store runs/demo/store.h5 --config paper --out runs/demo/RUN \\
          --set train.epochs=20 --set train.attributes=[arousal,valence]
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from featurestore import StoreError
    from jax_ifmvse.config import ConfigError, load_config
    from jax_ifmvse.heads import HeadConfigError
    from jax_ifmvse.train import TrainError, train_run

    try:
        cfg = load_config(config_file, overrides)
    except ConfigError as e:
        raise UserError(str(e)) from None
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        "loss {task.fields[loss]}  dev CCC {task.fields[ccc]}  best {task.fields[best]}",
        TimeElapsedColumn(),
    ) as bar:
        tasks: dict[str, tuple[int, float]] = {}

        def on_epoch(rec: dict) -> None:
            name = rec["model"]
            if name not in tasks:
                tid = bar.add_task(name, total=rec["epochs"], loss="-", ccc="-", best="-")
                tasks[name] = (tid, float("-inf"))
            tid, best = tasks[name]
            best = max(best, rec["dev_ccc"])
            tasks[name] = (tid, best)
            bar.update(
                tid,
                completed=rec["epoch"],
                loss=f"{rec['train_loss']:.4f}",
                ccc=f"{rec['dev_ccc']:.4f}",
                best=f"{best:.4f}",
            )

        try:
            manifest = train_run(store, cfg, out, overrides, progress=on_epoch)
        except (ConfigError, StoreError, TrainError, HeadConfigError) as e:
            raise UserError(str(e)) from None
    for s, per in manifest["best"].items():
        line = "  ".join(f"{a} {v['dev_ccc']:.4f} (epoch {v['epoch']})" for a, v in per.items())
        click.echo(f"{s}: {line}")
    click.echo(f"run: {out} (scores for {', '.join(manifest['splits'])})")


@cli.command()
@click.argument("audio", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--run",
    "run",
    required=True,
    type=click.Path(file_okay=False),
    help="A trained and ensembled RUN/ directory.",
)
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False),
    help="Write FILE.csv or FILE.json instead of a table.",
)
def predict(audio: tuple[str, ...], run: str, out: str | None) -> None:
    """Arousal, valence and dominance (1..7) of audio files through a run's backbones, heads and
    ensemble weights. Values are clipped to 1..7, as in the challenge submission file.

    Features are extracted exactly as the run's store recorded them (source, crop length,
    layers, Whisper window, compute dtype), so the numbers equal the batch path's. A file that
    cannot be decoded gets a one-line error; the others are still predicted.

    \b
    Examples:
      ifmvse predict clip1.wav clip2.flac --run runs/demo/run
      ifmvse predict *.wav --run runs/demo/run --out predictions.csv
    """
    from pathlib import Path

    from featurestore import StoreError
    from jax_ifmvse.backbones import BadSource
    from jax_ifmvse.config import ATTRIBUTES, ConfigError
    from jax_ifmvse.predict import PredictError, predict_files, write_predictions
    from jax_ifmvse.train import TrainError

    if out and not out.lower().endswith((".csv", ".json")):
        raise UserError(f"--out {out}: must end in .csv or .json")
    try:
        preds = predict_files(audio, run)
    except (PredictError, ConfigError, StoreError, BadSource, TrainError) as e:
        raise UserError(str(e)) from None
    for p in preds:
        if p.error is not None:
            why = p.error.splitlines()[0] if p.error else "failed"
            named = Path(p.file).name in why  # decode errors already name the file
            click.echo(f"Error: {why}" if named else f"Error: {p.file}: {why}", err=True)
    if out:
        write_predictions(preds, out)
        click.echo(f"wrote {out} ({sum(p.values is not None for p in preds)} files)")
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"predictions ({run})")
        table.add_column("file", overflow="fold")  # whole paths, wrapped
        for a in ATTRIBUTES:
            table.add_column(a, justify="right")
        for p in preds:
            if p.values is not None:
                table.add_row(p.file, *(f"{v:.3f}" for v in p.values))
        Console().print(table)
    if all(p.values is None for p in preds):
        sys.exit(1)


@cli.command()
@click.option(
    "--out",
    default="runs/demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the store, RUN/ and report.",
)
@click.option("--n", "n", type=int, help="Demo corpus size (default 300; 60 with --quick).")
@click.option(
    "--epochs",
    type=int,
    help="Training epochs (default from configs/demo.yaml, 30; 20 with --quick).",
)
@click.option(
    "--quick",
    is_flag=True,
    help="The reduced size CI runs (n=60, 20 epochs; a few minutes on 2 cores).",
)
@click.option("--seed", default=0, show_default=True, help="Demo corpus seed.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override configs/demo.yaml (repeatable).",
)
def demo(
    out: str, n: int | None, epochs: int | None, quick: bool, seed: int, overrides: tuple[str, ...]
) -> None:
    """The whole pipeline on the built-in demo corpus with whisper-base and whisper-tiny.en.

    Demo corpus -> extract -> train five score sets x three attributes -> ensemble on
    Development -> CCC on Test1 per score set and for the ensemble -> OUT/run/report/index.md
    with plots. Resumable: a rerun reuses the corpus, the store and finished training.

    \b
    Examples:
      ifmvse demo
      ifmvse demo --quick --out /tmp/demo
    """
    from featurestore import StoreError
    from jax_ifmvse.backbones import BadSource
    from jax_ifmvse.config import ConfigError
    from jax_ifmvse.data.demo_corpus import DemoCorpusError
    from jax_ifmvse.data.tts import TTSError
    from jax_ifmvse.demo import run_demo
    from jax_ifmvse.ensemble import EnsembleError
    from jax_ifmvse.evaluate import EvaluateError
    from jax_ifmvse.train import TrainError

    command = " ".join(["ifmvse", *sys.argv[1:]]) if sys.argv[1:2] == ["demo"] else "ifmvse demo"
    try:
        run_demo(
            out, n=n, epochs=epochs, quick=quick, seed=seed, overrides=overrides, command=command
        )
    except (
        ConfigError,
        StoreError,
        BadSource,
        DemoCorpusError,
        TTSError,
        TrainError,
        EnsembleError,
        EvaluateError,
    ) as e:
        raise UserError(str(e)) from None


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="ifmvse")


if __name__ == "__main__":
    sys.exit(main())
