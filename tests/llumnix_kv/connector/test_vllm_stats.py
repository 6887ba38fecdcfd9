"""The connector's stats as vLLM's pipeline handles them: aggregated over workers and
intervals, reduced for the log line. Gauges are the latest value per worker, summed over
workers; transfers and events add up."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from llumnix_kv.plugins.vllm.stats import GAUGES, LlumnixKVConnectorStats


def gauges(**values: int) -> dict[str, int]:
    return {g: values.get(g, 0) for g in GAUGES}


def test_gauges_keep_the_latest_per_worker_and_sum_over_workers() -> None:
    total = LlumnixKVConnectorStats()
    assert total.is_empty()
    step1 = LlumnixKVConnectorStats()
    step1.set_gauges(0, gauges(holds_pending=3, registrations=2))
    step1.record("load", 0.5, 1000)
    assert not step1.is_empty()
    other_rank = LlumnixKVConnectorStats()
    other_rank.set_gauges(1, gauges(holds_pending=1, registrations=2))
    step2 = LlumnixKVConnectorStats()
    step2.set_gauges(0, gauges(holds_pending=0, registrations=2))  # rank 0 released its holds
    step2.count("failed_loads")
    for part in (step1, other_rank, step2):
        total.aggregate(part)
    out = total.reduce()
    assert out["holds_pending"] == 1 and out["registrations"] == 4
    assert out["load transfers"] == 1 and out["failed_loads"] == 1


def test_stats_without_gauges_reduce_without_them() -> None:
    stats = LlumnixKVConnectorStats()
    stats.record("push", 0.1, 10)
    assert "holds_pending" not in stats.reduce()
    # A copy shipped between processes (plain data) aggregates like the original.
    copy = LlumnixKVConnectorStats(data=dict(stats.data))
    assert copy.reduce() == stats.reduce()
