"""Reproduce the OSDI'24 Llumnix experiment families on 16 simulated instances.

Runs ``llumnix sim`` for each family below (same presets, fixed seed 0), writes per-family
JSON and PNG plots under ``--out``, and a ``SUMMARY.md`` with every claim (paper figure next
to ours) and the exact command that reproduces it.

    PYTHONPATH=. python benchmarks/scheduler/run_experiments.py [--out results/scheduler]
        [--only serving,priority] [--workers 2] [--num-requests 10000]
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from llumnix.cli import main as llumnix_main

TRACES = "L-L,M-M,S-S,sharegpt,burstgpt"

FAMILIES: dict[str, list[str]] = {
    # Figure 10: the paper's traces at the paper's request rates
    "serving": ["--family", "serving", "--traces", TRACES],
    # Figure 13: Gamma arrivals (CV 2), 10% high-priority requests, M-M at the paper's M-M rates
    "priority": [
        "--family", "priority", "--traces", "M-M", "--rates", "7.4,7.6,7.8,8.0", "--cv", "2",
        "--high-priority", "0.1", "--policies", "infaas++,llumnix-base,llumnix",
    ],
    # Figure 14: cost vs P99 prefill over a sweep of scaling bands (each policy on its own
    # load metric), Poisson and Gamma arrivals
    "autoscale-poisson": [
        "--family", "autoscale", "--traces", "M-M", "--rates", "6",
        "--policies", "infaas++,llumnix",
    ],
    "autoscale-cv2": [
        "--family", "autoscale", "--traces", "M-M", "--rates", "6", "--cv", "2",
        "--policies", "infaas++,llumnix",
    ],
    # burstier arrivals: more scaling events, so draining speed matters more
    "autoscale-cv4": [
        "--family", "autoscale", "--traces", "M-M", "--rates", "6", "--cv", "4",
        "--policies", "infaas++,llumnix",
    ],
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("results/scheduler"))
    ap.add_argument("--only", default=",".join(FAMILIES), help="comma-separated family names")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--num-requests", type=int, default=10_000)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    summary = ["# Llumnix OSDI'24 claims, simulated (16 instances, seed 0)", ""]
    summary += [
        "| claim | paper | ours (best) | ours (median) | at | command |",
        "|---|---|---|---|---|---|",
    ]
    for name in args.only.split(","):
        out = args.out / name
        argv = ["sim", *FAMILIES[name], "--out", str(out), "--workers", str(args.workers)]
        argv += ["--num-requests", str(args.num_requests)]
        if args.quiet:
            argv.append("--quiet")
        cmd = "llumnix " + " ".join(shlex.quote(a) for a in argv)
        print(f"\n=== {name}: {cmd}", flush=True)
        t0 = time.perf_counter()
        llumnix_main(argv)
        print(f"=== {name} took {time.perf_counter() - t0:.0f}s", flush=True)
        family = FAMILIES[name][1]
        doc = json.loads((out / f"{family}.json").read_text())
        for c in doc["claims"]:
            fmt = "{:.2f}x" if c["unit"] == "x" else "{:+.1f}%"
            summary.append(
                f"| {c['name']} ({name}) | {c['paper']} | {fmt.format(c['ours_best'])} | "
                f"{fmt.format(c['ours_median'])} | {c['where']} | `{cmd}` |"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "SUMMARY.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
