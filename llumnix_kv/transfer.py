"""The transfer engine: moves KV between processes and hosts.

One :class:`TransferEngine` per process. Register memory (a KV layout's regions, any tensor or
array, or shared host memory from :meth:`TransferEngine.alloc_shared`), hand
:meth:`TransferEngine.descriptor` to peers, load theirs with :meth:`TransferEngine.add_peer`,
then move data asynchronously::

    batch = engine.transfer(peer, plan, local_layout, remote_layout, op="WRITE", notify=b"done")
    batch.wait(timeout=5.0)

Transports, best first: ``local`` (same process), ``shm`` (same host: memory from
``alloc_shared`` is mapped by the peer and copied with memcpy; other memory through
cross-memory attach), ``ucx`` (when built with UCX), ``tcp`` (always; it is also the control
channel that carries notifications and notices a lost peer). Every wait has a deadline and
errors are :class:`llumnix_kv.errors.KvError` subclasses (``PeerLostError``,
``KvTimeoutError``, ``UnregisteredMemoryError``, ``CorruptionError``, ...).
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llumnix_kv import _C
from llumnix_kv._C import CopyPlan, KvLayout
from llumnix_kv.errors import InvalidArgumentError, KvError

__all__ = ["Batch", "Notification", "Op", "Peer", "TransferEngine", "plan_segments"]


class Op(enum.IntEnum):
    WRITE = 0  # push local memory into the peer's
    READ = 1  # pull the peer's memory into local memory


@dataclass(frozen=True)
class Peer:
    id: int
    name: str
    transport: str


@dataclass(frozen=True)
class Notification:
    peer: str  # the sending engine's name
    message: bytes


class Batch:
    """A submitted transfer. ``wait``/``poll`` raise the batch's typed error if it failed.

    The engine keeps each batch's record (its segment table, its status) until :meth:`release`
    or until this handle is garbage collected, whichever comes first. Dropping the handle of a
    batch in flight does not stop it: it still lands and still sends its notification."""

    def __init__(self, engine: _C.TransferEngine, batch_id: int, nbytes: int) -> None:
        self._engine = engine
        self.id = batch_id
        self.nbytes = nbytes
        self.transport = ""
        self.staged = False  # whether it asked for staged mode (see TransferEngine.submit)
        self._released = False

    def poll(self) -> bool:
        """True once every byte has landed."""
        state, _, _, self.transport, self.staged = self._engine.poll(self.id)
        return bool(state == 1)

    def wait(self, timeout: float) -> None:
        """Blocks until done; ``KvTimeoutError`` if not done within ``timeout`` seconds."""
        _, _, _, self.transport, self.staged = self._engine.wait(self.id, timeout)

    def cancel(self) -> None:
        self._engine.cancel(self.id)

    def release(self) -> None:
        """Forgets the batch: later calls on this handle raise ``InvalidArgumentError``."""
        self._released = True
        self._engine.release(self.id)

    def __del__(self) -> None:
        if not getattr(self, "_released", True):
            with contextlib.suppress(KvError):  # the engine is closed: nothing left to free
                self._engine.release(self.id)


def _span(obj: Any) -> tuple[int, int, int]:
    """(address, bytes, device) of a tensor, numpy array or (addr, bytes[, device]) tuple."""
    if isinstance(obj, tuple):
        return int(obj[0]), int(obj[1]), int(obj[2]) if len(obj) > 2 else -1
    if isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous:
            raise InvalidArgumentError("register a contiguous array")
        return obj.ctypes.data, obj.nbytes, -1
    if hasattr(obj, "data_ptr"):
        dev = obj.device
        device = -1 if dev.type == "cpu" else (dev.index or 0)
        return obj.data_ptr(), obj.untyped_storage().nbytes(), device
    raise InvalidArgumentError(f"cannot register {type(obj).__name__}")


def plan_segments(
    plan: CopyPlan, local: KvLayout, remote: KvLayout, op: Op
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resolves a plan into (local addresses, remote addresses, lengths).

    For WRITE the plan's source is ``local`` and its destination ``remote``; for READ the
    reverse (plan from the remote cache into the local one)."""
    src, dst = (local, remote) if op == Op.WRITE else (remote, local)
    plan.check_bounds(src, dst)
    src_bases = np.array([r.addr for r in src.regions], dtype=np.uint64)
    dst_bases = np.array([r.addr for r in dst.regions], dtype=np.uint64)
    src_addr = src_bases[plan.src_region] + plan.src_off.astype(np.uint64)
    dst_addr = dst_bases[plan.dst_region] + plan.dst_off.astype(np.uint64)
    lens = plan.len.astype(np.uint64)
    return (src_addr, dst_addr, lens) if op == Op.WRITE else (dst_addr, src_addr, lens)


