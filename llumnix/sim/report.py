"""Tables, JSON and plots of experiment runs, and the OSDI'24 claims computed from them.

Claims compare Llumnix with INFaaS++ (serving, autoscaling) or with priority-blind
Llumnix-base (priorities), as the paper does, and report the best point of a sweep ("up to")
together with the median over the sweep's points.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from llumnix.sim.experiments import Run
from llumnix.sim.metrics import LatencyStats, SimResult

logger = logging.getLogger(__name__)


@dataclass
class Claim:
    """One paper figure next to ours."""

    name: str
    """What is compared."""
    paper: str
    """The paper's figure."""
    ours_best: float
    """Our best point over the sweep."""
    ours_median: float
    """Our median over the sweep."""
    unit: str
    """``x`` (ratio, higher is better) or ``%`` (reduction)."""
    where: str
    """Trace and rate of the best point."""

    def render(self) -> str:
        fmt = "{:.2f}x" if self.unit == "x" else "{:+.1f}%"
        return (
            f"{self.name:<42} paper {self.paper:>7}   ours {fmt.format(self.ours_best):>7} "
            f"(median {fmt.format(self.ours_median)})   at {self.where}"
        )


def _high(r: SimResult) -> LatencyStats:
    return r.by_priority.get("high", LatencyStats())


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def _by_point(runs: Sequence[Run], family: str) -> dict[tuple[str, float], dict[str, Run]]:
    points: dict[tuple[str, float], dict[str, Run]] = defaultdict(dict)
    for r in runs:
        if r.family == family and r.knob is None:
            points[(r.trace, r.rate)][r.policy] = r
    return points


def _claim(
    name: str, paper: str, unit: str, values: list[tuple[float, str]], higher: bool = True
) -> Claim | None:
    if not values:
        return None
    best = max(values) if higher else min(values)
    return Claim(name, paper, best[0], statistics.median(v for v, _ in values), unit, best[1])


def serving_claims(runs: Sequence[Run], baseline: str = "infaas++") -> list[Claim]:
    """P99/mean prefill speed-ups and preemption-loss reduction of Llumnix vs ``baseline``."""
    p99, mean, ploss = [], [], []
    for (trace, rate), pols in sorted(_by_point(runs, "serving").items()):
        if "llumnix" not in pols or baseline not in pols:
            continue
        ll, bl = pols["llumnix"].result.latency, pols[baseline].result.latency
        where = f"{trace} {rate:.2f} req/s"
        p99.append((_ratio(bl.prefill_p99_s, ll.prefill_p99_s), where))
        mean.append((_ratio(bl.prefill_mean_s, ll.prefill_mean_s), where))
        if bl.preemption_loss_mean_s > 0:
            red = 100 * (ll.preemption_loss_mean_s / bl.preemption_loss_mean_s - 1)
            ploss.append((red, where))
    out = [
        _claim(f"P99 prefill latency vs {baseline}", "14.8x", "x", p99),
        _claim(f"mean prefill latency vs {baseline}", "7.7x", "x", mean),
        _claim(f"preemption loss vs {baseline}", "-70%", "%", ploss, higher=False),
    ]
    return [c for c in out if c is not None]


def priority_claims(runs: Sequence[Run], baseline: str = "llumnix-base") -> list[Claim]:
    """High-priority request speed-ups of Llumnix vs priority-blind ``baseline``."""
    req, dec, pre = [], [], []
    for (trace, rate), pols in sorted(_by_point(runs, "priority").items()):
        if "llumnix" not in pols or baseline not in pols:
            continue
        ll = pols["llumnix"].result.by_priority.get("high")
        bl = pols[baseline].result.by_priority.get("high")
        if ll is None or bl is None:
            continue
        where = f"{trace} {rate:.2f} req/s"
        req.append((_ratio(bl.request_mean_s, ll.request_mean_s), where))
        dec.append((_ratio(bl.decode_mean_ms, ll.decode_mean_ms), where))
        pre.append((_ratio(bl.prefill_p99_s, ll.prefill_p99_s), where))
    out = [
        _claim(f"high-priority mean request latency vs {baseline}", "1.5x", "x", req),
        _claim(f"high-priority mean decode latency vs {baseline}", "1.5x", "x", dec),
        _claim(f"high-priority P99 prefill latency vs {baseline}", "-", "x", pre),
    ]
    return [c for c in out if c is not None]


def _frontier(rs: list[Run], get: Callable[[Run], float]) -> list[tuple[float, float]]:
    """(cost, P99) of the bands on the cost frontier: cheapest first, each with a lower P99
    than every cheaper band (over-provisioned bands drop out)."""
    pts = sorted((r.result.instance_seconds, get(r)) for r in rs)
    out: list[tuple[float, float]] = []
    for cost, p99 in pts:
        if p99 > 0 and (not out or p99 < out[-1][1]):
            out.append((cost, p99))
    return out


def cost_at(frontier: list[tuple[float, float]], target: float) -> float | None:
    """Cost of reaching P99 <= ``target`` on a frontier, interpolated between the two bands
    around it (linear in cost, logarithmic in P99); None when no band reaches it."""
    if not frontier or target < frontier[-1][1]:
        return None
    if target >= frontier[0][1]:
        return frontier[0][0]
    for (ca, pa), (cb, pb) in itertools.pairwise(frontier):
        if pb <= target < pa:
            w = (math.log(pa) - math.log(target)) / (math.log(pa) - math.log(pb))
            return ca + w * (cb - ca)
    return None


