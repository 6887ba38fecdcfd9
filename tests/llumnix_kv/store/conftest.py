"""Fixtures of the store tier tests: deterministic chunks and a real redis-server."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from tests.redis_server import REDIS_SERVER, RedisProcess

STARTUP_DEADLINE_S = 10.0


def chunk(seed: int, nbytes: int) -> np.ndarray:
    """A deterministic uint8 chunk of ``nbytes``."""
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def keys_for(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}-{i}".encode() for i in range(n)]


RedisServer = RedisProcess


def start_redis() -> RedisServer:
    """A real redis-server on a free loopback port (skips without redis-server or the client)."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    pytest.importorskip("redis", reason="the redis client is not installed")
    return RedisProcess(STARTUP_DEADLINE_S)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """One server for a test module; each test uses its own namespace."""
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis_server() -> Iterator[RedisServer]:
    """A server the test may kill."""
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()
