"""`at2po bench replay` figures: every key present and consistent (values are timings, never asserted)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ops.bench_floor import BareTransfer, echo_main
from ops.bench_replay import BenchSettings, free_endpoint, run_replay_bench


def test_the_bare_echo_sends_the_asked_frames_and_stops() -> None:
    endpoint = free_endpoint()
    echo = threading.Thread(target=echo_main, args=(endpoint,), daemon=True)
    echo.start()
    bare = BareTransfer(endpoint)
    assert bare.time_ms(3, 100_000) >= 0
    assert bare.time_ms(3, 100_000) >= 0  # cached frames the second time
    bare.close()
    echo.join(timeout=10)
    assert not echo.is_alive()


@pytest.mark.slow
def test_a_small_replay_bench_reports_every_figure(tmp_path: Path) -> None:
    settings = BenchSettings(total_mb=8, message_kb=96, sample_trees=4, sample_interval_s=0.02)
    figures = run_replay_bench(settings, work_dir=tmp_path)
    for key in (
        "ingest_mb_s",
        "raw_lmdb_mb_s",
        "ingest_vs_raw",
        "sample_p50_ms",
        "sample_p99_ms",
        "sample_idle_p50_ms",
        "socket_floor_p50_ms",
        "socket_floor_p99_ms",
        "socket_floor_idle_p50_ms",
        "sample_p50_ms_per_tree",
        "sample_by_value_p50_ms",
        "sample_by_value_p99_ms",
        "sample_by_value_idle_p50_ms",
        "reference_vs_value_p99",
    ):
        assert figures[key] is not None and figures[key] > 0, key
    assert figures["samples"] > 0 and figures["rejected"] == 0
    assert figures["reference_fallbacks"] == 0  # the sampler process read every sample from the store itself
    assert figures["sample_batch_trees"] == 4
    assert figures["sample_reply_mb"] == pytest.approx(4 * figures["message_kb"] * 1024 / 1e6, rel=0.2)
