"""``llumnix`` command line.

``llumnix sim``: simulate the OSDI'24 experiment families (or one trace file) on a cluster of
simulated engines driven by the production scheduler and rescheduler; prints a table and the
paper's claims next to ours, writes ``results.json`` and PNG plots.

``llumnix serve``: serve a model on N vLLM engines behind the Llumnix gateway (see
:mod:`llumnix.serve`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from llumnix import serve
from llumnix.sim import experiments, report
from llumnix.sim.profile import DEFAULT_PROFILE, load_profile
from llumnix.sim.traces import load_jsonl

logger = logging.getLogger(__name__)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _add_sim_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sim",
        help="simulate scheduling policies on a cluster",
        description="Compare round-robin, INFaaS++, Llumnix-base and Llumnix on simulated "
        "engines (the same scheduler/rescheduler objects as production).",
    )
    p.add_argument(
        "--family",
        choices=["serving", "priority", "autoscale"],
        default="serving",
        help="experiment family (default: serving)",
    )
    p.add_argument(
        "--traces",
        default="M-M",
        help="comma-separated length distributions: S-S, M-M, L-L, S-L, L-S, sharegpt, burstgpt",
    )
    p.add_argument("--rates", type=_floats, help="comma-separated req/s (default: the paper's)")
    p.add_argument(
        "--rate-scale",
        type=float,
        default=1.0,
        help="multiply every rate (map the paper's load onto another engine profile)",
    )
    p.add_argument(
        "--policies",
        default=",".join(experiments.POLICIES),
        help=f"comma-separated presets from {', '.join(experiments.POLICIES)}",
    )
    p.add_argument("--num-requests", type=int, default=10_000, help="requests per run")
    p.add_argument("--instances", type=int, default=16, help="instances (initial, autoscale)")
    p.add_argument("--seed", type=int, default=0, help="trace seed")
    p.add_argument("--cv", type=float, help="Gamma arrivals with this CV (default Poisson)")
    p.add_argument(
        "--high-priority", type=float, default=None, help="fraction of high-priority requests"
    )
    p.add_argument("--profile", default=DEFAULT_PROFILE, help="engine profile name or JSON file")
    p.add_argument("--trace", type=Path, help="replay a JSONL trace instead of generating")
    p.add_argument("--out", type=Path, default=Path("results/sim"), help="output directory")
    p.add_argument("--workers", type=int, default=1, help="parallel simulation processes")
    p.add_argument("--no-plot", action="store_true", help="skip PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_spec(args: argparse.Namespace) -> experiments.ExperimentSpec:
    """The experiment spec described by parsed ``sim`` arguments."""
    traces = [t for t in args.traces.split(",") if t]
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        if p not in experiments.POLICIES:
            raise SystemExit(f"unknown policy {p!r}; choose from {experiments.POLICIES}")
    hp = args.high_priority
    cv = args.cv
    if args.family == "priority":
        # the paper's priority experiment: bursty arrivals, 10% high priority
        hp = 0.1 if hp is None else hp
        cv = 2.0 if cv is None else cv
    spec = experiments.ExperimentSpec(
        family=args.family,
        traces=traces,
        rates={t: args.rates for t in traces} if args.rates else {},
        rate_scale=args.rate_scale,
        policies=policies,
        num_requests=args.num_requests,
        num_instances=args.instances,
        seed=args.seed,
        cv=cv,
        high_priority_fraction=hp or 0.0,
        profile=load_profile(args.profile),
    )
    if args.trace is not None:
        spec.trace_file = load_jsonl(args.trace)
        spec.traces = [args.trace.stem]
    return spec


def cmd_sim(args: argparse.Namespace) -> int:
    spec = build_spec(args)
    total = experiments.count_requests(spec)
    bar = None
    if not args.quiet:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="req", desc=f"sim {spec.family}")
        except ImportError:
            logger.info("tqdm not installed: no progress bar")
    t0 = time.perf_counter()
    runs = experiments.run_all(spec, bar.update if bar else None, workers=args.workers)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0
    claims = report.all_claims(runs)
    print(report.table(runs))
    if claims:
        print("\nOSDI'24 claims (Llumnix vs baseline; best point of the sweep):")
        for c in claims:
            print("  " + c.render())
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "argv": sys.argv[1:],
        "profile": spec.profile.name,
        "wall_s": round(wall, 2),
        "simulated_requests": total,
    }
    out_json = args.out / f"{spec.family}.json"
    report.write_json(runs, claims, out_json, meta)
    written = [] if args.no_plot else report.plot(runs, args.out)
    print(f"\nwrote {out_json}" + "".join(f", {p}" for p in written))
    print(f"simulated {total} requests in {wall:.1f}s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llumnix`` console script."""
    parser = argparse.ArgumentParser(prog="llumnix", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_sim_parser(sub)
    serve.add_parser(sub)
    serve.add_drain_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    if args.command == "sim":
        return cmd_sim(args)
    if args.command == "serve":
        return serve.cmd_serve(args)
    if args.command == "drain":
        return serve.cmd_drain(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
