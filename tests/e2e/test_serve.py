"""``llumnix serve`` end to end: two real vLLM CPU engines with their llumlets behind the
gateway, driven by the official ``openai`` client.

Greedy completions through the gateway (streamed and not, completions and chat-free token
prompts) equal an engine's own answer; a loaded instance is avoided; a client that
disconnects aborts its request and the llumlet shows its blocks back; bad JSON, an unknown
model and a too long prompt get the status vLLM gives; a stream live-migrated to the other
instance (once, twice, or outrun by its own end) equals the unmigrated answer token for token,
with the KV moved through the connector and every block back afterwards; a SIGKILLed
instance's new requests go elsewhere, a stream it was serving continues on the survivor, and
a migration to it rolls back; Ctrl-C stops everything. The gateway runs with ``--migration``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
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
from tests.e2e.test_pd_proxy import EXTERNAL_METRIC, free_port
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
    with launch(tmp_path_factory, ["--instances", "2", "--migration"], {"i0", "i1"}) as s:
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


def counter(url: str, pattern: re.Pattern[str]) -> float:
    """The value of the first match of ``pattern`` in the ``/metrics`` of ``url``."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        match = pattern.search(resp.read().decode())
    return float(match.group(1)) if match else 0.0


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


class Stream:
    """A streamed greedy completion through the gateway, read event by event: its token ids,
    the text, the finish reason and usage the client sees."""

    def __init__(self, served: Served, prompt: list[int], max_tokens: int, **extra: Any) -> None:
        body = {
            "model": served.model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "ignore_eos": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}, **extra,
        }  # fmt: skip
        req = urllib.request.Request(
            served.url + "/v1/completions", json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )  # fmt: skip
        self.resp = urllib.request.urlopen(req, timeout=120)
        self.request_id = self.resp.headers["X-Request-Id"]
        self.instance = self.resp.headers["X-Llumnix-Instance"]
        self.ids: list[int] = []
        self.ids_chunks: list[str] = []
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.done = False
        self.events: list[dict[str, Any]] = []

    def read_until(self, n: int) -> None:
        """Reads events until ``n`` tokens arrived or the stream ended."""
        while not self.done and len(self.ids) < n:
            line = self.resp.readline()
            if not line:
                raise AssertionError(f"the stream ended without [DONE] after {self.events[-3:]}")
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                break
            event = json.loads(data)
            self.events.append(event)
            assert "error" not in event, event
            for c in event["choices"]:
                self.ids += c.get("token_ids") or []
                self.finish = c.get("finish_reason") or self.finish
                assert not c.get("prompt_token_ids") or len(self.events) == 1, event
            self.usage = event.get("usage") or self.usage

    def close(self) -> None:
        self.resp.close()


def migrate(served: Served, request_id: str, destination: str) -> dict[str, Any]:
    body = json.dumps({"request_id": request_id, "destination": destination}).encode()
    status, answer = post(served.url + "/v1/llumnix/migrate", body)
    assert status == 200, (answer, live_requests(served))
    return answer


class migrating:
    """Starts a migration in a thread (the call returns when it is over); ``self()`` waits
    for it and returns its summary."""

    def __init__(self, served: Served, request_id: str, destination: str) -> None:
        self.out: list[dict[str, Any]] = []
        args = (served, request_id, destination)
        self.thread = threading.Thread(target=lambda: self.out.append(migrate(*args)))
        self.thread.start()

    def done(self) -> bool:
        return not self.thread.is_alive()

    def __call__(self) -> dict[str, Any]:
        self.thread.join(120)
        assert self.out, "the migration call did not return"
        return self.out[0]


def other(instance: str) -> str:
    return {"i0": "i1", "i1": "i0"}[instance]


MIGRATED_TOKENS = 400  # long enough that a migration starts well before the end


def fresh_prompt(seed: int, n: int = 297) -> list[int]:
    """A prompt no instance has cached (297 tokens: 9 full blocks of 32)."""
    rng = random.Random(seed)
    return [rng.randrange(3, 490) for _ in range(n)]


