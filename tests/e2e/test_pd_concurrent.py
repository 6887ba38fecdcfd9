"""The scenario of a new user that once hung a decode engine: three vLLM servers (a plain one,
a prefill with 64-token blocks and a decode with 32-token blocks, both with LlumnixConnector
and ``kv_load_failure_policy="recompute"``), a model with one KV head of 64 (MQA), and 8
greedy completions sent at once with the official ``openai`` client through
``llumnix-pd-proxy``, in pull and in push mode. Every completion must equal the plain
server's, no load or push may fail, and afterwards neither PD server may hold a request, a
KV block or pending connector work (their Prometheus gauges)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    import openai
    import vllm  # noqa: F401
except Exception as exc:  # a broken install raises more than ImportError
    pytest.skip(f"vllm or openai is not importable: {exc}", allow_module_level=True)

from benchmarks.connector.soak import MODEL as MQA_LLAMA  # one KV head of 64, 3 layers
from benchmarks.connector.soak import metrics, not_idle
from tests.e2e.test_pd_proxy import Server, free_port, proxy_args, spawn

CONNECTOR = {
    "kv_connector": "LlumnixConnector",
    "kv_connector_module_path": "llumnix_kv.plugins.vllm",
    "kv_role": "kv_both",
    "kv_load_failure_policy": "recompute",
}
START_DEADLINE_S = 240.0
REQUEST_TIMEOUT_S = 60.0
MAX_TOKENS = 16
# From a few tokens to several 64-token blocks, across the block edges of both sides.
LENGTHS = (3, 31, 33, 64, 65, 100, 129, 193)


def serve_args(model: Path, port: int, block: int, kv: dict | None) -> list[str]:
    args = [
        "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--load-format", "dummy", "--skip-tokenizer-init", "--enforce-eager",
        "--block-size", str(block), "--max-model-len", "1024", "--seed", "0",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    if kv is not None:
        args += ["--kv-transfer-config", json.dumps(kv)]
    return args


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    logs = tmp_path_factory.mktemp("pd-concurrent-logs")
    model = tmp_path_factory.mktemp("mqa-llama")
    (model / "config.json").write_text(json.dumps(MQA_LLAMA))
    started: dict[str, Server] = {}
    try:
        for name, block, kv in (("plain", 32, None), ("prefill", 64, CONNECTOR),
                                ("decode", 32, CONNECTOR)):  # fmt: skip
            port = free_port()
            started[name] = spawn(name, serve_args(model, port, block, kv), port, logs)
        deadline = time.monotonic() + START_DEADLINE_S
        for server in list(started.values()):
            server.wait_healthy(deadline)
        for mode in ("pull", "push"):
            port = free_port()
            args = proxy_args(port, started["prefill"].url, started["decode"].url, 60.0, mode)
            started[mode] = spawn(f"proxy-{mode}", args, port, logs)
            started[mode].wait_healthy(time.monotonic() + 30)
        started["model"] = model  # type: ignore[assignment]
        yield started
    finally:
        for name, server in started.items():
            if name != "model":
                server.stop()


def completions(url: str, model: str, prompts: list[list[int]]) -> list[Any]:
    """The prompts sent at once; token ids of each completion (or the exception)."""

    async def run() -> list[Any]:
        client = openai.AsyncOpenAI(
            base_url=url + "/v1", api_key="none", timeout=REQUEST_TIMEOUT_S, max_retries=0
        )

        async def one(prompt: list[int]) -> Any:
            out = await client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=MAX_TOKENS,
                temperature=0.0,
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )
            return list(out.choices[0].token_ids)

        try:
            return await asyncio.gather(*(one(p) for p in prompts), return_exceptions=True)
        finally:
            await client.close()

    return asyncio.run(run())


FAILURES = ("failed_loads_total", "failed_pushes_total", "expired_holds_total")


def failures(server: Server) -> dict[str, float]:
    m = metrics(server)
    return {k: m.get(f"vllm:llumnix_kv_{k}", 0.0) for k in FAILURES}


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_eight_concurrent_mqa_requests_across_block_sizes(
    servers: dict[str, Server], mode: str
) -> None:
    model = str(servers["model"])
    rng = random.Random(len(mode))
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in LENGTHS]
    want = completions(servers["plain"].url, model, prompts)
    assert all(isinstance(w, list) and len(w) == MAX_TOKENS for w in want), want
    pd = ("prefill", "decode")
    before = {n: failures(servers[n]) for n in pd}
    got = completions(servers[mode].url, model, prompts)
    assert got == want
    deadline = time.monotonic() + 30
    while left := {n: bad for n in pd if (bad := not_idle(servers[n]))}:
        assert time.monotonic() < deadline, left
        time.sleep(0.5)
    assert {n: failures(servers[n]) for n in pd} == before
