"""Dispatch policies: where a new request goes.

Most policies are a *pipeline* per stage: filters, then a selector over metrics. Stages
without their own pipeline fall back to the neutral one. Built-ins:

- ``round_robin``: next schedulable instance in turn (load-blind baseline).
- ``infaas++``: the OSDI'24 paper's INFaaS++ baseline: lowest projected memory usage
  (allocated + queued demand), queue length breaking ties.
- ``queue_size``: fewest queued (then total) requests.
- ``load_balance``: Llumnix: highest freeness, queued demand counted in full.
- ``priority``: Llumnix with priority headroom: instances hosting high-priority requests look
  fuller, so normal requests avoid them and high-priority requests land on light instances.
- ``cache_aware``: most prefix-cache hit tokens among instances with enough freeness.
- ``flood``: always the first schedulable instance (tests, stress).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from llumnix.scheduler.cluster import ClusterView, DispatchRequest, InstanceStatus, Stage
from llumnix.scheduler.filters import Filter, Fits, MetricThreshold, Schedulable, Staleness
from llumnix.scheduler.ledger import NO_PENDING, PendingLoad
from llumnix.scheduler.metrics import Freeness, Metric
from llumnix.scheduler.registry import Registry
from llumnix.scheduler.selectors import Candidate, Lexicographic, Selector

logger = logging.getLogger(__name__)


class DispatchPolicy:
    """Base class: choose an instance id for a request, or None when nothing is eligible."""

    name: str = "policy"

    def select(
        self,
        r: DispatchRequest,
        view: ClusterView,
        pending: Mapping[str, PendingLoad],
        now: float,
    ) -> str | None:
        raise NotImplementedError


class Pipeline:
    """Filters then a selector, for one stage. ``prefer`` filters are soft: the best instance
    passing them wins, and only when none does the best of the rest is taken."""

    def __init__(
        self, filters: Sequence[Filter], selector: Selector, prefer: Sequence[Filter] = ()
    ) -> None:
        self.filters = list(filters)
        self.prefer = list(prefer)
        self.selector = selector
        self._fast = isinstance(selector, Lexicographic) and selector.top_k == 1
        # Schedulable is in nearly every pipeline: checked inline on the hot path
        self._inline_schedulable = bool(self.filters) and type(self.filters[0]) is Schedulable
        start = 1 if self._inline_schedulable else 0
        self._hard = [f.keep for f in self.filters[start:]]
        self._soft = [f.keep for f in self.prefer]

    def candidates(
        self,
        r: DispatchRequest | None,
        view: ClusterView,
        pending: Mapping[str, PendingLoad],
        now: float,
    ) -> list[Candidate]:
        """Every (report, in-flight load) pair that passes all (hard) filters."""
        infos = view.infos
        filters = self.filters
        out: list[Candidate] = []
        for s in view.status_list():
            p = pending.get(s.instance_id, NO_PENDING)
            if filters:
                info = infos[s.instance_id]
                if not all(f.keep(s, info, p, r, now) for f in filters):
                    continue
            out.append((s, p))
        return out

    def select(
        self,
        r: DispatchRequest | None,
        view: ClusterView,
        pending: Mapping[str, PendingLoad],
        now: float,
    ) -> InstanceStatus | None:
        if self._fast:
            return self._select_fast(r, view, pending, now)
        cands = self.candidates(r, view, pending, now)
        if self.prefer:
            infos = view.infos
            preferred = [
                (s, p)
                for s, p in cands
                if all(f.keep(s, infos[s.instance_id], p, r, now) for f in self.prefer)
            ]
            best = self.selector.select(preferred, r)
            if best is not None:
                return best
        return self.selector.select(cands, r)

    def _select_fast(
        self,
        r: DispatchRequest | None,
        view: ClusterView,
        pending: Mapping[str, PendingLoad],
        now: float,
    ) -> InstanceStatus | None:
        # One pass, no candidate list: the dispatch hot path (top-1). Later metrics are only
        # evaluated to break exact ties of the first.
        sel = self.selector
        assert isinstance(sel, Lexicographic)
        metric = sel.metrics[0]
        sign = sel.signs[0]
        key = metric.key
        cacheable = not metric.request_dependent
        rest = len(sel.metrics) > 1
        hard = self._hard
        soft = self._soft
        inline_schedulable = self._inline_schedulable
        infos = view.infos
        pget = pending.get if pending else None
        metric_compute = metric.compute
        best = best_pref = None
        best_v = best_pref_v = 0.0
        for s in view.status_list():
            if inline_schedulable and (not s.schedulable or s.draining):
                continue
            iid = s.instance_id
            p = pget(iid, NO_PENDING) if pget is not None else NO_PENDING
            if hard:
                info = infos[iid]
                if not all(keep(s, info, p, r, now) for keep in hard):
                    continue
            if p.num_requests or not cacheable:
                v = sign * metric_compute(s, p, r)
            else:
                cached = s.metric_cache.get(key)
                if cached is None:
                    cached = s.metric_cache[key] = metric_compute(s, p, r)
                v = sign * cached
            if best is None or v < best_v:
                best, best_v = s, v
            elif rest and v == best_v and self._tie_wins(s, p, best, pending, r):
                best = s
            if not soft:
                continue
            if (
                best_pref is None
                or v < best_pref_v
                or (rest and v == best_pref_v and self._tie_wins(s, p, best_pref, pending, r))
            ):
                info = infos[iid]
                if all(keep(s, info, p, r, now) for keep in soft):
                    best_pref, best_pref_v = s, v
        return best_pref if best_pref is not None else best

    def _tie_wins(
        self,
        s: InstanceStatus,
        p: PendingLoad,
        incumbent: InstanceStatus,
        pending: Mapping[str, PendingLoad],
        r: DispatchRequest | None,
    ) -> bool:
        sel = self.selector
        assert isinstance(sel, Lexicographic)
        q = pending.get(incumbent.instance_id, NO_PENDING)
        return sel.sort_key(s, p, r)[1:] < sel.sort_key(incumbent, q, r)[1:]


def _base_filters(staleness_s: float | None) -> list[Filter]:
    filters: list[Filter] = [Schedulable()]
    if staleness_s is not None:
        filters.append(Staleness(staleness_s))
    return filters


class PipelinePolicy(DispatchPolicy):
    """A pipeline per stage; the neutral pipeline serves stages without their own."""

    def __init__(self, pipelines: Mapping[Stage, Pipeline]) -> None:
        if Stage.NEUTRAL not in pipelines:
            raise ValueError("a neutral pipeline is required")
        self.pipelines = dict(pipelines)

    def select(
        self,
        r: DispatchRequest,
        view: ClusterView,
        pending: Mapping[str, PendingLoad],
        now: float,
    ) -> str | None:
        pipe = self.pipelines.get(r.stage) or self.pipelines[Stage.NEUTRAL]
        s = pipe.select(r, view, pending, now)
        return None if s is None else s.instance_id


def metric_policy(
    metrics: Sequence[str | Metric], staleness_s: float | None = None, top_k: int = 1
) -> PipelinePolicy:
    """Neutral-stage pipeline: schedulable (and fresh) instances, lexicographic selector."""
    return PipelinePolicy(
        {Stage.NEUTRAL: Pipeline(_base_filters(staleness_s), Lexicographic(metrics, top_k))}
    )


class RoundRobin(DispatchPolicy):
    """Next schedulable instance after the previous choice, in registration order."""

    name = "round_robin"

    def __init__(self, staleness_s: float | None = None) -> None:
        self._filters = _base_filters(staleness_s)
        self._next = 0

    def select(
        self,
        r: DispatchRequest,
        view: ClusterView,
        pending: Mapping[str, PendingLoad],
        now: float,
    ) -> str | None:
        statuses = view.status_list()
        n = len(statuses)
        for i in range(n):
            s = statuses[(self._next + i) % n]
            info = view.infos[s.instance_id]
            p = pending.get(s.instance_id, NO_PENDING)
            if all(f.keep(s, info, p, r, now) for f in self._filters):
                self._next = (self._next + i + 1) % n
                return s.instance_id
        return None


class InfaasPlusPlus(PipelinePolicy):
    """INFaaS++: lowest projected memory usage (allocated + queued), then shortest queue."""

    name = "infaas++"

    def __init__(self, staleness_s: float | None = None) -> None:
        super().__init__(metric_policy(["kv_usage", "queue_size"], staleness_s).pipelines)


class QueueSizeBalance(PipelinePolicy):
    """Fewest queued requests, then fewest requests overall."""

    name = "queue_size"

    def __init__(self, staleness_s: float | None = None) -> None:
        super().__init__(metric_policy(["queue_size", "num_requests"], staleness_s).pipelines)


class LoadBalance(DispatchPolicy):
    """Llumnix dispatch: highest freeness with every queued request's demand counted.
    With ``prefer_fit``, instances that can admit the request at once come first (the freest
    of them), so a long prompt is not queued behind a nearly full batch of few requests."""

    name = "load_balance"

    def __init__(
        self,
        staleness_s: float | None = None,
        top_k: int = 1,
        prefer_fit: bool = True,
        high_priority_headroom_blocks: float = 0.0,
    ) -> None:
        metric = Freeness("all", high_priority_headroom_blocks)
        self._pipe = Pipeline(
            _base_filters(staleness_s),
            Lexicographic([metric], top_k),
            [Fits()] if prefer_fit else [],
        )

    def select(
        self,
        r: DispatchRequest,
        view: ClusterView,
        pending: Mapping[str, PendingLoad],
        now: float,
    ) -> str | None:
        s = self._pipe.select(r, view, pending, now)
        return None if s is None else s.instance_id


class PriorityAware(DispatchPolicy):
    """Llumnix dispatch with priority headroom. Normal requests see ``headroom_blocks`` of
    virtual usage on every instance hosting a high-priority request, so they avoid those
    instances. A high-priority request would add that headroom wherever it goes, so for it the
    headroom is the same everywhere and it goes to the instance with most room per request;
    those are the instances the rescheduler keeps light, so high-priority requests gather
    where their decode steps stay small."""

    name = "priority"

    def __init__(
        self,
        headroom_blocks: float = 600.0,
        staleness_s: float | None = None,
        prefer_fit: bool = True,
        colocate_high: bool = True,
    ) -> None:
        self._normal = LoadBalance(staleness_s, 1, prefer_fit, headroom_blocks)
        self._high = LoadBalance(
            staleness_s, 1, prefer_fit, 0.0 if colocate_high else headroom_blocks
        )

    def select(
        self,
        r: DispatchRequest,
        view: ClusterView,
        pending: Mapping[str, PendingLoad],
        now: float,
    ) -> str | None:
        policy = self._high if r.priority > 0 else self._normal
        return policy.select(r, view, pending, now)


class CacheAware(DispatchPolicy):
    """Most prefix-hit tokens among instances whose freeness is at least ``min_freeness``;
    freeness breaks ties and decides when no instance qualifies."""

    name = "cache_aware"

    def __init__(self, min_freeness: float = 10.0, staleness_s: float | None = None) -> None:
        freeness = Freeness("all")
        filters = [*_base_filters(staleness_s), MetricThreshold(freeness, ">=", min_freeness)]
        self._cached = Pipeline(filters, Lexicographic(["prefix_hit_tokens", freeness]))
        self._fallback = Pipeline(_base_filters(staleness_s), Lexicographic([freeness]))

    def select(
        self,
        r: DispatchRequest,
        view: ClusterView,
        pending: Mapping[str, PendingLoad],
        now: float,
    ) -> str | None:
        s = self._cached.select(r, view, pending, now) or self._fallback.select(
            r, view, pending, now
        )
        return None if s is None else s.instance_id


class Flood(DispatchPolicy):
    """Everything to the first schedulable instance."""

    name = "flood"

    def select(
        self,
        r: DispatchRequest,
        view: ClusterView,
        pending: Mapping[str, PendingLoad],
        now: float,
    ) -> str | None:
        for s in view.status_list():
            if s.schedulable and not s.draining:
                return s.instance_id
        return None


DISPATCH_POLICIES: Registry[DispatchPolicy] = Registry("dispatch policy")
for _name, _cls in [
    ("round_robin", "RoundRobin"),
    ("infaas++", "InfaasPlusPlus"),
    ("queue_size", "QueueSizeBalance"),
    ("load_balance", "LoadBalance"),
    ("priority", "PriorityAware"),
    ("cache_aware", "CacheAware"),
    ("flood", "Flood"),
]:
    DISPATCH_POLICIES.register(_name, __name__, _cls)
