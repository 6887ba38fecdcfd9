from __future__ import annotations

import multiprocessing
import time
import uuid

import numpy as np
import pytest

from llumnix_kv.errors import InvalidArgumentError, KvError, KvTimeoutError
from llumnix_kv.store import TierUnavailableError, create_tier
from tests.llumnix_kv.store.conftest import RedisServer, chunk, keys_for

pytest.importorskip("redis", reason="the redis client is not installed (pip install redis)")

from llumnix_kv.store.redis import RedisTier, RedisTierConfig

CHUNK = 32 * 1024


def make(server: RedisServer, namespace: str, **kw: object) -> RedisTier:
    return RedisTier(RedisTierConfig(url=server.url, namespace=namespace, **kw))  # type: ignore[arg-type]


@pytest.fixture
def namespace() -> str:
    return uuid.uuid4().hex


def test_round_trip_batches(redis_server: RedisServer, namespace: str) -> None:
    keys = keys_for("k", 10)
    vals = [chunk(i, CHUNK) for i in range(10)]
    with make(redis_server, namespace, max_batch_keys=3) as tier:
        assert tier.put(keys, vals).result(10.0) == [True] * 10
        assert tier.contains([*keys, b"nope"]) == [True] * 10 + [False]
        outs = [np.zeros(CHUNK, np.uint8) for _ in range(11)]
        assert tier.get([*keys, b"nope"], outs).result(10.0) == [True] * 10 + [False]
        for v, o in zip(vals, outs, strict=False):
            np.testing.assert_array_equal(v, o)
        assert not outs[10].any()
        tier.delete(keys[:5])
        assert tier.contains(keys) == [False] * 5 + [True] * 5
        s = tier.stats()
        assert (s["puts"], s["hits"], s["misses"]) == (10, 10, 1)
        with pytest.raises(InvalidArgumentError):
            tier.get([keys[5]], [np.zeros(CHUNK - 1, np.uint8)]).result(10.0)


def test_namespaces_are_separate(redis_server: RedisServer, namespace: str) -> None:
    with make(redis_server, namespace) as a, make(redis_server, namespace + "-other") as b:
        a.put([b"k"], [chunk(0, CHUNK)]).result(10.0)
        assert b.contains([b"k"]) == [False]


def test_ttl_expires(redis_server: RedisServer, namespace: str) -> None:
    with make(redis_server, namespace, ttl_s=0.2) as tier:
        tier.put([b"k"], [chunk(0, CHUNK)]).result(10.0)
        assert tier.contains([b"k"]) == [True]
        deadline = time.monotonic() + 5.0
        while tier.contains([b"k"])[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tier.contains([b"k"]) == [False]


def test_corrupt_value_is_a_miss_and_deleted(redis_server: RedisServer, namespace: str) -> None:
    import redis

    with make(redis_server, namespace) as tier:
        tier.put([b"k"], [chunk(0, CHUNK)]).result(10.0)
        raw = redis.Redis.from_url(redis_server.url)
        rkey = f"llumnix_kv:{namespace}:k".encode()
        blob = bytearray(raw.get(rkey))  # type: ignore[arg-type]
        blob[-10] ^= 0xFF
        raw.set(rkey, bytes(blob))
        out = np.zeros(CHUNK, np.uint8)
        assert tier.get([b"k"], [out]).result(10.0) == [False]
        assert not out.any()
        assert tier.stats()["corrupt"] == 1
        assert raw.exists(rkey) == 0
        raw.close()


def _child_get(url: str, namespace: str, keys: list[bytes], nbytes: int) -> None:
    tier = RedisTier(RedisTierConfig(url=url, namespace=namespace))
    outs = [np.empty(nbytes, np.uint8) for _ in keys]
    hits = tier.get(keys, outs).result(10.0)
    tier.close()
    if not all(hits) or any(not np.array_equal(o, chunk(i, nbytes)) for i, o in enumerate(outs)):
        raise SystemExit(3)


def test_reuse_across_instances_and_processes(redis_server: RedisServer, namespace: str) -> None:
    keys = keys_for("k", 4)
    writer = create_tier("redis", {"url": redis_server.url, "namespace": namespace})
    with writer:
        writer.put(keys, [chunk(i, CHUNK) for i in range(4)]).result(10.0)
    with make(redis_server, namespace) as reader:  # another instance in this process
        outs = [np.empty(CHUNK, np.uint8) for _ in keys]
        assert reader.get(keys, outs).result(10.0) == [True] * 4
        np.testing.assert_array_equal(outs[3], chunk(3, CHUNK))
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_child_get, args=(redis_server.url, namespace, keys, CHUNK))
    proc.start()
    proc.join(60.0)
    if proc.is_alive():
        proc.kill()
        proc.join()
    assert proc.exitcode == 0


def test_unreachable_server_raises_typed_error(own_redis_server: RedisServer) -> None:
    tier = make(own_redis_server, "ns", connect_timeout_s=0.5, socket_timeout_s=0.5)
    try:
        tier.put([b"k"], [chunk(0, CHUNK)]).result(10.0)
        own_redis_server.stop()
        start = time.monotonic()
        with pytest.raises(TierUnavailableError):
            tier.contains([b"k"])
        with pytest.raises((TierUnavailableError, KvTimeoutError)):
            tier.get([b"k"], [np.empty(CHUNK, np.uint8)]).result(10.0)
        with pytest.raises(KvError):
            tier.put([b"k2"], [chunk(1, CHUNK)]).result(10.0)
        assert time.monotonic() - start < 5.0
    finally:
        tier.close()
    start = time.monotonic()
    with pytest.raises(TierUnavailableError):
        make(own_redis_server, "ns", connect_timeout_s=0.5)
    assert time.monotonic() - start < 5.0


def test_stalled_server_times_out(own_redis_server: RedisServer) -> None:
    import os
    import signal

    tier = make(own_redis_server, "ns", socket_timeout_s=0.3)
    os.kill(own_redis_server.proc.pid, signal.SIGSTOP)  # accepts nothing, answers nothing
    try:
        start = time.monotonic()
        with pytest.raises(KvTimeoutError):
            tier.get([b"k"], [np.empty(CHUNK, np.uint8)]).result(10.0)
        assert time.monotonic() - start < 3.0
    finally:
        os.kill(own_redis_server.proc.pid, signal.SIGCONT)
        tier.close()
