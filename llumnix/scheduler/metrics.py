"""Load metrics: numbers computed from one instance's report plus its in-flight load.

A metric measures *work*, not requests. Every metric states whether higher values are better
(``higher_is_better``); selectors turn that into an ordering. Request-independent metrics are
memoised on the report (a report never changes), so a dispatch over N instances costs N dict
lookups for instances with nothing in flight.

Freeness follows the OSDI'24 paper (Algorithm 1): ``F = (M - sum(virtual usage)) / B`` with
``M`` the instance's KV blocks and ``B`` the number of requests whose usage is counted (1 when
idle). Virtual usage is the physical usage of running requests, plus the demand of queued
requests (only the head-of-line one for rescheduling, all of them for dispatch), plus a
headroom reserved for high-priority requests, and infinity for a draining instance. The
queued requests counted in the usage are counted in ``B`` too, as in Llumnix's
``remaining_steps`` load (dispatch: running + all queued, in-flight dispatches included;
rescheduling: running + 1 when a request is queued): otherwise an instance with a long queue
(or a burst of dispatches it has not yet reported) keeps looking as free per request as
before and keeps drawing requests.
"""

from __future__ import annotations

import logging
import math

from llumnix.scheduler.cluster import DispatchRequest, InstanceStatus
from llumnix.scheduler.ledger import PendingLoad
from llumnix.scheduler.registry import Registry

logger = logging.getLogger(__name__)


class Metric:
    """Base class: subclasses implement :meth:`compute`."""

    name: str = "metric"
    higher_is_better: bool = False
    request_dependent: bool = False

    @property
    def key(self) -> str:
        """Cache key: the name plus any parameters that change the value."""
        return self.name

    def compute(self, s: InstanceStatus, p: PendingLoad, r: DispatchRequest | None = None) -> float:
        raise NotImplementedError

    def evaluate(
        self, s: InstanceStatus, p: PendingLoad, r: DispatchRequest | None = None
    ) -> float:
        """Value for report ``s`` with in-flight load ``p`` (memoised when possible)."""
        if p.num_requests or self.request_dependent:
            return self.compute(s, p, r)
        cache = s.metric_cache
        key = self.key
        v = cache.get(key)
        if v is None:
            v = cache[key] = self.compute(s, p, r)
        return v


class Freeness(Metric):
    """Paper freeness, in KV blocks per request (higher = more room)."""

    name = "freeness"
    higher_is_better = True

    def __init__(self, queued: str = "all", high_priority_headroom_blocks: float = 0.0) -> None:
        """``queued``: ``"all"`` counts every queued request's demand (dispatch), ``"head"``
        only the head-of-line request (rescheduling: a blocked head makes the instance look
        overloaded so the rescheduler frees room for it). ``high_priority_headroom_blocks``:
        extra virtual usage of an instance hosting any high-priority request."""
        if queued not in ("all", "head"):
            raise ValueError(f"queued must be 'all' or 'head', not {queued!r}")
        self.queued = queued
        self._all = queued == "all"
        self.headroom = float(high_priority_headroom_blocks)
        self._key = f"freeness[{queued},{self.headroom:g}]"

    @property
    def key(self) -> str:
        return self._key

    def compute(self, s: InstanceStatus, p: PendingLoad, r: DispatchRequest | None = None) -> float:
        if s.draining:
            return -math.inf
        free: float = s.num_free_blocks - p.blocks
        free -= s.waiting_demand_blocks if self._all else s.hol_demand_blocks
        if self.headroom and (s.num_high_priority or p.num_high_priority):
            free -= self.headroom
        n = self.batch(s, p)
        if n <= 1:
            return free
        # The paper's free / B ranks a deficit shared by more requests as *better* (-100 / 10
        # beats -50 / 2), sending work to the most loaded instance once every queue is long.
        # A deficit is multiplied instead: more requests never make an instance look freer.
        return free / n if free >= 0 else free * n

    def batch(self, s: InstanceStatus, p: PendingLoad) -> int:
        """``B``: running requests plus the queued requests whose demand is counted."""
        if self._all:
            return s.num_running + s.num_waiting + p.num_requests
        return s.num_running + (1 if s.num_waiting else 0)


