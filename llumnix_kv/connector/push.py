"""Prefill-decode disaggregation in push mode: the prefill writes each layer's KV, as soon as
that layer is computed, into blocks the decode instance allocated.

Protocol (one request; the caller names it on both instances with one ``transfer_id``):

1. The caller sends the request to both instances at once: to the prefill as a normal
   remote-decode request tagged with the transfer id, to the decode with the transfer id and
   the prefill's endpoint (its transfer-engine name and descriptor, which a probe request to
   the prefill returns).
2. The decode allocates blocks and sends the prefill a :class:`PushReady`: its descriptor,
   layout, block table, the token range it wants, and how long it will wait.
3. The prefill's :class:`PdPusher` WRITEs, after each attention layer ran, that layer's new
   tokens of the range (tokens it computed before the ready arrived go along); when the
   request has finished it WRITEs whatever is left, and once every batch has landed it sends
   ``done`` (a notification, so it arrives after the data). Its blocks are freed then.
4. The decode's :class:`PdPushReceiver` reports the load finished on ``done ok``, failed on
   ``done failed`` or at its deadline; a failed load reports the local blocks it was filling.

Deadlines: the ready says how long the decode waits (``expires_in``, its remaining time less
a margin); the prefill submits nothing after that and cancels what still runs, so a decode
that gave up never has its (freed, reused) blocks written. A prefill whose ready never comes
frees its blocks at its hold deadline. A decode aborted before it allocated sends ``abort``,
and the prefill frees its blocks at once.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llumnix_kv._C import KvLayout
from llumnix_kv.connector.jobs import JobState
from llumnix_kv.connector.pd import LoadOutcome
from llumnix_kv.connector.peers import PeerPool
from llumnix_kv.copy import plan_copy
from llumnix_kv.errors import InvalidArgumentError, KvError, PeerLostError
from llumnix_kv.layout import layout_from_dict, layout_to_dict
from llumnix_kv.transfer import Batch, Op, Peer, TransferEngine

__all__ = ["PdPushReceiver", "PdPusher", "PushEndpoint", "PushReady", "abort_notice"]

logger = logging.getLogger(__name__)

_READY = b"llumnix.push.ready:"
_ABORT = b"llumnix.push.abort:"
_DONE_OK = b"llumnix.push.done.ok:"
_DONE_FAILED = b"llumnix.push.done.failed:"

# A decode waits this much past its deadline before it reports a push failed, and tells the
# prefill a deadline this much earlier than its own: the prefill stops writing in between.
_MARGIN_S = 1.0


@dataclass(frozen=True)
class PushEndpoint:
    """A prefill worker a decode sends its ready to (JSON-safe with to/from_params)."""

    engine_name: str
    descriptor: bytes

    def to_params(self) -> dict[str, Any]:
        return {
            "engine_name": self.engine_name,
            "descriptor": base64.b64encode(self.descriptor).decode("ascii"),
        }

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> PushEndpoint:
        try:
            return cls(
                str(params["engine_name"]),
                base64.b64decode(params["descriptor"], validate=True),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"not a push endpoint: {exc!r}") from exc


@dataclass(frozen=True)
class PushReady:
    """Decode -> prefill: where to write the request's KV and until when."""

    transfer_id: str
    engine_name: str
    descriptor: bytes
    layout: Mapping[str, Any]
    block_ids: tuple[int, ...]
    tokens: tuple[int, int]
    expires_in: float  # seconds from receipt after which the prefill must not write

    def encode(self) -> bytes:
        return (
            _READY
            + json.dumps(
                {
                    "transfer_id": self.transfer_id,
                    "engine_name": self.engine_name,
                    "descriptor": base64.b64encode(self.descriptor).decode("ascii"),
                    "layout": dict(self.layout),
                    "block_ids": list(self.block_ids),
                    "tokens": list(self.tokens),
                    "expires_in": self.expires_in,
                }
            ).encode()
        )

    @classmethod
    def decode(cls, message: bytes) -> PushReady:
        try:
            d = json.loads(message[len(_READY) :])
            begin, end = (int(t) for t in d["tokens"])
            return cls(
                transfer_id=str(d["transfer_id"]),
                engine_name=str(d["engine_name"]),
                descriptor=base64.b64decode(d["descriptor"], validate=True),
                layout=dict(d["layout"]),
                block_ids=tuple(int(b) for b in d["block_ids"]),
                tokens=(begin, end),
                expires_in=float(d["expires_in"]),
            )
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError(f"malformed push ready: {exc!r}") from exc


