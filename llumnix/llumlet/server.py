"""The llumlet: an instance's status reports, pushed as they are made, and its gRPC service.

It runs inside the engine process, beside the engine's scheduler. The engine adapter calls
:meth:`Llumlet.on_step` after every scheduler step; the llumlet then publishes a report at once
if the last one is at least ``min_interval_s`` old, or else when that interval ends (a report
thread), and a heartbeat every ``heartbeat_s`` while nothing changes.

Reports go out on a ZMQ PUB socket (one serialized ``Status`` per message; subscribers set
``CONFLATE`` and so always read the latest), sent by the thread that made the report: in a busy
engine that is the scheduler's own thread, inside its step. They do not go through the gRPC
server, because its handlers are Python threads that must win the GIL from the engine core's
busy loop (vLLM spins on its workers' replies): measured on a loaded 2-core host, a
``GetStatus`` call took up to seconds while a pushed report leaves within the step. The gRPC
service (``llumlet.proto``) carries the control calls: status on demand, health, drain, abort
and migration.

Both bind loopback by default. Given a ``token``, every gRPC call must carry the metadata
``authorization: Bearer <token>`` (:class:`LlumletClient` sends it), or it fails with
UNAUTHENTICATED; the report socket carries only load numbers and request ids.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import zmq

from llumnix.llumlet import llumlet_pb2 as pb
from llumnix.llumlet import llumlet_pb2_grpc as pb_grpc
from llumnix.llumlet.status import ROLES, StatusTracker

logger = logging.getLogger(__name__)


@dataclass
class LlumletConfig:
    """Where the llumlet serves and how often it reports."""

    host: str = "127.0.0.1"
    port: int = 0
    """gRPC port; 0: a free one, logged and in :attr:`Llumlet.port`."""
    report_port: int = 0
    """ZMQ PUB port of the reports; 0: a free one (:attr:`Llumlet.report_port`)."""
    instance_id: str = ""
    """Defaults to the engine's id."""
    role: str = ""
    """prefill, decode or neutral; defaults to what the engine's KV role implies."""
    token: str = ""
    """Shared secret every call must carry (empty: none; set it when binding beyond loopback)."""
    min_interval_s: float = 0.02
    heartbeat_s: float = 0.25

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> LlumletConfig:
        values = dict(values or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown llumlet config keys {unknown}; known: {sorted(known)}")
        config = cls(**values)
        if config.role and config.role not in ROLES:
            raise ValueError(f"llumlet role must be one of {ROLES}, not {config.role!r}")
        if not 0 < config.min_interval_s <= config.heartbeat_s:
            raise ValueError("llumlet needs 0 < min_interval_s <= heartbeat_s")
        for port in (config.port, config.report_port):
            if not 0 <= int(port) < 65536:
                raise ValueError(f"llumlet port out of range: {port}")
        return config


class Llumlet:
    """Reports of one instance and the gRPC server that hands them out."""

    def __init__(
        self,
        tracker: StatusTracker,
        blocks: Callable[[], tuple[int, int]],
        config: LlumletConfig | None = None,
    ) -> None:
        """``blocks()`` returns the engine's (free, total) KV blocks now."""
        self.tracker = tracker
        self.config = config or LlumletConfig()
        self._blocks = blocks
        self._cv = threading.Condition()
        self._latest: pb.Status | None = None
        self._published_at = 0.0
        self._dirty = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._server: grpc.Server | None = None
        self._zmq: zmq.Context[zmq.Socket[bytes]] | None = None
        self._pub: zmq.Socket[bytes] | None = None
        self._send_lock = threading.Lock()  # a ZMQ socket is not thread-safe
        self.port = 0
        self.report_port = 0

    # ------------------------------------------------------------------ reports

    def on_step(self) -> None:
        """After an engine step was scheduled: report now, or when the interval allows."""
        now = time.monotonic()
        with self._cv:
            if now - self._published_at < self.config.min_interval_s:
                self._dirty = True
                self._cv.notify_all()
                return
        self.publish()

    def publish(self) -> pb.Status:
        """Takes a report now and sends it to the subscribers."""
        free, total = self._blocks()
        status = self.tracker.snapshot(free, total)
        with self._cv:
            self._latest, self._published_at, self._dirty = status, time.monotonic(), False
        if self._pub is not None:
            data = status.SerializeToString()
            with self._send_lock, contextlib.suppress(zmq.Again, zmq.ZMQError):
                self._pub.send(data, zmq.NOBLOCK)
        return status

    def latest(self) -> pb.Status:
        with self._cv:
            latest = self._latest
        return latest if latest is not None else self.publish()

    def _run(self) -> None:
        while True:
            with self._cv:
                if self._stopped:
                    return
                wait = self.config.min_interval_s if self._dirty else self.config.heartbeat_s
                delay = self._published_at + wait - time.monotonic()
                if delay > 0:
                    self._cv.wait(delay)
                    continue
            try:
                self.publish()
            except Exception:  # a report must never end the thread
                logger.exception("llumlet report failed")
                time.sleep(self.config.heartbeat_s)

    def drain(self, on: bool) -> None:
        self.tracker.draining = on
        self.publish()

    # ------------------------------------------------------------------ server

    def start(self) -> int:
        """Binds the report socket, starts the report thread and the gRPC server; the gRPC
        port."""
        self._zmq = zmq.Context()
        pub = self._zmq.socket(zmq.PUB)
        pub.setsockopt(zmq.CONFLATE, 1)  # per subscriber, only the newest report waits
        pub.setsockopt(zmq.LINGER, 0)
        endpoint = f"tcp://{self.config.host}"
        if self.config.report_port:
            pub.bind(f"{endpoint}:{int(self.config.report_port)}")
            self.report_port = int(self.config.report_port)
        else:
            self.report_port = pub.bind_to_random_port(endpoint)
        self._pub = pub
        self.publish()
        self._thread = threading.Thread(target=self._run, name="llumlet-report", daemon=True)
        self._thread.start()
        interceptors = [_TokenCheck(self.config.token)] if self.config.token else []
        server = grpc.server(
            ThreadPoolExecutor(max_workers=8, thread_name_prefix="llumlet-rpc"),
            interceptors=interceptors,
        )
        pb_grpc.add_LlumletServicer_to_server(_Servicer(self), server)
        address = f"{self.config.host}:{int(self.config.port)}"
        self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"llumlet could not bind {address}")
        server.start()
        self._server = server
        logger.info(
            "llumlet of %s: gRPC on %s:%d, reports on port %d",
            self.tracker.instance_id,
            self.config.host,
            self.port,
            self.report_port,
        )
        return self.port

    def stop(self, grace: float = 1.0) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        if self._server is not None:
            self._server.stop(grace).wait(grace + 1.0)
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        with self._send_lock:
            if self._pub is not None:
                self._pub.close(linger=0)
                self._pub = None
        if self._zmq is not None:
            self._zmq.term()
            self._zmq = None


