"""Terminal rendering (rich tables) of summaries the commands compute."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table


def make_console(stderr: bool = False) -> Console:
    """A console that, off a terminal, is wide enough not to elide table cells."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr) if stream.isatty() else Console(stderr=stderr, width=160)


def print_store_summary(s: dict[str, Any], console: Console | None = None) -> None:
    """Print `featurestore.summarize` output as readable tables."""
    console = console or make_console()
    console.print(
        f"[bold]{s['path']}[/bold]  schema v{s['schema_version']}, {s['utterances']} utterances"
    )
    t = Table(title="Splits and labels (mean ± std, known count)")
    for col in ("split", "utterances", "hours", "arousal", "valence", "dominance"):
        t.add_column(col, justify="right" if col != "split" else "left")
    for split, info in s["splits"].items():
        cells = []
        for attr in ("arousal", "valence", "dominance"):
            st = info["labels"].get(attr, {"count": 0})
            cells.append(
                f"{st['mean']:.2f} ± {st['std']:.2f} ({st['count']})" if st["count"] else "-"
            )
        t.add_row(split, str(info["utterances"]), f"{info['hours']:.2f}", *cells)
    console.print(t)
    if any("classes" in info for info in s["splits"].values()):  # task 1 labels (EmoClass)
        console.print(
            "EmoClass per split: "
            + "; ".join(
                f"{split} "
                + " ".join(f"{c or 'empty'}={n}" for c, n in info.get("classes", {}).items())
                for split, info in s["splits"].items()
            ),
            highlight=False,
        )
    b = Table(title="Backbones")
    for col in (
        "name",
        "source",
        "width",
        "layers",
        "dtype",
        "filled",
        "missing",
        "failed",
        "NaN rows",
        "mean norm",
    ):
        b.add_column(col, justify="left" if col in ("name", "source") else "right")
    for name, info in s["backbones"].items():
        b.add_row(
            name,
            str(info["source"]),
            str(info["width"]),
            str(info["layers"] or "-"),
            info["dtype"],
            str(info["filled"]),
            str(info["missing"]),
            f"[red]{info['failed']}[/red]" if info["failed"] else "0",
            f"[red]{info['nan_rows']}[/red]" if info["nan_rows"] else "0",
            "-" if info["mean_norm"] is None else f"{info['mean_norm']:.3f}",
        )
    if not s["backbones"]:
        b.add_row("(none yet)", "", "", "", "", "", "", "", "", "")
    console.print(b)
    for name, info in s["backbones"].items():  # rows a training on this view leaves out
        parts = [
            f"{split} " + ", ".join(f"{n} {k}" for k, n in why.items())
            for split, why in info.get("left_out", {}).items()
            if why
        ]
        if parts:
            console.print(f"{name} leaves out: {'; '.join(parts)}", highlight=False)
    if s["failures"]:
        console.print("[bold]First failures[/bold]")
        for f in s["failures"]:
            console.print(f"  {f['id']} [{f['backbone']}]: {f['reason']}")
    if s["pending_journal_files"]:
        console.print(
            f"[yellow]{s['pending_journal_files']} journal files not yet merged"
            " (a writer is running or was interrupted; rerun it or call finalize)[/yellow]"
        )
