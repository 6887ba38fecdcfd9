"""``llumnix serve --ray``: the engines placed as Ray actors with placement groups on a real
local Ray cluster (``ray start --head`` on loopback, one node), serving the official
``openai`` client through the gateway; on Ctrl-C the engine processes end, the placement
groups are removed, and the cluster keeps running until the test stops it."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

try:
    import openai
    import ray
    import vllm  # noqa: F401
except Exception as exc:  # a broken install raises more than ImportError
    pytest.skip(f"ray, vllm or openai is not importable: {exc}", allow_module_level=True)

from llumnix.launch import free_port
from llumnix.serve import ServeProcess
from tests.e2e.vllm_engine import write_model

REPO = Path(__file__).resolve().parents[2]
RAY = shutil.which("ray")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    if RAY is None:
        pytest.skip("the ray command is not installed")
    temp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = [
        RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
        "--temp-dir", temp,
    ]  # fmt: skip
    try:
        proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_serve_places_engines_on_ray_and_removes_them_on_ctrl_c(
    ray_cluster: str, tmp_path: Path
) -> None:
    model = write_model(tmp_path / "model")
    port = free_port()
    serving = ServeProcess(
        ["--model", str(model), "--instances", "2", "--load-format", "dummy",
         "--port", str(port), "--logs", str(tmp_path / "logs"), "--ray", ray_cluster],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    pids: list[int] = []
    try:
        engines = serving.wait_serving(420)
        assert set(engines) == {"i0", "i1"}, serving.output
        pids += [e["pid"] for e in engines.values()]
        for pid in pids:  # each engine is a child of a Ray worker, not of llumnix serve
            chain = [p.name() + " ".join(p.cmdline()) for p in psutil.Process(pid).parents()]
            assert any("ray" in c for c in chain), chain
            assert serving.proc.pid not in [p.pid for p in psutil.Process(pid).parents()]
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=120, max_retries=0
        )
        placed = set()
        for i in range(4):
            raw = client.completions.with_raw_response.create(
                model=str(model), prompt=[5 + i, 6, 7], max_tokens=8, temperature=0.0,
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )  # fmt: skip
            assert len(raw.parse().choices[0].token_ids) == 8
            placed.add(raw.headers["X-Llumnix-Instance"])
        assert placed <= {"i0", "i1"} and placed
    finally:
        code = serving.stop()
    assert code == 0, "".join(serving.output[-30:])
    deadline = time.monotonic() + 20
    while any(psutil.pid_exists(pid) for pid in pids):  # the engines end with their actors
        assert time.monotonic() < deadline, [p for p in pids if psutil.pid_exists(p)]
        time.sleep(0.2)
    ray.init(address=ray_cluster, logging_level=logging.WARNING, log_to_driver=False)
    try:
        deadline = time.monotonic() + 30
        while True:
            states = [g["state"] for g in ray.util.placement_group_table().values()]
            if all(s == "REMOVED" for s in states):
                break
            assert time.monotonic() < deadline, states
            time.sleep(0.5)
        assert len(states) == 2
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