class _Servicer(pb_grpc.LlumletServicer):
    def __init__(self, llumlet: Llumlet) -> None:
        self.llumlet = llumlet

    def GetStatus(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.Status:
        return self.llumlet.latest()

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        tracker = self.llumlet.tracker
        return pb.HealthReply(
            healthy=True,
            instance_id=tracker.instance_id,
            incarnation=tracker.incarnation,
            seconds_since_step=tracker.seconds_since_step(),
        )

    def Drain(self, request: pb.DrainRequest, context: grpc.ServicerContext) -> pb.DrainReply:
        self.llumlet.drain(request.drain)
        return pb.DrainReply(draining=request.drain)

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortReply:
        # vLLM 0.32 gives a connector no way to abort a request; its front end aborts one when
        # the client's HTTP stream closes, which is how the gateway aborts.
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "abort through the gateway: closing a request's HTTP stream aborts it in the engine",
        )
        raise AssertionError("unreachable")

    def MigrateOut(
        self, request: pb.MigrateRequest, context: grpc.ServicerContext
    ) -> pb.MigrateReply:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "live migration is not implemented yet")
        raise AssertionError("unreachable")

    def MigrateIn(
        self, request: pb.MigrateRequest, context: grpc.ServicerContext
    ) -> pb.MigrateReply:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "live migration is not implemented yet")
        raise AssertionError("unreachable")


class _TokenCheck(grpc.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._want = f"Bearer {token}"

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong llumlet token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        metadata = dict(handler_call_details.invocation_metadata or ())
        if metadata.get("authorization") == self._want:
            return continuation(handler_call_details)
        return self._deny


class LlumletClient:
    """Calls one llumlet; every call has a deadline."""

    def __init__(self, address: str, token: str = "", timeout: float = 5.0) -> None:
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.LlumletStub(self._channel)

    def status(self, timeout: float | None = None) -> pb.Status:
        return self._stub.GetStatus(
            pb.StatusRequest(), timeout=timeout or self.timeout, metadata=self._metadata
        )

    def health(self, timeout: float | None = None) -> pb.HealthReply:
        return self._stub.Health(
            pb.HealthRequest(), timeout=timeout or self.timeout, metadata=self._metadata
        )

    def drain(self, on: bool = True, timeout: float | None = None) -> bool:
        reply = self._stub.Drain(
            pb.DrainRequest(drain=on), timeout=timeout or self.timeout, metadata=self._metadata
        )
        return bool(reply.draining)

    def abort(self, request_ids: list[str], timeout: float | None = None) -> list[str]:
        reply = self._stub.Abort(
            pb.AbortRequest(request_ids=request_ids),
            timeout=timeout or self.timeout,
            metadata=self._metadata,
        )
        return list(reply.aborted)

    def migrate_out(self, request_id: str, destination: str, timeout: float | None = None) -> Any:
        return self._stub.MigrateOut(
            pb.MigrateRequest(request_id=request_id, destination=destination),
            timeout=timeout or self.timeout,
            metadata=self._metadata,
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LlumletClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReportSubscriber:
    """Reads one llumlet's pushed reports; with ``latest_only`` (ZMQ ``CONFLATE``) a slow
    reader gets the newest report, never a backlog."""

    def __init__(self, endpoint: str, latest_only: bool = True) -> None:
        """``endpoint``: host:port of the llumlet's report socket."""
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        if latest_only:
            self._sock.setsockopt(zmq.CONFLATE, 1)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(f"tcp://{endpoint}")

    def recv(self, timeout: float) -> pb.Status | None:
        """The next report, or None if none came within ``timeout`` seconds."""
        if not self._sock.poll(int(timeout * 1000)):
            return None
        return pb.Status.FromString(self._sock.recv())

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> ReportSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
