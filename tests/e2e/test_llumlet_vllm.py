"""The llumlet inside a real vLLM OpenAI server (LlumletConnector, unmodified vLLM 0.32 CPU):
its pushed reports and gRPC status follow the engine step by step. Idle it reports every block
free and no request; under concurrent streamed completions (the official ``openai`` client) it
reports them running, decoding, holding blocks and making progress; a client that disconnects
mid-stream aborts its request, and the report shows it gone with its blocks back; the total
matches the engine's own cache size in ``/metrics``."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    import openai
    import vllm  # noqa: F401
except Exception as exc:  # a broken install raises more than ImportError
    pytest.skip(f"vllm, grpc or openai is not importable: {exc}", allow_module_level=True)

from llumnix.llumlet import LlumletClient, ReportSubscriber
from tests.e2e.test_pd_proxy import Server, free_port, spawn
from tests.e2e.vllm_engine import write_model

BLOCK = 32
START_DEADLINE_S = 240.0
CONCURRENT = 6
PROMPT = 40
MAX_TOKENS = 48


def serve_args(model: Path, port: int, llumlet_port: int, report_port: int) -> list[str]:
    kv = {
        "kv_connector": "LlumletConnector",
        "kv_connector_module_path": "llumnix.llumlet.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "llumlet": {
                "port": llumlet_port,
                "report_port": report_port,
                "instance_id": "i0",
                "min_interval_s": 0.02,
            }
        },
    }
    return [
        "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--load-format", "dummy", "--skip-tokenizer-init", "--enforce-eager",
        "--block-size", str(BLOCK), "--max-model-len", "1024", "--seed", "0",
        "--host", "127.0.0.1", "--port", str(port), "--kv-transfer-config", json.dumps(kv),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, LlumletClient]]:
    """The server and a gRPC client of its llumlet (``client.reports``: its report port)."""
    model = write_model(tmp_path_factory.mktemp("llumlet-model"))
    logs = tmp_path_factory.mktemp("llumlet-logs")
    port, llumlet_port, report_port = free_port(), free_port(), free_port()
    server = spawn("llumlet-vllm", serve_args(model, port, llumlet_port, report_port), port, logs)
    client = LlumletClient(f"127.0.0.1:{llumlet_port}", timeout=5.0)
    client.reports = f"127.0.0.1:{report_port}"  # type: ignore[attr-defined]
    try:
        server.wait_healthy(time.monotonic() + START_DEADLINE_S)
        server.model = str(model)  # type: ignore[attr-defined]
        yield server, client
    finally:
        client.close()
        server.stop()


def idle(client: LlumletClient, timeout: float = 20.0) -> Any:
    """The first report that shows the instance idle (or the last one at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        s = client.status()
        if (not s.requests and s.num_free_blocks == s.num_total_blocks) or (
            time.monotonic() > deadline
        ):
            return s
        time.sleep(0.05)


def test_idle_instance_reports_its_whole_cache_free(instance: tuple[Server, LlumletClient]) -> None:
    server, client = instance
    s = idle(client)
    assert s.instance_id == "i0" and s.role == "neutral" and s.block_size == BLOCK
    assert s.num_total_blocks > 0 and s.num_free_blocks == s.num_total_blocks
    assert (s.num_running, s.num_waiting, len(s.requests)) == (0, 0, 0)
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    blocks = re.search(r'^vllm:cache_config_info\{[^}]*num_gpu_blocks="(\d+)"', text, re.M)
    assert blocks is not None
    assert s.num_total_blocks == int(blocks.group(1)) - 1  # vLLM's null block is never usable
    health = client.health()
    assert health.healthy and health.incarnation == s.incarnation


def completions(server: Server, prompts: list[list[int]]) -> list[list[int]]:
    async def run() -> list[list[int]]:
        client = openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key="none", timeout=120, max_retries=0
        )

        async def one(prompt: list[int]) -> list[int]:
            tokens: list[int] = []
            stream = await client.completions.create(
                model=server.model,  # type: ignore[attr-defined]
                prompt=prompt,
                max_tokens=MAX_TOKENS,
                temperature=0.0,
                stream=True,
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )
            async for chunk in stream:
                tokens += list(chunk.choices[0].token_ids or [])
            return tokens

        try:
            return list(await asyncio.gather(*(one(p) for p in prompts)))
        finally:
            await client.close()

    return asyncio.run(run())


def test_reports_follow_concurrent_requests_step_by_step(
    instance: tuple[Server, LlumletClient],
) -> None:
    server, client = instance
    before = idle(client)
    prompts = [[(7 * i + j) % 500 + 3 for j in range(PROMPT)] for i in range(CONCURRENT)]
    reports: list[Any] = []
    done = threading.Event()

    def read() -> None:  # every pushed report, none conflated
        with ReportSubscriber(client.reports, latest_only=False) as sub:  # type: ignore[attr-defined]
            while not done.is_set():
                s = sub.recv(0.1)
                if s is not None:
                    reports.append(s)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        time.sleep(0.5)  # subscribed
        outputs = completions(server, prompts)
    finally:
        time.sleep(0.5)
        done.set()
        reader.join(10)
    assert all(len(o) == MAX_TOKENS for o in outputs)
    busy = [s for s in reports if s.requests]
    assert busy, "no report showed a request"
    # The first full report may be the step that prefilled them all; prefer one that decodes.
    peak = max(busy, key=lambda s: (s.num_running, s.decode_batch_size))
    assert peak.num_running == CONCURRENT and peak.decode_batch_size > 0
    # Each running request holds the blocks of its tokens; the pool's count says the same.
    for r in peak.requests:
        assert r.prompt_tokens == PROMPT and r.running
        assert r.blocks == -(-r.computed_tokens // BLOCK)
    used = peak.num_total_blocks - peak.num_free_blocks
    assert used >= sum(r.blocks for r in peak.requests) - CONCURRENT  # shared prefix blocks
    # Progress is monotonic per request and reaches the end.
    for request_id in {r.request_id for s in busy for r in s.requests}:
        out = [r.output_tokens for s in busy for r in s.requests if r.request_id == request_id]
        # Reports are at most one per 20 ms, so the last one before the finish may be a few
        # tokens short of the end: within one report's progress of it.
        gap = max([b - a for a, b in itertools.pairwise(out)], default=0)
        assert out == sorted(out) and out[-1] + gap >= MAX_TOKENS - 1
    steps = [s.step_id for s in reports]
    assert steps == sorted(steps) and steps[-1] - before.step_id >= MAX_TOKENS
    after = idle(client)
    assert (len(after.requests), after.num_free_blocks) == (0, after.num_total_blocks)
    assert after.incarnation == before.incarnation


def test_a_client_disconnect_aborts_and_the_report_shows_the_blocks_back(
    instance: tuple[Server, LlumletClient],
) -> None:
    server, client = instance
    idle(client)

    async def start_and_leave() -> None:
        oai = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        stream = await oai.completions.create(
            model=server.model,  # type: ignore[attr-defined]
            prompt=list(range(3, 3 + 3 * BLOCK)),
            max_tokens=900,
            temperature=0.0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 4:
                break
        s = client.status()
        assert len(s.requests) == 1 and s.num_free_blocks < s.num_total_blocks
        await stream.close()
        await oai.close()

    asyncio.run(start_and_leave())
    after = idle(client)
    assert (len(after.requests), after.num_free_blocks) == (0, after.num_total_blocks)
