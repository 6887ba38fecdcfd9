"""Discrete-event cluster simulation.

Instances (:class:`~llumnix.sim.engine.SimInstance`) step as events on one heap. After every
step, migration stage and state change an instance pushes a status report to the
*production* :class:`~llumnix.scheduler.Scheduler` (as a llumlet would push to the meta
store); arrivals are dispatched by that scheduler; every ``interval_s`` the *production*
:class:`~llumnix.rescheduler.Rescheduler` plans migrations and scaling, which the simulated
llumlets carry out. No policy logic lives here.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from llumnix.rescheduler import MigrationPair, MigrationRule, Rescheduler, ReschedulerConfig
from llumnix.rescheduler.pairs import ScaleAction
from llumnix.scheduler import DispatchRequest, Scheduler, SchedulerConfig
from llumnix.sim.engine import SimInstance, SimRequest
from llumnix.sim.metrics import ClusterSampler, SimResult, latency_stats
from llumnix.sim.migration import JobState, MigrationJob
from llumnix.sim.profile import EngineProfile, load_profile
from llumnix.sim.traces import TraceRequest

logger = logging.getLogger(__name__)

_STEP, _STAGE, _FINAL, _TICK, _READY = range(5)


@dataclass
class SimConfig:
    """One simulated cluster run."""

    num_instances: int = 16
    """Instances at the start."""
    profile: EngineProfile = field(default_factory=load_profile)
    """Engine model of every instance."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Dispatcher (production object)."""
    rescheduler: ReschedulerConfig | None = None
    """Rescheduler (production object), or None: no migration, no autoscaling."""
    migration: bool = True
    """Carry out migration pairs (False: autoscaling only, retiring instances run dry)."""
    startup_s: float = 10.0
    """Delay between a scale-out decision and the new instance serving."""
    priority_queue: bool = False
    """Engines queue high-priority requests ahead of normal ones."""
    check_invariants: bool = False
    """Check block and token conservation after every event (slow; tests)."""
    horizon_s: float = 36000.0
    """Stop this long after the last arrival even if requests remain (a stuck run)."""
    name: str = ""
    """Label of the run in results."""


