"""The CI slice of the PD matrix (benchmarks/connector/pd_matrix.py) on real vLLM CPU engines:
MQA with head_dim 64 across 64 -> 32 and 32 -> 96 token blocks and 8 KV heads of 128 across
32 -> 64, in pull and push mode, 8 concurrent requests each. Every case must be
token-identical to a plain engine, with no failed or expired transfer and no request, block
or pending connector work left on either engine afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import vllm  # noqa: F401
except Exception as exc:  # a broken install raises more than ImportError
    pytest.skip(f"vllm is not importable: {exc}", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "connector" / "pd_matrix.py"
DEADLINE_S = 600.0


def test_ci_slice_passes(tmp_path: Path) -> None:
    out = tmp_path / "matrix.json"
    # Its own process group, so that its engine processes end with it whatever happens.
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--slice", "ci", "--json", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=DEADLINE_S)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    table = [line for line in stdout.splitlines() if line.startswith(("kv", "case"))]
    assert out.exists(), stderr[-3000:]
    result = json.loads(out.read_text())
    failed = [c for c in result["cases"] if not c["ok"]]
    assert not failed, "\n".join(table)
    assert proc.returncode == 0, "\n".join(table)
    shapes = {
        (c["heads"], c["head_dim"], c["prefill_block"], c["decode_block"], c["mode"])
        for c in result["cases"]
    }
    assert (1, 64, 64, 32, "pull") in shapes and (1, 64, 64, 32, "push") in shapes
    assert len(shapes) == 6
