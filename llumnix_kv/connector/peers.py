"""Peers and notifications of a worker's transfer engine, handled off the forward path.

Connecting to a peer is a blocking handshake (bounded by the transfer engine's connect
timeout). A :class:`PeerPool` runs it on a background thread: callers ask for a peer on every
engine step and get None until it is connected, so no step waits for a handshake.

A :class:`NoticeReader` takes notifications as they arrive, also while the engine is idle,
and hands them to the engine's steps; it can start work at once (e.g. connect to the sender
of a push ready), so that work is done before the request it is for is scheduled.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError

import numpy as np

from llumnix_kv.errors import KvError, KvTimeoutError
from llumnix_kv.transfer import Notification, Op, Peer, TransferEngine

__all__ = ["NoticeReader", "PeerPool"]

logger = logging.getLogger(__name__)


class PeerPool:
    """Peers by engine name; each is connected once, on a background thread."""

    def __init__(self, engine: TransferEngine) -> None:
        self._engine = engine
        self._peers: dict[str, Peer] = {}
        self._connecting: dict[str, Future[Peer]] = {}
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llumnix-connect")
        self._notifier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llumnix-notify")
        self._lock = threading.Lock()  # get() also runs on other threads

    @property
    def connected(self) -> int:
        """Peers connected now (a lost one counts until it is dropped)."""
        with self._lock:
            return len(self._peers)

    def get(self, name: str, descriptor: bytes) -> Peer | None:
        """The connected peer, or None while its handshake runs (started by the first call).

        Raises the handshake's :class:`~llumnix_kv.errors.KvError` once, when it failed; the
        next call tries again.
        """
        with self._lock:
            return self._get(name, descriptor)

    def _get(self, name: str, descriptor: bytes) -> Peer | None:
        peer = self._peers.get(name)
        if peer is not None:
            return peer
        future = self._connecting.get(name)
        if future is None:
            self._connecting[name] = self._executor.submit(self._engine.add_peer, descriptor)
            return None
        if not future.done():
            return None
        del self._connecting[name]
        peer = future.result()  # raises the handshake's error
        self._peers[name] = peer
        logger.info("connected to %s over %s", peer.name, peer.transport)
        return peer

    def notify(self, name: str, descriptor: bytes, message: bytes, timeout: float) -> None:
        """Sends ``message`` to the peer on a background thread (connecting first if
        needed), without waiting: for notices that must go out even if the engine stops
        stepping (e.g. "free your blocks" for a request aborted here). Failures are logged."""
        self._notifier.submit(self._notify, name, descriptor, message, timeout)

    def _notify(self, name: str, descriptor: bytes, message: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        try:
            with self._lock:
                peer = self._get(name, descriptor)
                future = self._connecting.get(name)
            if peer is None and future is not None:
                future.result(timeout=max(deadline - time.monotonic(), 0.0))
                with self._lock:
                    peer = self._get(name, descriptor)
            if peer is None:
                raise KvError(f"could not connect to {name}")
            none = np.zeros(0, dtype=np.uint64)
            batch = self._engine.submit(
                peer, Op.WRITE, none, none, none, notify=message, timeout=timeout
            )
            try:
                batch.wait(max(deadline - time.monotonic(), 1e-3))
            finally:
                batch.release()
        except (KvError, FutureTimeoutError) as exc:
            logger.warning("notice to %s not sent: %s", name, exc)

    def drop(self, name: str) -> None:
        """Forgets a peer (after it was lost), closing its links; the next get reconnects."""
        with self._lock:
            peer = self._peers.pop(name, None)
        if peer is not None:
            with contextlib.suppress(KvError):
                self._engine.remove_peer(peer)

    def close(self) -> None:
        """Waits for running handshakes and notices (each bounded by its timeout)."""
        self._notifier.shutdown(wait=True)
        self._executor.shutdown(wait=True, cancel_futures=True)


class NoticeReader:
    """Reads an engine's notifications on a thread of its own into a queue.

    ``on_arrival`` runs on that thread for each message as it arrives (it must be quick and
    thread-safe); :meth:`take` returns what arrived since the last call.
    """

    def __init__(
        self, engine: TransferEngine, on_arrival: Callable[[Notification], None] | None = None
    ) -> None:
        self._engine = engine
        self._on_arrival = on_arrival
        self._queue: queue.SimpleQueue[Notification] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llumnix-notices", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                notes = self._engine.notifications(timeout=0.1)
            except KvTimeoutError:
                continue
            except KvError:  # the engine was closed
                return
            for note in notes:
                if self._on_arrival is not None:
                    try:
                        self._on_arrival(note)
                    except Exception:  # a bad message must not stop the reader
                        logger.exception("handling a notification from %s", note.peer)
                self._queue.put(note)

    def take(self) -> list[Notification]:
        out = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self._queue.get_nowait())
        return out

    def close(self) -> None:
        """Stops the thread (within about 0.1 s); call before closing the engine."""
        self._stop.set()
        self._thread.join(timeout=5.0)
