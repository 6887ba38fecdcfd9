"""``llumnix serve`` end to end: two real vLLM CPU engines with their llumlets behind the
gateway, driven by the official ``openai`` client.

Greedy completions through the gateway (streamed and not, completions and chat-free token
prompts) equal an engine's own answer; a loaded instance is avoided; a client that
disconnects aborts its request and the llumlet shows its blocks back; bad JSON, an unknown
model and a too long prompt get the status vLLM gives; a SIGKILLed instance's new requests go
elsewhere and a stream it was serving ends with an error event; Ctrl-C stops everything."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

try:
    import openai
    import psutil
    import vllm  # noqa: F401
except Exception as exc:  # a broken install raises more than ImportError
    pytest.skip(f"vllm or openai is not importable: {exc}", allow_module_level=True)

from llumnix.gateway import Gateway, GatewayConfig, serve_in_thread
from llumnix.llumlet import LlumletClient, ReportSubscriber
from llumnix.metastore import InstanceRecord, MetaStore, open_meta_store
from llumnix.scheduler import DispatchPolicy
from llumnix.serve import ServeProcess
from tests.e2e.test_pd_proxy import free_port
from tests.e2e.vllm_engine import write_model
from tests.redis_server import REDIS_SERVER, RedisProcess

REPO = Path(__file__).resolve().parents[2]
START_DEADLINE_S = 420.0


@dataclass
class Served:
    url: str
    model: str
    engines: dict[str, dict[str, Any]]  # id -> url, pid, llumlet

    def client(self, url: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=(url or self.url) + "/v1", api_key="none", timeout=120, max_retries=0
        )

    def llumlet(self, iid: str) -> LlumletClient:
        return LlumletClient(self.engines[iid]["llumlet"], timeout=5.0)


@contextlib.contextmanager
def launch(
    tmp_path_factory: pytest.TempPathFactory, args: list[str], names: set[str]
) -> Iterator[Served]:
    """Runs ``llumnix serve --model <tiny model> ARGS`` until the instances ``names`` serve;
    on exit Ctrl-C must stop it with nothing left running."""
    model = write_model(tmp_path_factory.mktemp("serve-model"))
    logs = tmp_path_factory.mktemp("serve-logs")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    serving = ServeProcess(
        ["--model", str(model), "--load-format", "dummy", "--port", str(port),
         "--logs", str(logs), *args],
        env=env,
    )  # fmt: skip
    try:
        engines = serving.wait_serving(START_DEADLINE_S)
        assert set(engines) == names, serving.output
        yield Served(f"http://127.0.0.1:{port}", str(model), engines)
    finally:
        family = []
        with contextlib.suppress(psutil.Error):
            me = psutil.Process(serving.proc.pid)
            family = [me, *me.children(recursive=True)]
        code = serving.stop()  # SIGINT, what Ctrl-C does
        _, alive = psutil.wait_procs(family, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        assert code == 0 and not alive, f"llumnix serve left {alive} (exit {code})"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with launch(tmp_path_factory, ["--instances", "2"], {"i0", "i1"}) as s:
        yield s


def complete(c: openai.OpenAI, model: str, prompt: list[int], n: int, stream: bool) -> Any:
    kwargs: dict[str, Any] = {
        "model": model, "prompt": prompt, "max_tokens": n, "temperature": 0.0,
        "extra_body": {"ignore_eos": True, "return_token_ids": True},
    }  # fmt: skip
    if not stream:
        return list(c.completions.create(**kwargs).choices[0].token_ids)
    tokens: list[int] = []
    for chunk in c.completions.create(stream=True, **kwargs):
        tokens += list(chunk.choices[0].token_ids or [])
    return tokens


def test_greedy_outputs_equal_an_engines_own(served: Served) -> None:
    gateway, direct = served.client(), served.client(served.engines["i0"]["url"])
    assert [m.id for m in gateway.models.list().data] == [served.model]
    for n, prompt in enumerate(([5, 6, 7], list(range(3, 70)), [9] * 33)):
        want = complete(direct, served.model, prompt, 12, stream=False)
        assert len(want) == 12
        for stream in (False, True):
            assert complete(gateway, served.model, prompt, 12, stream) == want, (n, stream)


def instance_of(served: Served, prompt: list[int]) -> str:
    req = urllib.request.Request(
        served.url + "/v1/completions",
        data=json.dumps({"model": served.model, "prompt": prompt, "max_tokens": 1}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return str(resp.headers["X-Llumnix-Instance"])


def test_dispatch_avoids_a_loaded_instance(served: Served) -> None:
    stop = threading.Event()

    async def load_i0() -> None:  # long requests straight to i0, not through the gateway
        c = openai.AsyncOpenAI(base_url=served.engines["i0"]["url"] + "/v1", api_key="x")
        streams = [
            await c.completions.create(
                model=served.model,
                prompt=list(range(3, 300)),
                max_tokens=600,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for _ in range(4)
        ]

        async def drain(s: Any) -> None:
            async for _ in s:
                if stop.is_set():
                    break
            await s.close()

        await asyncio.gather(*(drain(s) for s in streams))
        await c.close()

    loader = threading.Thread(target=asyncio.run, args=(load_i0(),))
    loader.start()
    try:
        # The pushed reports, as the gateway sees them (a busy engine answers gRPC slowly).
        with ReportSubscriber(served.engines["i0"]["reports"]) as reports:
            deadline = time.monotonic() + 60
            while (report := reports.recv(1.0)) is None or report.num_running < 4:
                assert time.monotonic() < deadline, report
        order = [instance_of(served, [7, 8, 9]) for _ in range(10)]
        seen = gateway_view(served) if set(order) != {"i1"} else ""
    finally:
        stop.set()
        loader.join(60)
    assert Counter(order) == {"i1": 10}, (order, seen)


def gateway_view(served: Served) -> str:
    """The gateway's per-instance view and fallbacks, as its /metrics shows them."""
    with urllib.request.urlopen(served.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    keep = ("llumnix_gateway_instance", "llumnix_gateway_fallback", "llumnix_gateway_errors")
    return "\n".join(line for line in text.splitlines() if line.startswith(keep))


def idle(llumlet: LlumletClient, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        s = llumlet.status()
        if not s.requests and s.num_free_blocks == s.num_total_blocks:
            return s
        assert time.monotonic() < deadline, s
        time.sleep(0.05)


def test_client_disconnect_aborts_the_request_on_the_engine(served: Served) -> None:
    llumlets = {iid: served.llumlet(iid) for iid in served.engines}
    for c in llumlets.values():
        idle(c)

    async def leave(stream: bool) -> None:
        c = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
        kwargs: dict[str, Any] = {
            "model": served.model, "prompt": list(range(3, 99)), "max_tokens": 900,
            "extra_body": {"ignore_eos": True},
        }  # fmt: skip
        if stream:
            s = await c.completions.create(stream=True, **kwargs)
            async for _ in s:
                break
            await s.close()
        else:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(c.completions.create(**kwargs), 2.0)
        await c.close()

    for stream in (True, False):
        asyncio.run(leave(stream))
        for c in llumlets.values():
            s = idle(c)
            assert (len(s.requests), s.num_free_blocks) == (0, s.num_total_blocks)
    for c in llumlets.values():
        c.close()


def post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_bad_requests_get_the_status_vllm_gives(served: Served) -> None:
    engine = served.engines["i0"]["url"] + "/v1/completions"
    gateway = served.url + "/v1/completions"
    cases = [
        b"{not json",
        json.dumps({"model": "no-such-model", "prompt": [1, 2], "max_tokens": 2}).encode(),
        json.dumps({"model": served.model, "prompt": list(range(3, 1500)), "max_tokens": 2})
        .encode(),
    ]  # fmt: skip
    for body in cases:
        (want, _), (got, err) = post(engine, body), post(gateway, body)
        assert got == want and want in (400, 404), body[:40]
        assert err["error"]["code"] == got and err["error"]["message"]


class BrokenPolicy(DispatchPolicy):
    """A dispatch policy that always fails: the gateway must fall back, not fail requests."""

    def __init__(self, staleness_s: float | None = None) -> None:
        pass

    def select(self, *args: Any) -> str | None:
        raise RuntimeError("broken on purpose")


def record(iid: str, engine: dict[str, Any], blocks: int) -> InstanceRecord:
    return InstanceRecord(
        iid, engine["url"], llumlet=engine["llumlet"], reports=engine["reports"],
        role=engine["role"], block_size=32, num_blocks=blocks,
    )  # fmt: skip


@contextlib.contextmanager
def gateway_in_thread(store: MetaStore, policy: str, **config: Any) -> Iterator[str]:
    """A Gateway on a free loopback port, served from a thread of its own."""
    gateway = Gateway(store, GatewayConfig(port=free_port(), policy=policy, **config))
    with serve_in_thread(gateway) as url:
        yield url


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    )


def serves(url: str, model: str, n: int) -> list[int]:
    body = json.dumps({"model": model, "prompt": [5, 6], "max_tokens": 2}).encode()
    return [post(url + "/v1/completions", body)[0] for _ in range(n)]


def test_a_dead_redis_meta_store_or_a_failing_policy_loses_no_request(served: Served) -> None:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    redis = RedisProcess()
    try:
        store = open_meta_store(redis.url, namespace="serve-test", timeout_s=0.3)
        for iid, e in served.engines.items():
            with served.llumlet(iid) as llumlet:
                blocks = llumlet.status().num_total_blocks
            store.register(record(iid, e, blocks), 60)
        with gateway_in_thread(store, "llumnix") as url:
            assert serves(url, served.model, 4) == [200] * 4
            redis.stop()
            time.sleep(2.5)  # the gateway's refreshes now fail
            assert serves(url, served.model, 8) == [200] * 8
            assert metric(url, "llumnix_gateway_errors_total") > 0
    finally:
        redis.stop()
    store = open_meta_store("memory")
    for iid, e in served.engines.items():
        store.register(record(iid, e, 100), 60)
    with gateway_in_thread(store, "tests.e2e.test_serve:BrokenPolicy") as url:
        assert serves(url, served.model, 4) == [200] * 4
        assert metric(url, "llumnix_gateway_fallback_total") >= 4


def test_a_killed_instance_new_requests_go_elsewhere_and_its_streams_end_with_an_error(
    served: Served,
) -> None:
    gateway = served.client()
    streams = []
    # Open streams until one runs on i0, then kill i0's whole process tree.
    for _ in range(6):
        s = gateway.completions.with_raw_response.create(
            model=served.model, prompt=[4, 5, 6], max_tokens=900, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        streams.append(s)
        if s.headers.get("X-Llumnix-Instance") == "i0":
            break
    on_i0 = [s for s in streams if s.headers.get("X-Llumnix-Instance") == "i0"]
    assert on_i0, "no stream landed on i0"
    victim = psutil.Process(served.engines["i0"]["pid"])
    for p in [victim, *victim.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            p.kill()
    began = time.monotonic()
    body = b"".join(on_i0[0].http_response.iter_bytes())
    assert time.monotonic() - began < 60
    assert b'"error"' in body and b"failed mid-stream" in body
    for s in streams:
        s.http_response.close()
    # Not-yet-started requests: every one succeeds, on i1.
    placed = Counter()
    for _ in range(8):
        raw = gateway.completions.with_raw_response.create(
            model=served.model, prompt=[7, 8], max_tokens=3, extra_body={"ignore_eos": True}
        )
        assert len(raw.parse().choices[0].text) >= 0
        placed[raw.headers["X-Llumnix-Instance"]] += 1
    assert placed == {"i1": 8}, placed