def abort_notice(transfer_id: str) -> bytes:
    """Decode -> prefill: this request will not load; free its blocks."""
    return _ABORT + transfer_id.encode()


def done_notice(transfer_id: str, ok: bool, nbytes: int) -> bytes:
    return (_DONE_OK if ok else _DONE_FAILED) + f"{nbytes}:{transfer_id}".encode()


def parse_done(message: bytes) -> tuple[str, bool, int] | None:
    """(transfer id, ok, bytes pushed) of a ``done``; None for any other message."""
    for prefix, ok in ((_DONE_OK, True), (_DONE_FAILED, False)):
        rest = _suffix(message, prefix)
        if rest is not None:
            nbytes, _, transfer_id = rest.partition(":")
            return transfer_id, ok, int(nbytes) if nbytes.isdigit() else 0
    return None


def _suffix(message: bytes, prefix: bytes) -> str | None:
    if not message.startswith(prefix):
        return None
    return message[len(prefix) :].decode(errors="replace")


@dataclass
class _Push:
    """Prefill-side state of one pushed request."""

    request_id: str
    transfer_id: str
    blocks: list[int] = field(default_factory=list)  # the request's block table here
    computed: int = 0  # tokens whose KV exists once the current step's forward ran
    ready: PushReady | None = None
    remote: KvLayout | None = None
    expires: float = float("inf")  # monotonic; nothing is written after it
    pushed: int = 0  # tokens [ready.tokens[0], pushed) were sent for every layer
    step: tuple[int, int] | None = None  # tokens this step's layers send
    step_layers: int = 0  # layers of this step sent so far
    batches: list[Batch] = field(default_factory=list)
    nbytes: int = 0
    started: float = 0.0
    finished: bool = False  # the request finished here: its blocks wait for release
    hold_deadline: float = float("inf")
    error: str = ""
    aborted: bool = False
    done_batch: Batch | None = None


