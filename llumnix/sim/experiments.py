"""The OSDI'24 paper's experiment families as simulator runs, and the policy presets they
compare.

Presets (all on the same engines and traces):

- ``round_robin``: load-blind dispatch, no migration.
- ``infaas++``: the paper's INFaaS++ baseline: load-aware dispatch on projected memory usage
  and queue length, no migration.
- ``llumnix-base``: Llumnix's freeness dispatch without migration (priority-blind).
- ``llumnix``: freeness dispatch plus the rescheduler (load balance, de-fragmentation, drain,
  priority headroom). With priorities, dispatch and migration add the high-priority headroom
  and engines queue high-priority requests first; the other presets stay priority-blind.

Families: ``serving`` (latency vs request rate on fixed clusters, the paper's Figure 10 traces
and rates), ``priority`` (Gamma arrivals, 10% high-priority requests, Figure 13) and
``autoscale`` (cost vs P99 prefill latency over a range of scaling bands, Figure 14; each
preset scales on its own load metric, ``AUTOSCALE_METRIC``).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from llumnix.rescheduler import AutoscaleConfig, ReschedulerConfig
from llumnix.scheduler import SchedulerConfig
from llumnix.sim.metrics import SimResult
from llumnix.sim.profile import EngineProfile, load_profile
from llumnix.sim.runner import SimConfig, Simulation
from llumnix.sim.traces import TraceRequest, generate

logger = logging.getLogger(__name__)

POLICIES = ("round_robin", "infaas++", "llumnix-base", "llumnix")

PRIORITY_HEADROOM_BLOCKS = 900.0
"""Virtual usage reserved on an instance hosting high-priority requests (blocks): nearly a
whole instance (936 blocks), so normal requests leave it and high-priority decode runs near
single-request speed."""


def policy_config(
    policy: str,
    num_instances: int = 16,
    profile: EngineProfile | None = None,
    priorities: bool = False,
    autoscale: AutoscaleConfig | None = None,
    startup_s: float = 10.0,
) -> SimConfig:
    """The simulator configuration of a named preset."""
    profile = profile or load_profile()
    resched: ReschedulerConfig | None = None
    migration = True
    headroom = PRIORITY_HEADROOM_BLOCKS if priorities else 0.0
    if policy == "round_robin":
        sched = SchedulerConfig("round_robin")
    elif policy == "infaas++":
        sched = SchedulerConfig("infaas++")
    elif policy == "llumnix-base":
        sched = SchedulerConfig("load_balance")
    elif policy == "llumnix":
        if priorities:
            sched = SchedulerConfig("priority", {"headroom_blocks": headroom})
        else:
            sched = SchedulerConfig("load_balance")
        resched = ReschedulerConfig(
            policy_kwargs={
                "load_balance": {"high_priority_headroom_blocks": headroom},
                "priority_headroom": {"headroom_blocks": headroom},
            },
            autoscale=autoscale,
        )
    else:
        raise ValueError(f"unknown policy preset {policy!r}; choose from {POLICIES}")
    if autoscale is not None and resched is None:
        # same autoscaler, but retiring instances must run dry: no migration
        resched = ReschedulerConfig(policies=[], autoscale=autoscale)
        migration = False
    return SimConfig(
        num_instances=num_instances,
        profile=profile,
        scheduler=sched,
        rescheduler=resched,
        migration=migration,
        startup_s=startup_s,
        priority_queue=priorities and policy == "llumnix",
        name=policy,
    )


@dataclass
class Run:
    """One point of an experiment."""

    family: str
    """Experiment family."""
    trace: str
    """Trace label (length distribution or file)."""
    rate: float
    """Mean request rate (req/s)."""
    policy: str
    """Policy preset."""
    knob: float | None = None
    """Family-specific parameter (autoscale: scale-out threshold)."""
    result: SimResult = field(default_factory=SimResult)
    """Outcome."""

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d


SERVING_RATES: dict[str, list[float]] = {
    "L-L": [2.6, 2.8, 3.0, 3.2],
    "M-M": [7.4, 7.6, 7.8, 8.0],
    "S-S": [32.0, 34.0, 36.0, 38.0],
    "sharegpt": [7.0, 7.5, 8.0],
    "burstgpt": [7.5, 8.0, 8.5],
}
"""The paper's request rates (req/s on 16 instances, Figure 10). On the default profile they
sit at the edge of saturation, as in the paper (see ``profiles/llama7b_a10.json``)."""

AUTOSCALE_BANDS: list[tuple[float, float]] = [
    (0, 40),
    (5, 50),
    (10, 60),
    (15, 60),
    (20, 65),
    (30, 75),
    (40, 100),
    (60, 140),
    (80, 180),
]
"""Llumnix's autoscaling bands ``(scale out below, scale in above)`` of average freeness
(blocks per request), swept from under-provisioned to the latency floor to trace cost against
P99 latency."""
INFAAS_AUTOSCALE_BANDS: list[tuple[float, float]] = [
    (-0.05, 0.20),
    (0.0, 0.25),
    (0.05, 0.30),
    (0.10, 0.35),
    (0.15, 0.40),
    (0.20, 0.45),
    (0.30, 0.55),
    (0.40, 0.65),
    (0.50, 0.75),
]
"""INFaaS++'s bands, on its own load metric (projected free KV fraction, queued demand
included), as in the paper: each system scales on the load metric it dispatches with. Swept up
to keeping half the KV free: under bursty arrivals its P99 keeps improving that far."""
AUTOSCALE_METRIC: dict[str, str] = {"infaas++": "kv_free_fraction"}
"""Autoscaling metric per preset (default ``freeness``)."""


def autoscale_bands(policy: str) -> list[tuple[float, float]]:
    """The bands swept for a preset."""
    return INFAAS_AUTOSCALE_BANDS if policy == "infaas++" else AUTOSCALE_BANDS


@dataclass
class ExperimentSpec:
    """What to run."""

    family: str = "serving"
    """``serving``, ``priority`` or ``autoscale``."""
    traces: list[str] = field(default_factory=lambda: ["M-M"])
    """Length distributions (``serving``) or the one trace of the other families."""
    rates: dict[str, list[float]] = field(default_factory=dict)
    """Rates per trace; defaults to ``SERVING_RATES``."""
    rate_scale: float = 1.0
    """Multiply every rate (calibrate load to a different engine profile)."""
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    """Presets to compare."""
    num_requests: int = 10_000
    """Requests per run."""
    num_instances: int = 16
    """Instances (initial instances for autoscale)."""
    seed: int = 0
    """Trace seed."""
    cv: float | None = None
    """Gamma coefficient of variation of arrivals (None = Poisson)."""
    high_priority_fraction: float = 0.0
    """Share of high-priority requests."""
    profile: EngineProfile = field(default_factory=load_profile)
    """Engine model."""
    trace_file: list[TraceRequest] | None = None
    """A replayed trace instead of generated ones (its own arrival times)."""


def _rates(spec: ExperimentSpec, trace_name: str) -> list[float]:
    if spec.trace_file is not None:
        return [0.0]
    return spec.rates.get(trace_name) or SERVING_RATES.get(trace_name) or [1.0]


def expand(spec: ExperimentSpec) -> Iterator[tuple[Run, SimConfig, list[TraceRequest]]]:
    """Every (run, config, trace) of a spec, generated lazily."""
    priorities = spec.family == "priority" or spec.high_priority_fraction > 0
    for trace_name in spec.traces:
        for rate in _rates(spec, trace_name):
            rate = rate * spec.rate_scale
            trace = spec.trace_file or generate(
                spec.num_requests,
                rate,
                trace_name,
                seed=spec.seed,
                cv=spec.cv,
                high_priority_fraction=spec.high_priority_fraction,
            )
            for policy in spec.policies:
                if spec.family == "autoscale":
                    for lo, hi in autoscale_bands(policy):
                        auto = AutoscaleConfig(
                            scale_out_below=lo,
                            scale_in_above=hi,
                            min_instances=1,
                            max_instances=4 * spec.num_instances,
                            metric=AUTOSCALE_METRIC.get(policy, "freeness"),
                        )
                        cfg = policy_config(
                            policy, spec.num_instances, spec.profile, priorities, auto
                        )
                        yield Run(spec.family, trace_name, rate, policy, lo), cfg, trace
                else:
                    cfg = policy_config(policy, spec.num_instances, spec.profile, priorities)
                    yield Run(spec.family, trace_name, rate, policy), cfg, trace


def _simulate(args: tuple[SimConfig, list[TraceRequest]]) -> SimResult:
    return Simulation(*args).run()


def run_all(
    spec: ExperimentSpec,
    on_progress: Callable[[int], None] | None = None,
    workers: int = 1,
) -> list[Run]:
    """Run every point of a spec; ``on_progress(n)`` is called with the number of requests
    each finished run simulated. ``workers > 1`` runs points in parallel processes (results
    are identical: every run is deterministic)."""
    points = list(expand(spec))
    runs = [run for run, _, _ in points]
    if workers <= 1:
        for run, cfg, trace in points:
            run.result = Simulation(cfg, trace).run()
            if on_progress is not None:
                on_progress(len(trace))
        return runs
    ctx = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
    with ctx.Pool(workers) as pool:
        jobs = [(cfg, trace) for _, cfg, trace in points]
        for k, res in enumerate(pool.imap(_simulate, jobs)):
            runs[k].result = res
            if on_progress is not None:
                on_progress(len(jobs[k][1]))
    return runs


def count_requests(spec: ExperimentSpec) -> int:
    """Total requests a spec simulates (for a progress bar)."""
    per_trace = len(spec.trace_file) if spec.trace_file is not None else spec.num_requests
    runs = 0
    for trace_name in spec.traces:
        rates = _rates(spec, trace_name)
        for policy in spec.policies:
            bands = len(autoscale_bands(policy)) if spec.family == "autoscale" else 1
            runs += len(rates) * bands
    return runs * per_trace
