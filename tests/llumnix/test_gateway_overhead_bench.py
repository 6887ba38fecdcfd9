"""Smoke test of benchmarks/serving/gateway_overhead.py: its ``--quick`` run starts an
instant-streaming upstream and a gateway in processes of their own, streams through both
paths, writes the JSON and PNG, and stops both processes. No speed is asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "serving" / "gateway_overhead.py"


def test_quick_run_measures_both_paths_and_leaves_nothing_running(tmp_path: Path) -> None:
    out, png = tmp_path / "gw.json", tmp_path / "gw.png"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out), "--png", str(png)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        text, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, text
    assert "gateway adds TTFT" in text
    res = json.loads(out.read_text())
    for path in ("direct", "gateway"):
        ttft = res["latency"][path]["ttft"]
        assert ttft["n"] == 100 and 0 < ttft["p50_ms"] <= ttft["p99_ms"]
        assert res["throughput"][path]["requests"] > 0
    assert png.stat().st_size > 0
    left = [p for p in psutil.process_iter(["cmdline"]) if str(SCRIPT) in (p.info["cmdline"] or [])]
    assert not left, left
