"""Smoke test of benchmarks/serving/bench_serving.py: its ``--quick`` run serves a tokenizer-
equipped tiny model on two real vLLM CPU engines with ``llumnix serve``, drives both gateways
(Llumnix and round-robin) with ``vllm bench serve``, and every request completes. No policy is
required to win here: that is the benchmark's job, at its full size."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

try:
    import vllm  # noqa: F401
except Exception as exc:  # a broken install raises more than ImportError
    pytest.skip(f"vllm is not importable: {exc}", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "serving" / "bench_serving.py"


def test_quick_run_completes_every_request_under_both_policies(tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        text, _ = proc.communicate(timeout=600)
    finally:  # on a timeout, nothing it started may outlive the test
        if proc.poll() is None:
            family = psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
            for p in family:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            proc.wait(10)
    assert proc.returncode == 0, text[-5000:]
    rows = json.loads(out.read_text())["rows"]
    assert sorted(r["policy"] for r in rows) == ["llumnix", "round_robin"]
    for r in rows:
        assert r["completed"] == 20, r
        assert 0 < r["mean_ttft_ms"] <= r["p99_ttft_ms"] and r["mean_tpot_ms"] > 0
        assert set(r["preemptions"]) == {"i0", "i1"}
