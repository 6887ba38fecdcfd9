"""Fixtures of the store tier tests: deterministic chunks and a real redis-server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

REDIS_SERVER = shutil.which("redis-server")
STARTUP_DEADLINE_S = 10.0


def chunk(seed: int, nbytes: int) -> np.ndarray:
    """A deterministic uint8 chunk of ``nbytes``."""
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def keys_for(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}-{i}".encode() for i in range(n)]


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis() -> RedisServer:
    """Start redis-server on a free loopback port, without persistence; wait for PING."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    redis = pytest.importorskip("redis", reason="the redis client is not installed")
    port = _free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [REDIS_SERVER, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = RedisServer(port, proc)
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    client = redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}")
            try:
                if client.ping():
                    return server
            except redis.exceptions.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server did not answer PING in {STARTUP_DEADLINE_S} s")
            time.sleep(0.05)
    except BaseException:
        server.stop()
        raise
    finally:
        client.close()


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
