"""Settings are validated when the config loads: enumerated keys, numeric ranges, good configs."""

from __future__ import annotations

import dataclasses

import pytest

from jax_ifmvse.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    declared_rules,
    load_config,
)
from jax_ifmvse.errors import IfmvseError

# Every enumerated setting, with its choices as the code reads them (a new one added to the
# dataclasses without a choice() rule, or with other choices, fails `test_enumerated_keys_...`).
ENUMERATED = {
    "corpus.kind": ("msp", "manifest", "demo"),
    "audio.long_audio": ("crop", "chunk"),
    "audio.normalize": ("none", "utterance", "train"),
    "extract.dtype": ("float32", "float16"),
    "extract.compute_dtype": ("float32", "bfloat16"),
    "model.init": ("torch", "flax"),
    "model.score_sets[].kind": ("mlp", "fusion"),
    "train.attributes": ("arousal", "valence", "dominance"),
    "finetune.task": ("attributes", "category"),
    "loader.frames": ("stream", "memory"),
}


def _override(key: str, value: str) -> list[str]:
    """`--set` overrides that put `value` at `key` (score-set keys replace the list)."""
    if key.startswith("model.score_sets[]."):
        field = key.split(".")[-1]
        item = {"name": "S1", "kind": "mlp", "views": ["w"], field: value}
        views = "[w, v]" if value == "fusion" else "[w]"  # a fusion takes two views
        body = ", ".join(
            f"{k}: {v}" if k != "views" else f"views: {views}" for k, v in item.items()
        )
        return [f"model.score_sets=[{{{body}}}]"]
    if key == "train.attributes":  # a list of distinct names
        return [f"train.attributes=[{value}]"]
    return [f"{key}={value}"]


def test_enumerated_keys_are_all_declared():
    rules = declared_rules(Config)
    declared = {k: r["choices"] for k, r in rules.items() if "choices" in r}
    assert declared.keys() >= ENUMERATED.keys()
    for key, choices in ENUMERATED.items():
        assert tuple(declared[key]) == choices, key


@pytest.mark.parametrize("key", sorted(ENUMERATED))
def test_every_enumerated_key_rejects_a_bad_value(key):
    for good in ENUMERATED[key]:
        load_config(None, _override(key, good))  # every choice loads
    with pytest.raises(ConfigError) as e:
        load_config(None, _override(key, "bogus"))
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, IfmvseError)
    shown = key.replace("[]", "[0]")
    assert f"{shown}=" in msg and "bogus" in msg, msg
    assert f"expected one of {', '.join(ENUMERATED[key])}" in msg, msg


def test_the_issue_example_message():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["audio.long_audio=chnuk"])
    assert str(e.value) == "audio.long_audio='chnuk': expected one of crop, chunk"
    with pytest.raises(ConfigError, match=r"^paper: audio.normalize='bogus': expected one of"):
        load_config("paper", ["audio.normalize=bogus"])


# (key, bad values, good values)
RANGES = [
    ("train.batch_size", ["0", "-3"], ["1", "32"]),
    ("train.epochs", ["0"], ["1"]),
    ("train.learning_rate", ["0", "-1e-5"], ["1e-5"]),
    ("train.weight_decay", ["-0.1"], ["0", "0.01"]),
    ("train.checkpoint_every", ["0"], ["1"]),
    ("model.dropout", ["-0.1", "1", "1.5"], ["0", "0.5", "0.99"]),
    ("model.common_dim", ["0"], ["8"]),
    ("model.hidden", ["0"], ["8"]),
    ("model.mlp_branches", ["0"], ["2"]),
    ("audio.max_seconds", ["0", "-1"], ["0.5", "12"]),
    ("audio.sample_rate", ["0"], ["8000"]),
    ("audio.bucket_seconds", ["[2.0, 0]"], ["[1.0, 2.0]"]),
    ("extract.batch_seconds", ["0"], ["8"]),
    ("extract.max_batch", ["0"], ["1"]),
    ("extract.workers", ["0"], ["1"]),
    ("extract.prefetch", ["0"], ["1"]),
    (
        "extract.whisper_window_s",
        ["0", "-2", "30.02", "31", "2.01", "0.03"],
        ["0.02", "2", "6", "30"],
    ),
    ("extract.layers", ["first", "1,x", ""], ["last", "all", "3", "0,3,-1"]),
    ("ensemble.coarse_step", ["0", "1.5"], ["0.1"]),
    ("ensemble.fine_step", ["0"], ["0.01"]),
    ("ensemble.fine_radius", ["-0.1"], ["0", "0.1"]),
    ("ensemble.chunk", ["0"], ["1024"]),
]


