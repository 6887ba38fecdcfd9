"""Autoscaling as a policy output: scale out when the cluster's average freeness drops below a
band, scale in (drain the emptiest instance) when it rises above it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from llumnix.rescheduler.pairs import ScaleAction, ScaleDecision
from llumnix.scheduler.cluster import ClusterView
from llumnix.scheduler.ledger import NO_PENDING
from llumnix.scheduler.metrics import Freeness

logger = logging.getLogger(__name__)


@dataclass
class AutoscaleConfig:
    """Freeness band and limits of the autoscaler."""

    scale_out_below: float = 10.0
    """Add an instance when average freeness (blocks per running request) is below this."""
    scale_in_above: float = 60.0
    """Retire an instance when average freeness is above this."""
    min_instances: int = 1
    """Never go below this many serving instances."""
    max_instances: int = 64
    """Never go above this many instances (serving + starting)."""
    cooldown_s: float = 10.0
    """Minimum time between two decisions; should cover an instance's start-up time."""


class Autoscaler:
    """Band controller over the average freeness of serving instances."""

    def __init__(self, config: AutoscaleConfig | None = None) -> None:
        self.config = config or AutoscaleConfig()
        self.metric = Freeness("all")
        self._last = -float("inf")

    def decide(self, view: ClusterView, now: float, num_starting: int = 0) -> ScaleDecision | None:
        """A decision, or None. ``num_starting``: instances requested but not yet serving."""
        cfg = self.config
        if now - self._last < cfg.cooldown_s:
            return None
        serving = [s for s in view.status_list() if s.schedulable and not s.draining]
        if not serving:
            return None
        avg = sum(self.metric.evaluate(s, NO_PENDING) for s in serving) / len(serving)
        decision = None
        if avg < cfg.scale_out_below and len(view) + num_starting < cfg.max_instances:
            decision = ScaleDecision(ScaleAction.OUT, 1)
        elif avg > cfg.scale_in_above and len(serving) > cfg.min_instances and not num_starting:
            victim = min(serving, key=lambda s: (s.num_running + s.num_waiting, s.instance_id))
            decision = ScaleDecision(ScaleAction.IN, 1, (victim.instance_id,))
        if decision is not None:
            self._last = now
            logger.info("autoscale %s at t=%.1f (avg freeness %.1f)", decision, now, avg)
        return decision
