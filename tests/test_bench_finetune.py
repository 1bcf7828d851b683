"""bench/bench_finetune.py at its --quick (toy) shape: both sides run, the numbers are consistent."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_finetune  # noqa: E402


@pytest.mark.slow  # a benchmark run, both sides: about a minute
def test_bench_finetune_quick():
    r = bench_finetune.bench_finetune(quick=True, rounds=1)
    assert r["ours_step_s"] > 0 and r["torch_step_s"] > 0
    assert r["speedup"] == r["torch_step_s"] / r["ours_step_s"]
    assert r["ours_peak_rss"] > 100 << 20 and r["torch_peak_rss"] > 100 << 20
    # XLA counts the toy step's FLOPs: forward + backward of a 2-layer, 32-wide WavLM on 1 s.
    assert 1e6 < r["flops_per_step"] < 1e10
    assert 0 < r["share_of_peak"] < 1.5
    text = bench_finetune.report(r)
    assert "PyTorch / ours" in text and "of the measured matmul peak" in text
