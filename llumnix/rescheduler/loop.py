"""The rescheduler: run the policies each cycle and keep a conflict-free, capped plan.

Conflict-free means an instance is either a source or a destination within one cycle (never
both: no ping-pong, no chains), and no pair repeats. Caps count migrations already in
progress (from the reports) plus those planned this cycle.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llumnix.rescheduler.autoscale import AutoscaleConfig, Autoscaler
from llumnix.rescheduler.pairs import MigrationPair, ReschedulePlan
from llumnix.rescheduler.policies import RESCHEDULE_POLICIES, ReschedulePolicy
from llumnix.scheduler.cluster import ClusterView

logger = logging.getLogger(__name__)


@dataclass
class ReschedulerConfig:
    """Rescheduler configuration."""

    policies: list[str] = field(
        default_factory=lambda: ["drain", "defragmentation", "priority_headroom", "load_balance"]
    )
    """Policy names in precedence order (earlier policies claim instances first)."""
    policy_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Constructor keyword arguments per policy name."""
    interval_s: float = 0.1
    """Seconds between cycles."""
    max_out_per_instance: int = 2
    """Concurrent outgoing migrations per source (drain uses ``max_drain_out``)."""
    max_in_per_instance: int = 2
    """Concurrent incoming migrations per destination."""
    max_drain_out: int = 4
    """Concurrent outgoing migrations of a draining or failed instance."""
    autoscale: AutoscaleConfig | None = None
    """Autoscaling band, or None for a fixed-size cluster."""


class Rescheduler:
    """Periodic planner of migrations (and scaling) over a cluster view."""

    def __init__(self, config: ReschedulerConfig | None = None) -> None:
        self.config = config or ReschedulerConfig()
        self.policies: list[ReschedulePolicy] = [
            RESCHEDULE_POLICIES.create(name, **self.config.policy_kwargs.get(name, {}))
            for name in self.config.policies
        ]
        self.autoscaler = Autoscaler(self.config.autoscale) if self.config.autoscale else None

    def plan(self, view: ClusterView, now: float, num_starting: int = 0) -> ReschedulePlan:
        """One cycle: migration pairs from every policy, then the autoscaling decision."""
        cfg = self.config
        out_count: dict[str, int] = {}
        in_count: dict[str, int] = {}
        role: dict[str, str] = {}
        for s in view.status_list():
            out_count[s.instance_id] = s.num_migrating_out
            in_count[s.instance_id] = s.num_migrating_in
        accepted: list[MigrationPair] = []
        for policy in self.policies:
            for pair in policy.propose(view, now):
                if pair.src == pair.dst or pair.src not in view or pair.dst not in view:
                    continue
                if role.get(pair.src) == "dst" or role.get(pair.dst) == "src":
                    continue
                src_status = view.statuses[pair.src]
                cap_out = (
                    cfg.max_drain_out
                    if src_status.draining or not src_status.schedulable
                    else cfg.max_out_per_instance
                )
                n = min(
                    pair.num_requests,
                    cap_out - out_count[pair.src],
                    cfg.max_in_per_instance - in_count[pair.dst],
                )
                if n <= 0:
                    continue
                if n != pair.num_requests:
                    pair = MigrationPair(pair.src, pair.dst, pair.rule, n, pair.reason)
                accepted.append(pair)
                out_count[pair.src] += n
                in_count[pair.dst] += n
                role[pair.src] = "src"
                role[pair.dst] = "dst"
        scale = self.autoscaler.decide(view, now, num_starting) if self.autoscaler else None
        return ReschedulePlan(accepted, scale)


class ReschedulerLoop:
    """Runs :meth:`Rescheduler.plan` every ``interval_s`` on a thread of its own and hands each
    plan to ``on_plan`` (in production: send the pairs to the source llumlets, apply the
    scaling decision). ``view_fn`` returns the current cluster view; ``num_starting_fn`` how
    many instances are starting."""

    def __init__(
        self,
        rescheduler: Rescheduler,
        view_fn: Callable[[], ClusterView],
        on_plan: Callable[[ReschedulePlan], None],
        num_starting_fn: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rescheduler = rescheduler
        self.view_fn = view_fn
        self.on_plan = on_plan
        self.num_starting_fn = num_starting_fn
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cycles = 0

    def run_once(self) -> ReschedulePlan:
        """One cycle, synchronously."""
        plan = self.rescheduler.plan(self.view_fn(), self.clock(), self.num_starting_fn())
        self.cycles += 1
        self.on_plan(plan)
        return plan

    def _run(self) -> None:
        interval = self.rescheduler.config.interval_s
        while not self._stop.is_set():
            started = self.clock()
            try:
                self.run_once()
            except Exception:  # keep rescheduling; a bad cycle must not stop the loop
                logger.exception("rescheduling cycle failed")
            self._stop.wait(max(0.0, interval - (self.clock() - started)))

    def start(self) -> None:
        """Start the background thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="rescheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop after the current cycle."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
