"""The `ifmvse` command line: one click group, one command per pipeline stage.

Each command imports its module inside its function: `ifmvse --help` and a mistyped option then
answer in about 0.1 s instead of the seconds JAX, Flax and transformers take to import.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable

import click

from jax_ifmvse import __version__
from jax_ifmvse.compile_cache import enable_compile_cache
from jax_ifmvse.config import load_config
from jax_ifmvse.errors import IfmvseError, first_line

try:  # click >= 8.3 marks "no default" with a sentinel instead of None
    from click._utils import UNSET
except ImportError:  # pragma: no cover - older click
    UNSET = None


class UserError(click.ClickException):
    """A one-line error for bad input: names the file and the reason."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """What reaches the user as one line: the package's errors, the store's, and OS errors."""
    from featurestore import StoreError

    # OSError: a path that cannot be read or written (its message names the file); anything
    # else, ValueError included, is a bug and keeps its traceback.
    return (IfmvseError, StoreError, OSError)


def _debug_option(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta["ifmvse.debug"] = True


def deprecated(old: str, new: str) -> None:
    """The one-line notice an old spelling gets for one release (on stderr)."""
    click.echo(f"ifmvse: {old} is deprecated and goes in the next release; use {new}", err=True)


def _scheme_defaults(params: list[click.Parameter]) -> None:
    """Apply the naming scheme's mechanics (docs/cli-conventions.md) to a command's options:
    `--set` takes SECTION.KEY=VALUE, a value-taking option without a metavar names what it
    takes (paths: FILE or DIR), and one without a default says so ("[default: (not set)]")."""
    for p in params:
        if not isinstance(p, click.Option) or p.is_flag or p.hidden:
            continue
        if "--set" in p.opts:  # one override syntax on every command
            p.metavar = "SECTION.KEY=VALUE"
        if p.metavar is None and isinstance(p.type, click.Path):
            p.metavar = "FILE" if not p.type.dir_okay else "DIR" if not p.type.file_okay else None
        if p.metavar is None and p.type is click.STRING:
            p.metavar = p.name.upper()
        written = "[default:" in (p.help or "")  # the help text says it already
        if not p.required and p.show_default is None and p.default in (None, UNSET) and not written:
            p.show_default = "not set"


class Command(click.Command):
    """A command with `--debug`, whose user errors become one line (with `--debug`, a traceback).

    `renamed` maps an old option spelling to its new one ("--store": "--out"), and
    `legacy_positional` names the option a former positional argument became: either still
    works for one release, with a one-line deprecation notice.
    """

    def __init__(self, *args, renamed=None, legacy_positional=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.renamed = dict(renamed or {})
        self.legacy_positional = legacy_positional
        _scheme_defaults(self.params)
        self.params.append(
            click.Option(
                ["--debug"],
                is_flag=True,
                expose_value=False,
                is_eager=True,
                callback=_debug_option,
                help="Show the full traceback behind an error.",
            )
        )

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Rewrite old spellings (with their notice) before click parses the new ones."""
        if self.renamed or self.legacy_positional:
            args = self._modernise(list(args))
        return super().parse_args(ctx, args)

    def _modernise(self, args: list[str]) -> list[str]:
        takes_value = {
            o for p in self.params if isinstance(p, click.Option) and not p.is_flag for o in p.opts
        }
        out, i = [], 0
        while i < len(args):
            tok = args[i]
            name, eq, val = tok.partition("=")
            if name in self.renamed:
                deprecated(name, self.renamed[name])
                tok = self.renamed[name] + eq + val
                name = self.renamed[name]
            if tok == "--":
                out.extend(args[i:])
                break
            if tok.startswith("-"):
                out.append(tok)
                if name in takes_value and not eq and i + 1 < len(args):
                    out.append(args[i + 1])
                    i += 1
            elif self.legacy_positional:
                deprecated(f"the positional {tok!r}", f"{self.legacy_positional} {tok}")
                out.extend([self.legacy_positional, tok])
            else:
                out.append(tok)
            i += 1
        return out

    def invoke(self, ctx: click.Context):
        """Run the command; the one place where user errors turn into one-line messages."""
        try:
            return super().invoke(ctx)
        except _user_errors() as e:
            if ctx.meta.get("ifmvse.debug"):
                raise
            raise UserError(first_line(e)) from None


class Group(click.Group):
    """The `ifmvse` group: its commands and subgroups are `Command`s and `Group`s."""

    command_class = Command


Group.group_class = Group


def _removed_option(flag: str, takes_value: bool):
    """A hidden option for a flag of the removed multi-host exchange: one line naming the new form."""

    def refuse(ctx: click.Context, _param: click.Parameter, value) -> None:
        if value not in (None, False):
            raise RemovedOption(
                f"{flag} was removed: shards never talk to each other now; run every shard with"
                " --shard K/N (or --shard auto under SLURM, Kubernetes or Open MPI), then"
                " `ifmvse store finalize STORE`, or use --shards N --engine ray"
            )

    return click.option(
        flag,
        hidden=True,
        expose_value=False,
        is_flag=not takes_value,
        callback=refuse,
    )


class RemovedOption(click.UsageError):
    """A removed flag: the one line that says what replaced it (no usage text around it)."""

    def show(self, file=None) -> None:
        click.echo(f"Error: {self.format_message()}", err=True)


# `predict` and `serve` take the same run.
RUN_OPTION = click.option(
    "--run",
    "run",
    required=True,
    type=click.Path(file_okay=False),
    metavar="RUN",
    help="A trained and ensembled RUN/ directory (from `ifmvse train` and `ifmvse ensemble`).",
)


def _built_in(section: str, key: str) -> str:
    """`show_default` text of an option whose default is the config's: the built-in value."""
    return f"--config's {section}.{key}; built-in {getattr(getattr(load_config(), section), key)}"


SET_HELP = "Config override (repeatable), e.g. --set "


