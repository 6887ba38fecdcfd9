"""Remote shared tier on Redis: chunks reused across instances and hosts.

Every chunk is one Redis string ``<prefix><key>`` (raw key bytes after a per-namespace prefix,
so two models sharing a server never collide) holding a :mod:`llumnix_kv.store.record`
(header, key, payload, crc32). Batches are pipelined: ``put`` is one pipeline of ``SET`` (with
``PX`` when a TTL is set), ``get`` is one ``MGET`` per ``max_batch_keys`` keys, ``contains`` is
one pipeline of ``EXISTS``. A value that fails its check counts as ``corrupt``, is deleted and
is a miss.

Capacity and eviction belong to the server: run it with ``maxmemory`` and
``maxmemory-policy allkeys-lru`` to make it an LRU cache. Every network wait is bounded by
``connect_timeout_s`` / ``socket_timeout_s`` (times ``1 + retries``); an unreachable server
raises :class:`TierUnavailableError` and a stalled one :class:`KvTimeoutError`, synchronously
from ``contains``/``delete`` and through the future from ``put``/``get``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

try:
    import redis as redis_py
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the redis store tier needs the redis client: pip install redis") from exc

from llumnix_kv.errors import CorruptionError, InvalidArgumentError, KvTimeoutError
from llumnix_kv.store import record
from llumnix_kv.store.base import (
    ChunkKey,
    StoreTier,
    TierClosedError,
    TierCounters,
    TierUnavailableError,
    byte_view,
    check_batch,
)

logger = logging.getLogger(__name__)

__all__ = ["RedisTier", "RedisTierConfig"]


@dataclass
class RedisTierConfig:
    url: str = "redis://127.0.0.1:6379/0"
    """Server address, ``redis://[user:password@]host:port/db`` (``rediss://`` for TLS)."""

    namespace: str = "default"
    """Key namespace, one per model and KV format: chunks are shared only within it."""

    ttl_s: float | None = None
    """Expire each chunk this many seconds after its last put; None keeps it until evicted."""

    connect_timeout_s: float = 2.0
    """Deadline of opening one connection, in seconds."""

    socket_timeout_s: float = 5.0
    """Deadline of each socket read or write, in seconds."""

    retries: int = 0
    """Extra attempts of a command after a connection error (no backoff)."""

    io_threads: int = 2
    """Threads (each with its own connection) that run put and get batches."""

    max_batch_keys: int = 64
    """Most keys in one pipeline or MGET; bounds the client's buffered bytes per round trip."""

    check_on_start: bool = True
    """PING the server in the constructor, raising TierUnavailableError if it does not answer."""


@contextlib.contextmanager
def _translated(url: str) -> Iterator[None]:
    """Re-raise redis client errors as llumnix_kv errors."""
    try:
        yield
    except redis_py.exceptions.TimeoutError as exc:
        raise KvTimeoutError(f"redis store tier {url}: timed out ({exc})") from exc
    except redis_py.exceptions.ConnectionError as exc:
        raise TierUnavailableError(f"redis store tier {url} is unreachable: {exc}") from exc


