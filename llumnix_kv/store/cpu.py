"""Host-memory tier: a pool of chunks with a byte capacity and LRU eviction.

With a fixed ``chunk_bytes`` the pool is one preallocated slab of
``capacity_bytes // chunk_bytes`` slots (no Python object per chunk); otherwise each chunk is
one ``bytes`` object. Either way ``bytes_used <= capacity_bytes`` holds at every instant.
Copies happen in the calling thread under the pool lock (numpy releases the GIL for them), so
``put`` and ``get`` return futures that are already done.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from llumnix_kv.errors import InvalidArgumentError
from llumnix_kv.store.base import (
    ChunkKey,
    StoreTier,
    TierClosedError,
    TierCounters,
    byte_view,
    check_batch,
    completed,
)

logger = logging.getLogger(__name__)

__all__ = ["CpuTier", "CpuTierConfig"]


@dataclass
class CpuTierConfig:
    capacity_bytes: int
    """Most payload bytes held at once; the least recently used chunks are evicted beyond it."""

    chunk_bytes: int | None = None
    """Size of every chunk in bytes. Set: one slab of ``capacity_bytes // chunk_bytes`` slots
    is preallocated and other sizes are rejected. None: chunks of any size, one object each."""

    pinned: bool = False
    """Page-lock the slab for DMA to and from a GPU. ``llumnix_kv._C`` exposes no host-register
    call yet, so this is a documented no-op (the slab stays pageable; a warning is logged)."""


class CpuTier(StoreTier):
    """Chunks in host memory with exact byte-capacity LRU eviction. Thread-safe."""

    name = "cpu"
    config_class: ClassVar[type] = CpuTierConfig

    def __init__(self, config: CpuTierConfig) -> None:
        if config.capacity_bytes < 0:
            raise InvalidArgumentError("capacity_bytes must be >= 0")
        if config.chunk_bytes is not None and config.chunk_bytes <= 0:
            raise InvalidArgumentError("chunk_bytes must be > 0")
        self.config = config
        self._chunk_bytes = config.chunk_bytes or 0  # 0: variable-size chunks
        self._lock = threading.Lock()
        self._counters = TierCounters()
        self._closed = False
        # Recency order: first = least recently used. Value = slot index (slab mode) or the
        # chunk's bytes (variable-size mode).
        self._entries: OrderedDict[bytes, Any] = OrderedDict()
        self._bytes_used = 0
        self._slab: np.ndarray | None = None
        self._free_slots: list[int] = []
        if config.chunk_bytes is not None:
            slots = config.capacity_bytes // config.chunk_bytes
            # Shape (slots, chunk_bytes), uint8: slot i holds one chunk.
            self._slab = np.empty((slots, config.chunk_bytes), dtype=np.uint8)
            self._free_slots = list(range(slots - 1, -1, -1))
        if config.pinned:
            logger.warning("CpuTier(pinned=True): page-locking is not available; slab pageable")

    def _size_of(self, entry: Any) -> int:
        return self._chunk_bytes if self._slab is not None else len(entry)

    def _check_open(self) -> None:
        if self._closed:
            raise TierClosedError("CpuTier is closed")

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        self._check_open()
        with self._lock:
            return [key in self._entries for key in keys]

    def _evict_for(self, nbytes: int) -> bool:
        """Evict LRU chunks until ``nbytes`` more fit (lock held); False if they never can."""
        if nbytes > self.config.capacity_bytes:
            return False
        while self._bytes_used + nbytes > self.config.capacity_bytes or (
            self._slab is not None and not self._free_slots
        ):
            _, entry = self._entries.popitem(last=False)
            self._bytes_used -= self._size_of(entry)
            if self._slab is not None:
                self._free_slots.append(entry)
            self._counters.add("evictions")
        return True

    def _put_one(self, key: bytes, src: np.ndarray) -> bool:
        """Store one chunk (lock held)."""
        if key in self._entries:  # same key, same bytes: only refresh recency
            self._entries.move_to_end(key)
            return True
        if not self._evict_for(src.nbytes):
            return False
        if self._slab is not None:
            slot = self._free_slots.pop()
            np.copyto(self._slab[slot], src)
            self._entries[key] = slot
        else:
            self._entries[key] = src.tobytes()
        self._bytes_used += src.nbytes
        return True

    def put(self, keys: Sequence[ChunkKey], values: Sequence[Any]) -> Future[list[bool]]:
        self._check_open()
        check_batch(keys, values, "values")
        srcs = [byte_view(v, what=f"values[{i}]") for i, v in enumerate(values)]
        if self._slab is not None:
            for i, src in enumerate(srcs):
                if src.nbytes != self.config.chunk_bytes:
                    raise InvalidArgumentError(
                        f"values[{i}] is {src.nbytes} bytes; this tier stores "
                        f"{self.config.chunk_bytes}-byte chunks"
                    )
        with self._lock:
            stored = [self._put_one(k, s) for k, s in zip(keys, srcs, strict=True)]
        self._counters.add("puts", sum(stored))
        self._counters.add("rejected", len(stored) - sum(stored))
        return completed(stored)

    def get(self, keys: Sequence[ChunkKey], outs: Sequence[Any]) -> Future[list[bool]]:
        self._check_open()
        check_batch(keys, outs, "out buffers")
        dsts = [byte_view(o, writable=True, what=f"outs[{i}]") for i, o in enumerate(outs)]
        hits: list[bool] = []
        with self._lock:
            for i, (key, dst) in enumerate(zip(keys, dsts, strict=True)):
                entry = self._entries.get(key)
                if entry is None:
                    hits.append(False)
                    continue
                size = self._size_of(entry)
                if dst.nbytes != size:
                    fut: Future[list[bool]] = Future()
                    fut.set_exception(
                        InvalidArgumentError(f"outs[{i}] is {dst.nbytes} bytes, chunk is {size}")
                    )
                    return fut
                self._entries.move_to_end(key)
                if self._slab is not None:
                    np.copyto(dst, self._slab[entry])
                else:
                    dst[:] = np.frombuffer(entry, dtype=np.uint8)
                hits.append(True)
        self._counters.add("hits", sum(hits))
        self._counters.add("misses", len(hits) - sum(hits))
        return completed(hits)

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        self._check_open()
        with self._lock:
            for key in keys:
                entry = self._entries.pop(key, None)
                if entry is None:
                    continue
                self._bytes_used -= self._size_of(entry)
                if self._slab is not None:
                    self._free_slots.append(entry)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self._counters.snapshot())
        with self._lock:
            out.update(
                entries=len(self._entries),
                bytes_used=self._bytes_used,
                capacity_bytes=self.config.capacity_bytes,
            )
        return out

    def lru_keys(self) -> list[ChunkKey]:
        """Stored keys, least recently used first (for tests and introspection)."""
        with self._lock:
            return list(self._entries)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._entries.clear()
            self._bytes_used = 0
            self._slab = None
            self._free_slots = []
