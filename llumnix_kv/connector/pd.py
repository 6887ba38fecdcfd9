"""Prefill-decode disaggregation in pull mode: the decode side reads, the prefill side holds.

Protocol (one request):
1. The prefill instance computes the prompt, keeps the request's blocks and publishes a
   :class:`~llumnix_kv.connector.handoff.PdHandoff`; its :class:`PdSendLedger` holds the
   blocks until a read notice for the request arrives or the hold's deadline passes.
2. The decode instance allocates blocks and its :class:`PdPuller` READs the tokens from the
   prefill's cache into them through the transfer engine (any block sizes on either side),
   with :func:`read_notice` as the batch's notification. The prefill's engine receives the
   notice after the data, so the blocks it held may be freed.
3. A load that fails or passes its deadline reports the local blocks it was writing, so the
   engine recomputes them; the prefill side frees its blocks at its own deadline. The hand-off
   says when that is (``expires_at``): a load's deadline ends :data:`HOLD_MARGIN_S` before it
   (:func:`load_deadline`), so no READ runs once the blocks may be reused for other requests.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np

from llumnix_kv._C import KvLayout
from llumnix_kv.connector.handoff import PdHandoff
from llumnix_kv.connector.jobs import JobState, LoadJob, SendHold
from llumnix_kv.connector.peers import PeerPool
from llumnix_kv.copy import plan_copy
from llumnix_kv.errors import KvError, PeerLostError
from llumnix_kv.transfer import Op, TransferEngine

__all__ = [
    "HOLD_MARGIN_S",
    "LoadOutcome",
    "PdPuller",
    "PdSendLedger",
    "load_deadline",
    "parse_read_notice",
    "read_notice",
]

logger = logging.getLogger(__name__)

_NOTICE_PREFIX = b"llumnix.pd.read:"

# A decode's READ ends (done or cancelled) this long before the prefill's hold of the blocks
# it reads expires, so that clock skew between hosts and the cancel itself stay inside it.
HOLD_MARGIN_S = 2.0


def load_deadline(handoff: PdHandoff, timeout_s: float, now: float | None = None) -> float:
    """The ``time.monotonic()`` deadline of a load of ``handoff``: ``timeout_s`` from now, or
    :data:`HOLD_MARGIN_S` before the prefill frees the blocks, whichever comes first."""
    now = time.monotonic() if now is None else now
    deadline = now + timeout_s
    if handoff.expires_at is not None:
        deadline = min(deadline, now + (handoff.expires_at - time.time()) - HOLD_MARGIN_S)
    return deadline


def read_notice(request_id: str) -> bytes:
    """The notification that tells a prefill instance its blocks for ``request_id`` were read
    (or will never be: an aborted decode sends it with no data)."""
    return _NOTICE_PREFIX + request_id.encode()


def parse_read_notice(message: bytes) -> str | None:
    """The request id of a read notice; None for any other message."""
    if not message.startswith(_NOTICE_PREFIX):
        return None
    return message[len(_NOTICE_PREFIX) :].decode(errors="replace")


@dataclass(frozen=True)
class LoadOutcome:
    """A finished load: ``failed_blocks`` (local block ids) is empty when it succeeded."""

    request_id: str
    ok: bool
    num_tokens: int  # tokens loaded (0 when it failed)
    failed_blocks: tuple[int, ...]
    error: str = ""


class PdPuller:
    """Decode side: runs :class:`LoadJob` READs from prefill peers into the local cache.

    One per worker process, next to its :class:`TransferEngine` (which holds the local
    layout's memory registered). Peers come from a :class:`PeerPool` (connected on a
    background thread, kept by engine name); a peer that is lost is dropped, so a later
    hand-off from it reconnects.
    """

    def __init__(self, engine: TransferEngine, local: KvLayout, peers: PeerPool) -> None:
        self._engine = engine
        self._local = local
        self._peers = peers
        self._jobs: dict[str, LoadJob] = {}
        self.tokens_loaded = 0
        self.loads_done = 0
        self.loads_failed = 0
        self.bytes_loaded = 0
        self.durations: list[tuple[float, int]] = []  # (seconds, bytes) of loads since taken

    @property
    def pending(self) -> int:
        return len(self._jobs)

    def start(self, job: LoadJob) -> None:
        """Queues the job; its READ (or, for an empty token range, only the read notice) is
        submitted as soon as the peer is connected (this call, or a later :meth:`poll`)."""
        self._jobs[job.request_id] = job
        self._submit(job)

    def _submit(self, job: LoadJob) -> None:
        try:
            timeout = job.deadline - time.monotonic()
            if timeout <= 0:
                # E.g. the hand-off's hold expires too soon: the prefill may free the blocks.
                job.state, job.error = JobState.FAILED, "deadline passed before the read"
                return
            peer = self._peers.get(job.handoff.engine_name, job.handoff.descriptor)
            if peer is None:
                return  # still connecting
            notice = read_notice(job.handoff.request_id)
            begin, end = job.tokens
            if end <= begin:
                none = np.zeros(0, dtype=np.uint64)
                job.batch = self._engine.submit(
                    peer, Op.READ, none, none, none, notify=notice, timeout=timeout
                )
            else:
                remote = job.handoff.remote_layout()
                plan = plan_copy(
                    remote, self._local, job.handoff.block_ids, job.local_blocks, tokens=job.tokens
                )
                job.batch = self._engine.transfer(
                    peer, plan, self._local, remote, op=Op.READ, notify=notice, timeout=timeout
                )
            job.state = JobState.RUNNING
        except KvError as exc:
            self._fail(job, exc)

    def poll(self) -> list[LoadOutcome]:
        """Jobs that finished since the last call (done, failed or past their deadline)."""
        now = time.monotonic()
        out = []
        for job in list(self._jobs.values()):
            if job.state == JobState.PENDING:
                if now > job.deadline:
                    job.state, job.error = JobState.FAILED, "deadline passed while connecting"
                else:
                    self._submit(job)
            if job.state == JobState.RUNNING and job.batch is not None:
                try:
                    if job.batch.poll():
                        job.state = JobState.DONE
                    elif now > job.deadline:
                        job.batch.cancel()
                        job.state, job.error = JobState.FAILED, "deadline passed"
                except KvError as exc:
                    self._fail(job, exc)
            if job.state in (JobState.DONE, JobState.FAILED):
                out.append(self._finish(job))
        return out

    def _fail(self, job: LoadJob, exc: Exception) -> None:
        job.state, job.error = JobState.FAILED, f"{type(exc).__name__}: {exc}"
        if isinstance(exc, PeerLostError):
            self._peers.drop(job.handoff.engine_name)

    def _finish(self, job: LoadJob) -> LoadOutcome:
        del self._jobs[job.request_id]
        if job.batch is not None:
            with contextlib.suppress(KvError):
                job.batch.release()
        if job.state == JobState.DONE:
            self.loads_done += 1
            n = max(job.tokens[1] - job.tokens[0], 0)
            self.tokens_loaded += n
            if n:
                nbytes = job.batch.nbytes if job.batch is not None else 0
                self.bytes_loaded += nbytes
                self.durations.append((time.monotonic() - job.started, nbytes))
            return LoadOutcome(job.request_id, True, n, ())
        self.loads_failed += 1
        logger.warning("load of %s failed: %s", job.request_id, job.error)
        failed = tuple(job.written_blocks(self._local.block_tokens))
        return LoadOutcome(job.request_id, False, 0, failed, job.error)


class PdSendLedger:
    """Prefill side: which requests' blocks are held for a peer's read, and when to free them.

    Read notices are matched by request id; a notice that arrives before its hold is known
    (the peer read between two engine steps) is kept for ``notice_ttl`` seconds.
    """

    def __init__(self, *, notice_ttl: float = 600.0) -> None:
        self._holds: dict[str, SendHold] = {}
        self._early: dict[str, float] = {}  # request id -> monotonic time its notice came
        self._notice_ttl = notice_ttl
        self.reads_noticed = 0
        self.holds_expired = 0

    @property
    def pending(self) -> int:
        return len(self._holds)

    def hold(self, request_id: str, timeout: float) -> None:
        self._holds[request_id] = SendHold(request_id, time.monotonic() + timeout)

    def accept(self, message: bytes) -> bool:
        """Takes a read notice (True); any other message is left to others (False)."""
        request_id = parse_read_notice(message)
        if request_id is None:
            return False
        self._early[request_id] = time.monotonic()
        return True

    def poll(self) -> list[str]:
        """Requests whose blocks may be freed now: read by the peer, or past the deadline.
        Read notices reach the ledger through :meth:`accept`."""
        now = time.monotonic()
        released = []
        for request_id, held in list(self._holds.items()):
            if self._early.pop(request_id, None) is not None:
                self.reads_noticed += 1
            elif now > held.deadline:
                self.holds_expired += 1
                logger.warning("no read notice for %s before its deadline; freeing", request_id)
            else:
                continue
            del self._holds[request_id]
            released.append(request_id)
        for request_id, seen in list(self._early.items()):
            if now - seen > self._notice_ttl:
                del self._early[request_id]
        return released
