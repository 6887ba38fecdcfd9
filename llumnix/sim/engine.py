"""Engine model: one paged-KV, continuous-batching instance with vLLM-style local scheduling.

Per step the engine either prefills (admitting queued requests FCFS while their blocks fit
and the token budget allows; a request that does not fit blocks the queue behind it) or
decodes one token for every running request. Before a decode step every request whose last
block is full needs a new block; when there are not enough free blocks the running request
that arrived last is preempted by recompute (vLLM's FCFS policy keeps the running queue in
arrival order and pops its tail; with a priority queue, the lowest priority first): its
blocks are freed and it re-queues at the head, to prefill prompt + generated tokens again.
A request that joined by migration or was re-admitted after a preemption keeps its arrival
order, so it is not the next victim just because it joined the batch last.

Token accounting of a request: after a prefill of ``n`` tokens the KV holds ``n`` tokens and
one more token has been generated; each decode step writes the previous token's KV and
generates one more. So while running, ``ctx == prompt + generated - 1`` and the request holds
``ceil(ctx / block_size)`` blocks, plus one block reserved ahead when ``ctx`` is a multiple of
``block_size`` and it is about to decode.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from dataclasses import dataclass, field

from llumnix.scheduler.cluster import InstanceInfo, InstanceStatus
from llumnix.sim.profile import EngineProfile
from llumnix.sim.traces import TraceRequest

logger = logging.getLogger(__name__)


class ReqState(enum.Enum):
    """Where a request is in its life."""

    WAITING = 0
    RUNNING = 1
    SUSPENDED = 2
    FINISHED = 3


@dataclass(slots=True, eq=False)
class SimRequest:
    """A request inside the simulator."""

    trace: TraceRequest
    """The trace entry it came from."""
    generated: int = 0
    """Output tokens produced so far."""
    ctx: int = 0
    """Tokens whose KV is held on the current instance."""
    blocks: int = 0
    """KV blocks held on the current instance."""
    state: ReqState = ReqState.WAITING
    """Life-cycle state."""
    instance: SimInstance | None = None
    """Instance that holds it."""
    needs_block: bool = False
    """Running and its last block is full: needs a block before its next decode step."""
    first_token_s: float | None = None
    """When the first output token was produced (end of the first prefill)."""
    finish_s: float | None = None
    """When the last output token was produced."""
    preempted_at: float | None = None
    """Set while re-queued after a preemption."""
    num_preemptions: int = 0
    """Preemptions suffered."""
    preemption_loss_s: float = 0.0
    """Time lost to preemptions: from each preemption until its recompute finished."""
    num_migrations: int = 0
    """Completed migrations."""
    migration: object | None = None
    """The migration job in progress, if any."""
    prefill_hit_tokens: int = 0
    """Prompt tokens served from the prefix cache at the last admission."""

    @property
    def request_id(self) -> str:
        return self.trace.request_id

    @property
    def prefill_tokens(self) -> int:
        """Tokens to prefill on (re-)admission: the prompt plus what was generated."""
        return self.trace.input_tokens + self.generated


@dataclass
class EngineStats:
    """Counters of one instance."""

    prefill_steps: int = 0
    """Prefill steps run."""
    decode_steps: int = 0
    """Decode steps run."""
    preemptions: int = 0
    """Requests preempted."""
    busy_s: float = 0.0
    """Seconds spent running steps."""
    finished: list[SimRequest] = field(default_factory=list)
    """Requests finished here, in finishing order."""


class SimInstance:
    """One simulated engine instance."""

    def __init__(
        self,
        instance_id: str,
        profile: EngineProfile,
        start_s: float = 0.0,
        priority_queue: bool = False,
        prefix_cache_size: int = 64,
    ) -> None:
        self.instance_id = instance_id
        self.profile = profile
        self.info = InstanceInfo(
            instance_id, profile.num_blocks, profile.block_size, max_batch_size=profile.max_num_seqs
        )
        self.bs = profile.block_size
        self.free_blocks = profile.num_blocks
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.suspended: set[SimRequest] = set()
        self.needing: list[SimRequest] = []
        self.running_tokens = 0
        self.waiting_tokens = 0
        self.waiting_blocks = 0
        self.num_high_priority = 0
        self.ids: set[str] = set()
        self.migrating_out = 0
        self.migrating_in = 0
        self.reserved_blocks = 0
        self.pending_suspends: list[object] = []
        self.priority_queue = priority_queue
        self.prefix_cache: dict[str, None] = {}
        self.prefix_cache_size = prefix_cache_size
        self.schedulable = True
        self.draining = False
        self.start_s = start_s
        self.end_s: float | None = None
        self.busy = False
        self._step_prefill: list[SimRequest] | None = None
        self._step_n = 0
        self.stats = EngineStats()

    # -- queue ---------------------------------------------------------------------------
    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.bs)

    def enqueue(self, r: SimRequest, front: bool = False) -> None:
        """Put a request in the waiting queue (front: a preempted request)."""
        r.state = ReqState.WAITING
        r.instance = self
        if front:
            self.waiting.appendleft(r)
        elif self.priority_queue and r.trace.priority > 0:
            # behind queued requests of equal or higher priority, ahead of the rest
            pos = next(
                (i for i, w in enumerate(self.waiting) if w.trace.priority < r.trace.priority),
                len(self.waiting),
            )
            self.waiting.insert(pos, r)
        else:
            self.waiting.append(r)
        if r.request_id not in self.ids:
            self.ids.add(r.request_id)
            self.num_high_priority += r.trace.priority > 0
        self.waiting_tokens += r.prefill_tokens
        self.waiting_blocks += self._blocks_for(r.prefill_tokens)

    def dequeue(self, r: SimRequest) -> None:
        """Remove a queued request (moved elsewhere); it no longer counts here."""
        self.waiting.remove(r)
        self.waiting_tokens -= r.prefill_tokens
        self.waiting_blocks -= self._blocks_for(r.prefill_tokens)
        self._forget(r)

    def _forget(self, r: SimRequest) -> None:
        self.ids.discard(r.request_id)
        self.num_high_priority -= r.trace.priority > 0

    def has_work(self) -> bool:
        """Anything to run?"""
        return bool(self.running or self.waiting)

    def is_empty(self) -> bool:
        """Holds no request in any state and no migration touches it."""
        return not (
            self.running
            or self.waiting
            or self.suspended
            or self.migrating_in
            or self.migrating_out
            or self.busy
        )

    # -- running set -----------------------------------------------------------------------
    def _mark_need(self, r: SimRequest) -> None:
        if r.ctx >= r.blocks * self.bs:
            r.needs_block = True
            self.needing.append(r)

    def add_running(self, r: SimRequest) -> None:
        """Join the running batch with ``r.blocks`` already allocated (admission, migration)."""
        r.state = ReqState.RUNNING
        r.instance = self
        self.running.append(r)
        self.running_tokens += r.ctx
        self._mark_need(r)

    def remove_running(self, r: SimRequest) -> None:
        """Leave the running batch (blocks stay held)."""
        self.running.remove(r)
        self.running_tokens -= r.ctx
        if r.needs_block:
            r.needs_block = False
            self.needing.remove(r)

    def free_request_blocks(self, r: SimRequest) -> None:
        """Return a request's blocks to the free pool."""
        self.free_blocks += r.blocks
        r.blocks = 0
        r.ctx = 0

    def _preempt(self, r: SimRequest, now: float) -> None:
        self.remove_running(r)
        self.free_request_blocks(r)
        r.num_preemptions += 1
        if r.preempted_at is None:
            r.preempted_at = now
        self.stats.preemptions += 1
        self.ids.discard(r.request_id)  # re-added by enqueue
        self.num_high_priority -= r.trace.priority > 0
        self.enqueue(r, front=True)

    def _victim_key(self, r: SimRequest) -> tuple[int, float]:
        """Preemption order: the largest key goes first (latest arrival; with a priority
        queue, among the lowest priority); ties go to the most recently admitted."""
        prio = -r.trace.priority if self.priority_queue else 0
        return (prio, r.trace.arrival_s)

    # -- steps -----------------------------------------------------------------------------
    def start_step(self, now: float, on_preempt: object = None) -> float | None:
        """Schedule and begin one step; returns its duration, or None when idle. Calls
        ``on_preempt(request)`` for each request preempted (so migrations can abort)."""
        if self.busy or not (self.running or self.waiting):
            return None
        p = self.profile
        batch = self._admit()
        if batch:
            self._step_prefill = batch
            tokens = 0
            sq = 0.0
            for r in batch:
                n = r.prefill_tokens - r.prefill_hit_tokens
                tokens += n
                sq += n * n
            self.stats.prefill_steps += 1
            dur = p.prefill_s(tokens, sq)
        else:
            if not self.running:
                return None
            while len(self.needing) > self.free_blocks and self.running:
                victim = max(reversed(self.running), key=self._victim_key)
                self._preempt(victim, now)
                if callable(on_preempt):
                    on_preempt(victim)
            for r in self.needing:
                r.blocks += 1
                r.needs_block = False
            self.free_blocks -= len(self.needing)
            self.needing.clear()
            if not self.running:
                return self.start_step(now, on_preempt) if self.waiting else None
            self._step_prefill = None
            self._step_n = len(self.running)
            self.stats.decode_steps += 1
            dur = p.decode_s(self._step_n, self.running_tokens)
        self.busy = True
        self.stats.busy_s += dur
        return dur

    def _admit(self) -> list[SimRequest]:
        p = self.profile
        batch: list[SimRequest] = []
        budget = p.max_batched_tokens
        seqs = len(self.running)
        while self.waiting and seqs < p.max_num_seqs:
            r = self.waiting[0]
            n = r.prefill_tokens
            need = -(-n // self.bs)
            if need > self.free_blocks:
                break
            hit = 0
            pid = r.trace.prefix_id
            if pid is not None and pid in self.prefix_cache and r.generated == 0:
                hit = min(r.trace.prefix_tokens, n - 1)
            if batch and n - hit > budget:
                break
            self.waiting.popleft()
            self.waiting_tokens -= n
            self.waiting_blocks -= need
            self.free_blocks -= need
            r.blocks = need
            r.prefill_hit_tokens = hit
            budget -= n - hit
            seqs += 1
            batch.append(r)
        return batch

    def finish_step(self, now: float) -> list[SimRequest]:
        """Apply the step's effects; returns requests that finished."""
        self.busy = False
        done: list[SimRequest] = []
        batch = self._step_prefill
        if batch is not None:
            self._step_prefill = None
            for r in batch:
                r.ctx = r.prefill_tokens
                r.generated += 1
                if r.first_token_s is None:
                    r.first_token_s = now
                if r.preempted_at is not None:
                    r.preemption_loss_s += now - r.preempted_at
                    r.preempted_at = None
                pid = r.trace.prefix_id
                if pid is not None:
                    self._touch_prefix(pid)
                if r.generated >= r.trace.output_tokens:
                    self._finish(r, now)
                    done.append(r)
                else:
                    self.add_running(r)
            return done
        n = self._step_n
        keep: list[SimRequest] = []
        bs = self.bs
        needing = self.needing
        for r in self.running[:n]:
            r.ctx += 1
            r.generated += 1
            if r.generated >= r.trace.output_tokens:
                self.running_tokens -= r.ctx - 1
                self._finish(r, now)
                done.append(r)
                continue
            keep.append(r)
            if r.ctx >= r.blocks * bs:
                r.needs_block = True
                needing.append(r)
        self.running_tokens += len(keep)
        if len(self.running) > n:
            keep.extend(self.running[n:])
        self.running = keep
        return done

    def _finish(self, r: SimRequest, now: float) -> None:
        r.state = ReqState.FINISHED
        r.finish_s = now
        self.free_request_blocks(r)
        self._forget(r)
        self.stats.finished.append(r)

    def _touch_prefix(self, pid: str) -> None:
        cache = self.prefix_cache
        cache.pop(pid, None)
        cache[pid] = None
        if len(cache) > self.prefix_cache_size:
            del cache[next(iter(cache))]

    # -- reports ---------------------------------------------------------------------------
    def status(self, now: float) -> InstanceStatus:
        """The load report a llumlet would push for this instance now."""
        hol = self.waiting[0].prefill_tokens if self.waiting else 0
        # requests in the prefill step under way are in vLLM's running queue already
        prefilling = len(self._step_prefill) if self._step_prefill else 0
        return InstanceStatus(
            instance_id=self.instance_id,
            timestamp=now,
            num_total_blocks=self.profile.num_blocks,
            num_free_blocks=self.free_blocks,
            num_running=len(self.running) + prefilling,
            num_waiting=len(self.waiting),
            running_tokens=self.running_tokens,
            waiting_prefill_tokens=self.waiting_tokens,
            hol_demand_blocks=-(-hol // self.bs),
            waiting_demand_blocks=self.waiting_blocks,
            num_high_priority=self.num_high_priority,
            num_migrating_out=self.migrating_out,
            num_migrating_in=self.migrating_in,
            schedulable=self.schedulable,
            draining=self.draining,
            request_ids=frozenset(self.ids),
            prefix_ids=frozenset(self.prefix_cache) if self.prefix_cache else frozenset(),
        )

    def check_invariants(self) -> None:
        """Block conservation: free + held + reserved == capacity, nothing negative."""
        held = sum(r.blocks for r in self.running) + sum(r.blocks for r in self.suspended)
        total = self.free_blocks + held + self.reserved_blocks
        if self.busy and self._step_prefill:
            total += sum(r.blocks for r in self._step_prefill)
        assert self.free_blocks >= 0, (self.instance_id, self.free_blocks)
        assert total == self.profile.num_blocks, (self.instance_id, total, self.profile.num_blocks)
        assert self.running_tokens == sum(r.ctx for r in self.running), self.instance_id
