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


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="ifmvse")


if __name__ == "__main__":
    sys.exit(main())
