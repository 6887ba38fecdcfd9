"""The gateway against fake instances (an OpenAI-style upstream plus a llumlet-like report
publisher, both under the test's control), for what real engines cannot be made to do on
demand: an instance whose reports stop while it still serves keeps its work (a busy host
delays heartbeats); one whose reports stop and whose ``/health`` fails gets none."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator

import pytest
import zmq
from aiohttp import web

from llumnix.gateway import Gateway, GatewayConfig, serve_in_thread
from llumnix.launch import free_port
from llumnix.llumlet import llumlet_pb2 as pb
from llumnix.metastore import InProcessMetaStore, InstanceRecord


class FakeInstance:
    """Answers ``/v1/completions`` with one token and ``/health`` with 200 while ``healthy``;
    publishes a report every 50 ms while ``reporting`` (``running`` requests, ``free``
    blocks of 1000)."""

    def __init__(self, instance_id: str, running: int = 0, free: int = 1000) -> None:
        self.instance_id, self.running, self.free = instance_id, running, free
        self.healthy = self.reporting = True
        self.port, self.report_port = free_port(), free_port()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    def record(self) -> InstanceRecord:
        return InstanceRecord(
            self.instance_id,
            f"http://127.0.0.1:{self.port}",
            reports=f"127.0.0.1:{self.report_port}",
            num_blocks=1000,
        )

    async def _main(self) -> None:
        async def completions(request: web.Request) -> web.Response:
            await request.json()
            return web.json_response({"id": "x", "choices": [{"index": 0, "text": "a"}]})

        async def health(request: web.Request) -> web.Response:
            return web.Response(status=200 if self.healthy else 503)

        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        ctx = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.bind(f"tcp://127.0.0.1:{self.report_port}")
        self._ready.set()
        seq = 0
        try:
            while not self._stop.is_set():
                if self.reporting:
                    seq += 1
                    status = pb.Status(
                        instance_id=self.instance_id, seq=seq, timestamp=time.time(),
                        num_total_blocks=1000, num_free_blocks=self.free,
                        num_running=self.running, schedulable=True, healthy=True,
                        role="neutral", block_size=16,
                    )  # fmt: skip
                    pub.send(status.SerializeToString())
                await asyncio.sleep(0.05)
        finally:
            pub.close()
            ctx.term()
            await runner.cleanup()

    def __enter__(self) -> FakeInstance:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def placed(url: str, n: int) -> Counter[str]:
    out: Counter[str] = Counter()
    body = json.dumps({"model": "m", "prompt": [1, 2, 3], "max_tokens": 1}).encode()
    for _ in range(n):
        req = urllib.request.Request(
            url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            out[resp.headers["X-Llumnix-Instance"]] += 1
    return out


@pytest.fixture
def two() -> Iterator[tuple[str, FakeInstance, FakeInstance]]:
    """A loaded instance and an idle one behind a gateway that suspects silence after 0.3 s."""
    with FakeInstance("busy", running=4, free=500) as busy, FakeInstance("idle") as idle:
        store = InProcessMetaStore()
        for inst in (busy, idle):
            store.register(inst.record(), 60.0)
        config = GatewayConfig(port=free_port(), suspect_after_s=0.3, health_timeout_s=1.0,
                               staleness_s=30.0)  # fmt: skip
        with serve_in_thread(Gateway(store, config)) as url:
            deadline = time.monotonic() + 10
            while placed(url, 1) != {"idle": 1}:  # both reported
                assert time.monotonic() < deadline
                time.sleep(0.05)
            yield url, busy, idle


def test_a_silent_instance_that_answers_its_health_check_keeps_its_work(
    two: tuple[str, FakeInstance, FakeInstance],
) -> None:
    url, _, idle = two
    idle.reporting = False
    time.sleep(1.0)  # three silences of 0.3 s, each followed by a health check that passes
    assert placed(url, 5) == {"idle": 5}


def test_a_silent_instance_that_fails_its_health_check_gets_no_work(
    two: tuple[str, FakeInstance, FakeInstance],
) -> None:
    url, _, idle = two
    idle.reporting, idle.healthy = False, False
    time.sleep(1.0)
    assert placed(url, 5) == {"busy": 5}
    idle.reporting, idle.healthy = True, True  # its next report makes it eligible again
    deadline = time.monotonic() + 10
    while placed(url, 1) != {"idle": 1}:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def post_json(url: str, body: bytes) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_migrate_and_drain_requests_that_cannot_start_get_typed_errors(
    two: tuple[str, FakeInstance, FakeInstance],
) -> None:
    url = two[0]
    cases = [
        ("/v1/llumnix/migrate", b"{not json", 400),
        ("/v1/llumnix/migrate", b'{"request_id": "llx-1"}', 400),
        ("/v1/llumnix/migrate", b'{"request_id": "llx-1", "destination": "idle"}', 404),
        ("/v1/llumnix/migrate",
         b'{"request_id": "llx-1", "destination": "idle", "max_stages": "x"}', 400),
        ("/v1/llumnix/drain", b'{"instance": "nowhere"}', 404),
        ("/v1/llumnix/drain", b'{"instance": "idle"}', 400),  # no llumlet to drain it
    ]  # fmt: skip
    for path, body, want in cases:
        status, answer = post_json(url + path, body)
        assert status == want, (path, body, answer)
        error = answer["error"]
        assert isinstance(error, dict) and error["message"], answer
    with urllib.request.urlopen(url + "/v1/llumnix/requests", timeout=10) as resp:
        assert json.loads(resp.read()) == []
