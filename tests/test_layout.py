"""The package's seams: libraries below commands, serving apart from training, no import cycle
between modules, and one place mapping user errors.

The import graph counts every import of a module, function-level ones included, so a lazy import
is held to the same rules as a module-level one.
"""

import ast
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import jax_ifmvse
from jax_ifmvse import cli as cli_module
from jax_ifmvse.errors import IfmvseError

ROOT = Path(jax_ifmvse.__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its body (function-level too)."""
    files = [
        *ROOT.joinpath("jax_ifmvse").rglob("*.py"),
        *ROOT.joinpath("featurestore").rglob("*.py"),
    ]
    modules = {_module_name(f): f for f in files}
    graph: dict[str, set[str]] = {}
    for name, f in modules.items():
        deps = set()
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                # A package's __init__ re-exporting its submodules is not a cycle of theirs.
                if t and t != name and not name.startswith(t + "."):
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "jax_ifmvse.train" in graph and "jax_ifmvse.inference" in graph["jax_ifmvse.predictor"]
    assert find_cycle(graph) is None


# Command modules: what the `ifmvse` CLI runs, and nothing else builds on them. `cli` maps the
# commands; `extract`, `predict`, `serve` and `demo` are commands of their own; `ray_engine` runs
# `extract`'s shards under Ray (`ifmvse extract --engine ray`). Everything else in the package is
# a library: it may be imported by commands and by other libraries, and imports no command. A
# command may run another (the demo runs extract; serve opens a run as predict does).
COMMANDS = frozenset(
    f"jax_ifmvse.{m}" for m in ("cli", "extract", "predict", "serve", "demo", "ray_engine")
)
# The training run code serving must never load (it would carry the optimizer, the fit loop and
# their dependencies into a server, and tie the server's start to the training modules). Exact
# names: a fine-tuning package's predictor and model are not its run.
TRAINING_RUNS = frozenset(("jax_ifmvse.train", "jax_ifmvse.finetune.run", "jax_ifmvse.trainer.fit"))
# Known breaks of the serving rule, (importer, training module) -> what removes it. The test
# fails when one is fixed and still listed, so the list only shrinks.
KNOWN_SERVING_TRAINING: dict[tuple[str, str], str] = {}


def loads(graph: dict[str, set[str]], module: str) -> set[str]:
    """The modules importing `module` runs: its imports and their packages (`a.b` of `a.b.c`)."""
    out = set()
    for m in graph.get(module, ()):
        parts = m.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(graph)
    return out - {module}


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module `start` loads, directly or not: module -> the module that imports it."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        n = todo.pop()
        for m in sorted(loads(graph, n)):
            if m not in seen and m != start:
                seen[m] = n
                todo.append(m)
    return seen


def test_reachable_follows_chains_and_packages():
    assert reachable({"a": {"b"}, "b": {"c"}, "c": set()}, "a") == {"b": "a", "c": "b"}
    graph = {"s": {"p.m"}, "p": {"p.run"}, "p.m": set(), "p.run": set()}
    assert set(reachable(graph, "s")) == {"p.m", "p", "p.run"}


def test_command_modules_exist():
    graph = import_graph()
    assert not COMMANDS - set(graph), sorted(COMMANDS - set(graph))


def test_no_library_module_imports_a_command_module():
    graph = import_graph()
    bad = sorted(
        f"{lib} imports {cmd}"
        for lib, deps in graph.items()
        if lib not in COMMANDS
        for cmd in deps & COMMANDS
    )
    assert bad == []


def test_serving_never_imports_the_training_run_code():
    graph = import_graph()
    serving = ["jax_ifmvse.serve", *reachable(graph, "jax_ifmvse.serve")]
    # The edges where serving's imports enter training run code.
    found = {
        (n, d) for n in serving if n not in TRAINING_RUNS for d in loads(graph, n) & TRAINING_RUNS
    }
    assert found == set(KNOWN_SERVING_TRAINING), sorted(found)


def test_featurestore_imports_nothing_of_the_package():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("featurestore"):
            assert not {d for d in deps if d.startswith("jax_ifmvse")}, name


def test_featurestore_imports_no_jax():
    for f in ROOT.joinpath("featurestore").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.split(".")[0] in ("jax", "flax", "jax_ifmvse") for n in names), f


def test_no_private_name_imported_across_modules():
    graph_files = [
        *ROOT.joinpath("jax_ifmvse").rglob("*.py"),
        *ROOT.joinpath("featurestore").rglob("*.py"),
    ]
    bad = []
    for f in graph_files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                ("jax_ifmvse", "featurestore")
            ):
                bad += [
                    f"{f.name}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and a.name != "__version__"
                ]
    assert bad == []


def _probe_cli(exc: BaseException) -> click.Group:
    """A group of the CLI's own classes with one command raising `exc`."""

    @click.group(cls=cli_module.Group)
    def probe():
        pass

    @probe.command()
    def boom():
        raise exc

    return probe


class _Bad(IfmvseError):
    pass


def test_user_error_is_one_line_and_debug_shows_traceback():
    group = _probe_cli(_Bad("/data/x.h5: no such store\nsecond line"))
    res = CliRunner().invoke(group, ["boom"])
    assert res.exit_code == 1
    assert res.output.strip() == "Error: /data/x.h5: no such store"
    res = CliRunner().invoke(group, ["boom", "--debug"])
    assert isinstance(res.exception, _Bad)


def test_a_bug_keeps_its_traceback():
    res = CliRunner().invoke(_probe_cli(ValueError("a bug")), ["boom"])
    assert isinstance(res.exception, ValueError) and "Error:" not in res.output


@pytest.mark.parametrize("path", [["inspect"], ["store", "finalize"], ["train"], ["predict"]])
def test_every_command_takes_debug(path):
    group = cli_module.cli
    for name in path:
        group = group.commands[name] if isinstance(group, click.Group) else group
    assert "--debug" in {o for p in group.params for o in getattr(p, "opts", [])}