class Simulation:
    """Runs one trace through one cluster configuration."""

    def __init__(self, config: SimConfig, trace: list[TraceRequest]) -> None:
        self.config = config
        self.trace = sorted(trace, key=lambda r: r.arrival_s)
        self.scheduler = Scheduler(config.scheduler)
        self.rescheduler = Rescheduler(config.rescheduler) if config.rescheduler else None
        self.instances: dict[str, SimInstance] = {}
        self.retired: list[SimInstance] = []
        self.requests: list[SimRequest] = []
        self.backlog: list[SimRequest] = []
        self.jobs: list[MigrationJob] = []
        self.num_starting = 0
        self.now = 0.0
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._next_id = 0
        self.sampler = ClusterSampler()
        for _ in range(config.num_instances):
            self._add_instance(0.0)

    # -- plumbing ----------------------------------------------------------------------------
    def _push(self, t: float, kind: int, obj: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, obj))

    def _add_instance(self, now: float) -> SimInstance:
        inst = SimInstance(
            f"i{self._next_id}", self.config.profile, now, self.config.priority_queue
        )
        self._next_id += 1
        self.instances[inst.instance_id] = inst
        self.scheduler.add_instance(inst.info, inst.status(now))
        return inst

    def _report(self, inst: SimInstance) -> None:
        if inst.instance_id in self.instances:
            self.scheduler.on_status(inst.status(self.now))

    def _kick(self, inst: SimInstance) -> None:
        dur = inst.start_step(self.now, self._on_preempt)
        if dur is not None:
            self._push(self.now + dur, _STEP, inst)
        elif inst.pending_suspends:
            self._do_suspends(inst)

    def _on_preempt(self, r: SimRequest) -> None:
        job = r.migration
        if isinstance(job, MigrationJob):
            job.abort("request preempted at source")

    # -- events ------------------------------------------------------------------------------
    def _arrive(self, t: TraceRequest) -> None:
        r = SimRequest(t)
        self.requests.append(r)
        if not self._dispatch(r):
            self.backlog.append(r)

    def _dispatch(self, r: SimRequest) -> bool:
        t = r.trace
        dr = DispatchRequest(
            t.request_id,
            r.prefill_tokens,
            priority=t.priority,
            prefix_id=t.prefix_id,
            prefix_tokens=t.prefix_tokens,
        )
        target = self.scheduler.dispatch(dr, self.now)
        if target is None:
            return False
        inst = self.instances[target]
        inst.enqueue(r)
        if not inst.busy:
            self._kick(inst)
        return True

    def _step_end(self, inst: SimInstance) -> None:
        for r in inst.finish_step(self.now):
            job = r.migration
            if isinstance(job, MigrationJob):
                job.abort("request finished at source")
        if inst.pending_suspends:
            self._do_suspends(inst)
        self._kick(inst)
        self._report(inst)
        self._maybe_retire(inst)

    def _do_suspends(self, inst: SimInstance) -> None:
        jobs, inst.pending_suspends = inst.pending_suspends, []
        for job in jobs:
            assert isinstance(job, MigrationJob)
            if job.state is not JobState.SUSPEND_PENDING:
                continue
            dur = job.suspend(self.now)
            if dur is not None:
                self._push(self.now + dur, _FINAL, job)
            self._report(job.dst)

    def _stage_end(self, job: MigrationJob) -> None:
        if job.state is not JobState.PRECOPY:
            return
        dur = job.stage_done()
        if dur is not None:
            self._push(self.now + dur, _STAGE, job)
        elif job.state is JobState.SUSPEND_PENDING:
            job.src.pending_suspends.append(job)
            if not job.src.busy:
                self._do_suspends(job.src)
        else:
            self._report(job.src)
            self._report(job.dst)

    def _final_end(self, job: MigrationJob) -> None:
        job.commit(self.now)
        self.jobs.append(job)
        for inst in (job.src, job.dst):
            if not inst.busy:
                self._kick(inst)
            self._report(inst)
        self._maybe_retire(job.src)

    def _tick(self) -> None:
        cfg = self.config
        if self.backlog:
            self.backlog = [r for r in self.backlog if not self._dispatch(r)]
        self.sampler.sample(self.now, self.instances.values())
        if self.rescheduler is None:
            return
        plan = self.rescheduler.plan(self.scheduler.view, self.now, self.num_starting)
        if cfg.migration:
            for pair in plan.pairs:
                self._execute(pair)
        if plan.scale is not None:
            if plan.scale.action is ScaleAction.OUT:
                for _ in range(plan.scale.count):
                    self.num_starting += 1
                    self._push(self.now + cfg.startup_s, _READY, None)
            else:
                for iid in plan.scale.instance_ids:
                    inst = self.instances.get(iid)
                    if inst is not None:
                        inst.draining = True
                        self._report(inst)
                        self._maybe_retire(inst)
        for inst in list(self.instances.values()):
            if inst.draining:
                self._maybe_retire(inst)

    def _ready(self) -> None:
        self.num_starting -= 1
        inst = self._add_instance(self.now)
        inst.start_s = self.now - self.config.startup_s

    def _maybe_retire(self, inst: SimInstance) -> None:
        if inst.draining and inst.is_empty() and inst.instance_id in self.instances:
            inst.end_s = self.now
            del self.instances[inst.instance_id]
            self.scheduler.remove_instance(inst.instance_id)
            self.retired.append(inst)
            logger.debug("retired %s at %.1f", inst.instance_id, self.now)

    # -- migration execution (the llumlet side) ---------------------------------------------
    def _pick(self, src: SimInstance, rule: MigrationRule) -> SimRequest | None:
        cands = [r for r in src.running if r.migration is None]
        if not cands:
            return None
        if rule is MigrationRule.SHORTEST or rule is MigrationRule.ALL:
            return min(cands, key=lambda r: r.ctx)
        if rule is MigrationRule.LONGEST:
            return max(cands, key=lambda r: r.ctx)
        if rule is MigrationRule.LAST_ADMITTED:
            return cands[-1]
        normal = [r for r in cands if r.trace.priority == 0]
        return max(normal, key=lambda r: r.ctx) if normal else None

    def _execute(self, pair: MigrationPair) -> None:
        src = self.instances.get(pair.src)
        dst = self.instances.get(pair.dst)
        if src is None or dst is None or dst.draining:
            return
        for _ in range(pair.num_requests):
            if pair.rule is MigrationRule.ALL and src.waiting:
                # a queued request holds no KV: moving it is a re-dispatch
                queued = src.waiting[-1]
                src.dequeue(queued)
                dst.enqueue(queued)
                if not dst.busy:
                    self._kick(dst)
                continue
            r = self._pick(src, pair.rule)
            if r is None:
                break
            job = MigrationJob(r, src, dst, self.now, pair.reason)
            dur = job.begin()
            if dur is None:
                break
            self._push(self.now + dur, _STAGE, job)
        self._report(src)
        self._report(dst)

    # -- main loop ---------------------------------------------------------------------------
    def run(self, progress: Callable[[int], None] | None = None) -> SimResult:
        """Simulate until every request has finished; returns the summary."""
        trace = self.trace
        heap = self._heap
        interval = self.config.rescheduler.interval_s if self.config.rescheduler else 0.1
        self._push(0.0, _TICK, None)
        i = 0
        n = len(trace)
        done_before = 0
        check = self.config.check_invariants
        stop_at = (trace[-1].arrival_s if trace else 0.0) + self.config.horizon_s
        while True:
            next_arrival = trace[i].arrival_s if i < n else float("inf")
            if heap and heap[0][0] <= next_arrival:
                t, _, kind, obj = heapq.heappop(heap)
                self.now = t
                if kind == _STEP:
                    assert isinstance(obj, SimInstance)
                    self._step_end(obj)
                elif kind == _STAGE:
                    assert isinstance(obj, MigrationJob)
                    self._stage_end(obj)
                elif kind == _FINAL:
                    assert isinstance(obj, MigrationJob)
                    self._final_end(obj)
                elif kind == _TICK:
                    self._tick()
                    if i < n or (self._unfinished() and t < stop_at):
                        self._push(t + interval, _TICK, None)
                else:
                    self._ready()
            elif i < n:
                self.now = next_arrival
                self._arrive(trace[i])
                i += 1
            else:
                break
            if check:
                for inst in self.instances.values():
                    inst.check_invariants()
            if progress is not None and i - done_before >= 200:
                progress(i - done_before)
                done_before = i
        if progress is not None and i > done_before:
            progress(i - done_before)
        return summarize(self)

    def _unfinished(self) -> bool:
        return any(inst.has_work() or inst.suspended for inst in self.instances.values()) or bool(
            self.backlog
        )