@click.group(
    cls=Group,
    context_settings={
        "help_option_names": ["-h", "--help"],
        "max_content_width": 100,
        "show_default": True,  # the scheme: every --help shows every default
    },
)
@click.version_option(__version__, prog_name="ifmvse")
@click.option(
    "--no-compile-cache",
    is_flag=True,
    help="Compile every program anew: no on-disk XLA cache (same as IFMVSE_COMPILE_CACHE=off).",
)
def cli(no_compile_cache: bool) -> None:
    """IF-MVSE: predict arousal, valence and dominance of speech.

    Pipeline: demo-corpus / extract (pretrained encoders -> HDF5 store) -> train (fusion heads)
    -> ensemble (weights searched on Development) -> evaluate / predict / serve.

    Compiled programs are kept in $IFMVSE_CACHE/xla (IFMVSE_COMPILE_CACHE=DIR moves it), so a
    second run of a command starts warm. Naming scheme of every command: docs/cli-conventions.md.

    \b
    Example:
      ifmvse demo --quick --out runs/demo
      ifmvse predict clip.wav --run runs/demo/run
    """
    if no_compile_cache:
        os.environ["IFMVSE_COMPILE_CACHE"] = "off"  # subprocesses (the demo's) inherit it


def _compile_cache() -> None:
    """Turn on JAX's on-disk compilation cache for this command (see compile_cache.py)."""
    enable_compile_cache()


@cli.command()
@click.argument("store", type=click.Path(dir_okay=False), metavar="STORE")
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
    from featurestore import summarize

    summary = summarize(store)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    from jax_ifmvse.report import print_store_summary

    print_store_summary(summary)


@cli.group()
def store() -> None:
    """Maintain a feature store: merge its journal, upgrade an older layout.

    \b
    Examples:
      ifmvse store finalize /shared/clips.h5
      ifmvse store upgrade runs/demo/store.h5
    """


@store.command("upgrade")
@click.argument("path", type=click.Path(dir_okay=False), metavar="STORE")
@click.option(
    "--labels",
    "labels",
    type=click.Path(dir_okay=False),
    default=None,
    help="labels_consensus.csv to take EmoClass and Gender from (default: the recorded corpus's).",
)
def store_upgrade(path: str, labels: str | None) -> None:
    """Rewrite a store made by an older version in the current layout, in place (crash-safe).

    A store made before task 1 support also gets the EmoClass and Gender of every row, from
    --labels or from the corpus the store records (<root>/Labels/labels_consensus.csv).

    \b
    Example:
      ifmvse store upgrade runs/demo/store.h5
      ifmvse store upgrade runs/msp/store.h5 --labels MSP-PODCAST/Labels/labels_consensus.csv
    """
    from featurestore import FeatureStore, upgrade
    from jax_ifmvse.categories import add_store_codes, default_label_file

    done = upgrade(path)
    click.echo(f"{path}: {'upgraded' if done else 'already'} at the current schema version")
    st = FeatureStore(path)
    if labels is None and "EmoClass" in st.codes:
        return
    if labels is None and default_label_file(st) is None:
        click.echo(
            f"{path}: no EmoClass labels and no label file at the recorded corpus root;"
            " pass --labels to add them (task 1 needs them)",
            err=True,
        )
        return
    counts = add_store_codes(path, labels)
    shown = ", ".join(f"{k or 'empty'} {v}" for k, v in sorted(counts.items()))
    click.echo(f"{path}: EmoClass and Gender labels written ({shown})")


@cli.command()
@click.argument("run", type=click.Path(file_okay=False), metavar="RUN")
@click.option(
    "--free-weights", is_flag=True, help="Weights free in [0, 1] instead of summing to 1."
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help=SET_HELP + "ensemble.fine_radius=0.05 (ensemble.coarse_step, fine_step, fine_radius,"
    " simplex, chunk; on top of the run's config).",
)
def ensemble(run: str, free_weights: bool, overrides: tuple[str, ...]) -> None:
    """Search per-attribute weights of the score sets on Development (paper eq. 7).

    Coarse grid 0..1 step 0.1, then a fine grid step 0.01 around the best, maximising the
    development CCC. Writes RUN/ensemble/: weights.json, <split>.csv (ensembled predictions),
    submission_<split>.csv (challenge format, 1..7, one row per utterance in file-name order),
    fallbacks_<split>.csv (rows scored without some score set, and how) and dev_ccc.png.

    \b
    Examples:
      ifmvse ensemble runs/paper
      ifmvse ensemble runs/paper --free-weights
      ifmvse ensemble runs/paper --set ensemble.fine_radius=0.05 --set ensemble.chunk=16384
    """
    from pathlib import Path

    from jax_ifmvse.ensemble.run import run_ensemble
    from jax_ifmvse.trainer.rundir import read_finished

    given = []
    for o in overrides:
        if not o.startswith("ensemble."):  # the bare keys of earlier releases
            deprecated(f"--set {o}", f"--set ensemble.{o}")
            o = f"ensemble.{o}"
        given.append(o)
    _compile_cache()
    base = read_finished(run, "manifest.json", "train").get("config", {}).get("ensemble", {}) or {}
    sets = [f"ensemble.{k}={json.dumps(v)}" for k, v in base.items()] + given
    if free_weights:
        sets.append("ensemble.simplex=false")
    cfg = load_config(None, sets).ensemble
    summary = run_ensemble(run, cfg)
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
    cat = summary.get("category")
    if cat is not None:  # task 1: the columns are dev macro-F1, not CCC
        singles = [v for v in cat["dev_macro_f1_per_set"].values() if v is not None]
        table.add_row(
            "category (macro-F1)",
            *(f"{cat['weights'][nm]:.2f}" for nm in names),
            f"{cat['dev_macro_f1']:.4f}",
            f"{max(singles):.4f}",
        )
    Console().print(table)
    click.echo(
        f"wrote {Path(run) / 'ensemble'}/ (weights.json, "
        + ("dev_ccc.png, " if summary["attributes"] else "")
        + ", ".join(
            [f"submission_{s}.csv" for s in summary["splits"]]
            + [f"submission_cat_{s}.csv" for s in (cat or {}).get("splits", {})]
        )
        + ")"
    )
    for attr in summary.get("unweighted", []):
        click.echo(
            f"note: {attr} has no ensemble weights ({summary['attributes'][attr]['n_dev']} usable"
            f" {summary['dev_split']} rows); every row takes its best set on development, else"
            " the Train label mean (see fallbacks_<split>.csv)",
            err=True,
        )
    for split, n in summary["splits"].items():
        fb = summary["fallbacks"][split]
        line = f"{split}: {n} rows, {fb['rows']} fallback(s)"
        if fb["rows"]:
            line += (
                f" ({fb['renormalised']} renormalised weights, {fb['best_set']} best available"
                f" set, {fb['label_mean']} Train label mean; see fallbacks_{split}.csv)"
            )
        click.echo(line)


