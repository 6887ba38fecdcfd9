"""A transfer-engine peer in its own process, driven over a pipe (by the bench and the tests).

The child registers one buffer (shared memory, so shm peers map it, or private memory) and
answers commands; the parent always stops it, killing it if it does not exit in time.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
from collections.abc import Sequence
from typing import Any

import numpy as np

from llumnix_kv import _C
from llumnix_kv.errors import KvError
from llumnix_kv.transfer import TransferEngine


def serve(
    conn: Any, transports: Sequence[str], nbytes: int, shared: bool, corrupt: int, device: int
) -> None:
    """Registers an nbytes buffer (shared memory, private memory, or CUDA device memory when
    device >= 0), sends (descriptor, address), then answers commands until "exit"."""
    engine = TransferEngine("peer", transports=transports, debug_corrupt_every=corrupt)
    dev_ptr = 0
    if device >= 0:
        dev_ptr = _C.cuda_malloc(nbytes, device)
        buf = np.zeros(0, dtype=np.uint8)
        engine.register((dev_ptr, nbytes, device))
    else:
        buf = engine.alloc_shared(nbytes) if shared else np.zeros(nbytes, dtype=np.uint8)
        engine.register(buf)
    conn.send((engine.descriptor(), dev_ptr or buf.ctypes.data))
    try:
        while True:
            cmd, *args = conn.recv()
            if cmd == "exit":
                break
            try:
                conn.send(("ok", _handle(engine, buf, dev_ptr, nbytes, cmd, args)))
            except KvError as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        engine.close()
        if dev_ptr:
            _C.cuda_free(dev_ptr)


def _handle(
    engine: TransferEngine, buf: np.ndarray, dev_ptr: int, nbytes: int, cmd: str, args: list[Any]
) -> Any:
    if cmd == "fill":
        (seed,) = args
        data = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
        if dev_ptr:
            _C.cuda_memcpy_sync(dev_ptr, data.ctypes.data, nbytes)
        else:
            buf[:] = data
        return None
    if cmd in ("digest", "bytes"):
        offset, length = args
        if dev_ptr:  # device memory: read it back through the host
            host = np.empty(length, np.uint8)
            _C.cuda_memcpy_sync(host.ctypes.data, dev_ptr + offset, length)
            raw = host.tobytes()
        else:
            raw = buf[offset : offset + length].tobytes()
        return raw if cmd == "bytes" else hashlib.sha256(raw).hexdigest()
    if cmd == "notifications":
        (timeout,) = args
        return [(n.peer, n.message) for n in engine.notifications(timeout)]
    if cmd == "wait_for":
        message, timeout = args
        return engine.wait_for(message, timeout).peer
    raise ValueError(cmd)


class PeerProcess:
    """Starts `serve` in a spawned process; always stopped by `stop` (or the context exit)."""

    def __init__(
        self,
        transports: Sequence[str] = ("shm", "tcp"),
        nbytes: int = 1 << 20,
        *,
        shared: bool = True,
        corrupt: int = 0,
        device: int = -1,
    ) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=serve,
            args=(child, list(transports), nbytes, shared, corrupt, device),
            daemon=True,
        )
        self.proc.start()
        if not self.conn.poll(60):
            self.stop()
            raise TimeoutError("peer process did not start")
        self.descriptor, self.addr = self.conn.recv()

    def call(self, *cmd: Any, timeout: float = 30.0) -> Any:
        self.conn.send(cmd)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"peer did not answer {cmd[0]!r}")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value

    def signal(self, sig: int) -> None:
        if self.proc.pid is not None:
            os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.signal(signal.SIGCONT)
                self.conn.send(("exit",))
            except OSError:
                pass
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