class PdPusher:
    """Prefill side of push mode: writes requests' KV into decode-allocated blocks.

    Call order per engine step: :meth:`track` (the step's requests), :meth:`accept` for each
    notification, :meth:`begin_step`, :meth:`on_layer` after each layer's attention,
    :meth:`end_step` after the forward, and :meth:`poll` for the requests whose blocks may be
    freed; :meth:`finish` when a request finished here.
    """

    def __init__(self, engine: TransferEngine, local: KvLayout, peers: PeerPool) -> None:
        self._engine = engine
        self._local = local
        self._peers = peers
        self._pushes: dict[str, _Push] = {}  # by transfer id
        self._by_request: dict[str, str] = {}  # request id -> transfer id
        self._early: dict[str, tuple[float, PushReady | None]] = {}  # ready/abort before track
        self._untracked: list[str] = []  # finished, never tracked: nothing to wait for
        self.pushes_done = 0
        self.pushes_failed = 0
        self.layer_batches = 0  # WRITEs sent right after a layer's attention ran
        self.holds_expired = 0
        self.bytes_pushed = 0
        self.durations: list[tuple[float, int]] = []  # (seconds, bytes) since taken

    @property
    def pending(self) -> int:
        return len(self._pushes)

    @property
    def stepping(self) -> bool:
        """Whether this step's layers send anything (set by :meth:`begin_step`)."""
        return any(push.step is not None for push in self._pushes.values())

    def track(self, request_id: str, transfer_id: str, blocks: list[int], computed: int) -> None:
        """The request's block table and the tokens computed once this step's forward ran."""
        push = self._pushes.get(transfer_id)
        if push is None:
            push = self._pushes[transfer_id] = _Push(request_id, transfer_id)
            self._by_request[request_id] = transfer_id
            received, ready = self._early.pop(transfer_id, (0.0, None))
            if received and ready is None:
                push.aborted = True
            elif ready is not None:
                self._set_ready(push, ready, received)
        push.blocks, push.computed = list(blocks), computed

    def accept(self, message: bytes) -> bool:
        """Takes a ready or abort (True); other messages are left to others (False)."""
        now = time.monotonic()
        if message.startswith(_READY):
            try:
                ready = PushReady.decode(message)
            except InvalidArgumentError as exc:
                logger.warning("dropping %s", exc)
                return True
            push = self._pushes.get(ready.transfer_id)
            if push is None:
                self._early[ready.transfer_id] = (now, ready)
                self.prepare(message)
            else:
                self._set_ready(push, ready, now)
            return True
        transfer_id = _suffix(message, _ABORT)
        if transfer_id is None:
            return False
        push = self._pushes.get(transfer_id)
        if push is None:
            self._early[transfer_id] = (now, None)
        else:
            push.aborted = True
        return True

    def prepare(self, message: bytes) -> None:
        """Starts connecting to the sender of a ready (thread-safe; for a notification
        reader, so the connection is up before the request's first step)."""
        if message.startswith(_READY):
            with contextlib.suppress(KvError):
                ready = PushReady.decode(message)
                self._peers.get(ready.engine_name, ready.descriptor)

    def _set_ready(self, push: _Push, ready: PushReady, received: float) -> None:
        try:
            push.remote = layout_from_dict(dict(ready.layout))
        except KvError as exc:
            push.error = f"bad layout in ready: {exc}"
            return
        push.ready, push.expires = ready, received + ready.expires_in
        push.pushed = ready.tokens[0]
        self._peer(push)  # starts connecting

    def _peer(self, push: _Push) -> Peer | None:
        assert push.ready is not None
        try:
            return self._peers.get(push.ready.engine_name, push.ready.descriptor)
        except KvError as exc:
            push.error = f"connect: {exc}"
            return None

    def begin_step(self) -> None:
        """Decides which tokens this step's layers send, per request."""
        now = time.monotonic()
        for push in self._pushes.values():
            push.step, push.step_layers = None, 0
            if push.ready is None or push.error or push.aborted or now > push.expires:
                continue
            lo, hi = push.pushed, min(push.computed, push.ready.tokens[1])
            if hi > lo and self._peer(push) is not None:
                push.step = (lo, hi)

    def on_layer(self, layer: int) -> None:
        """Sends layer ``layer`` of this step's tokens (its attention just ran)."""
        for push in self._pushes.values():
            if push.step is not None:
                self._write(push, push.step, (layer, layer + 1))
                push.step_layers += 1
                self.layer_batches += 1

    def end_step(self) -> None:
        """After the forward: the step's tokens count as sent only if every layer went (a
        step whose layers were not all seen leaves them to the send after the request)."""
        for push in self._pushes.values():
            complete = push.step_layers == self._local.num_layers
            if push.step is not None and complete and not push.error:
                push.pushed = push.step[1]
            push.step, push.step_layers = None, 0

    def finish(self, request_id: str, hold_s: float, *, ok: bool) -> None:
        """The request finished here (``ok``: normally; else aborted or preempted, so its
        blocks no longer hold its KV and the decode must not use what was sent)."""
        transfer_id = self._by_request.get(request_id)
        if transfer_id is None:
            self._untracked.append(request_id)  # no step ran: nothing was sent
            return
        push = self._pushes[transfer_id]
        push.finished, push.hold_deadline = True, time.monotonic() + hold_s
        if not ok:
            push.error = push.error or "the request did not finish on the prefill"

    def poll(self) -> list[str]:
        """Finished requests whose blocks may be freed now."""
        now = time.monotonic()
        released, self._untracked = self._untracked, []
        for push in list(self._pushes.values()):
            self._progress(push, now)
            if self._settled(push, now):
                released.append(push.request_id)
                del self._pushes[push.transfer_id]
                del self._by_request[push.request_id]
        for transfer_id, (received, _) in list(self._early.items()):
            if now - received > 600.0:
                del self._early[transfer_id]
        return released

    def _progress(self, push: _Push, now: float) -> None:
        for batch in list(push.batches):
            try:
                if not batch.poll():
                    if now > push.expires:
                        batch.cancel()
                    continue
            except KvError as exc:
                push.error = push.error or f"{type(exc).__name__}: {exc}"
                if isinstance(exc, PeerLostError) and push.ready is not None:
                    self._peers.drop(push.ready.engine_name)
            with contextlib.suppress(KvError):
                batch.release()
            push.batches.remove(batch)
        if not push.finished or push.ready is None or push.error or push.aborted:
            return
        if now > push.expires:
            push.error = "the decode's deadline passed"
            return
        end = push.ready.tokens[1]
        if push.pushed < end and self._peer(push) is not None:
            # Tokens not sent layer by layer (the ready came late, or prefix hits here).
            self._write(push, (push.pushed, end), None)
            if not push.error:
                push.pushed = end

    def _settled(self, push: _Push, now: float) -> bool:
        """Whether the request's blocks may be freed (sending ``done`` first when due)."""
        if not push.finished or push.batches:
            return False
        if push.ready is None:
            if push.aborted:
                return True
            if now > push.hold_deadline:
                self.holds_expired += 1
                logger.warning("no push ready for %s before its deadline", push.request_id)
                return True
            return False
        ok = not push.error and not push.aborted and push.pushed >= push.ready.tokens[1]
        if not ok and not push.error and not push.aborted and now <= push.hold_deadline:
            return False  # still connecting, or not sent yet
        if push.done_batch is None:
            try:
                peer = self._peers.get(push.ready.engine_name, push.ready.descriptor)
            except KvError:
                return True  # the decode is gone: nothing will read these blocks
            if peer is None:
                return now > push.hold_deadline  # still connecting
            self._send_done(push, peer, ok)
            if push.done_batch is None:
                return True
        try:
            if not push.done_batch.poll() and now <= push.expires + _MARGIN_S:
                return False
        except KvError:
            pass
        with contextlib.suppress(KvError):
            push.done_batch.release()
        if ok:
            self.pushes_done += 1
            self.bytes_pushed += push.nbytes
            self.durations.append((now - push.started, push.nbytes))
        else:
            self.pushes_failed += 1
            logger.warning("push of %s failed: %s", push.request_id, push.error or "aborted")
        return True

    def _send_done(self, push: _Push, peer: Peer, ok: bool) -> None:
        none = np.zeros(0, dtype=np.uint64)
        notice = done_notice(push.transfer_id, ok, push.nbytes)
        timeout = max(push.expires + _MARGIN_S - time.monotonic(), 0.1)
        with contextlib.suppress(KvError):
            push.done_batch = self._engine.submit(
                peer, Op.WRITE, none, none, none, notify=notice, timeout=timeout
            )

    def _write(self, push: _Push, tokens: tuple[int, int], layers: tuple[int, int] | None) -> None:
        ready, remote = push.ready, push.remote
        assert ready is not None and remote is not None
        try:
            peer = self._peers.get(ready.engine_name, ready.descriptor)
            assert peer is not None  # begin_step/_progress checked it
            plan = plan_copy(
                self._local, remote, push.blocks, ready.block_ids, tokens=tokens, layers=layers
            )
            timeout = max(push.expires - time.monotonic(), 1e-3)
            batch = self._engine.transfer(
                peer, plan, self._local, remote, op=Op.WRITE, timeout=timeout
            )
        except KvError as exc:
            push.error = f"{type(exc).__name__}: {exc}"
            return
        if not push.started:
            push.started = time.monotonic()
        push.batches.append(batch)
        push.nbytes += batch.nbytes


