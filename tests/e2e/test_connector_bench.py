"""Smoke test of benchmarks/connector/bench_connector.py: its ``--quick`` run on real vLLM CPU
engines writes every section with sane values. No timing comparisons are asserted (a hit is
not required to beat a miss); 1P1D outputs must equal the single instance's, and every store
hit must have been served by the tier it measures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

try:
    import vllm  # noqa: F401
except Exception as exc:  # a broken install raises more than ImportError
    pytest.skip(f"vllm is not importable: {exc}", allow_module_level=True)

from tests.redis_server import REDIS_SERVER

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "connector" / "bench_connector.py"
DEADLINE_S = 400.0


def positive_ms(summary: dict[str, Any]) -> None:
    assert summary["n"] > 0
    assert 0 < summary["p50_ms"] <= summary["p99_ms"]
    assert summary["mean_ms"] > 0


def test_quick_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for title in ("TTFT", "Throughput", "Store:", "Transfer time vs KV bytes"):
        assert title in proc.stdout
    result = json.loads(out.read_text())
    settings = result["meta"]["settings"]
    lengths, store_lengths = settings["lengths"], settings["store_lengths"]
    assert result["meta"]["pd_mode"] == "pull" and result["meta"]["kv_bytes_per_token"] > 0

    ttft = {(r["config"], r["prompt_len"]): r for r in result["pd"]["ttft"]}
    assert set(ttft) == {(c, n) for c in ("single", "1p1d") for n in lengths}
    for row in ttft.values():
        positive_ms(row)
    for n in lengths:
        pd = ttft[("1p1d", n)]
        assert pd["parts_mean_ms"]["prefill"] > 0 and pd["parts_mean_ms"]["decode_first"] > 0
        assert pd["first_token_mismatches"] == 0
    tput = {(r["config"], r["prompt_len"]): r for r in result["pd"]["throughput"]}
    assert set(tput) == set(ttft)
    for (config, _), row in tput.items():
        assert row["output_tokens"] == row["requests"] * settings["max_tokens"]
        assert row["seconds"] > 0 and row["output_tok_s"] > 0
        if config == "1p1d":
            assert row["requests_matching_single"] == row["requests"]

    tiers = ["cpu", "disk", "disk-cold"] + (["redis"] if REDIS_SERVER else [])
    store = {(r["tier"], r["prompt_len"]): r for r in result["store"]["rows"]}
    assert set(store) == {(t, n) for t in ["none (miss)", *tiers] for n in store_lengths}
    for (tier, _), row in store.items():
        positive_ms(row["ttft"])
        if tier != "none (miss)":
            positive_ms(row["miss_save"])
            assert row["hits_served_from_tier"] == row["reps"]  # every hit came from the tier
            assert row["speedup_vs_miss"] > 0
    if not REDIS_SERVER:
        assert any("Redis row skipped" in note for note in result["store"]["notes"])

    kinds = {(r["kind"], r["prompt_len"]) for r in result["transfer"]["rows"]}
    want = {("pd-pull", n) for n in lengths}
    want |= {(f"store-{t}", n) for t in tiers for n in store_lengths}
    assert kinds == want
    for row in result["transfer"]["rows"]:
        assert row["kv_bytes"] > 0 and row["gb_s"] > 0
        positive_ms(row["transfer"])
