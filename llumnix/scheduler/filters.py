"""Filters: which instances a policy may consider at all."""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable

from llumnix.scheduler.cluster import DispatchRequest, InstanceInfo, InstanceStatus
from llumnix.scheduler.ledger import PendingLoad
from llumnix.scheduler.metrics import METRICS, Metric
from llumnix.scheduler.registry import Registry

logger = logging.getLogger(__name__)


class Filter:
    """Base class: ``keep`` returns False to exclude an instance."""

    name: str = "filter"

    def keep(
        self,
        s: InstanceStatus,
        info: InstanceInfo,
        p: PendingLoad,
        r: DispatchRequest | None,
        now: float,
    ) -> bool:
        raise NotImplementedError


class Schedulable(Filter):
    """Healthy, started and not being drained."""

    name = "schedulable"

    def keep(
        self,
        s: InstanceStatus,
        info: InstanceInfo,
        p: PendingLoad,
        r: DispatchRequest | None,
        now: float,
    ) -> bool:
        return s.schedulable and not s.draining


class Staleness(Filter):
    """Excludes instances whose last report is older than ``max_age_s``: their load is unknown
    and they may be dead."""

    name = "staleness"

    def __init__(self, max_age_s: float = 5.0) -> None:
        self.max_age_s = max_age_s

    def keep(
        self,
        s: InstanceStatus,
        info: InstanceInfo,
        p: PendingLoad,
        r: DispatchRequest | None,
        now: float,
    ) -> bool:
        return now - s.timestamp <= self.max_age_s


_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


class MetricThreshold(Filter):
    """Keeps instances where ``metric <op> threshold`` holds, e.g. ``freeness >= 10``."""

    name = "metric_threshold"

    def __init__(self, metric: str | Metric, op: str, threshold: float) -> None:
        self.metric = METRICS.create(metric) if isinstance(metric, str) else metric
        if op not in _OPS:
            raise ValueError(f"op must be one of {sorted(_OPS)}, not {op!r}")
        self._op = _OPS[op]
        self.threshold = threshold

    def keep(
        self,
        s: InstanceStatus,
        info: InstanceInfo,
        p: PendingLoad,
        r: DispatchRequest | None,
        now: float,
    ) -> bool:
        return self._op(self.metric.evaluate(s, p, r), self.threshold)


class FailureDomain(Filter):
    """Excludes instances in failed domains (configured) or domains the request avoids."""

    name = "failure_domain"

    def __init__(self, excluded: frozenset[str] | set[str] = frozenset()) -> None:
        self.excluded = set(excluded)

    def keep(
        self,
        s: InstanceStatus,
        info: InstanceInfo,
        p: PendingLoad,
        r: DispatchRequest | None,
        now: float,
    ) -> bool:
        domain = info.failure_domain
        if domain in self.excluded:
            return False
        return r is None or domain not in r.excluded_domains


class Fits(Filter):
    """Keeps instances that can admit the request at once: free blocks, minus the demand of
    everything queued or in flight there, cover the request's prompt."""

    name = "fits"

    def keep(
        self,
        s: InstanceStatus,
        info: InstanceInfo,
        p: PendingLoad,
        r: DispatchRequest | None,
        now: float,
    ) -> bool:
        if r is None:
            return True
        need = -(-r.prompt_tokens // info.block_size)
        return s.num_free_blocks - s.waiting_demand_blocks - p.blocks >= need


FILTERS: Registry[Filter] = Registry("filter")
for _name, _cls in [
    ("schedulable", "Schedulable"),
    ("staleness", "Staleness"),
    ("metric_threshold", "MetricThreshold"),
    ("failure_domain", "FailureDomain"),
    ("fits", "Fits"),
]:
    FILTERS.register(_name, __name__, _cls)
