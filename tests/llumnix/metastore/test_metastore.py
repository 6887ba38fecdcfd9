"""Both meta store backends behave the same: registrations expire unless renewed, the newest
report wins, in-flight entries settle and age out; Redis runs as a real redis-server, and a
dead one fails every call with MetaStoreError within the timeout."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from llumnix.metastore import (
    InFlight,
    InstanceRecord,
    MetaStore,
    MetaStoreError,
    open_meta_store,
)
from llumnix.scheduler import InstanceStatus
from tests.redis_server import REDIS_SERVER, RedisProcess


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[MetaStore]:
    if request.param == "memory":
        yield open_meta_store("memory")
        return
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = RedisProcess()
    try:
        s = open_meta_store(server.url, namespace="t")
        yield s
        s.close()
    finally:
        server.stop()


def record(iid: str) -> InstanceRecord:
    return InstanceRecord(iid, f"http://127.0.0.1:1/{iid}", llumlet="127.0.0.1:2", block_size=32)


def test_registrations_expire_unless_renewed(store: MetaStore) -> None:
    store.register(record("a"), ttl_s=0.3)
    store.register(record("b"), ttl_s=30)
    assert set(store.instances()) == {"a", "b"}
    assert store.instances()["a"] == record("a")
    time.sleep(0.2)
    store.register(record("a"), ttl_s=0.3)  # renewed
    time.sleep(0.2)
    assert set(store.instances()) == {"a", "b"}
    time.sleep(0.3)
    assert set(store.instances()) == {"b"}
    store.deregister("b")
    assert store.instances() == {}


def test_the_newest_report_wins_and_reports_expire(store: MetaStore) -> None:
    now = time.time()
    new = InstanceStatus("a", timestamp=now, num_total_blocks=10, num_free_blocks=4,
                         num_running=2, request_ids=frozenset({"r1", "r2"}))  # fmt: skip
    store.put_status(new, ttl_s=0.4)
    store.put_status(InstanceStatus("a", timestamp=now - 1, num_free_blocks=9), ttl_s=0.4)
    got = store.statuses()["a"]
    assert (got.num_free_blocks, got.num_running, got.request_ids) == (4, 2, new.request_ids)
    assert time.time() - got.timestamp < 1.0  # its age is what the staleness filter reads
    time.sleep(0.5)
    assert store.statuses() == {}


def test_inflight_entries_settle_and_age_out(store: MetaStore) -> None:
    now = time.time()
    store.add_inflight("a", InFlight("r1", 2, 64, now))
    store.add_inflight("a", InFlight("r2", 3, 96, now - 10))
    assert {e.request_id for e in store.inflight("a", now, ttl_s=5)} == {"r1"}
    store.settle("a", ["r1", "unknown"])
    assert store.inflight("a", now, ttl_s=5) == []
    assert store.inflight("b", now, ttl_s=5) == []


def test_a_dead_redis_fails_fast_with_a_typed_error() -> None:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = RedisProcess()
    store = open_meta_store(server.url, timeout_s=0.3)
    store.register(record("a"), ttl_s=30)
    server.stop()
    for call in (store.instances, store.statuses, lambda: store.register(record("a"), 30)):
        began = time.monotonic()
        with pytest.raises(MetaStoreError):
            call()
        assert time.monotonic() - began < 3.0
    store.close()


def test_unknown_meta_store_url() -> None:
    with pytest.raises(ValueError, match="unknown meta store"):
        open_meta_store("etcd://x")