def summarize(sim: Simulation) -> SimResult:
    """Summarise a finished simulation."""
    reqs = sim.requests
    finished = [r for r in reqs if r.finish_s is not None]
    end = max((r.finish_s for r in finished), default=sim.now)  # type: ignore[type-var]
    assert end is not None
    insts = list(sim.instances.values()) + sim.retired
    cost = sum((inst.end_s if inst.end_s is not None else end) - inst.start_s for inst in insts)
    res = SimResult(
        name=sim.config.name,
        num_requests=len(sim.trace),
        num_finished=len(finished),
        duration_s=float(end),
        latency=latency_stats(reqs),
        num_preemptions=sum(r.num_preemptions for r in reqs),
        preempted_fraction=sum(r.num_preemptions > 0 for r in reqs) / max(1, len(reqs)),
        num_migrations=len(sim.jobs),
        migration_downtime_mean_ms=(
            float(np.mean([j.downtime_s for j in sim.jobs]) * 1e3) if sim.jobs else 0.0
        ),
        fragmentation_mean=float(np.mean(sim.sampler.fragmentation))
        if sim.sampler.fragmentation
        else 0.0,
        instance_seconds=float(cost),
        mean_instances=float(np.mean(sim.sampler.instances)) if sim.sampler.instances else 0.0,
    )
    if any(r.trace.priority > 0 for r in reqs):
        res.by_priority = {
            "high": latency_stats([r for r in reqs if r.trace.priority > 0]),
            "normal": latency_stats([r for r in reqs if r.trace.priority == 0]),
        }
    return res
