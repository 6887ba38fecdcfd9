"""Rescheduling policies: each proposes migration pairs from the cluster view.

Proposals are ordered best first; the :class:`~llumnix.rescheduler.loop.Rescheduler` keeps
the conflict-free ones within the concurrency caps. All policies reason in the paper's
freeness (blocks of free KV per request, see :mod:`llumnix.scheduler.metrics`), with
only the head-of-line queued request counted, so a blocked queue makes an instance a source.
"""

from __future__ import annotations

import logging

from llumnix.rescheduler.pairs import MigrationPair, MigrationRule
from llumnix.scheduler.cluster import ClusterView, InstanceStatus
from llumnix.scheduler.ledger import NO_PENDING
from llumnix.scheduler.metrics import Freeness, MigrationFreeness
from llumnix.scheduler.registry import Registry

logger = logging.getLogger(__name__)


def _eligible_destinations(
    view: ClusterView, metric: Freeness, exclude_high_priority: bool = False
) -> list[tuple[float, InstanceStatus]]:
    """Schedulable, non-draining instances with no queue, freest first."""
    out = []
    for s in view.status_list():
        if not s.schedulable or s.draining or s.num_waiting:
            continue
        if exclude_high_priority and s.num_high_priority:
            continue
        out.append((metric.evaluate(s, NO_PENDING), s))
    out.sort(key=lambda t: -t[0])
    return out


class ReschedulePolicy:
    """Base class."""

    name: str = "reschedule_policy"

    def propose(self, view: ClusterView, now: float) -> list[MigrationPair]:
        raise NotImplementedError


class LoadBalance(ReschedulePolicy):
    """Pair the least free instances with the freest while the freeness gap exceeds
    ``gap`` and the source's freeness is below ``src_below`` (no churn among light
    instances). Defaults: act early (40 blocks = 640 tokens of growth per running request
    left) and on small gaps; in simulation near saturation this keeps preemptions and
    head-of-line blocking rare, while lazier settings (gap 10-30, below 10-20) let instances
    diverge until they preempt."""

    name = "load_balance"

    def __init__(
        self,
        gap: float = 5.0,
        src_below: float = 40.0,
        rule: MigrationRule | str = MigrationRule.SHORTEST,
        high_priority_headroom_blocks: float = 0.0,
    ) -> None:
        self.gap = gap
        self.src_below = src_below
        self.rule = MigrationRule(rule)
        self.metric = MigrationFreeness(high_priority_headroom_blocks)

    def propose(self, view: ClusterView, now: float) -> list[MigrationPair]:
        live = [
            (self.metric.evaluate(s, NO_PENDING), s)
            for s in view.status_list()
            if s.schedulable and not s.draining
        ]
        live.sort(key=lambda t: t[0])
        pairs = []
        i, j = 0, len(live) - 1
        while i < j:
            f_src, src = live[i]
            f_dst, dst = live[j]
            if f_src >= self.src_below or f_dst - f_src <= self.gap:
                break
            rule = self.rule
            movable = src.num_running
            if self.metric.headroom and src.num_high_priority:
                # keep high-priority requests where they are; move normal ones out
                rule = MigrationRule.LOW_PRIORITY
                movable = src.num_running - src.num_high_priority
            if movable >= 1 and src.num_running >= 2 and dst.num_waiting == 0:
                pairs.append(MigrationPair(src.instance_id, dst.instance_id, rule, 1, self.name))
                j -= 1
            i += 1
        return pairs


class Defragmentation(ReschedulePolicy):
    """Make room for a blocked head-of-line request: an instance whose queue head needs more
    blocks than are free migrates running requests to the freest instances."""

    name = "defragmentation"

    def __init__(self, rule: MigrationRule | str = MigrationRule.LONGEST) -> None:
        self.rule = MigrationRule(rule)
        self.metric = MigrationFreeness()

    def propose(self, view: ClusterView, now: float) -> list[MigrationPair]:
        blocked = [
            s
            for s in view.status_list()
            if s.num_waiting and s.num_running and s.hol_demand_blocks > s.num_free_blocks
        ]
        if not blocked:
            return []
        blocked.sort(key=lambda s: s.num_free_blocks - s.hol_demand_blocks)
        dests = _eligible_destinations(view, self.metric)
        pairs = []
        for src, (f_dst, dst) in zip(blocked, dests, strict=False):
            if f_dst <= 0:
                break
            pairs.append(MigrationPair(src.instance_id, dst.instance_id, self.rule, 1, self.name))
        return pairs


class Drain(ReschedulePolicy):
    """Move everything off draining or unschedulable instances (retirement, failover),
    spreading it over the freest instances; ``per_cycle`` requests per source per cycle."""

    name = "drain"

    def __init__(self, per_cycle: int = 4) -> None:
        self.per_cycle = per_cycle
        self.metric = Freeness("all")

    def propose(self, view: ClusterView, now: float) -> list[MigrationPair]:
        sources = [
            s
            for s in view.status_list()
            if (s.draining or not s.schedulable)
            and s.num_running + s.num_waiting > s.num_migrating_out
        ]
        if not sources:
            return []
        dests = _eligible_destinations(view, self.metric)
        if not dests:
            return []
        pairs = []
        k = 0
        for src in sources:
            todo = min(self.per_cycle, src.num_running + src.num_waiting - src.num_migrating_out)
            for _ in range(todo):
                dst = dests[k % len(dests)][1]
                k += 1
                pairs.append(
                    MigrationPair(src.instance_id, dst.instance_id, MigrationRule.ALL, 1, self.name)
                )
        return pairs


class PriorityHeadroom(ReschedulePolicy):
    """Keep headroom on instances that host high-priority requests: when such an instance's
    freeness (with ``headroom_blocks`` of virtual usage) falls below ``src_below``, move its
    normal-priority requests to the freest instances without high-priority work."""

    name = "priority_headroom"

    def __init__(self, headroom_blocks: float = 600.0, src_below: float = 20.0) -> None:
        self.metric = MigrationFreeness(headroom_blocks)
        self.dst_metric = MigrationFreeness()
        self.src_below = src_below

    def propose(self, view: ClusterView, now: float) -> list[MigrationPair]:
        sources = []
        for s in view.status_list():
            if s.num_high_priority and s.num_running > s.num_high_priority:
                f = self.metric.evaluate(s, NO_PENDING)
                if f < self.src_below:
                    sources.append((f, s))
        if not sources:
            return []
        sources.sort(key=lambda t: t[0])
        dests = _eligible_destinations(view, self.dst_metric, exclude_high_priority=True)
        pairs = []
        for (_, src), (f_dst, dst) in zip(sources, dests, strict=False):
            if f_dst < self.src_below:
                break
            pairs.append(
                MigrationPair(
                    src.instance_id, dst.instance_id, MigrationRule.LOW_PRIORITY, 1, self.name
                )
            )
        return pairs


RESCHEDULE_POLICIES: Registry[ReschedulePolicy] = Registry("reschedule policy")
for _name, _cls in [
    ("load_balance", "LoadBalance"),
    ("defragmentation", "Defragmentation"),
    ("drain", "Drain"),
    ("priority_headroom", "PriorityHeadroom"),
]:
    RESCHEDULE_POLICIES.register(_name, __name__, _cls)