@pytest.mark.parametrize(("key", "bad", "good"), RANGES, ids=[r[0] for r in RANGES])
def test_numeric_ranges(key, bad, good):
    for v in good:
        load_config(None, [f"{key}={v}"])
    for v in bad:
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{key}={v}"])
        msg = str(e.value)
        assert msg.startswith(f"{key}=") and "expected" in msg and "\n" not in msg, (v, msg)


def test_rules_apply_to_directly_built_sections_too():
    """Python callers building a section get the same check (the rule lives on the field)."""
    cfg = load_config()
    with pytest.raises(ConfigError, match="long_audio='x'"):
        dataclasses.replace(cfg.audio, long_audio="x")


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_cli_refuses_a_bad_setting_before_reading_any_file(tmp_path):
    """`--set audio.long_audio=chnuk` stops `train`/`extract` with the one-line error, before the
    (missing) store or manifest is looked at and before RUN/ is created."""
    from click.testing import CliRunner

    from jax_ifmvse.cli import cli

    store, run = tmp_path / "none.h5", tmp_path / "run"
    runner = CliRunner()
    r = runner.invoke(cli, ["train", "--store", str(store), "--out", str(run),
                            "--set", "audio.long_audio=chnuk"])  # fmt: skip
    assert r.exit_code == 1, r.output
    assert "audio.long_audio='chnuk': expected one of crop, chunk" in r.output
    assert "none.h5" not in r.output and not run.exists()
    r = runner.invoke(cli, ["extract", "--manifest", str(tmp_path / "m.csv"), "--backbone",
                            "a=whisper-base", "--store", str(store),
                            "--set", "audio.normalize=bogus"])  # fmt: skip
    assert r.exit_code == 1, r.output
    assert "audio.normalize='bogus': expected one of none, utterance, train" in r.output
    assert "m.csv" not in r.output and not store.exists()


def test_docs_table_lists_every_declared_rule():
    """docs/cli.md's settings table says what the code checks (it cannot drift silently)."""
    from pathlib import Path

    from jax_ifmvse.config import describe_rule

    page = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    for key, meta in declared_rules(Config).items():
        assert f"| `{key}` | {describe_rule(meta)} |" in page, key


def test_a_recorded_config_from_before_new_keys_still_matches():
    """A RUN/ recorded before a section or key existed resumes when the new ones are defaults."""
    import copy

    from jax_ifmvse.config import same_settings, to_dict

    default = to_dict(Config())
    new = to_dict(load_config("paper"))
    old = copy.deepcopy(new)
    del old["finetune"]  # a section added later
    del old["train"]["sampler"]  # a key added later
    del old["model"]["score_sets"][0]["kind"]  # a key of a list item
    assert same_settings(old, new, default)
    assert same_settings(new, new, default)
    changed = copy.deepcopy(old)
    changed["train"]["epochs"] += 1
    assert not same_settings(changed, new, default)
    # A new key set away from its default is a different config.
    other = copy.deepcopy(new)  # (a recorded dict: balanced alone breaks a rule at load)
    other["train"]["sampler"] = "balanced"
    assert not same_settings(old, other, default)
    # A key the recorded config has and the new one lacks is a different config too.
    extra = copy.deepcopy(new)
    extra["train"]["gone"] = 1
    assert not same_settings(extra, new, default)


