"""Prefill-decode disaggregation through the gateway: ``llumnix serve --pd 1:1`` (pull mode)
and an in-process gateway in push mode over the same two real vLLM CPU engines.

Every request is split by the gateway: its prompt runs on the prefill instance, the decode
instance gets the KV through the LlumnixConnector (the decode's external-KV counter and, in
push mode, the prefill's push counter show it moved), and greedy outputs, streamed and not,
equal a plain engine's own. A request the prefill rejects gets vLLM's own status."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

try:
    import openai  # noqa: F401
    import vllm  # noqa: F401
except Exception as exc:  # a broken install raises more than ImportError
    pytest.skip(f"vllm or openai is not importable: {exc}", allow_module_level=True)

from llumnix.metastore import open_meta_store
from tests.e2e.test_pd_proxy import EXTERNAL_METRIC, PUSHES_METRIC
from tests.e2e.test_serve import (
    Served,
    complete,
    counter,
    gateway_in_thread,
    launch,
    post,
    record,
)

BLOCK = 32
LENGTHS = (40, 64, 100)  # across block boundaries
VOCAB = 500  # token ids stay below the tiny model's vocabulary (512): vLLM's engine dies on others


def prompt(seed: int, n: int) -> list[int]:
    """A prompt no other seed shares a first block with."""
    return [(seed * 37 + 7 * i) % VOCAB + 3 for i in range(n)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with launch(tmp_path_factory, ["--pd", "1:1", "--pd-mode", "pull"], {"p0", "d1"}) as s:
        yield s


def through(served: Served, url: str, seed: int) -> None:
    """Prompts of each length (seeded so no engine has them cached) through the gateway at
    ``url``, streamed and not: equal to the prefill engine's own plain answer, served by the
    decode instance, whose external-KV counter grows by the prompt's full blocks."""
    gateway = served.client(url)
    plain = served.client(served.engines["p0"]["url"])
    decode = served.engines["d1"]["url"]
    for stream in (False, True):
        for n, length in enumerate(LENGTHS):
            p = prompt(seed + 2 * n + stream, length)
            before = counter(decode, EXTERNAL_METRIC)
            got = complete(gateway, served.model, p, 10, stream)
            loaded = counter(decode, EXTERNAL_METRIC) - before
            assert got == complete(plain, served.model, p, 10, False), (n, stream)
            assert loaded >= (length - 1) // BLOCK * BLOCK > 0, (n, stream, loaded)
    body = {"model": served.model, "prompt": prompt(seed + 99, 20), "max_tokens": 2}
    req = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["X-Llumnix-Instance"] == "d1"


def test_pull_mode_serve_splits_every_request(served: Served) -> None:
    assert {e["role"] for e in served.engines.values()} == {"prefill", "decode"}
    through(served, served.url, seed=0)


def test_push_mode_gateway_has_the_prefill_write_the_kv(served: Served) -> None:
    store = open_meta_store("memory")
    for iid, e in served.engines.items():
        with served.llumlet(iid) as llumlet:
            store.register(record(iid, e, llumlet.status().num_total_blocks), 60)
    prefill = served.engines["p0"]["url"]
    pushes = counter(prefill, PUSHES_METRIC)
    with gateway_in_thread(store, "llumnix", pd_mode="push") as url:
        time.sleep(0.5)  # the first reports
        through(served, url, seed=200)
    # A push is counted when the prefill frees its blocks, a step after the decode's read.
    deadline = time.monotonic() + 30
    while counter(prefill, PUSHES_METRIC) - pushes < 2 * len(LENGTHS) + 1:
        assert time.monotonic() < deadline, "pushes not counted on the prefill"
        time.sleep(0.2)


def test_what_the_prefill_rejects_gets_vllms_own_status(served: Served) -> None:
    engine = served.engines["p0"]["url"] + "/v1/completions"
    gateway = served.url + "/v1/completions"
    cases: list[dict[str, Any]] = [
        {"model": served.model, "prompt": prompt(400, 1500), "max_tokens": 2},
        {"model": "no-such-model", "prompt": [1, 2], "max_tokens": 2},
    ]
    for body in cases:
        data = json.dumps(body).encode()
        (want, _), (got, err) = post(engine, data), post(gateway, data)
        assert got == want and want in (400, 404), body["model"]
        assert err["error"]["message"]
    status, err = post(gateway, json.dumps({**cases[0], "prompt": [[1, 2], [3, 4]]}).encode())
    assert status == 400 and "batched" in err["error"]["message"]
