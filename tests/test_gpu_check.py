"""bench/gpu_check.py: the one-call GPU check runs its real code at tiny shapes on a CPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402

# (section, unit) -> rows expected: 2 encoders x 2 dtypes for extraction, S1 + S2 for training,
# 1/4/16 clients + idle latency for serving.
EXPECTED = {
    ("peak", "TFLOP/s"): 2,
    ("extract", "utterances/s"): 4,
    ("extract", "audio-seconds/s"): 4,
    ("train", "steps/s"): 2,
    ("finetune", "steps/s"): 1,
    ("serve", "clips/s"): 3,
    ("serve", "ms (p50)"): 1,
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "rows.json"
    r = subprocess.run(
        # No time budget here: timing belongs to benchmarks, and a loaded CI box is slow.
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_check.py"),
            "--smoke",
            "--budget-s",
            "inf",
            "--json",
            str(out),
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout, json.loads(out.read_text())


@pytest.mark.slow  # the smoke run (a subprocess of every section): minutes
def test_smoke_table_has_every_row_with_finite_numbers(smoke):
    stdout, data = smoke
    rows = data["rows"]
    got: dict = {}
    for row in rows:
        got[(row["section"], row["unit"])] = got.get((row["section"], row["unit"]), 0) + 1
        # Every number a row has is finite and positive: ours, PyTorch (present here), the ratio.
        for key in ("ours", "ref", "ratio"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["benchmark"], key, row[key])
        if row["section"] in ("extract", "train"):
            for key in ("ours_mfu", "ref_mfu"):
                assert math.isfinite(row[key]) and row[key] >= 0, (row["benchmark"], key)
    assert got == EXPECTED
    # The printed table is the same rows, one line each, after a header.
    lines = [ln for ln in stdout.splitlines() if ln.startswith("| ")]
    assert len(lines) == 1 + len(rows)
    assert all(s > 0 for s in data["info"]["section_s"].values())


@pytest.mark.slow  # the same smoke run
def test_bfloat16_rows_compare_each_side_with_its_own_float32(smoke):
    _, data = smoke
    rows = data["rows"]
    notes = [r["notes"] for r in rows if r["section"] == "extract" and "bfloat16" in r["benchmark"]]
    notes = [n for n in notes if n]  # the utterances/s row of each encoder carries the notes
    assert len(notes) == 2 and all("bf16 vs own f32" in n for n in notes)


def test_sections_are_a_hook_list():
    """A section is one more `Section` in `SECTIONS`; run_check runs what is listed."""
    names = [s.name for s in gpu_check.SECTIONS]
    assert names == ["peak", "extract", "train", "finetune", "serve"]
    calls = []

    def extra(ctx):
        calls.append(ctx.smoke)
        return [gpu_check.Row("extra", "step", "steps/s", 2.0, 1.0)]

    gpu_check.SECTIONS.append(gpu_check.Section("extra", extra))
    try:
        rows, info = gpu_check.run_check(True, only=("extra",))
    finally:
        gpu_check.SECTIONS.pop()
    assert calls == [True] and [r.section for r in rows] == ["extra"]
    assert rows[0].ratio == 2.0 and "extra" in info["section_s"]
    assert "| extra | step | steps/s | 2 | 1 | 2x |" in gpu_check.markdown(rows)


def test_failing_section_is_an_error_row_not_a_crash():
    def broken(ctx):
        raise RuntimeError("boom")

    gpu_check.SECTIONS.append(gpu_check.Section("broken", broken))
    try:
        rows, _ = gpu_check.run_check(True, only=("broken",))
    finally:
        gpu_check.SECTIONS.pop()
    assert rows[0].benchmark == "ERROR" and "boom" in rows[0].notes


def test_gpu_wheels_satisfy_the_package_requirements():
    """Every carried wheel that the package depends on is a version pyproject.toml allows, and
    transformers is a 4.x (the Flax classes); each package is pinned exactly once."""
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    allowed = {Requirement(d).name.lower().replace("_", "-"): Requirement(d) for d in deps}
    names = []
    for spec in gpu_check.GPU_WHEELS:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        names.append(name)
        (pinned,) = [s.version for s in req.specifier if s.operator == "=="]
        if name in allowed:
            assert allowed[name].specifier.contains(pinned), (spec, str(allowed[name]))
    assert len(names) == len(set(names))
    assert {"transformers", "soundfile", "soxr", "starlette", "uvicorn"} <= set(names)
    (tf,) = [s for s in gpu_check.GPU_WHEELS if s.startswith("transformers==")]
    assert int(tf.split("==")[1].split(".")[0]) == 4