@cli.command()
@click.argument("pred", type=click.Path(dir_okay=False), metavar="PRED")
@click.option(
    "--labels",
    "labels_path",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="FILE",
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

    A task 1 submission (`FileName,EmoClass`, one of A S H U F D C N per file of the split) is
    scored by macro-F1 (the official metric), accuracy, per-class F1 and the confusion matrix;
    rows the labels code X, O or leave empty are not scored.

    \b
    Examples:
      ifmvse evaluate runs/paper/ensemble/submission_Development.csv \\
          --labels MSP-Podcast/Labels/labels_consensus.csv --split Development
      ifmvse evaluate pred.csv --labels labels_consensus.csv --json | jq .mean.ccc
      ifmvse evaluate runs/cat/ensemble/submission_cat_Development.csv \\
          --labels labels_consensus.csv --json | jq .macro_f1
    """
    from jax_ifmvse.evaluate import evaluate_files, print_table

    if n_boot < 1:
        raise UserError(f"--bootstrap {n_boot}: must be at least 1")
    result = evaluate_files(pred, labels_path, split or None, n_boot=n_boot, seed=seed)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    print_table(result)


def shard_options(command: Callable) -> Callable:
    """`--shard K/N|auto` and `--shards N`, the same for extract and transcribe (whose shard K
    holds the rows extraction's shard K has)."""
    command = click.option(
        "--shards",
        type=click.IntRange(min=1),
        help="Number of shards: with --shard auto (a Kubernetes Indexed Job; in a SLURM array the"
        " task ids are then the shard numbers), or extract's --engine ray.",
    )(command)
    return click.option(
        "--shard",
        metavar="K/N|auto",
        help="Compute shard K of N (a pure function of the corpus), then exit; auto reads"
        " SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX, SLURM_PROCID or OMPI_COMM_WORLD_RANK."
        " Then `ifmvse store finalize STORE`.",
    )(command)


@cli.command(renamed={"--store": "--out"})
@click.option(
    "--corpus",
    "corpus_dir",
    type=click.Path(file_okay=False),
    metavar="DIR",
    show_default="none: give --corpus or --manifest",
    help="MSP-Podcast-style corpus root (Labels/labels_consensus.csv, Audios/).",
)
@click.option(
    "--manifest",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    show_default="none: give --corpus or --manifest",
    help="CSV/TSV manifest: path, split, optional arousal/valence/dominance.",
)
@click.option(
    "--audio-root",
    type=click.Path(file_okay=False),
    metavar="DIR",
    show_default="the manifest's folder",
    help="With --manifest: the folder its (relative or absolute) paths must lie in.",
)
@click.option(
    "--backbone",
    "backbones",
    multiple=True,
    metavar="NAME=SOURCE",
    show_default="--config's extract.backbones",
    help="Store name and SOURCE: a local HF folder, a hub id, or whisper-base / whisper-tiny.en. Repeatable.",
)
@click.option(
    "--out",
    "store",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="STORE",
    help="The HDF5 feature store to create or resume (was --store).",
)
@click.option(
    "--layers",
    metavar="LAYERS",
    show_default=_built_in("extract", "layers"),
    help="Hidden states to keep besides the pooled last one: last (none), all, or indices like 6,12,24.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    show_default=_built_in("extract", "dtype"),
    help="Storage dtype of the features.",
)
@click.option(
    "--compute-dtype",
    type=click.Choice(["float32", "bfloat16"]),
    show_default=_built_in("extract", "compute_dtype"),
    help="Compute dtype on the device (bfloat16 for GPUs).",
)
@click.option(
    "--batch-seconds",
    type=float,
    show_default=_built_in("extract", "batch_seconds"),
    help="Padded audio seconds per batch.",
)
@click.option(
    "--frames",
    "frames",
    metavar="LAYER",
    help="Also store frame-level features of one hidden state (last or an index), float16,"
    " for heads with model.pooling=attentive (prints their size first).",
)
@click.option(
    "--max-seconds",
    type=float,
    show_default=_built_in("audio", "max_seconds"),
    help="Longer audio is cropped (or chunked, audio.long_audio=chunk).",
)
@click.option(
    "--config",
    "config_file",
    metavar="NAME|FILE",
    show_default="built-in defaults",
    help="A configs/*.yaml file or name (e.g. paper, demo).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help=SET_HELP + "audio.long_audio=chunk.",
)
@shard_options
@click.option(
    "--engine",
    type=click.Choice(["process", "ray"]),
    default="process",
    show_default=True,
    help="ray: run the --shards N shards as Ray tasks (retried) and finalize.",
)
@click.option(
    "--ray-cpus",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="C",
    help="--engine ray: CPUs per shard [default: a node's cores over the shards it runs at once"
    " (its GPUs; one on CPU nodes, whose JAX uses every core)].",
)
@click.option(
    "--ray-gpus",
    type=click.FloatRange(min=0),
    default=None,
    metavar="G",
    help="--engine ray: GPUs per shard [default: 1 when the cluster has GPUs, else 0].",
)
@click.option(
    "--ray-memory-gb",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="GB",
    help="--engine ray: memory reserved per shard (Ray's `memory`) [default: none reserved].",
)
@click.option(
    "--retry-failed",
    "retry_failed",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[REASON]",
    help="Also recompute rows recorded as failed: all, or those whose reason contains REASON"
    " (e.g. 'not audio'). Without it a rerun computes only missing rows.",
)
@_removed_option("--coordinator", True)
@_removed_option("--num-processes", True)
@_removed_option("--process-id", True)
@_removed_option("--distributed", False)
@_removed_option("--peer-timeout", True)
def extract(
    corpus_dir,
    manifest,
    audio_root,
    backbones,
    store,
    layers,
    dtype,
    compute_dtype,
    batch_seconds,
    frames,
    max_seconds,
    config_file,
    overrides,
    shard,
    shards,
    engine,
    ray_cpus,
    ray_gpus,
    ray_memory_gb,
    retry_failed,
) -> None:
    """Fill a feature store with pooled embeddings of pretrained speech models.

    Audio is decoded on CPU threads while the device computes, batched by length buckets
    (one compiled program per bucket), data-parallel over every local device. Rerunning the
    same command resumes: only rows neither filled nor recorded as failed are computed. A file
    that is not audio is a recorded failure (recompute with --retry-failed); one that cannot be
    read (I/O error) is retried with backoff and, if that fails, left missing: the command
    exits non-zero and a rerun computes it.

    \b
    Examples:
      ifmvse extract --corpus MSP-Podcast --backbone wavlm=microsoft/wavlm-large \\
          --backbone whisper=openai/whisper-large-v3 --out msp.h5 --layers all
      ifmvse extract --manifest clips.csv --backbone w=whisper-base --out clips.h5
      # many hosts sharing the store's filesystem: shard K of 16 each, then one finalize
      ifmvse extract --manifest clips.csv --backbone w=whisper-base --out /shared/clips.h5 \\
          --shard 3/16          # or --shard auto in a SLURM array / Kubernetes Indexed Job
      ifmvse store finalize /shared/clips.h5 --require-complete
      ifmvse extract ... --shards 8 --engine ray   # Ray tasks (RAY_ADDRESS: a cluster)
    """
    ov = list(overrides)
    for key, val in (
        ("extract.layers", layers),
        ("extract.dtype", dtype),
        ("extract.compute_dtype", compute_dtype),
        ("extract.batch_seconds", batch_seconds),
        ("extract.frames", frames),
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
    if audio_root:
        if not manifest:
            raise UserError("--audio-root goes with --manifest (MSP-Podcast audio is in Audios/)")
        ov.append(f"corpus.audio_root={audio_root}")
    cfg = load_config(config_file, ov, command="extract")
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
    from jax_ifmvse.extract import extract_main

    if engine == "ray":
        if shard is not None or shards is None:
            raise UserError("--engine ray runs the shards itself: give --shards N, not --shard")
        from jax_ifmvse.ray_engine import ShardResources, run_ray

        res = ShardResources(ray_cpus, ray_gpus, ray_memory_gb)
        ran = run_ray(
            cfg, pairs, store, shards, resources=res, retry_failed=retry_failed,
            report=lambda line: click.echo(line, err=True),
        )  # fmt: skip
        for k, stats in sorted(ran.items()):
            done = ", ".join(f"{name} {st.done}" for name, st in stats.items())
            click.echo(f"shard {k}/{shards}: rows computed by its last attempt: {done}")
        click.echo(f"{store}: {shards} Ray shards done and finalized")
        return
    where = None
    if shard is not None:
        from featurestore.jobs import parse_shard

        where = parse_shard(shard, shards)
    elif shards is not None:
        raise UserError("--shards N goes with --engine ray or --shard auto; one shard: --shard K/N")
    if any(x is not None for x in (ray_cpus, ray_gpus, ray_memory_gb)):
        raise UserError("--ray-cpus, --ray-gpus and --ray-memory-gb go with --engine ray")
    _compile_cache()
    extract_main(cfg, pairs, store, shard=where, retry_failed=retry_failed)


@store.command("finalize")
@click.argument("path", type=click.Path(dir_okay=False), metavar="STORE")
@click.option(
    "--require-complete",
    is_flag=True,
    help="Exit non-zero (one line: per backbone the missing rows and frames, per transcript set"
    " the missing rows, their shards, and failed rows past --allow-failed) unless complete.",
)
@click.option(
    "--allow-failed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="N",
    help="With --require-complete: accept up to N rows per backbone (and per transcript set)"
    " recorded as failed.",
)
def store_finalize(path: str, require_complete: bool, allow_failed: int) -> None:
    """Merge what every shard wrote into STORE and report, per backbone, rows done, failed (the
    most common reasons), missing (by shard) and rows without frames; per transcript set
    (`ifmvse transcribe`), rows done (flagged ones by flag), failed and missing (by shard).

    Run it once the shards of a job are done (a SLURM job with --dependency=afterany, a
    Kubernetes Job after the Indexed Job); safe at any time, also while shards still write (it
    takes the store's lock; later journal files are merged by the next finalize). Derives the
    job's layer views; a job with no missing rows or frames is retired, so a new job may use
    the store.

    \b
    Example:
      ifmvse store finalize /shared/clips.h5 --require-complete --allow-failed 10
    """
    from pathlib import Path

    from featurestore.jobs import (
        incomplete,
        missing_line,
        report_lines,
        transcript_lines,
        transcripts_report,
    )
    from jax_ifmvse.extract import finalize_job

    if not Path(path).is_file():
        raise UserError(f"{path}: no such store")
    merged, report, job = finalize_job(path)
    texts = transcripts_report(path, job)
    n = None if job is None else job.get("num_shards")
    if require_complete and incomplete(report, allow_failed, texts):
        raise UserError(missing_line(path, report, n, allow_failed, texts))
    click.echo(f"{path}: merged {merged} journal files")
    for line in [*report_lines(report, n), *transcript_lines(texts)]:
        click.echo(f"  {line}")


def _print_left_out(store: str, cfg) -> None:
    """Per split, the rows training leaves out (a view failed, not extracted, no frames)."""
    from pathlib import Path

    from featurestore.summary import left_out, left_out_lines

    if not Path(store).is_file():
        return  # train's own check says so in one line
    views = sorted({v for ss in cfg.model.score_sets for v in ss.views})
    report = left_out(store, views, frames=cfg.model.pooling == "attentive")
    for line in left_out_lines(report):
        click.echo(f"{store}: {line}", err=True)


@cli.command("demo-corpus", legacy_positional="--out")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Folder to write the corpus to (was a positional OUT).",
)
@click.option("--n", "n", default=300, show_default=True, help="Number of utterances.")
@click.option("--seed", default=0, show_default=True, help="Seed: same seed, same corpus.")
def demo_corpus(out: str, n: int, seed: int) -> None:
    """Synthesize the built-in demo corpus (eSpeak NG speech, MSP-Podcast layout) into --out DIR.

    Labels follow documented rules (arousal from pitch, range, rate and volume; dominance from
    volume and pitch; valence from the sentence's sentiment). Written atomically; an existing
    complete corpus with the same --n and --seed is reused.

    \b
    Example:
      ifmvse demo-corpus --out runs/demo/corpus --n 300 --seed 0
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from jax_ifmvse.data.demo_corpus import make_demo_corpus

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ) as bar:
        task = bar.add_task("synthesizing", total=n)
        path = make_demo_corpus(
            out, n=n, seed=seed, progress=lambda i, total: bar.update(task, completed=i)
        )
        bar.update(task, completed=n)
    click.echo(f"demo corpus: {path} ({n} utterances, seed {seed})")


@cli.command()
@click.option(
    "--store",
    "store",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="STORE",
    help="Feature store (HDF5) from `ifmvse extract`.",
)
@click.option(
    "--config",
    "config_file",
    default="paper",
    show_default=True,
    metavar="NAME|FILE",
    help="Config file or name in configs/.",
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    metavar="RUN",
    help="RUN/ directory to write.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help=SET_HELP + "train.epochs=20.",
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

    from jax_ifmvse.train import train_run

    _compile_cache()
    cfg = load_config(config_file, overrides, command="train")
    _print_left_out(store, cfg)
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
            score = rec.get("dev_score", rec.get("dev_ccc"))  # task 1 / joint: dev_score
            best = max(best, score)
            tasks[name] = (tid, best)
            bar.update(
                tid,
                completed=rec["epoch"],
                loss=f"{rec['train_loss']:.4f}",
                ccc=f"{score:.4f}",
                best=f"{best:.4f}",
            )

        manifest = train_run(store, cfg, out, overrides, progress=on_epoch)
    for s, per in manifest["best"].items():
        line = "  ".join(
            f"{a} {v['dev_ccc']:.4f} (epoch {v['epoch']})"
            if "dev_ccc" in v
            else f"{a} macro-F1 {v['dev_macro_f1']:.4f} (epoch {v['epoch']})"
            for a, v in per.items()
        )
        click.echo(f"{s}: {line}")
    for split in manifest.get("skipped_splits", []):
        click.echo(f"note: test split {split} is not in the store; skipped", err=True)
    click.echo(f"run: {out} (scores for {', '.join(manifest['splits'])})")


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
    help="CSV/TSV manifest: path, split, arousal/valence/dominance.",
)
@click.option(
    "--backbone",
    "backbone",
    required=True,
    metavar="NAME=SOURCE",
    help="The backbone to fine-tune: a local HF folder, a hub id, or whisper-tiny.en / whisper-base.",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="RUN/ directory (resumed)."
)
@click.option(
    "--config",
    "config_file",
    default="finetune",
    show_default=True,
    help="Config file or name in configs/.",
)
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override (repeatable)."
)
@click.option(
    "--compute-dtype",
    type=click.Choice(["float32", "bfloat16"]),
    help="Backbone compute dtype (master weights stay float32) [default: the config's].",
)
@click.option(
    "--remat/--no-remat",
    default=None,
    help="Gradient checkpointing per transformer layer [default: the config's].",
)
def finetune(
    corpus_dir, manifest, backbone, out, config_file, overrides, compute_dtype, remat
) -> None:
    """Fine-tune a backbone end to end (the challenge baseline's recipe) and export it.

    Backbone -> attentive statistics pooling -> regression head, loss sum of 1 - CCC, AdamW
    with gradient accumulation, CNN feature encoder frozen (configs/finetune.yaml). Writes
    RUN/: checkpoints (a rerun resumes), metrics.jsonl, curves.png, predictions/, hf/ (a
    transformers checkpoint folder: use it as --backbone NAME=RUN/hf in `ifmvse extract`) and
    head.safetensors.

    \b
    Examples:
      ifmvse finetune --corpus MSP-Podcast --backbone wavlm=microsoft/wavlm-large \\
          --out runs/ft-wavlm --compute-dtype bfloat16 --remat
      ifmvse finetune --manifest clips.csv --backbone tiny=whisper-tiny.en --out runs/ft \\
          --set train.epochs=3
    """
    from jax_ifmvse.finetune.run import finetune_main

    if bool(corpus_dir) == bool(manifest):
        raise UserError("give exactly one of --corpus DIR or --manifest FILE")
    if "=" not in backbone:
        raise UserError(f"--backbone {backbone!r}: expected NAME=SOURCE")
    name, source = backbone.split("=", 1)
    ov = [
        f"corpus.kind={'msp' if corpus_dir else 'manifest'}",
        f"corpus.path={corpus_dir or manifest}",
        *overrides,
    ]
    if compute_dtype is not None:
        ov.append(f"finetune.compute_dtype={compute_dtype}")
    if remat is not None:
        ov.append(f"finetune.remat={str(remat).lower()}")
    _compile_cache()
    finetune_main(load_config(config_file, ov, command="finetune"), name, source, out)


@cli.command()
@click.argument(
    "audio", nargs=-1, required=True, type=click.Path(), metavar="AUDIO..."
)  # checked below: a missing path or a folder is one line, before anything loads
@RUN_OPTION
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    show_default="a table on stdout",
    help="Write FILE.csv or FILE.json (every file; a failed one with empty scores and its error).",
)
@click.option(
    "--fallback",
    type=click.Choice(["none", "label-mean"]),
    default="none",
    help="What a file nothing could be heard of gets: no scores, or the run's Train label mean"
    " (marked in the fallback column; the command still exits 1).",
)
@click.option(
    "--segments",
    type=click.Choice(["fixed", "vad"]),
    default=None,
    show_default="one row per file",
    help="One row per segment of each file: fixed windows, or speech regions from the WebRTC"
    " VAD (cut to the window); --out then ends in .csv or .jsonl (else JSON Lines on stdout)"
    " and per-file summaries go to OUT.summary.json.",
)
@click.option(
    "--window-s",
    type=float,
    default=None,
    show_default="the run's shortest backbone input, at most 6 s",
    help="Segment length in seconds (--segments).",
)
@click.option(
    "--hop-s",
    type=float,
    default=None,
    show_default="the window (no overlap)",
    help="Seconds between segment starts (--segments fixed); at most the window.",
)
@click.option(
    "--vad-level",
    type=click.IntRange(0, 3),
    default=2,
    help="WebRTC VAD aggressiveness, 0 keeps the most audio as speech (--segments vad).",
)
@click.option(
    "--plots",
    type=click.Path(file_okay=False),
    metavar="DIR",
    default=None,
    show_default="none",
    help="Write DIR/<file>.timeline.png per file: attributes over time, class as a band"
    " (--segments).",
)
@click.option(
    "--transcripts",
    "transcripts",
    type=click.Path(exists=True),
    metavar="FILE|DIR",
    default=None,
    show_default="Whisper runs transcribe",
    help="The clips' texts (CSV with file and text columns, or a folder of <stem>.txt) for a"
    " run whose text views embed the corpus' own transcripts.",
)
def predict(
    audio: tuple[str, ...],
    run: str,
    out: str | None,
    fallback: str,
    segments: str | None,
    window_s: float | None,
    hop_s: float | None,
    vad_level: int,
    plots: str | None,
    transcripts: str | None,
) -> None:
    """Arousal, valence and dominance (1..7) of AUDIO files through a run's backbones, heads and
    ensemble weights. Values are clipped to 1..7, as in the challenge submission file.

    Features are extracted exactly as the run's store recorded them (source, crop or chunk
    length, waveform normalisation, layers, Whisper window, compute dtype), so the numbers equal
    the batch path's and `ifmvse serve`'s. Each row says what was done to the clip (duration_s;
    flags: cropped, chunked, short, silent, resampled from N Hz). A file that is empty, not
    audio, truncated or cannot be decoded gets empty score cells and its reason in the `error`
    column, the other files are scored, and the command exits 1 after writing everything it
    could. A missing path or a folder is refused before any model loads. The run's training
    corpus is named on stderr (with a warning for the synthetic demo corpus).

    A run with text views transcribes each clip with the Whisper its store recorded (same
    checkpoint, language setting, first 30 s) and embeds the transcript with the same encoder
    settings; the transcript and its flags come beside the scores (columns transcript,
    transcript_flags, transcript_language). A run trained on the corpus' own transcripts needs
    --transcripts for the new clips.

    \b
    Examples:
      ifmvse predict clip1.wav clip2.flac --run runs/demo/run
      ifmvse predict *.wav --run runs/demo/run --out predictions.csv
      ifmvse predict *.wav --run runs/demo/run --out p.json --fallback label-mean
      ifmvse predict episode.flac --run runs/demo/run --segments fixed --out seg.csv --plots png/
      ifmvse predict call.wav --run runs/demo/run --segments vad --out seg.jsonl

    With --segments, a long file is decoded as a stream and scored in batches of segments
    (host memory independent of its length); each segment scores as the same span cut out as
    a file. Rows: file, index, start_s, end_s, the three attributes, flags (silent: no scores;
    short; clipped), error, and class with probabilities for task 1 runs. A file that could
    not be read, or whose decoding stopped early (the segments before are kept; the summary's
    error says where), makes the command exit 1.
    """
    from pathlib import Path

    for f in audio:  # before any model loads
        if not Path(f).expanduser().exists():
            raise UserError(f"{f}: no such file")
        if not Path(f).expanduser().is_file():
            raise UserError(f"{f}: not a file (give the audio files, e.g. DIR/*.wav)")
    if segments is not None:
        if transcripts is not None:
            raise UserError("--transcripts: not with --segments (a segment has no transcript)")
        _predict_segments(audio, run, out, segments, window_s, hop_s, vad_level, plots, fallback)
        return
    if window_s is not None or hop_s is not None or plots is not None:
        raise UserError("--window-s, --hop-s and --plots need --segments")
    if out and not out.lower().endswith((".csv", ".json")):
        raise UserError(f"--out {out}: must end in .csv or .json")
    from jax_ifmvse.inference import run_manifest
    from jax_ifmvse.predict import predict_files, predictions_table, write_predictions
    from jax_ifmvse.provenance import demo_warning, describe, run_corpus

    record = run_corpus(run_manifest(Path(run)))
    _compile_cache()
    preds = predict_files(audio, run, fallback=fallback, transcripts=transcripts)
    click.echo(f"{run}: trained on corpus {describe(record)}", err=True)
    if note := demo_warning(record, run):
        click.echo(note, err=True)
    for p in preds:
        if p.failed:
            given = f"; given the {p.fallback}" if p.fallback else ""
            click.echo(f"Error: {p.file}: {p.error}{given}", err=True)
        elif p.note:
            click.echo(f"note: {p.file}: {p.note}; scored from {p.fallback}", err=True)
    if out:
        write_predictions(preds, out)
        click.echo(f"wrote {out} ({len(preds)} rows)")
    else:
        from rich.console import Console

        console = Console()
        console.print(predictions_table(preds, f"predictions ({run})", console.width))
    failed = sum(p.failed for p in preds)
    line = f"{len(preds) - failed} of {len(preds)} file(s) scored"
    if failed:
        line += f", {failed} failed (see the error column)"
        n_mean = sum(p.failed and p.values is not None for p in preds)
        if n_mean:
            line += f", {n_mean} given the Train label mean"
    click.echo(line, err=True)
    if failed:
        sys.exit(1)  # a batch script must not take a failed file for a measurement


def _predict_segments(audio, run, out, mode, window_s, hop_s, vad_level, plots, fallback):
    """`predict --segments`: rows per segment, summaries, plots; exit 1 when a file failed."""
    from pathlib import Path

    if out and not out.lower().endswith((".csv", ".jsonl")):
        raise UserError(f"--out {out}: with --segments must end in .csv or .jsonl")
    if fallback != "none":
        raise UserError("--fallback label-mean: not with --segments (a segment is never given"
                        " a score it was not heard to have)")  # fmt: skip
    from jax_ifmvse.inference import run_manifest
    from jax_ifmvse.predict import predict_segments
    from jax_ifmvse.provenance import demo_warning, describe, run_corpus
    from jax_ifmvse.timeline import Segmentation

    record = run_corpus(run_manifest(Path(run)))
    _compile_cache()
    seg = Segmentation(mode, window_s, hop_s, vad_level)
    click.echo(f"{run}: trained on corpus {describe(record)}", err=True)
    if note := demo_warning(record, run):
        click.echo(note, err=True)
    summaries = predict_segments(
        audio, run, seg, out=out, plots=plots, echo=lambda m: click.echo(m, err=True)
    )
    failed = [s for s in summaries if s["error"]]
    for s in failed:
        kept = f"; {s['segments']} segment(s) before it kept" if s["segments"] else ""
        click.echo(f"Error: {s['file']}: {s['error']}{kept}", err=True)
    total = sum(s["segments"] for s in summaries)
    line = f"{len(summaries) - len(failed)} of {len(summaries)} file(s) read to the end,"
    line += f" {total} segment(s)"
    silent = sum(s["flagged"]["silent"] for s in summaries)
    if silent:
        line += f" ({silent} silent: no scores)"
    click.echo(line, err=True)
    if failed:
        sys.exit(1)  # a batch script must not take a partial timeline for a whole one


@cli.command()
@RUN_OPTION
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, help="Port to listen on.")
@click.option("--max-upload-mb", default=20.0, show_default=True, help="Largest request body.")
@click.option(
    "--max-audio-s", default=300.0, show_default=True, help="Longest file accepted (seconds)."
)
@click.option("--timeout-s", default=30.0, show_default=True, help="Per-request time limit.")
@click.option("--queue", default=64, show_default=True, help="Requests waiting before 503.")
@click.option(
    "--window-ms", default=5.0, show_default=True, help="Wait for more requests to batch."
)
@click.option("--max-clips", default=8, show_default=True, help="Files per batch.")
@click.option(
    "--max-timeline-mb", default=512.0, show_default=True, help="Largest POST /segments body."
)
@click.option(
    "--max-timeline-s",
    default=3600.0,
    show_default=True,
    help="Longest recording POST /segments accepts (seconds).",
)
def serve(
    run: str,
    host: str,
    port: int,
    max_upload_mb: float,
    max_audio_s: float,
    timeout_s: float,
    queue: int,
    window_ms: float,
    max_clips: int,
    max_timeline_mb: float,
    max_timeline_s: float,
) -> None:
    """Serve a run over HTTP: backbones, heads and weights loaded and compiled once.

    POST /predict with an audio file as the body (audio/*, application/octet-stream) or one
    or more files as multipart/form-data -> JSON per file: arousal, valence, dominance (1..7,
    clipped), duration_s, flags, fallback, error (null), the rows `predict --out FILE.json`
    writes; a file nothing could be heard of is refused with 422 and the reason `predict` puts
    in its error column. GET /health answers 503 until warm-up is done; GET /info shows the run,
    its training corpus, backbones, score sets, weights and limits. Concurrent requests are
    batched, through the same code as `ifmvse predict`. POST /segments with one long recording
    as the body (query: name, mode=fixed|vad, window_s, hop_s, vad_level) answers JSON Lines
    as segments are scored, the rows of `predict --segments`, then a summary line.

    \b
    Examples:
      ifmvse serve --run runs/demo/run
      curl -s --data-binary @clip.wav -H 'Content-Type: audio/wav' localhost:8000/predict
      curl -s -F a=@a.wav -F b=@b.flac localhost:8000/predict
      curl -sN --data-binary @episode.flac -H 'Content-Type: audio/flac' \\
        'localhost:8000/segments?name=episode.flac&mode=vad'
    """
    from jax_ifmvse.serve import Limits
    from jax_ifmvse.serve import serve as run_server

    limits = Limits(
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        max_audio_s=max_audio_s,
        timeout_s=timeout_s,
        max_queue=queue,
        window_ms=window_ms,
        max_clips=max_clips,
        max_timeline_bytes=int(max_timeline_mb * 1024 * 1024),
        max_timeline_s=max_timeline_s,
    )
    for name, v in dataclasses.asdict(limits).items():
        if v <= 0 and name != "window_ms" or v < 0:
            raise UserError(f"--{name.replace('_', '-')} {v}: must be positive")
    _compile_cache()
    run_server(run, host=host, port=port, limits=limits)


@cli.command()
@click.option(
    "--out",
    default="runs/demo",
    show_default=True,
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Folder for the store, RUN/ and report.",
)
@click.option("--n", "n", type=int, show_default="300; 60 with --quick", help="Demo corpus size.")
@click.option(
    "--epochs",
    type=int,
    show_default="configs/demo.yaml's train.epochs, 30; 20 with --quick",
    help="Training epochs.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="The reduced size CI runs (n=60, 20 epochs, whisper-base transcripts too; about 5"
    " minutes on 2 shared cores).",
)
@click.option("--seed", default=0, show_default=True, help="Demo corpus seed.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help=SET_HELP + "train.epochs=5 (on top of configs/demo.yaml).",
)
@click.option(
    "--finetune",
    "finetune_too",
    is_flag=True,
    help="Also fine-tune whisper-tiny.en end to end (configs/finetune_demo.yaml: 8 epochs, 3"
    " with --quick) and compare; a finished demo folder is reused, only this stage trains.",
)
def demo(
    out: str,
    n: int | None,
    epochs: int | None,
    quick: bool,
    seed: int,
    overrides: tuple[str, ...],
    finetune_too: bool,
) -> None:
    """The whole pipeline on the built-in demo corpus with whisper-base and whisper-tiny.en.

    Demo corpus -> extract -> transcribe with whisper-base and embed the transcripts with
    all-MiniLM-L6-v2 (a text view) -> train seven score sets (five speech, two with text) x
    three attributes -> ensemble on Development, with and without text -> CCC on Test1 per
    score set and for both ensembles, the transcripts' WER -> OUT/run/report/index.md with
    plots. Resumable: a rerun reuses the corpus, the store, the transcripts and finished
    training.

    \b
    Examples:
      ifmvse demo
      ifmvse demo --quick --out /tmp/demo
    """
    from jax_ifmvse.demo import run_demo

    command = " ".join(["ifmvse", *sys.argv[1:]]) if sys.argv[1:2] == ["demo"] else "ifmvse demo"
    _compile_cache()
    run_demo(
        out,
        n=n,
        epochs=epochs,
        quick=quick,
        seed=seed,
        overrides=overrides,
        command=command,
        finetune=finetune_too,
    )


def _pairs(values: tuple[str, ...], flag: str) -> list[tuple[str, str]]:
    """NAME=SOURCE values of a repeatable option -> (name, source) pairs."""
    out = []
    for v in values:
        name, eq, source = v.partition("=")
        if not eq or not name or not source:
            raise UserError(f"{flag} {v!r}: expected NAME=SOURCE")
        out.append((name, source))
    return out


@cli.command()
@click.argument("store", type=click.Path(dir_okay=False), metavar="STORE")
@click.option(
    "--asr",
    "asr",
    metavar="SOURCE",
    help="Whisper to transcribe with: whisper-base, whisper-tiny.en or a checkpoint DIR.",
)
@click.option(
    "--transcripts",
    "transcripts_path",
    type=click.Path(exists=True),
    metavar="FILE|DIR",
    help="The corpus' own transcripts (CSV or folder of .txt)"
    " instead of --asr; the source is recorded.",
)
@click.option(
    "--name",
    default="asr",
    show_default=True,
    help="Transcript set: written by --asr/--transcripts, read by --text-backbone.",
)
@click.option(
    "--language",
    default=None,
    help="Language code given to Whisper. [default: (detected per utterance)]",
)
@click.option(
    "--text-backbone",
    "text_backbones",
    multiple=True,
    metavar="NAME=SOURCE",
    help="Text view NAME from a BERT/RoBERTa checkpoint DIR (its own tokenizer) or"
    " all-MiniLM-L6-v2; repeatable.",
)
@click.option(
    "--audio-root",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder the store's relative audio paths lie in. [default: (the store's corpus)]",
)
@shard_options
@click.option(
    "--max-tokens",
    type=int,
    default=None,
    help="Text encoder input length; longer transcripts are truncated and flagged."
    " [default: (128, or the model's limit if lower)]",
)
@click.option(
    "--pooling",
    type=click.Choice(["mean", "first"]),
    default="mean",
    show_default=True,
    help="Text view: mean over tokens, or the first token.",
)
@click.option(
    "--layers",
    default="last",
    show_default=True,
    help="Text view hidden states stored as layers: last (none), all or indices.",
)
@click.option("--batch", type=int, default=8, show_default=True, help="Clips per decoding batch.")
@click.option(
    "--compute-dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Compute dtype of Whisper and the text encoders.",
)
@click.option(
    "--window-s",
    type=float,
    default=None,
    help="Whisper's encoder sees this many seconds, not 30 (speed option for short clips;"
    " longer ones are cropped and flagged). [default: 30]",
)
def transcribe(store, asr, transcripts_path, name, language, text_backbones, audio_root, shard,
               shards, max_tokens, pooling, layers, batch, compute_dtype, window_s) -> None:  # fmt: skip
    """Transcribe STORE's utterances (Whisper in JAX) or load the corpus' transcripts, and add
    text views of them to STORE beside the speech views.

    Resumable (rows already transcribed or embedded are skipped) and shardable like extract.
    Silence and non-speech give an empty transcript with a flag (silent, no-speech, empty).

    \b
    Examples:
      ifmvse transcribe clips.h5 --asr whisper-base --text-backbone minilm=all-MiniLM-L6-v2
      ifmvse transcribe msp.h5 --transcripts MSP-PODCAST/Transcripts --name msp \\
          --text-backbone roberta=/models/roberta-large
    """
    from jax_ifmvse.text.stage import transcribe_main

    where = None
    if shard is not None:
        from featurestore.jobs import parse_shard

        k, n, _ = parse_shard(shard, shards)
        where = (k, n)
    elif shards is not None:
        raise UserError("--shards N goes with --shard auto; one shard: --shard K/N")
    if asr is not None and transcripts_path is not None:
        raise UserError("give --asr SOURCE or --transcripts FILE|DIR, not both")
    _compile_cache()
    transcribe_main(
        store, asr_source=asr, transcripts_path=transcripts_path, name=name, language=language,
        text_backbones=_pairs(text_backbones, "--text-backbone"), audio_root=audio_root,
        shard=where, max_tokens=max_tokens, pooling=pooling, layers=layers, batch=batch,
        compute_dtype=compute_dtype, window_s=window_s,
    )  # fmt: skip


def main() -> None:
    """Console-script entry point."""
    # transformers imports torch (seconds) when it finds it, though we only use its Flax
    # modules, configs and numpy helpers (.bin checkpoints import torch themselves).
    os.environ.setdefault("USE_TORCH", "0")
    cli(prog_name="ifmvse")


if __name__ == "__main__":
    sys.exit(main())