@dataclass
class _Expect:
    """Decode-side state of one pushed load."""

    request_id: str
    transfer_id: str
    endpoint: PushEndpoint
    local_blocks: list[int]
    tokens: tuple[int, int]
    deadline: float
    state: JobState = JobState.PENDING
    sent: Batch | None = None
    error: str = ""
    nbytes: int = 0  # bytes the prefill pushed (from its done)
    started: float = field(default_factory=time.monotonic)


class PdPushReceiver:
    """Decode side of push mode: asks prefill workers to push and waits for their ``done``."""

    def __init__(self, engine: TransferEngine, local: KvLayout, peers: PeerPool) -> None:
        self._engine = engine
        self._local = local
        self._layout = layout_to_dict(local)
        self._peers = peers
        self._expects: dict[str, _Expect] = {}  # by transfer id
        self._done: dict[str, tuple[bool, int]] = {}  # transfer id -> (ok, bytes pushed)
        self.loads_done = 0
        self.loads_failed = 0
        self.tokens_loaded = 0
        self.bytes_loaded = 0
        self.durations: list[tuple[float, int]] = []  # (seconds, bytes) since taken

    @property
    def pending(self) -> int:
        return len(self._expects)

    def expect(
        self,
        request_id: str,
        transfer_id: str,
        endpoint: PushEndpoint,
        local_blocks: list[int],
        tokens: tuple[int, int],
        deadline: float,
    ) -> None:
        """Waits for the push of ``tokens`` into ``local_blocks``. (A request that will not
        load, e.g. aborted, sends the prefill :func:`abort_notice` instead.)"""
        self._expects[transfer_id] = _Expect(
            request_id, transfer_id, endpoint, list(local_blocks), tokens, deadline
        )

    def accept(self, message: bytes) -> bool:
        """Takes a ``done`` (True); other messages are left to others (False)."""
        done = parse_done(message)
        if done is None:
            return False
        transfer_id, ok, nbytes = done
        if transfer_id in self._expects:
            self._done[transfer_id] = (ok, nbytes)
        return True

    def poll(self) -> list[LoadOutcome]:
        """Loads that finished (pushed, failed or past the deadline)."""
        now = time.monotonic()
        out = []
        for exp in list(self._expects.values()):
            if exp.state == JobState.PENDING:
                self._send(exp, now)
            if exp.sent is not None:
                try:
                    if exp.sent.poll():
                        exp.sent.release()
                        exp.sent = None
                except KvError as exc:
                    self._fail(exp, exc)
            done = self._done.pop(exp.transfer_id, None)
            if done is not None and exp.state == JobState.RUNNING:
                ok, exp.nbytes = done
                exp.state = JobState.DONE if ok else JobState.FAILED
                exp.error = "" if ok else "the prefill reported the push failed"
            if exp.state == JobState.RUNNING and now > exp.deadline + _MARGIN_S:
                exp.state, exp.error = JobState.FAILED, "deadline passed"
            if exp.state == JobState.PENDING and now > exp.deadline:
                exp.state, exp.error = JobState.FAILED, "deadline passed while connecting"
            if exp.state in (JobState.DONE, JobState.FAILED) and exp.sent is None:
                del self._expects[exp.transfer_id]
                out.append(self._outcome(exp, now))
        return out

    def _send(self, exp: _Expect, now: float) -> None:
        try:
            peer = self._peers.get(exp.endpoint.engine_name, exp.endpoint.descriptor)
            if peer is None:
                return
            message = PushReady(
                transfer_id=exp.transfer_id,
                engine_name=self._engine.name,
                descriptor=self._engine.descriptor(),
                layout=self._layout,
                block_ids=tuple(exp.local_blocks),
                tokens=exp.tokens,
                expires_in=max(exp.deadline - now - _MARGIN_S, 0.0),
            ).encode()
            none = np.zeros(0, dtype=np.uint64)
            timeout = max(exp.deadline - now, 1e-3)
            exp.sent = self._engine.submit(
                peer, Op.WRITE, none, none, none, notify=message, timeout=timeout
            )
            exp.state = JobState.RUNNING
        except KvError as exc:
            self._fail(exp, exc)

    def _fail(self, exp: _Expect, exc: Exception) -> None:
        exp.state, exp.error = JobState.FAILED, f"{type(exc).__name__}: {exc}"
        if exp.sent is not None:
            with contextlib.suppress(KvError):
                exp.sent.release()
            exp.sent = None
        if isinstance(exc, PeerLostError):
            self._peers.drop(exp.endpoint.engine_name)

    def _outcome(self, exp: _Expect, now: float) -> LoadOutcome:
        begin, end = exp.tokens
        if exp.state == JobState.DONE:
            n = max(end - begin, 0)
            self.loads_done += 1
            self.tokens_loaded += n
            self.bytes_loaded += exp.nbytes
            self.durations.append((now - exp.started, exp.nbytes))
            return LoadOutcome(exp.request_id, True, n, ())
        self.loads_failed += 1
        logger.warning("push load of %s failed: %s", exp.request_id, exp.error)
        bt = self._local.block_tokens
        failed = exp.local_blocks[begin // bt : (end - 1) // bt + 1] if end > begin else []
        return LoadOutcome(exp.request_id, False, 0, tuple(failed), exp.error)
