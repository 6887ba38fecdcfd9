"""What an instance holds, followed from its engine's scheduler events, as status reports.

Engine-neutral: an engine adapter (``llumnix/llumlet/vllm.py``) feeds the tracker the events its
scheduler already emits (a request queued, its cache hit known, each step's scheduled
requests, a request finished) and the tracker answers :meth:`StatusTracker.snapshot`: the
instance's load as one ``Status`` message (``llumlet.proto``), whose leading fields are those of
:class:`llumnix.scheduler.InstanceStatus` (:func:`to_instance_status`).

All methods take the tracker's lock: the engine's scheduler thread writes while the llumlet's
report and RPC threads read.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from llumnix.llumlet import llumlet_pb2 as pb
from llumnix.scheduler.cluster import InstanceStatus

ROLES = ("prefill", "decode", "neutral")


@dataclass(slots=True)
class Scheduled:
    """One request an engine step computes tokens of."""

    request_id: str
    computed_tokens: int
    """Tokens with KV before this step (prompt and output)."""
    scheduled_tokens: int
    """Tokens the step computes."""
    output_tokens: int = 0
    """Output tokens generated before this step."""
    new_blocks: int = 0
    """Blocks allocated to it for this step."""
    resumed: bool = False
    """Rescheduled after a preemption: ``new_blocks`` is its whole block table again."""


@dataclass(slots=True)
class _Request:
    prompt_tokens: int
    cached_tokens: int = 0  # prefix-cache hit (local and external), known once matched
    computed_tokens: int = 0
    output_tokens: int = 0
    blocks: int = 0
    running: bool = False


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class StatusTracker:
    """Requests of one instance and the load they make, from its scheduler's events."""

    def __init__(self, instance_id: str, block_size: int, role: str = "neutral") -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.instance_id = instance_id
        self.block_size = block_size
        self.role = role
        self.incarnation = uuid.uuid4().hex[:12]
        self.draining = False
        self._lock = threading.Lock()
        self._requests: dict[str, _Request] = {}  # in arrival order: the queue's order
        self._seq = 0
        self._steps = 0
        self._preempted = 0
        self._last_step_at = 0.0
        self._step_seconds = 0.0
        self._decode = (0, 0)  # batch size, KV tokens
        self._prefill_tokens = 0

    # ------------------------------------------------------------------ events

    def add(self, request_id: str, prompt_tokens: int) -> None:
        """A request entered the engine's queue."""
        with self._lock:
            self._requests[request_id] = _Request(prompt_tokens)

    def matched(self, request_id: str, cached_tokens: int) -> None:
        """The engine found ``cached_tokens`` of a queued request's prompt cached (locally or
        to be loaded): it computes only the rest."""
        with self._lock:
            r = self._requests.get(request_id)
            if r is not None and not r.running:
                r.cached_tokens = min(max(cached_tokens, 0), r.prompt_tokens)

    def step(
        self,
        scheduled: Iterable[Scheduled],
        preempted: Iterable[str] = (),
        now: float | None = None,
    ) -> None:
        """An engine step was scheduled: what it computes, and which requests it preempted
        (back in the queue, their blocks freed)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._steps += 1
            if self._last_step_at:
                self._step_seconds = now - self._last_step_at
            self._last_step_at = now
            for request_id in preempted:
                r = self._requests.get(request_id)
                if r is not None:
                    r.running, r.blocks, r.computed_tokens, r.cached_tokens = False, 0, 0, 0
                    self._preempted += 1
            batch = tokens = prefill = 0
            for s in scheduled:
                r = self._requests.get(s.request_id)
                if r is None:  # arrived before the tracker started following the engine
                    r = self._requests[s.request_id] = _Request(s.computed_tokens)
                r.running = True
                r.blocks = s.new_blocks if s.resumed else r.blocks + s.new_blocks
                r.computed_tokens = s.computed_tokens + s.scheduled_tokens
                r.output_tokens = s.output_tokens
                if s.scheduled_tokens == 1 and s.computed_tokens >= r.prompt_tokens:
                    batch += 1
                    tokens += r.computed_tokens
                else:
                    prefill += s.scheduled_tokens
            self._decode = (batch, tokens)
            self._prefill_tokens = prefill

    def finish(self, request_id: str) -> None:
        """The request finished or was aborted (its blocks show in the pool's free count once
        the engine frees them)."""
        with self._lock:
            self._requests.pop(request_id, None)

    # ------------------------------------------------------------------ reports

    def seconds_since_step(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            return now - self._last_step_at if self._last_step_at else 0.0

    def snapshot(self, free_blocks: int, total_blocks: int, healthy: bool = True) -> pb.Status:
        """The instance's load now, as the next report of this incarnation."""
        with self._lock:
            self._seq += 1
            running_tokens = waiting_tokens = hol = demand = 0
            num_running = num_waiting = 0
            progress = []
            bs = self.block_size
            for request_id, r in self._requests.items():
                if r.running:
                    num_running += 1
                    running_tokens += r.computed_tokens
                else:
                    num_waiting += 1
                    waiting_tokens += r.prompt_tokens - r.cached_tokens
                    need = _blocks(r.prompt_tokens, bs) - r.cached_tokens // bs
                    hol = hol or need
                    demand += need
                progress.append(
                    pb.RequestProgress(
                        request_id=request_id,
                        prompt_tokens=r.prompt_tokens,
                        computed_tokens=r.computed_tokens,
                        output_tokens=r.output_tokens,
                        blocks=r.blocks,
                        running=r.running,
                    )
                )
            return pb.Status(
                instance_id=self.instance_id,
                incarnation=self.incarnation,
                seq=self._seq,
                step_id=self._steps,
                timestamp=time.time(),
                num_total_blocks=total_blocks,
                num_free_blocks=free_blocks,
                num_running=num_running,
                num_waiting=num_waiting,
                running_tokens=running_tokens,
                waiting_prefill_tokens=waiting_tokens,
                hol_demand_blocks=hol,
                waiting_demand_blocks=demand,
                decode_batch_size=self._decode[0],
                decode_tokens=self._decode[1],
                prefill_tokens=self._prefill_tokens,
                num_preempted=self._preempted,
                role=self.role,
                healthy=healthy,
                schedulable=healthy and not self.draining,
                draining=self.draining,
                block_size=bs,
                step_seconds=self._step_seconds,
                requests=progress,
            )


def to_instance_status(s: pb.Status) -> InstanceStatus:
    """A llumlet report as the scheduler's view of the instance."""
    return InstanceStatus(
        instance_id=s.instance_id,
        timestamp=s.timestamp,
        num_total_blocks=s.num_total_blocks,
        num_free_blocks=s.num_free_blocks,
        num_running=s.num_running,
        num_waiting=s.num_waiting,
        running_tokens=s.running_tokens,
        waiting_prefill_tokens=s.waiting_prefill_tokens,
        hol_demand_blocks=s.hol_demand_blocks,
        waiting_demand_blocks=s.waiting_demand_blocks,
        schedulable=s.schedulable,
        draining=s.draining,
        request_ids=frozenset(r.request_id for r in s.requests),
    )