# One breaking override per rule between settings, the words its one-line error names, and the
# command it binds (None: every config). `test_every_rule_has_a_case` keeps this list complete.
BROKEN = [
    (("extract.frames=last", "audio.long_audio=chunk"), "needs audio.long_audio=crop", None),
    (("model.pooling=attentive", "model.layer_weights=true"), "layer_weights=false", None),
    (("model.score_sets=[{name: F, kind: fusion, views: [a]}]",), "takes 2 distinct", None),
    (("model.score_sets=[{name: F, views: [a]}, {name: F, views: [b]}]",), "distinct", None),
    (("train.attributes=[arousal, arousal]",), "expected distinct names", None),
    (("train.tasks=[category, category]",), "expected distinct names", None),
    (("train.tasks=[gender]",), "gender is an auxiliary", None),
    (("train.sampler=balanced",), "balanced needs the category task", None),
    (("train.multitask=true", "train.tasks=[attributes, category]"), "multitask=true", None),
    (("ensemble.fine_step=0.03",), "fine_step=0.03: must divide 1.0", None),
    (("ensemble.coarse_step=0.15",), "coarse_step=0.15: must be a multiple", None),
    (("ensemble.fine_radius=0.015",), "fine_radius=0.015: must be a multiple", None),
    (("train.batch_size=30",), "multiple of finetune.accumulation_steps=4", "finetune"),
    (("train.batch_size=4",), "micro-batches need at least 2 rows", "finetune"),
    (("train.tasks=[category]",), "train.tasks=['category']: not read by fine-tuning", "finetune"),
    (("train.sampler=balanced", "train.tasks=[attributes, category]"), "not read", "finetune"),
    (("train.drop_last=true",), "train.drop_last=True: not read by fine-tuning", "finetune"),
    (("train.multitask=true",), "train.multitask=True: not read by fine-tuning", "finetune"),
]


@pytest.mark.parametrize("overrides,words,command", BROKEN, ids=lambda x: str(x)[:40])
def test_a_broken_rule_between_settings_is_one_line_at_load(overrides, words, command):
    from jax_ifmvse.config import check_command

    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, command=command)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    if command is not None:  # bound to a command: other commands and Python callers load it
        cfg = load_config(None, overrides, command="train")
        with pytest.raises(ConfigError, match=words.split(":")[0][:20].replace("[", r"\[")):
            check_command(cfg, command)


def test_every_rule_has_a_case_and_the_shipped_configs_keep_them():
    from jax_ifmvse.config import RULES

    cases = {k.split("=")[0].split("[")[0] for ov, _, _ in BROKEN for k in ov}
    for rule in RULES:
        assert cases & set(rule.keys), rule.keys
    for name in ("finetune", "finetune_demo"):
        load_config(name, command="finetune")


def test_directly_built_configs_are_checked_too():
    cfg = load_config()
    with pytest.raises(ConfigError, match="balanced needs the category task"):
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, sampler="balanced"))


def test_docs_table_lists_every_rule_between_settings():
    from pathlib import Path

    from jax_ifmvse.config import RULES

    page = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    for rule in RULES:
        keys = ", ".join(f"`{k}`" for k in rule.keys)
        where = ", ".join(f"`{c}`" for c in rule.commands) or "every command"
        assert f"| {keys} | {rule.text} | {where} |" in page, rule.keys


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--store", "{tmp}/none.h5", "--out", "{tmp}/run",
         "--set", "train.sampler=balanced"],
        ["train", "--store", "{tmp}/none.h5", "--out", "{tmp}/run",
         "--set", "model.pooling=attentive", "--set", "model.layer_weights=true"],
        ["extract", "--manifest", "{tmp}/m.csv", "--backbone", "a=whisper-base", "--out",
         "{tmp}/run", "--frames", "last", "--set", "audio.long_audio=chunk"],
        ["finetune", "--manifest", "{tmp}/m.csv", "--backbone", "a=whisper-base", "--out",
         "{tmp}/run", "--set", "train.tasks=[category]"],
        ["finetune", "--manifest", "{tmp}/m.csv", "--backbone", "a=whisper-base", "--out",
         "{tmp}/run", "--set", "train.batch_size=30"],
    ],
    ids=["sampler", "attentive", "frames", "finetune-tasks", "accumulation"],
)  # fmt: skip
def test_cli_refuses_a_broken_rule_before_touching_any_file(tmp_path, argv):
    """A rule between settings stops the command with one line before the (missing) store or
    manifest is read, and before the output path exists."""
    from click.testing import CliRunner

    from jax_ifmvse.cli import cli

    r = CliRunner().invoke(cli, [a.format(tmp=tmp_path) for a in argv])
    assert r.exit_code == 1, r.output
    line = r.output.strip()
    assert line.startswith("Error: ") and "\n" not in line, r.output
    assert not (tmp_path / "run").exists() and list(tmp_path.iterdir()) == []
