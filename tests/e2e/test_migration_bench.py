"""Smoke test of benchmarks/migration/bench_migration.py: its ``--quick`` run migrates streams
of two context lengths live and by abort-and-recompute between two real vLLM CPU engines;
every migration completes and every stream equals the unmigrated greedy answer. How the two
compare is the benchmark's business, at its full size."""

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
SCRIPT = REPO / "benchmarks" / "migration" / "bench_migration.py"


def test_quick_run_migrates_every_stream_token_identically(tmp_path: Path) -> None:
    out = tmp_path / "migration.json"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
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
    assert sorted((r["length"], r["mode"]) for r in rows) == [
        (256, "live"), (256, "recompute"), (1024, "live"), (1024, "recompute"),
    ]  # fmt: skip
    for r in rows:
        assert r["token_identical"], r
        assert r["downtime_ms_p50"] > 0 and r["itl_ms_p50"] > 0, r
        assert (r["stages"] >= 1 and r["kv_mib_moved"] > 0) == (r["mode"] == "live"), r
