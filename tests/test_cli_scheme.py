"""The command line's naming scheme (docs/cli-conventions.md), checked on every command.

The walk goes through `cli.commands` recursively, so a command added later is held to the same
rules: an example in its help (groups too), every default shown, `--debug` accepted, metavars
naming what they take, `--set SECTION.KEY=VALUE`, and old spellings still working for a release.
"""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from jax_ifmvse.cli import cli

GENERIC = {"TEXT", "PATH", "FILENAME", "DIRECTORY"}  # click's own, which say nothing


def _walk(group: click.Group, path: tuple[str, ...] = ()):
    yield path, group
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _walk(cmd, (*path, name))
        else:
            yield (*path, name), cmd


COMMANDS = list(_walk(cli))


def test_the_walk_finds_every_command():
    names = {" ".join(p) for p, _ in COMMANDS}
    assert {"", "store", "store finalize", "store upgrade", "extract", "predict", "serve"} <= names
    assert len(names) >= 13


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) or "ifmvse" for p, _ in COMMANDS])
def test_help_follows_the_scheme(path, cmd):
    res = CliRunner().invoke(cli, [*path, "--help"], terminal_width=100)
    assert res.exit_code == 0, res.output
    text = res.output
    assert "Example:" in text or "Examples:" in text, f"{path}: no example in --help"
    assert "ifmvse " + " ".join(path) in text  # the example runs this very command
    ctx = click.Context(cmd, info_name=path[-1] if path else "ifmvse", parent=None)
    ctx.show_default = True
    for p in cmd.get_params(ctx):
        if isinstance(p, click.Argument):
            assert p.make_metavar(ctx).rstrip(".").isupper(), (path, p.name)
            assert p.make_metavar(ctx).rstrip(".") not in GENERIC, (path, p.name)
            continue
        if not isinstance(p, click.Option) or p.hidden or p.is_flag:
            continue
        record = p.get_help_record(ctx)
        assert record is not None, (path, p.name)
        opts, help_text = record
        assert "[default:" in help_text or "required" in help_text, (path, opts, help_text)
        metavar = p.make_metavar(ctx)
        assert metavar not in GENERIC, (path, opts, metavar)
        if "--set" in p.opts:
            assert metavar == "SECTION.KEY=VALUE" and p.multiple, (path, metavar)
    if not isinstance(cmd, click.Group):
        assert "--debug" in text, f"{path}: no --debug"
        res = CliRunner().invoke(cli, [*path, "--debug", "--help"])
        assert res.exit_code == 0, res.output


def test_the_store_the_run_and_outputs_have_one_name_each():
    """Inputs: --store STORE, --run RUN; outputs: --out; objects acted on: positional."""
    seen = {}
    for path, cmd in COMMANDS:
        if isinstance(cmd, click.Group):
            continue
        ctx = click.Context(cmd, info_name=path[-1])
        for p in cmd.get_params(ctx):
            if isinstance(p, click.Option) and not p.hidden:
                for o in p.opts:
                    seen.setdefault(o, set()).add(p.make_metavar(ctx))
            elif isinstance(p, click.Argument):
                seen.setdefault(f"<{path[-1]}>", set()).add(p.make_metavar(ctx))
    assert seen["--store"] == {"STORE"} and seen["--run"] == {"RUN"}
    assert seen["--out"] <= {"STORE", "RUN", "FILE", "DIR"}
    assert seen["<inspect>"] == seen["<upgrade>"] == seen["<finalize>"] == {"STORE"}
    assert seen["<ensemble>"] == {"RUN"} and seen["<predict>"] == {"AUDIO..."}


def test_old_spellings_work_for_a_release_with_one_notice(tmp_path):
    # extract --store (now --out): parsed as --out, then the usual one-line error.
    r = CliRunner().invoke(cli, ["extract", "--backbone", "w=x", "--store", str(tmp_path / "s.h5")])
    assert r.exit_code == 1
    assert r.stderr.splitlines() == [
        "ifmvse: --store is deprecated and goes in the next release; use --out",
        "Error: give exactly one of --corpus DIR or --manifest FILE",
    ]
    r = CliRunner().invoke(cli, ["extract", "--backbone", "w=x", f"--store={tmp_path / 's.h5'}"])
    assert "--store is deprecated" in r.stderr and "exactly one of --corpus" in r.stderr
    # demo-corpus OUT (now --out OUT): n=2 is refused before anything is synthesized.
    r = CliRunner().invoke(cli, ["demo-corpus", str(tmp_path / "c"), "--n", "2"])
    assert r.exit_code == 1 and r.stderr.splitlines() == [
        f"ifmvse: the positional '{tmp_path / 'c'}' is deprecated and goes in the next release;"
        f" use --out {tmp_path / 'c'}",
        f"Error: {tmp_path / 'c'}: n=2 is too small (need at least 5 for three splits)",
    ]
    # ensemble --set KEY=VALUE (now ensemble.KEY=VALUE): the notice, then the run's own error.
    r = CliRunner().invoke(cli, ["ensemble", str(tmp_path / "nope"), "--set", "chunk=4096"])
    assert r.exit_code == 1
    assert r.stderr.splitlines()[0] == (
        "ifmvse: --set chunk=4096 is deprecated and goes in the next release;"
        " use --set ensemble.chunk=4096"
    )
    r = CliRunner().invoke(cli, ["ensemble", str(tmp_path / "nope"), "--set", "ensemble.chunk=1"])
    assert "deprecated" not in r.stderr and "manifest.json: not found" in r.stderr
    # The new spellings print no notice.
    r = CliRunner().invoke(cli, ["extract", "--backbone", "w=x", "--out", str(tmp_path / "s.h5")])
    assert r.stderr.splitlines() == ["Error: give exactly one of --corpus DIR or --manifest FILE"]


def test_a_later_command_gets_the_scheme_mechanics():
    """A command added by another change (e.g. `finetune`) inherits metavars, shown defaults and
    --debug from the group's `Command` class, so the walk above holds for it too."""

    @cli.command("probe-scheme", hidden=True)
    @click.option("--frames", type=int, help="Frames.")
    @click.option("--where", type=click.Path(file_okay=False), help="A folder.")
    @click.option("--name", help="A name.")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Overrides.")
    def probe(**_) -> None:
        """Probe.

        \b
        Example:
          ifmvse probe-scheme --frames 3
        """

    try:
        res = CliRunner().invoke(cli, ["probe-scheme", "--help"], terminal_width=100)
        assert res.exit_code == 0
        assert "--where DIR" in res.output and "--name NAME" in res.output
        assert res.output.count("[default: (not set)]") == 4 and "--debug" in res.output
        assert "--set SECTION.KEY=VALUE" in res.output
    finally:
        cli.commands.pop("probe-scheme")


def test_extract_and_transcribe_share_one_shard_option_block(tmp_path):
    """`--shard K/N|auto` and `--shards N` come from one decorator (`cli.shard_options`)."""

    def shard_params(name):
        return [
            (p.opts, p.help, p.metavar, repr(p.type))
            for p in cli.commands[name].params
            if p.name in ("shard", "shards")
        ]

    assert len(shard_params("extract")) == 2
    assert shard_params("extract") == shard_params("transcribe")
    r = CliRunner().invoke(cli, ["transcribe", str(tmp_path / "s.h5"), "--shards", "3"])
    assert r.exit_code != 0 and "--shards N goes with --shard auto" in r.output, r.output