class RedisTier(StoreTier):
    """Chunks on a shared Redis server. Thread-safe; several processes may share a namespace."""

    name = "redis"
    config_class: ClassVar[type] = RedisTierConfig

    def __init__(self, config: RedisTierConfig) -> None:
        if config.io_threads <= 0 or config.max_batch_keys <= 0 or config.retries < 0:
            raise InvalidArgumentError("io_threads and max_batch_keys must be > 0, retries >= 0")
        if config.ttl_s is not None and config.ttl_s <= 0:
            raise InvalidArgumentError("ttl_s must be > 0 or None")
        self.config = config
        self._prefix = f"llumnix_kv:{config.namespace}:".encode()
        self._ttl_ms = None if config.ttl_s is None else max(1, int(config.ttl_s * 1000))
        self._counters = TierCounters()
        self._closed = False
        self._client = redis_py.Redis.from_url(
            config.url,
            socket_connect_timeout=config.connect_timeout_s,
            socket_timeout=config.socket_timeout_s,
            retry=Retry(NoBackoff(), config.retries),
            max_connections=config.io_threads + 4,
        )
        if config.check_on_start:
            with _translated(config.url):
                self._client.ping()
        self._pool = ThreadPoolExecutor(config.io_threads, thread_name_prefix="llumnix-kv-redis")

    def _check_open(self) -> None:
        if self._closed:
            raise TierClosedError(f"RedisTier({self.config.url}) is closed")

    def _rkey(self, key: bytes) -> bytes:
        return self._prefix + key

    def _groups(self, n: int) -> Iterator[range]:
        step = self.config.max_batch_keys
        for start in range(0, n, step):
            yield range(start, min(n, start + step))

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        self._check_open()
        out: list[bool] = []
        with _translated(self.config.url):
            for group in self._groups(len(keys)):
                pipe = self._client.pipeline(transaction=False)
                for i in group:
                    pipe.exists(self._rkey(keys[i]))
                out.extend(bool(n) for n in pipe.execute())
        return out

    def put(self, keys: Sequence[ChunkKey], values: Sequence[Any]) -> Future[list[bool]]:
        self._check_open()
        check_batch(keys, values, "values")
        srcs = [byte_view(v, what=f"values[{i}]") for i, v in enumerate(values)]
        return self._pool.submit(self._put_batch, list(keys), srcs)

    def _put_batch(self, keys: list[bytes], srcs: list[np.ndarray]) -> list[bool]:
        stored: list[bool] = []
        with _translated(self.config.url):
            for group in self._groups(len(keys)):
                pipe = self._client.pipeline(transaction=False)
                for i in group:
                    blob = b"".join((record.encode_header(keys[i], srcs[i]), srcs[i].data))
                    pipe.set(self._rkey(keys[i]), blob, px=self._ttl_ms)
                stored.extend(bool(ok) for ok in pipe.execute())
        self._counters.add("puts", sum(stored))
        self._counters.add("rejected", len(stored) - sum(stored))
        return stored

    def get(self, keys: Sequence[ChunkKey], outs: Sequence[Any]) -> Future[list[bool]]:
        self._check_open()
        check_batch(keys, outs, "out buffers")
        dsts = [byte_view(o, writable=True, what=f"outs[{i}]") for i, o in enumerate(outs)]
        return self._pool.submit(self._get_batch, list(keys), dsts)

    def _get_batch(self, keys: list[bytes], dsts: list[np.ndarray]) -> list[bool]:
        hits: list[bool] = []
        corrupt: list[bytes] = []
        with _translated(self.config.url):
            for group in self._groups(len(keys)):
                blobs: list[bytes | None] = self._client.mget(  # type: ignore[assignment]
                    [self._rkey(keys[i]) for i in group]
                )
                for i, blob in zip(group, blobs, strict=True):
                    hits.append(self._fill(keys[i], blob, dsts[i], i, corrupt))
            if corrupt:
                self._client.delete(*corrupt)
        self._counters.add("hits", sum(hits))
        self._counters.add("misses", len(hits) - sum(hits))
        return hits

    def _fill(
        self, key: bytes, blob: bytes | None, dst: np.ndarray, index: int, corrupt: list[bytes]
    ) -> bool:
        """Copy one MGET value into ``dst``; False for a miss or a corrupt value."""
        if blob is None:
            return False
        try:
            payload = record.decode(blob, key)
        except CorruptionError as exc:
            logger.warning("redis tier: dropping corrupt chunk %s: %s", key.hex()[:16], exc)
            self._counters.add("corrupt")
            corrupt.append(self._rkey(key))
            return False
        if payload.nbytes != dst.nbytes:
            raise InvalidArgumentError(
                f"outs[{index}] is {dst.nbytes} bytes, chunk is {payload.nbytes}"
            )
        np.copyto(dst, np.frombuffer(payload, dtype=np.uint8))
        return True

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        self._check_open()
        with _translated(self.config.url):
            for group in self._groups(len(keys)):
                self._client.delete(*(self._rkey(keys[i]) for i in group))

    def stats(self) -> dict[str, Any]:
        return dict(self._counters.snapshot())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        self._client.close()