def autoscale_claims(runs: Sequence[Run], baseline: str = "infaas++") -> list[Claim]:
    """Cost at equal P99 latency. Each policy's bands give a cost-vs-P99 frontier; both
    frontiers are read (interpolated) at the same P99 targets, namely the P99 of every band on
    either frontier that both reach, and the savings there are reported (best and median).
    The paper's claim is on prefill latency; the decode-latency variant is reported beside
    it."""
    groups: dict[tuple[str, float], dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.family == "autoscale":
            groups[(r.trace, r.rate)][r.policy].append(r)
    metrics: list[tuple[str, str, Callable[[Run], float], str]] = [
        ("prefill", "-36%", lambda r: r.result.latency.prefill_p99_s, "s"),
        ("decode", "-", lambda r: r.result.latency.decode_p99_ms, "ms"),
    ]
    claims = []
    for label, paper, get, unit in metrics:
        savings = []
        for (trace, rate), pols in sorted(groups.items()):
            fb = _frontier(pols.get(baseline, []), get)
            fl = _frontier(pols.get("llumnix", []), get)
            for target in sorted({p for _, p in fb} | {p for _, p in fl}):
                cb, cl = cost_at(fb, target), cost_at(fl, target)
                if cb is not None and cl is not None:
                    where = f"{trace} {rate:.2f} req/s, P99 {label} {target:.2f}{unit}"
                    savings.append((100 * (cl / cb - 1), where))
        name = f"cost at equal P99 {label} vs {baseline}"
        c = _claim(name, paper, "%", savings, higher=False)
        if c is not None:
            claims.append(c)
    return claims


def all_claims(runs: Sequence[Run]) -> list[Claim]:
    """Every claim the runs support."""
    return serving_claims(runs) + priority_claims(runs) + autoscale_claims(runs)


def table(runs: Sequence[Run]) -> str:
    """A fixed-width table, one row per run."""
    head = (
        f"{'family':<9} {'trace':<9} {'rate':>6} {'policy':<13} {'knob':>5} {'P99pre':>8} "
        f"{'meanPre':>8} {'P99dec':>7} {'meanReq':>8} {'pLoss':>7} {'migr':>6} {'frag':>5} "
        f"{'inst-s':>8} {'hiReq':>7} {'hiDec':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        L = r.result.latency
        hi = r.result.by_priority.get("high")
        knob = f"{r.knob:g}" if r.knob is not None else "-"
        lines.append(
            f"{r.family:<9} {r.trace:<9} {r.rate:>6.2f} {r.policy:<13} {knob:>5} "
            f"{L.prefill_p99_s:>8.2f} {L.prefill_mean_s:>8.3f} {L.decode_p99_ms:>7.1f} "
            f"{L.request_mean_s:>8.2f} {L.preemption_loss_mean_s:>7.3f} "
            f"{r.result.num_migrations:>6d} {r.result.fragmentation_mean:>5.3f} "
            f"{r.result.instance_seconds:>8.0f} "
            f"{(hi.request_mean_s if hi else 0):>7.2f} {(hi.decode_mean_ms if hi else 0):>6.1f}"
        )
    return "\n".join(lines)


def write_json(runs: Sequence[Run], claims: Sequence[Claim], path: Path, meta: dict) -> None:
    """Everything, machine-readable."""
    doc = {"meta": meta, "claims": [asdict(c) for c in claims], "runs": [r.as_dict() for r in runs]}
    path.write_text(json.dumps(doc, indent=1))


def plot(runs: Sequence[Run], out_dir: Path) -> list[Path]:
    """Latency-vs-rate figures (one line per policy) per family and trace; cost-vs-P99 for
    autoscaling. Returns the files written; none if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib not installed: no plots (pip install 'llumnix[sim]')")
        return []
    written = []
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.family, r.trace)].append(r)
    for (family, trace), rs in sorted(groups.items()):
        path = out_dir / f"{family}_{trace}.png"
        if family == "autoscale":
            fig, ax = plt.subplots(figsize=(5, 4))
            for policy in dict.fromkeys(r.policy for r in rs):
                pts = sorted(
                    (r.result.instance_seconds, r.result.latency.prefill_p99_s)
                    for r in rs
                    if r.policy == policy
                )
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=policy)
            ax.set_xlabel("cost (instance-seconds)")
            ax.set_ylabel("P99 prefill latency (s)")
            ax.set_yscale("log")
            ax.legend()
            ax.set_title(f"autoscaling, {trace}")
        else:
            metrics: list[tuple[str, Callable[[SimResult], float]]] = [
                ("P99 prefill (s)", lambda R: R.latency.prefill_p99_s),
                ("mean prefill (s)", lambda R: R.latency.prefill_mean_s),
                ("P99 decode (ms/token)", lambda R: R.latency.decode_p99_ms),
                ("mean request (s)", lambda R: R.latency.request_mean_s),
                ("preemption loss (s)", lambda R: R.latency.preemption_loss_mean_s),
            ]
            if any(r.result.by_priority for r in rs):
                metrics += [
                    ("high-prio mean request (s)", lambda R: _high(R).request_mean_s),
                    ("high-prio mean decode (ms/token)", lambda R: _high(R).decode_mean_ms),
                ]
            fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.4))
            for ax, (label, get) in zip(axes, metrics, strict=True):
                for policy in dict.fromkeys(r.policy for r in rs):
                    pts = sorted((r.rate, get(r.result)) for r in rs if r.policy == policy)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=policy)
                ax.set_xlabel("request rate (req/s)")
                ax.set_title(label, fontsize=10)
                if not label.startswith("preemption"):
                    ax.set_yscale("log")
            axes[0].legend(fontsize=8)
            fig.suptitle(f"{family}, {trace}")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