def unmigrated(served: Served, prompt: list[int], n: int = MIGRATED_TOKENS) -> list[int]:
    """The greedy answer of an engine called directly (after the migrated run, so that the
    destination had nothing of the prompt cached)."""
    return complete(served.client(served.engines["i1"]["url"]), served.model, prompt, n, False)


def all_idle(served: Served) -> None:
    """Every instance ends with no request and every KV block free: nothing leaked."""
    for iid in served.engines:
        with served.llumlet(iid) as llumlet:
            idle(llumlet)


def test_a_stream_migrated_live_equals_the_unmigrated_one(served: Served) -> None:
    n = MIGRATED_TOKENS
    for point in (1, 150):  # after the first token; mid-decode
        prompt = fresh_prompt(point)
        s = Stream(served, prompt, n)
        try:
            s.read_until(point)
            dst = other(s.instance)
            loaded = counter(served.engines[dst]["url"], EXTERNAL_METRIC)
            join = migrating(served, s.request_id, dst)
            s.read_until(n + 1)
            summary = join()
        finally:
            s.close()
        assert summary["state"] == "done", summary
        assert summary["stages"] >= 1 and summary["copied_tokens"] >= 9 * 32, summary
        assert summary["downtime_s"] is not None and summary["downtime_s"] < 30
        # The KV reached the destination through its connector, not by recompute.
        assert counter(served.engines[dst]["url"], EXTERNAL_METRIC) - loaded >= 9 * 32, summary
        assert s.finish == "length" and s.done
        assert s.usage is not None and s.usage["prompt_tokens"] == len(prompt)
        assert s.usage["completion_tokens"] == n and s.usage["total_tokens"] == n + 297
        assert len({e["id"] for e in s.events}) == 1, "the stream's id changed at the splice"
        assert live_requests(served) == []
        assert s.ids == unmigrated(served, prompt), (point, summary)
    all_idle(served)


def live_requests(served: Served) -> list[dict[str, Any]]:
    with urllib.request.urlopen(served.url + "/v1/llumnix/requests", timeout=10) as resp:
        return list(json.loads(resp.read()))


def test_a_stream_migrated_twice_ends_where_it_started(served: Served) -> None:
    prompt = fresh_prompt(2)
    s = Stream(served, prompt, MIGRATED_TOKENS)
    try:
        s.read_until(10)
        first = migrating(served, s.request_id, other(s.instance))()
        second = migrating(served, s.request_id, s.instance)()  # back where it started
        s.read_until(MIGRATED_TOKENS + 1)
    finally:
        s.close()
    assert (first["state"], second["state"]) == ("done", "done"), (first, second)
    assert s.ids == unmigrated(served, prompt)
    all_idle(served)


def test_a_migration_the_request_outruns_or_the_client_leaves_is_cancelled(
    served: Served,
) -> None:
    # Started a few tokens before the end: the stream ends on the source, whole.
    prompt = fresh_prompt(3)
    s = Stream(served, prompt, MIGRATED_TOKENS)
    try:
        s.read_until(1)
        deadline = time.monotonic() + 60
        while (seen := live_requests(served)) and seen[0]["output_tokens"] < MIGRATED_TOKENS - 8:
            assert time.monotonic() < deadline, seen
        body = json.dumps({"request_id": s.request_id, "destination": other(s.instance)})
        status, answer = post(served.url + "/v1/llumnix/migrate", body.encode())
        s.read_until(MIGRATED_TOKENS + 1)
    finally:
        s.close()
    assert s.ids == unmigrated(served, prompt) and s.done
    # Too late to start (404/409), or started and then outrun (cancelled), or fast enough.
    assert status in (404, 409) or answer["state"] in ("cancelled", "done"), answer
    # The client leaves while its request is being migrated.
    s = Stream(served, fresh_prompt(4), MIGRATED_TOKENS)
    s.read_until(5)
    where = s.instance
    for _ in range(5):  # a migration that ends before the client could leave: again
        where = other(where)
        join = migrating(served, s.request_id, where)
        while not join.done() and not any(r["migrating"] for r in live_requests(served)):
            time.sleep(0.001)
        if not join.done():
            break
    s.close()
    assert join()["state"] in ("cancelled", "done")
    all_idle(served)


