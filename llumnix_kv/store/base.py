"""The contract every KV store tier implements.

A tier stores opaque byte chunks under content-addressed keys. A *chunk* is the KV of
``chunk_tokens`` consecutive tokens of a request (all layers) packed into one contiguous buffer;
its key is a chained prefix hash of the token chunks (vLLM's block hash, or
:func:`llumnix_kv.store.keys.chained_chunk_keys`), so equal keys mean equal bytes.

Operations are batched. ``contains`` is synchronous and cheap; ``put`` and ``get`` return a
:class:`concurrent.futures.Future` that resolves to one ``bool`` per key:

* ``put(keys, values)``: ``True`` = stored (or already present). ``values`` are buffer-protocol
  objects (numpy arrays, memoryviews, bytes); the tier has copied them by the time the future
  is done, so the caller may reuse its staging buffer then, and not before.
* ``get(keys, outs)``: ``True`` = hit, ``outs[i]`` filled; ``False`` = miss, ``outs[i]``
  untouched. Each out must be a writable C-contiguous buffer of exactly the stored chunk's size.

Errors are :class:`llumnix_kv.errors.KvError` subclasses. A malformed argument (batch lengths
differ, a read-only out buffer, a value of the wrong size for a fixed-size tier) raises
``InvalidArgumentError`` synchronously. A stored chunk whose size differs from its out buffer
fails the ``get`` future with ``InvalidArgumentError``. A chunk that fails its integrity check is
never returned: it counts as ``corrupt``, is deleted, and is a miss. Tiers are thread-safe.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from llumnix_kv.errors import (
    InvalidArgumentError,
    TierClosedError,
    TierUnavailableError,
)

__all__ = [
    "ChunkKey",
    "StoreTier",
    "TierClosedError",
    "TierCounters",
    "TierUnavailableError",
    "byte_view",
    "completed",
    "gather_futures",
]

ChunkKey = bytes
"""A chunk's content address (e.g. a 32-byte sha256 chained prefix hash)."""

T = TypeVar("T")

# Counter names every tier reports from stats(); tiers add their own (bytes_used, entries, ...).
COUNTERS = ("hits", "misses", "puts", "rejected", "evictions", "corrupt", "errors")


class TierCounters:
    """Thread-safe event counters of one tier (see ``COUNTERS``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(COUNTERS, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


class StoreTier(abc.ABC):
    """One storage tier of content-addressed KV chunks. See the module docstring."""

    name: str = "abstract"

    @abc.abstractmethod
    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Whether each key is stored now (a later ``get`` may still miss after an eviction)."""

    @abc.abstractmethod
    def put(self, keys: Sequence[ChunkKey], values: Sequence[Any]) -> Future[list[bool]]:
        """Store ``values[i]`` under ``keys[i]``; per key, whether it is stored."""

    @abc.abstractmethod
    def get(self, keys: Sequence[ChunkKey], outs: Sequence[Any]) -> Future[list[bool]]:
        """Fill ``outs[i]`` with the chunk of ``keys[i]``; per key, hit (filled) or miss."""

    @abc.abstractmethod
    def delete(self, keys: Sequence[ChunkKey]) -> None:
        """Remove the keys (absent keys are ignored)."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counters (``COUNTERS``) plus tier-specific gauges such as ``bytes_used``."""

    def close(self) -> None:  # noqa: B027 - a tier without resources has nothing to release
        """Release threads, files and connections; finishes in-flight writes first."""

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def byte_view(buf: Any, *, writable: bool = False, what: str = "buffer") -> npt.NDArray[np.uint8]:
    """A flat uint8 numpy view of a C-contiguous buffer-protocol object (no copy)."""
    try:
        mv = memoryview(buf)
    except TypeError as exc:
        raise InvalidArgumentError(f"{what} does not support the buffer protocol") from exc
    if not mv.c_contiguous:
        raise InvalidArgumentError(f"{what} is not C-contiguous")
    if writable and mv.readonly:
        raise InvalidArgumentError(f"{what} is read-only")
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return np.frombuffer(mv, dtype=np.uint8)


def check_batch(keys: Sequence[ChunkKey], buffers: Sequence[Any], what: str) -> None:
    """Raises InvalidArgumentError unless keys are bytes and match ``buffers`` one to one."""
    if len(keys) != len(buffers):
        raise InvalidArgumentError(f"{len(keys)} keys but {len(buffers)} {what}")
    for key in keys:
        if not isinstance(key, bytes) or not key:
            raise InvalidArgumentError(f"a chunk key must be non-empty bytes, got {key!r:.40}")


def completed(result: T) -> Future[T]:
    """A future that is already resolved to ``result``."""
    fut: Future[T] = Future()
    fut.set_result(result)
    return fut


def gather_futures(futures: Sequence[Future[bool]]) -> Future[list[bool]]:
    """One future for a batch: the per-key results in order, or the first exception raised."""
    out: Future[list[bool]] = Future()
    if not futures:
        out.set_result([])
        return out
    lock = threading.Lock()
    remaining = [len(futures)]

    def on_done(_: Future[bool]) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        for fut in futures:
            exc = fut.exception()
            if exc is not None:
                out.set_exception(exc)
                return
        out.set_result([fut.result() for fut in futures])

    for fut in futures:
        fut.add_done_callback(on_done)
    return out
