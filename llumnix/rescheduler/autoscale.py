"""Autoscaling as a policy output: scale out when the cluster's average load metric (freeness
by default) drops below a band, scale in (drain the emptiest instance) when it rises above it.

The metric is configurable so that a baseline can scale on its own load metric, as the
OSDI'24 paper's INFaaS++ does (projected free memory, ``kv_free_fraction``); the metric must
be one where higher means more room. Retiring an instance only marks it draining: new
requests stop going to it, and whatever holds its requests (migration for Llumnix, their
own completion for a baseline) decides how soon it is released."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from llumnix.rescheduler.pairs import ScaleAction, ScaleDecision
from llumnix.scheduler.cluster import ClusterView, InstanceStatus
from llumnix.scheduler.ledger import NO_PENDING
from llumnix.scheduler.metrics import METRICS, Freeness, Metric

logger = logging.getLogger(__name__)


@dataclass
class AutoscaleConfig:
    """Freeness band and limits of the autoscaler."""

    scale_out_below: float = 10.0
    """Add an instance when the average metric (freeness: blocks per request) is
    below this."""
    scale_in_above: float = 60.0
    """Retire an instance when the average metric is above this."""
    metric: str = "freeness"
    """Load metric averaged over serving instances (a ``METRICS`` name, higher = more room)."""
    min_instances: int = 1
    """Never go below this many serving instances."""
    max_instances: int = 64
    """Never go above this many instances (serving + starting)."""
    cooldown_s: float = 10.0
    """Minimum time between two decisions; should cover an instance's start-up time."""


class Autoscaler:
    """Band controller over the cluster's load metric (pooled freeness by default) over
    serving (non-draining) instances."""

    def __init__(self, config: AutoscaleConfig | None = None) -> None:
        self.config = config or AutoscaleConfig()
        self.metric: Metric = METRICS.create(self.config.metric)
        if not self.metric.higher_is_better:
            raise ValueError(f"autoscaling metric {self.config.metric!r} must be higher-is-better")
        self._last = -float("inf")

    def average(self, serving: list[InstanceStatus]) -> float:
        """The cluster's value of the metric over serving instances. Freeness is pooled (free
        blocks of all instances per request of all instances): a plain mean of
        per-instance freeness is dominated by idle instances (an empty instance's freeness is
        its whole capacity), so each fresh instance would look like a large surplus and
        trigger a scale-in. Other metrics are averaged."""
        if isinstance(self.metric, Freeness):
            free = 0.0
            batch = 0
            for s in serving:
                f = self.metric.evaluate(s, NO_PENDING)
                n = max(1, self.metric.batch(s, NO_PENDING))
                free += f * n
                batch += n
            return free / batch
        return sum(self.metric.evaluate(s, NO_PENDING) for s in serving) / len(serving)

    def decide(self, view: ClusterView, now: float, num_starting: int = 0) -> ScaleDecision | None:
        """A decision, or None. ``num_starting``: instances requested but not yet serving."""
        cfg = self.config
        if now - self._last < cfg.cooldown_s:
            return None
        serving = [s for s in view.status_list() if s.schedulable and not s.draining]
        if not serving:
            return None
        avg = self.average(serving)
        decision = None
        if avg < cfg.scale_out_below and len(view) + num_starting < cfg.max_instances:
            decision = ScaleDecision(ScaleAction.OUT, 1)
        elif avg > cfg.scale_in_above and len(serving) > cfg.min_instances and not num_starting:
            victim = min(serving, key=lambda s: (s.num_running + s.num_waiting, s.instance_id))
            decision = ScaleDecision(ScaleAction.IN, 1, (victim.instance_id,))
        if decision is not None:
            self._last = now
            logger.info(
                "autoscale %s at t=%.1f (avg %s %.2f)", decision, now, self.metric.name, avg
            )
        return decision