def test_migration_requests_that_cannot_start_get_a_clear_status(served: Served) -> None:
    body = json.dumps({"request_id": "llx-0000000000000000", "destination": "i1"}).encode()
    status, err = post(served.url + "/v1/llumnix/migrate", body)
    assert status == 404 and "no migratable stream" in err["error"]["message"]
    s = Stream(served, fresh_prompt(5), MIGRATED_TOKENS)
    try:
        s.read_until(3)
        for dst in (s.instance, "nowhere"):
            body = json.dumps({"request_id": s.request_id, "destination": dst}).encode()
            status, err = post(served.url + "/v1/llumnix/migrate", body)
            assert status == 400, err
        join = migrating(served, s.request_id, other(s.instance))
        deadline = time.monotonic() + 30
        while not live_requests(served)[0]["migrating"]:
            assert time.monotonic() < deadline
        # A second migration of the same request while one runs is refused.
        body = json.dumps({"request_id": s.request_id, "destination": other(s.instance)})
        status, err = post(served.url + "/v1/llumnix/migrate", body.encode())
        assert status == 409 and "already being migrated" in err["error"]["message"], err
        assert join()["state"] == "done"
        s.read_until(MIGRATED_TOKENS + 1)
    finally:
        s.close()
    status, _ = post(served.url + "/v1/llumnix/migrate", b"{}")
    assert status == 400


def test_a_killed_instance_new_requests_go_elsewhere_and_its_streams_continue(
    served: Served,
) -> None:
    n = 300
    resumed = metric(served.url, "llumnix_gateway_resumed_total")
    streams: dict[str, tuple[Stream, list[int]]] = {}
    opened = []
    # One stream on each instance.
    for k in range(8):
        prompt = fresh_prompt(900 + k, 40)
        s = Stream(served, prompt, n)
        opened.append(s)
        streams.setdefault(s.instance, (s, prompt))
        if len(streams) == 2:
            break
    assert set(streams) == {"i0", "i1"}, "the streams did not spread over both instances"
    on_i0, on_i1 = streams["i0"][0], streams["i1"][0]
    on_i0.read_until(5)
    on_i1.read_until(5)
    # i1's stream is being migrated to i0 when i0's whole process tree is killed.
    moving = migrating(served, on_i1.request_id, "i0")
    deadline = time.monotonic() + 30
    while not moving.done() and not any(r["migrating"] for r in live_requests(served)):
        assert time.monotonic() < deadline
    victim = psutil.Process(served.engines["i0"]["pid"])
    for p in [victim, *victim.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            p.kill()
    # Both streams go on where the client was, on i1: the killed source's recomputed there,
    # the migration rolled back (or, if it had committed, resumed from i0 back on i1).
    on_i0.read_until(n + 1)
    on_i1.read_until(n + 1)
    assert moving()["state"] in ("rolled_back", "done")
    for s, prompt in streams.values():
        assert s.done and s.ids == unmigrated(served, prompt, n)
    assert metric(served.url, "llumnix_gateway_resumed_total") > resumed
    for s in opened:
        s.close()
    # Not-yet-started requests: every one succeeds, on i1.
    gateway = served.client()
    placed = Counter()
    for _ in range(8):
        raw = gateway.completions.with_raw_response.create(
            model=served.model, prompt=[7, 8], max_tokens=3, extra_body={"ignore_eos": True}
        )
        assert len(raw.parse().choices[0].text) >= 0
        placed[raw.headers["X-Llumnix-Instance"]] += 1
    assert placed == {"i1": 8}, placed
