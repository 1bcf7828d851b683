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
        body = ", ".join(f"{k}: {v}" if k != "views" else "views: [w]" for k, v in item.items())
        return [f"model.score_sets=[{{{body}}}]"]
    if key == "train.attributes":
        return [f"train.attributes=[arousal, {value}]"]
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
    other = to_dict(load_config("paper", ["train.sampler=balanced"]))
    assert not same_settings(old, other, default)
    # A key the recorded config has and the new one lacks is a different config too.
    extra = copy.deepcopy(new)
    extra["train"]["gone"] = 1
    assert not same_settings(extra, new, default)
