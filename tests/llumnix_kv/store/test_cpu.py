from __future__ import annotations

import threading

import numpy as np
import pytest

from llumnix_kv.errors import InvalidArgumentError
from llumnix_kv.store import TierClosedError
from llumnix_kv.store.cpu import CpuTier, CpuTierConfig
from tests.llumnix_kv.store.conftest import chunk, keys_for

CHUNK = 4096


@pytest.fixture(params=[CHUNK, None], ids=["slab", "variable"])
def tier(request: pytest.FixtureRequest) -> CpuTier:
    return CpuTier(CpuTierConfig(capacity_bytes=4 * CHUNK, chunk_bytes=request.param))


def test_round_trip_batch(tier: CpuTier) -> None:
    keys = keys_for("k", 3)
    vals = [chunk(i, CHUNK) for i in range(3)]
    assert tier.put(keys, vals).result(1.0) == [True] * 3
    assert tier.contains([*keys, b"absent"]) == [True, True, True, False]
    outs = [np.zeros(CHUNK, np.uint8) for _ in range(4)]
    sentinel = np.full(CHUNK, 7, np.uint8)
    outs[3][:] = sentinel
    assert tier.get([*keys, b"absent"], outs).result(1.0) == [True, True, True, False]
    for v, o in zip(vals, outs, strict=False):
        np.testing.assert_array_equal(v, o)
    np.testing.assert_array_equal(outs[3], sentinel)  # a miss leaves its buffer untouched
    tier.delete([keys[0], b"absent"])
    assert tier.contains(keys) == [False, True, True]
    s = tier.stats()
    assert (s["hits"], s["misses"], s["puts"], s["entries"]) == (3, 1, 3, 2)
    assert s["bytes_used"] == 2 * CHUNK


def test_caller_may_reuse_staging_buffer(tier: CpuTier) -> None:
    staging = chunk(1, CHUNK)
    expected = staging.copy()
    tier.put([b"a"], [staging]).result(1.0)
    staging[:] = 0
    out = np.empty(CHUNK, np.uint8)
    assert tier.get([b"a"], [out]).result(1.0) == [True]
    np.testing.assert_array_equal(out, expected)


def test_other_dtypes_and_memoryviews(tier: CpuTier) -> None:
    value = np.arange(CHUNK // 2, dtype=np.float16).reshape(8, -1)
    tier.put([b"f16"], [value.data]).result(1.0)
    out = np.zeros_like(value)
    assert tier.get([b"f16"], [out]).result(1.0) == [True]
    np.testing.assert_array_equal(out, value)


def test_lru_eviction_order_and_exact_capacity(tier: CpuTier) -> None:
    keys = keys_for("k", 6)
    tier.put(keys[:4], [chunk(i, CHUNK) for i in range(4)]).result(1.0)
    assert tier.stats()["bytes_used"] == 4 * CHUNK
    out = np.empty(CHUNK, np.uint8)
    tier.get([keys[0]], [out]).result(1.0)  # k-0 becomes most recent
    tier.put([keys[4]], [chunk(4, CHUNK)]).result(1.0)  # evicts k-1
    assert tier.lru_keys() == [keys[2], keys[3], keys[0], keys[4]]
    tier.put([keys[2]], [chunk(2, CHUNK)]).result(1.0)  # present: refreshed, nothing evicted
    tier.put([keys[5]], [chunk(5, CHUNK)]).result(1.0)  # evicts k-3
    assert tier.lru_keys() == [keys[0], keys[4], keys[2], keys[5]]
    s = tier.stats()
    assert s["evictions"] == 2
    assert s["bytes_used"] == 4 * CHUNK == s["capacity_bytes"]


def test_variable_size_capacity_is_exact() -> None:
    tier = CpuTier(CpuTierConfig(capacity_bytes=1000))
    assert tier.put([b"a", b"b"], [chunk(0, 600), chunk(1, 400)]).result(1.0) == [True, True]
    assert tier.stats()["bytes_used"] == 1000
    assert tier.put([b"c"], [chunk(2, 1)]).result(1.0) == [True]  # evicts a (600 bytes)
    assert tier.lru_keys() == [b"b", b"c"]
    assert tier.stats()["bytes_used"] == 401
    assert tier.put([b"big"], [chunk(3, 1001)]).result(1.0) == [False]  # never fits
    assert tier.contains([b"b", b"c"]) == [True, True]
    assert tier.stats()["rejected"] == 1
    out = np.empty(400, np.uint8)
    assert tier.get([b"b"], [out]).result(1.0) == [True]
    np.testing.assert_array_equal(out, chunk(1, 400))


def test_bad_arguments(tier: CpuTier) -> None:
    with pytest.raises(InvalidArgumentError):
        tier.put([b"a", b"b"], [chunk(0, CHUNK)])
    with pytest.raises(InvalidArgumentError):
        tier.put(["str-key"], [chunk(0, CHUNK)])  # type: ignore[list-item]
    tier.put([b"a"], [chunk(0, CHUNK)]).result(1.0)
    readonly = np.zeros(CHUNK, np.uint8)
    readonly.flags.writeable = False
    with pytest.raises(InvalidArgumentError):
        tier.get([b"a"], [readonly])
    with pytest.raises(InvalidArgumentError):
        tier.get([b"a"], [np.zeros((CHUNK, 2), np.uint8)[:, 0]])  # not contiguous
    with pytest.raises(InvalidArgumentError):
        tier.get([b"a"], [np.zeros(CHUNK - 1, np.uint8)]).result(1.0)


def test_slab_rejects_other_sizes() -> None:
    tier = CpuTier(CpuTierConfig(capacity_bytes=2 * CHUNK, chunk_bytes=CHUNK))
    with pytest.raises(InvalidArgumentError):
        tier.put([b"a"], [chunk(0, CHUNK + 1)])


def test_closed() -> None:
    tier = CpuTier(CpuTierConfig(capacity_bytes=CHUNK, chunk_bytes=CHUNK))
    tier.close()
    with pytest.raises(TierClosedError):
        tier.contains([b"a"])


def test_concurrent_puts_and_gets_keep_capacity() -> None:
    tier = CpuTier(CpuTierConfig(capacity_bytes=8 * 256, chunk_bytes=256))
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            out = np.empty(256, np.uint8)
            for i in range(300):
                key = f"{t}-{i % 20}".encode()
                tier.put([key], [np.full(256, i % 20, np.uint8)]).result(1.0)
                if tier.get([key], [out]).result(1.0)[0]:
                    assert (out == i % 20).all()
                assert tier.stats()["bytes_used"] <= 8 * 256
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30.0)
    assert not errors
    s = tier.stats()
    assert s["entries"] == 8 and s["bytes_used"] == 8 * 256
