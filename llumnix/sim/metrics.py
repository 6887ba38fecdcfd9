"""Run metrics: latencies, preemption loss, fragmentation, cost.

Definitions (as in the OSDI'24 paper's evaluation):

- request latency: arrival to last token (s);
- prefill latency: arrival to first token, queueing included (s);
- decode latency: per output token after the first, ``(finish - first token) / (out - 1)``
  (ms), requests with one output token excluded;
- preemption loss: per request, time from each preemption until its recompute finished,
  averaged over all requests (s);
- fragmentation: fraction of the cluster's KV blocks that are free while some instance's
  head-of-line request is blocked although the cluster has room for it, time-averaged over
  rescheduler ticks;
- instance-seconds: sum over instances of time from scale-out decision (or start) to
  retirement (or end of run): the cost.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from llumnix.sim.engine import SimInstance, SimRequest

logger = logging.getLogger(__name__)


class ClusterSampler:
    """Time series sampled at rescheduler ticks."""

    def __init__(self) -> None:
        self.fragmentation: list[float] = []
        self.instances: list[int] = []

    def sample(self, now: float, instances: Iterable[SimInstance]) -> None:
        free = 0
        total = 0
        blocked_min = None
        n = 0
        for inst in instances:
            n += 1
            free += inst.free_blocks
            total += inst.profile.num_blocks
            if inst.waiting:
                need = -(-inst.waiting[0].prefill_tokens // inst.bs)
                if need > inst.free_blocks and (blocked_min is None or need < blocked_min):
                    blocked_min = need
        self.instances.append(n)
        frag = free / total if total and blocked_min is not None and blocked_min <= free else 0.0
        self.fragmentation.append(frag)


@dataclass
class LatencyStats:
    """Mean and P99 of the three latencies over a set of requests."""

    count: int = 0
    """Requests included."""
    request_mean_s: float = 0.0
    """Mean request latency."""
    request_p99_s: float = 0.0
    """P99 request latency."""
    prefill_mean_s: float = 0.0
    """Mean prefill latency (TTFT incl. queueing)."""
    prefill_p99_s: float = 0.0
    """P99 prefill latency."""
    decode_mean_ms: float = 0.0
    """Mean per-token decode latency."""
    decode_p99_ms: float = 0.0
    """P99 per-token decode latency."""
    preemption_loss_mean_s: float = 0.0
    """Mean preemption loss per request."""


@dataclass
class SimResult:
    """Summary of one run."""

    name: str = ""
    """Run label."""
    num_requests: int = 0
    """Requests in the trace."""
    num_finished: int = 0
    """Requests that finished."""
    duration_s: float = 0.0
    """Simulated time until the last request finished."""
    latency: LatencyStats = field(default_factory=LatencyStats)
    """All requests."""
    by_priority: dict[str, LatencyStats] = field(default_factory=dict)
    """``"high"`` and ``"normal"`` when the trace has priorities."""
    num_preemptions: int = 0
    """Preemptions over the run."""
    preempted_fraction: float = 0.0
    """Fraction of requests preempted at least once."""
    num_migrations: int = 0
    """Completed migrations."""
    migration_downtime_mean_ms: float = 0.0
    """Mean downtime of completed migrations."""
    fragmentation_mean: float = 0.0
    """Time-averaged fragmentation."""
    instance_seconds: float = 0.0
    """Cost: instance-seconds."""
    mean_instances: float = 0.0
    """Time-averaged serving instances."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _p99(x: np.ndarray) -> float:
    return float(np.percentile(x, 99)) if len(x) else 0.0


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else 0.0


def latency_stats(reqs: list[SimRequest]) -> LatencyStats:
    """Latency statistics over finished requests."""
    done = [r for r in reqs if r.finish_s is not None and r.first_token_s is not None]
    if not done:
        return LatencyStats()
    arr = np.array([r.trace.arrival_s for r in done])
    fin = np.array([r.finish_s for r in done], dtype=float)
    first = np.array([r.first_token_s for r in done], dtype=float)
    out = np.array([r.trace.output_tokens for r in done])
    loss = np.array([r.preemption_loss_s for r in done])
    multi = out > 1
    dec = (fin[multi] - first[multi]) / (out[multi] - 1) * 1e3
    return LatencyStats(
        count=len(done),
        request_mean_s=_mean(fin - arr),
        request_p99_s=_p99(fin - arr),
        prefill_mean_s=_mean(first - arr),
        prefill_p99_s=_p99(first - arr),
        decode_mean_ms=_mean(dec),
        decode_p99_ms=_p99(dec),
        preemption_loss_mean_s=_mean(loss),
    )
