"""Local-disk tier: one file per chunk in a directory, written and read on a thread pool.

Each file is a :mod:`llumnix_kv.store.record` (header, key, payload, crc32). A write goes to a
unique ``*.tmp`` name, is fsync'd (``fsync=True``) and renamed to ``<name>.chunk``; rename is
atomic, so a crash leaves either the whole chunk or a temp file, and temp files are deleted when
a tier opens the directory. Without fsync a power loss can leave a renamed file with missing
data; the checksum catches it on read. A chunk that fails its check counts as ``corrupt``, is
deleted, and is a miss.

The index (file name -> size, in LRU order) lives in memory and is rebuilt from the directory
on start, oldest modification time first, so a restarted tier serves the chunks of the previous
one. One tier owns a directory at a time (an ``flock`` on ``.lock``, released by the kernel if
the process dies).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from llumnix_kv.errors import CorruptionError, InvalidArgumentError, KvTimeoutError
from llumnix_kv.store import record
from llumnix_kv.store.base import (
    ChunkKey,
    StoreTier,
    TierClosedError,
    TierCounters,
    byte_view,
    check_batch,
    gather_futures,
)

logger = logging.getLogger(__name__)

__all__ = ["DiskTier", "DiskTierConfig"]

CHUNK_SUFFIX = ".chunk"
TMP_SUFFIX = ".tmp"
# Keys up to this many bytes are hex-encoded into the file name (64 -> 128 characters, under
# the 255-byte name limit of common file systems); longer keys use a 32-byte blake2b of the key.
MAX_HEX_KEY_BYTES = 64


@dataclass
class DiskTierConfig:
    path: str
    """Directory of the chunk files (created if missing). One tier owns it at a time."""

    capacity_bytes: int
    """Most file bytes (records: header + key + payload) kept; LRU chunks are deleted beyond."""

    io_threads: int = 4
    """Threads that write and read chunk files."""

    fsync: bool = True
    """fsync each file before its rename, so a chunk that was reported stored survives a power
    loss. Off: faster; a chunk lost in a power loss is detected by its checksum (a miss)."""


def file_name(key: bytes) -> str:
    """The chunk file name of ``key``."""
    if len(key) <= MAX_HEX_KEY_BYTES:
        stem = key.hex()
    else:
        stem = "h" + hashlib.blake2b(key, digest_size=32).hexdigest()
    return stem + CHUNK_SUFFIX


class DiskTier(StoreTier):
    """Chunks as files in one directory with byte-capacity LRU eviction. Thread-safe.

    Files of one ``put`` batch are written in parallel, so their recency order is the order in
    which their writes finish. ``contains`` sees a chunk once its write has finished.
    """

    name = "disk"
    config_class: ClassVar[type] = DiskTierConfig

    def __init__(self, config: DiskTierConfig) -> None:
        if config.capacity_bytes < 0 or config.io_threads <= 0:
            raise InvalidArgumentError("capacity_bytes must be >= 0 and io_threads > 0")
        self.config = config
        self.root = Path(config.path)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._lock_fd)
            raise InvalidArgumentError(f"{self.root} is in use by another DiskTier") from exc
        self._lock = threading.Lock()
        self._counters = TierCounters()
        self._closed = False
        # Committed files: name -> record bytes, least recently used first.
        self._index: OrderedDict[str, int] = OrderedDict()
        # Writes in flight: name -> (record bytes reserved, future of the write).
        self._pending: dict[str, tuple[int, Future[bool]]] = {}
        self._bytes_used = 0  # committed + reserved; never above capacity_bytes
        self._scan()
        self._pool = ThreadPoolExecutor(config.io_threads, thread_name_prefix="llumnix-kv-disk")

    def _scan(self) -> None:
        """Rebuild the index from the directory; delete temp files left by a crash."""
        found: list[tuple[float, str, int]] = []
        with os.scandir(self.root) as it:
            for entry in it:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if entry.name.endswith(TMP_SUFFIX):
                    os.unlink(entry.path)
                    logger.info("removed partial chunk file %s", entry.path)
                elif entry.name.endswith(CHUNK_SUFFIX):
                    st = entry.stat(follow_symlinks=False)
                    found.append((st.st_mtime, entry.name, st.st_size))
        for _, name, size in sorted(found):
            self._index[name] = size
            self._bytes_used += size
        evicted = self._evict_for(0)
        self._unlink(evicted)
        if found:
            logger.info(
                "disk tier %s: %d chunks, %d bytes", self.root, len(self._index), self._bytes_used
            )

    def _check_open(self) -> None:
        if self._closed:
            raise TierClosedError(f"DiskTier({self.root}) is closed")

    def _evict_for(self, nbytes: int) -> list[str]:
        """Drop LRU entries from the index until ``nbytes`` more fit (lock held)."""
        victims = []
        while self._index and self._bytes_used + nbytes > self.config.capacity_bytes:
            name, size = self._index.popitem(last=False)
            self._bytes_used -= size
            victims.append(name)
        self._counters.add("evictions", len(victims))
        return victims

    def _unlink(self, names: Sequence[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / name)

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        self._check_open()
        with self._lock:
            return [file_name(key) in self._index for key in keys]

    def put(self, keys: Sequence[ChunkKey], values: Sequence[Any]) -> Future[list[bool]]:
        self._check_open()
        check_batch(keys, values, "values")
        srcs = [byte_view(v, what=f"values[{i}]") for i, v in enumerate(values)]
        futures = [self._put_one(key, src) for key, src in zip(keys, srcs, strict=True)]
        return gather_futures(futures)

    def _put_one(self, key: bytes, src: np.ndarray) -> Future[bool]:
        name = file_name(key)
        size = record.HEADER.size + len(key) + src.nbytes
        fut: Future[bool] = Future()
        with self._lock:
            if name in self._index:  # same key, same bytes: only refresh recency
                self._index.move_to_end(name)
                fut.set_result(True)
                return fut
            if name in self._pending:
                return self._pending[name][1]
            if size > self.config.capacity_bytes:
                self._counters.add("rejected")
                fut.set_result(False)
                return fut
            # Unlinked under the lock so a concurrent put of a victim's key cannot race it.
            self._unlink(self._evict_for(size))
            self._bytes_used += size
            self._pending[name] = (size, fut)
        self._pool.submit(self._write, key, name, src, fut)
        return fut

    def _write(self, key: bytes, name: str, src: np.ndarray, fut: Future[bool]) -> None:
        tmp = self.root / f"{name}.{uuid.uuid4().hex}{TMP_SUFFIX}"
        ok = False
        try:
            header = record.encode_header(key, src)
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(src.data)
                f.flush()
                if self.config.fsync:
                    os.fsync(f.fileno())
            with self._lock:
                os.rename(tmp, self.root / name)
                size, _ = self._pending.pop(name)
                self._index[name] = size
            ok = True
        except Exception as exc:  # an I/O failure makes the chunk not stored, never an error
            logger.warning("disk tier: writing %s failed: %s", name, exc)
            self._counters.add("errors")
            with self._lock:
                size, _ = self._pending.pop(name)
                self._bytes_used -= size
            tmp.unlink(missing_ok=True)
        self._counters.add("puts" if ok else "rejected")
        fut.set_result(ok)

    def get(self, keys: Sequence[ChunkKey], outs: Sequence[Any]) -> Future[list[bool]]:
        self._check_open()
        check_batch(keys, outs, "out buffers")
        dsts = [byte_view(o, writable=True, what=f"outs[{i}]") for i, o in enumerate(outs)]
        futures: list[Future[bool]] = []
        for i, (key, dst) in enumerate(zip(keys, dsts, strict=True)):
            name = file_name(key)
            with self._lock:
                hit = name in self._index
                if hit:
                    self._index.move_to_end(name)
            if hit:
                futures.append(self._pool.submit(self._read, key, name, dst, i))
            else:
                self._counters.add("misses")
                fut: Future[bool] = Future()
                fut.set_result(False)
                futures.append(fut)
        return gather_futures(futures)

    def _read(self, key: bytes, name: str, dst: np.ndarray, index: int) -> bool:
        try:
            with open(self.root / name, "rb") as f:
                data = f.read()
        except FileNotFoundError:  # evicted since the index lookup, or removed by hand
            with self._lock:
                if name in self._index and not (self.root / name).exists():
                    self._bytes_used -= self._index.pop(name)
            self._counters.add("misses")
            return False
        except OSError as exc:
            logger.warning("disk tier: reading %s failed: %s", name, exc)
            self._counters.add("errors")
            self._counters.add("misses")
            return False
        try:
            payload = record.decode(data, key)
        except CorruptionError as exc:
            logger.warning("disk tier: dropping corrupt chunk %s: %s", name, exc)
            self._counters.add("corrupt")
            self._counters.add("misses")
            self._drop(name)
            return False
        if payload.nbytes != dst.nbytes:
            raise InvalidArgumentError(
                f"outs[{index}] is {dst.nbytes} bytes, chunk is {payload.nbytes}"
            )
        np.copyto(dst, np.frombuffer(payload, dtype=np.uint8))
        self._counters.add("hits")
        return True

    def _drop(self, name: str) -> None:
        with self._lock:
            if name in self._pending:  # a fresh write of this key is replacing the file
                return
            size = self._index.pop(name, None)
            if size is not None:
                self._bytes_used -= size
            self._unlink([name])

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        self._check_open()
        for key in keys:
            self._drop(file_name(key))

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self._counters.snapshot())
        with self._lock:
            out.update(
                entries=len(self._index),
                pending=len(self._pending),
                bytes_used=self._bytes_used,
                capacity_bytes=self.config.capacity_bytes,
            )
        return out

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every write submitted so far has finished (stored or failed)."""
        with self._lock:
            futures = [fut for _, fut in self._pending.values()]
        try:
            for fut in futures:
                fut.result(timeout)
        except FutureTimeoutError as exc:
            raise KvTimeoutError(f"disk writes still pending after {timeout} s") from exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        os.close(self._lock_fd)
