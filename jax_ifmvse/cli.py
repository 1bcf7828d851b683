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


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="ifmvse")


if __name__ == "__main__":
    sys.exit(main())