class MigrationFreeness(Freeness):
    """Freeness as the rescheduler sees it: only the head-of-line queued request counts."""

    name = "migration_freeness"

    def __init__(self, high_priority_headroom_blocks: float = 0.0) -> None:
        super().__init__("head", high_priority_headroom_blocks)


class PrefillTokens(Metric):
    """Uncomputed prefill tokens queued or in flight (prefix-cache hits cost nothing)."""

    name = "prefill_tokens"

    def compute(self, s: InstanceStatus, p: PendingLoad, r: DispatchRequest | None = None) -> float:
        return float(s.waiting_prefill_tokens + p.prefill_tokens)


class DecodeBatchSize(Metric):
    """Requests in the running (decode) batch."""

    name = "decode_batch_size"

    def compute(self, s: InstanceStatus, p: PendingLoad, r: DispatchRequest | None = None) -> float:
        return float(s.num_running)


class DecodeTokens(Metric):
    """Tokens held by the running batch: what a decode step reads."""

    name = "decode_tokens"

    def compute(self, s: InstanceStatus, p: PendingLoad, r: DispatchRequest | None = None) -> float:
        return float(s.running_tokens)


class KvUsage(Metric):
    """Projected KV usage as a fraction of capacity: allocated + queued + in-flight demand."""

    name = "kv_usage"

    def compute(self, s: InstanceStatus, p: PendingLoad, r: DispatchRequest | None = None) -> float:
        used = s.num_total_blocks - s.num_free_blocks + s.waiting_demand_blocks + p.blocks
        return used / max(1, s.num_total_blocks)


class KvFreeFraction(Metric):
    """Projected free KV as a fraction of capacity: ``1 - kv_usage`` (higher = more room).
    INFaaS++'s load metric expressed as room, so an autoscaling band reads like freeness."""

    name = "kv_free_fraction"
    higher_is_better = True

    def compute(self, s: InstanceStatus, p: PendingLoad, r: DispatchRequest | None = None) -> float:
        if s.draining:
            return -math.inf
        free = s.num_free_blocks - s.waiting_demand_blocks - p.blocks
        return free / max(1, s.num_total_blocks)


class NumRequests(Metric):
    """Running, queued and in-flight requests."""

    name = "num_requests"

    def compute(self, s: InstanceStatus, p: PendingLoad, r: DispatchRequest | None = None) -> float:
        return float(s.num_running + s.num_waiting + p.num_requests)


class QueueSize(Metric):
    """Queued plus in-flight requests."""

    name = "queue_size"

    def compute(self, s: InstanceStatus, p: PendingLoad, r: DispatchRequest | None = None) -> float:
        return float(s.num_waiting + p.num_requests)


class PrefixHitTokens(Metric):
    """Prompt tokens of the request already cached on the instance (higher = better)."""

    name = "prefix_hit_tokens"
    higher_is_better = True
    request_dependent = True

    def compute(self, s: InstanceStatus, p: PendingLoad, r: DispatchRequest | None = None) -> float:
        if r is None or r.prefix_id is None or r.prefix_id not in s.prefix_ids:
            return 0.0
        return float(r.prefix_tokens)


METRICS: Registry[Metric] = Registry("metric")
for _name, _cls in [
    ("freeness", "Freeness"),
    ("migration_freeness", "MigrationFreeness"),
    ("prefill_tokens", "PrefillTokens"),
    ("decode_batch_size", "DecodeBatchSize"),
    ("decode_tokens", "DecodeTokens"),
    ("kv_usage", "KvUsage"),
    ("kv_free_fraction", "KvFreeFraction"),
    ("num_requests", "NumRequests"),
    ("queue_size", "QueueSize"),
    ("prefix_hit_tokens", "PrefixHitTokens"),
]:
    METRICS.register(_name, __name__, _cls)


def blocks_for(tokens: int, block_size: int) -> int:
    """KV blocks needed to hold ``tokens`` tokens."""
    return -(-tokens // block_size)