class TransferEngine:
    """Python face of the native engine (see the module docstring).

    Args:
        name: agent name peers see in notifications ("" = generated).
        transports: allowed transports, best first (tcp is always there).
        listen_host, listen_port: where the tcp transport listens (loopback by default).
        tcp_streams: parallel TCP connections per peer.
        crc: end-to-end CRC32C on every batch (tcp checks it on the receiver).
        staged_below_bytes: ``mode="auto"`` stages batches whose average segment is smaller.
    """

    def __init__(
        self,
        name: str = "",
        *,
        transports: Sequence[str] = ("local", "shm", "ucx", "tcp"),
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        tcp_streams: int = 2,
        connect_timeout: float = 10.0,
        crc: bool = False,
        staged_below_bytes: int = 64 << 10,
        debug_corrupt_every: int = 0,
    ) -> None:
        self._engine = _C.TransferEngine(
            name=name,
            listen_host=listen_host,
            listen_port=listen_port,
            transports=list(transports),
            tcp_streams=tcp_streams,
            connect_timeout_s=connect_timeout,
            crc=crc,
            staged_below_bytes=staged_below_bytes,
            debug_corrupt_every=debug_corrupt_every,
        )
        self._keep: dict[int, Any] = {}  # registration handle -> object kept alive
        self._backlog: list[Notification] = []  # received, not yet returned by wait_for

    @property
    def name(self) -> str:
        return self._engine.name

    def transports(self) -> list[str]:
        """The transports this engine can use, best first."""
        return self._engine.transports()

    def device_transports(self) -> list[str]:
        """Those of :meth:`transports` that move CUDA device memory: local and shm where CUDA
        is built in, ucx where its UCX knows CUDA memory; never tcp."""
        return self._engine.device_transports()

    def alloc_shared(self, nbytes: int) -> np.ndarray:
        """A zeroed uint8 array in host memory that same-host peers map directly (the fast
        shm path). Unmapped by :meth:`close`: do not use the array after that."""
        addr = self._engine.alloc_shared(nbytes)
        buf = memoryview((ctypes.c_uint8 * nbytes).from_address(addr)).cast("B")
        return np.frombuffer(buf, dtype=np.uint8)

    def register(self, obj: Any) -> int:
        """Registers a tensor, array or (addr, bytes[, device]); returns the handle."""
        addr, nbytes, device = _span(obj)
        handle = self._engine.register_memory(addr, nbytes, device)
        self._keep[handle] = obj
        return handle

    def register_layout(self, layout: KvLayout) -> list[int]:
        """Registers every region of a KV layout."""
        return [self.register((r.addr, r.bytes, r.device)) for r in layout.regions]

    def deregister(self, handle: int) -> None:
        self._engine.deregister_memory(handle)
        self._keep.pop(handle, None)

    def num_registrations(self) -> int:
        return self._engine.num_registrations()

    def descriptor(self) -> bytes:
        """Identity, endpoints and registered memory, for peers' :meth:`add_peer`."""
        return self._engine.descriptor()

    def add_peer(self, descriptor: bytes, transport: str | None = None) -> Peer:
        """Connects to a peer; ``transport`` forces one (default: the best both support)."""
        peer_id, chosen = self._engine.add_peer(descriptor, transport or "")
        return Peer(peer_id, self._engine.peer_name(peer_id), chosen)

    def remove_peer(self, peer: Peer) -> None:
        """Closes the links to ``peer``; afterwards no transfer touches memory for it."""
        self._engine.remove_peer(peer.id)

    def submit(
        self,
        peer: Peer,
        op: Op | str,
        local: np.ndarray,
        remote: np.ndarray,
        lens: np.ndarray,
        *,
        notify: bytes = b"",
        timeout: float | None = None,
        transport: str | None = None,
        crc: bool = False,
        mode: str = "auto",
    ) -> Batch:
        """Starts moving ``lens[i]`` bytes between ``local[i]`` and the peer's ``remote[i]``.

        ``mode``: ``"direct"`` moves segment by segment into the peer's memory (one-sided);
        ``"staged"`` sends the segments gathered as one message that the receiver scatters;
        ``"auto"`` stages batches of small segments (ucx: any host-memory batch to a peer on
        this host, where UCX moves messages by shared memory but put/get over tcp). Transports
        with one way use it (tcp is always staged; shm and local always direct)."""
        op = Op[op] if isinstance(op, str) else Op(op)
        batch_id = self._engine.submit(
            peer.id,
            int(op),
            np.ascontiguousarray(local, dtype=np.uint64),
            np.ascontiguousarray(remote, dtype=np.uint64),
            np.ascontiguousarray(lens, dtype=np.uint64),
            notify=notify,
            timeout_s=timeout or 0.0,
            transport=transport or "",
            crc=crc,
            mode=mode,
        )
        return Batch(self._engine, batch_id, int(np.sum(lens, dtype=np.uint64)))

    def transfer(
        self,
        peer: Peer,
        plan: CopyPlan,
        local: KvLayout,
        remote: KvLayout,
        *,
        op: Op | str = Op.WRITE,
        notify: bytes = b"",
        timeout: float | None = None,
        transport: str | None = None,
        crc: bool = False,
        mode: str = "auto",
    ) -> Batch:
        """Runs a copy plan between a local cache and the peer's (``remote`` describes the
        peer's cache at the peer's addresses). WRITE: the plan goes local -> remote; READ:
        remote -> local."""
        op = Op[op] if isinstance(op, str) else Op(op)
        la, ra, lens = plan_segments(plan, local, remote, op)
        return self.submit(
            peer, op, la, ra, lens, notify=notify, timeout=timeout, transport=transport, crc=crc,
            mode=mode,
        )  # fmt: skip

    def notifications(self, timeout: float | None = None) -> list[Notification]:
        """Notifications received so far; with ``timeout``, waits up to that long for one
        (``KvTimeoutError`` if none arrives)."""
        if self._backlog:
            out, self._backlog = self._backlog, []
            return out + self._take(None)
        return self._take(timeout)

    def wait_for(self, message: bytes, timeout: float) -> Notification:
        """Waits for a notification whose message is ``message``; others stay queued."""
        deadline = time.monotonic() + timeout
        while True:
            self._backlog += self._take(None)
            for n in self._backlog:
                if n.message == message:
                    self._backlog.remove(n)
                    return n
            self._backlog += self._take(max(0.0, deadline - time.monotonic()))

    def _take(self, timeout: float | None) -> list[Notification]:
        raw = (
            self._engine.take_notifications()
            if timeout is None
            else self._engine.wait_notifications(timeout)
        )
        return [Notification(peer, msg) for peer, msg in raw]

    def close(self) -> None:
        """Closes every link and the listener and releases every registration."""
        self._engine.shutdown()
        self._keep.clear()

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
