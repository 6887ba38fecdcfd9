"""``llumnix serve --reschedule`` end to end: the rescheduler live-migrates streams on two real
vLLM CPU engines (64 KV blocks each, so three long requests load one), and ``llumnix drain``
retires an instance with nothing lost.

- Three streams forced onto i0 (i1 draining while they start, then back): the load-balance
  policy moves some to i1 by itself; every stream equals the unmigrated greedy answer.
- ``llumnix drain i0`` while streams run there: they continue on i1 token-identical, the
  command reports the migrations, i0's engine is stopped, new requests go to i1."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

try:
    import vllm  # noqa: F401
except Exception as exc:  # a broken install raises more than ImportError
    pytest.skip(f"vllm is not importable: {exc}", allow_module_level=True)

from tests.e2e.test_serve import (
    REPO,
    Served,
    Stream,
    all_idle,
    complete,
    counter,
    fresh_prompt,
    launch,
)

DONE = re.compile(r'^llumnix_gateway_migrations_total\{outcome="done"\}\s+(\S+)$', re.M)
N = 300


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    args = ["--instances", "2", "--reschedule", "--engine-arg=--num-gpu-blocks-override=64"]
    with launch(tmp_path_factory, args, {"i0", "i1"}) as s:
        yield s


def reference(served: Served, prompt: list[int], instance: str) -> list[int]:
    return complete(served.client(served.engines[instance]["url"]), served.model, prompt, N, False)


def wait_draining(served: Served, iid: str, on: bool) -> None:
    with served.llumlet(iid) as llumlet:
        llumlet.drain(on)
    time.sleep(0.5)  # the gateway has the report that says so


def test_the_rescheduler_moves_streams_off_a_loaded_instance(served: Served) -> None:
    done = counter(served.url, DONE)
    wait_draining(served, "i1", True)
    prompts = [fresh_prompt(100 + k) for k in range(3)]
    streams = [Stream(served, p, N) for p in prompts]
    try:
        assert [s.instance for s in streams] == ["i0"] * 3
        for s in streams:
            s.read_until(2)
        wait_draining(served, "i1", False)
        for s in streams:
            s.read_until(N + 1)
    finally:
        for s in streams:
            s.close()
    moved = counter(served.url, DONE) - done
    assert moved >= 1, "the rescheduler moved nothing off the loaded instance"
    for s, p in zip(streams, prompts, strict=True):
        assert s.done and s.ids == reference(served, p, "i1")
    all_idle(served)


def test_llumnix_drain_moves_every_stream_away_and_stops_the_instance(served: Served) -> None:
    wait_draining(served, "i1", True)
    prompts = [fresh_prompt(200 + k) for k in range(2)]
    streams = [Stream(served, p, N) for p in prompts]
    wait_draining(served, "i1", False)
    try:
        assert [s.instance for s in streams] == ["i0"] * 2
        for s in streams:
            s.read_until(5)
        drain = subprocess.run(
            [sys.executable, "-m", "llumnix.cli", "drain", "i0", "--url", served.url,
             "--timeout", "120"],
            cwd=REPO, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert drain.returncode == 0, drain.stderr
        answer = json.loads(drain.stdout)
        for s in streams:
            s.read_until(N + 1)
    finally:
        for s in streams:
            s.close()
    assert answer["instance"] == "i0" and answer["stopped"] and answer["migrated"] >= 1, answer
    for s, p in zip(streams, prompts, strict=True):
        assert s.done and s.ids == reference(served, p, "i1")
    assert not psutil.pid_exists(served.engines["i0"]["pid"])
    s = Stream(served, fresh_prompt(300), 4)
    s.read_until(5)
    s.close()
    assert s.instance == "i1" and s.done
    del served.engines["i0"]
    all_idle(served)
