"""bench/bench_audio_feed.py at a toy size: every way reads every clip of the plan once."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_audio_feed  # noqa: E402


@pytest.mark.slow  # Grain worker processes start twice: about 30 s
def test_bench_audio_feed_quick():
    r = bench_audio_feed.bench_audio_feed(n=24, threads=2, rounds=1)
    for k in ("plain", "feed", "grain_threads", "grain_processes"):
        assert r[f"{k}_rows_s"] > 0, k  # the bench asserted each way read all 24 clips
    assert r["limit_rows_s"] == 2 * r["plain_rows_s"] and r["batches"] >= 3
    assert "rows/s" in bench_audio_feed.report(r)
