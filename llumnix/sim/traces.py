"""Request traces: arrival processes, length distributions, priorities, JSONL replay.

Length distributions (all clipped to ``[1, max_tokens]``):

- ``sharegpt`` / ``burstgpt``: log-normal fitted to the published P50 and P99 of the OSDI'24
  paper's Table 1 (ShareGPT input 306/74/3388 mean/P50/P99, output 500/487/1234; BurstGPT
  input 830/582/3549, output 271/243/964). Fitting the two quantiles leaves the mean within
  15% of the published one (ShareGPT input is the worst: 264 instead of 306, the heavy upper
  tail of the real data is not log-normal); ``tests/llumnix/test_traces.py`` checks all three.
- ``short`` / ``medium`` / ``long``: the paper's power-law families, a truncated Pareto on
  ``[x_min, 6000]`` whose ``x_min`` and exponent are fitted to the published mean
  (128/256/512) and median (38/32/55).
Combined families name input then output: ``S-S``, ``M-M``, ``L-L``, ``S-L``, ``L-S``.

Arrivals: Poisson at ``rate`` req/s, or Gamma inter-arrivals with coefficient of variation
``cv`` (burstier for ``cv > 1``) at the same mean rate.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

POWER_LAW_MAX = 6000
"""Longest sequence of the power-law families (tokens)."""


@dataclass(slots=True)
class TraceRequest:
    """One request of a trace."""

    request_id: str
    """Unique id."""
    arrival_s: float
    """Arrival time in seconds from the trace start."""
    input_tokens: int
    """Prompt length."""
    output_tokens: int
    """Tokens to generate (>= 1)."""
    priority: int = 0
    """0 = normal, 1 = high."""
    prefix_id: str | None = None
    """Shared-prefix hash, if the prompt starts with a known prefix."""
    prefix_tokens: int = 0
    """Length of that prefix."""


_LOGNORMAL_QUANTILES = {
    # name: ((P50, P99) input, (P50, P99) output)
    "sharegpt": ((74.0, 3388.0), (487.0, 1234.0)),
    "burstgpt": ((582.0, 3549.0), (243.0, 964.0)),
}
_POWER_LAW_TARGETS = {"short": (128.0, 38.0), "medium": (256.0, 32.0), "long": (512.0, 55.0)}
_FAMILY_ALIASES = {"S": "short", "M": "medium", "L": "long"}
_Z99 = 2.3263478740408408


def _pareto_stats(x_min: float, x_max: float, a: float) -> tuple[float, float]:
    """(mean, median) of a Pareto with exponent ``a`` truncated to [x_min, x_max]."""
    r = (x_min / x_max) ** a
    median = x_min / (1 - 0.5 * (1 - r)) ** (1 / a)
    if abs(a - 1) < 1e-9:
        mean = x_min * math.log(x_max / x_min) / (1 - r)
    else:
        mean = a * x_min**a / (1 - r) * (x_max ** (1 - a) - x_min ** (1 - a)) / (1 - a)
    return mean, median


@functools.cache
def fit_power_law(mean: float, median: float, x_max: float = POWER_LAW_MAX) -> tuple[float, float]:
    """``(x_min, exponent)`` of a truncated Pareto on ``[x_min, x_max]`` with the given mean
    and median (grid over x_min, bisection on the exponent for the mean)."""
    best: tuple[float, float, float] | None = None
    for i in range(10, 400):
        x_min = i / 10
        if x_min >= median:
            break
        lo, hi = 1e-3, 8.0
        for _ in range(60):
            a = (lo + hi) / 2
            if _pareto_stats(x_min, x_max, a)[0] > mean:
                lo = a
            else:
                hi = a
        err = abs(_pareto_stats(x_min, x_max, a)[1] - median)
        if best is None or err < best[0]:
            best = (err, x_min, a)
    assert best is not None
    return best[1], best[2]


def sample_lengths(
    dist: str, n: int, rng: np.random.Generator, which: str = "input", max_tokens: int = 4096
) -> np.ndarray:
    """``n`` token counts from a named distribution (``which`` picks input or output for the
    dataset-fitted ones)."""
    if dist in _LOGNORMAL_QUANTILES:
        p50, p99 = _LOGNORMAL_QUANTILES[dist][0 if which == "input" else 1]
        sigma = math.log(p99 / p50) / _Z99
        x = rng.lognormal(math.log(p50), sigma, n)
        return np.clip(np.rint(x), 1, max_tokens).astype(np.int64)
    name = _FAMILY_ALIASES.get(dist, dist)
    if name in _POWER_LAW_TARGETS:
        x_min, a = fit_power_law(*_POWER_LAW_TARGETS[name])
        r = (x_min / POWER_LAW_MAX) ** a
        u = rng.random(n)
        x = x_min / (1 - u * (1 - r)) ** (1 / a)
        return np.clip(np.rint(x), 1, min(max_tokens, POWER_LAW_MAX)).astype(np.int64)
    raise ValueError(f"unknown length distribution {dist!r}")


def arrivals(n: int, rate: float, rng: np.random.Generator, cv: float | None = None) -> np.ndarray:
    """Arrival times (s) of ``n`` requests at mean ``rate`` req/s: Poisson, or Gamma
    inter-arrivals with coefficient of variation ``cv``."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    if cv is None or cv == 1.0:
        gaps = rng.exponential(1.0 / rate, n)
    else:
        shape = 1.0 / (cv * cv)
        gaps = rng.gamma(shape, 1.0 / (rate * shape), n)
    return np.cumsum(gaps)


def generate(
    n: int,
    rate: float,
    lengths: str = "M-M",
    seed: int = 0,
    cv: float | None = None,
    high_priority_fraction: float = 0.0,
    max_tokens: int = 6000,
) -> list[TraceRequest]:
    """A synthetic trace. ``lengths`` is ``"sharegpt"``, ``"burstgpt"`` or ``"<in>-<out>"``
    with each side one of S, M, L."""
    rng = np.random.default_rng(seed)
    if lengths in _LOGNORMAL_QUANTILES:
        ins = sample_lengths(lengths, n, rng, "input", max_tokens)
        outs = sample_lengths(lengths, n, rng, "output", max_tokens)
    else:
        try:
            d_in, d_out = lengths.split("-")
        except ValueError:
            raise ValueError(f"lengths must look like 'M-M', not {lengths!r}") from None
        ins = sample_lengths(d_in, n, rng, "input", max_tokens)
        outs = sample_lengths(d_out, n, rng, "output", max_tokens)
    times = arrivals(n, rate, rng, cv)
    prio = rng.random(n) < high_priority_fraction
    return [
        TraceRequest(f"r{i}", float(times[i]), int(ins[i]), int(outs[i]), int(prio[i]))
        for i in range(n)
    ]


def load_jsonl(path: str | Path) -> list[TraceRequest]:
    """Read a trace: one JSON object per line with ``arrival_s``, ``input_tokens``,
    ``output_tokens`` and optional ``priority``, ``prefix_id``, ``prefix_tokens``,
    ``request_id``. Sorted by arrival."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            d = json.loads(line)
            out.append(
                TraceRequest(
                    str(d.get("request_id", f"r{i}")),
                    float(d["arrival_s"]),
                    max(1, int(d["input_tokens"])),
                    max(1, int(d["output_tokens"])),
                    int(d.get("priority", 0)),
                    d.get("prefix_id"),
                    int(d.get("prefix_tokens", 0)),
                )
            )
    out.sort(key=lambda r: r.arrival_s)
    return out


def save_jsonl(trace: Iterable[TraceRequest], path: str | Path) -> None:
    """Write a trace in the format :func:`load_jsonl` reads."""
    with open(path, "w") as f:
        for r in trace:
            d = {k: v for k, v in asdict(r).items() if v is not None}
            f.write(json.dumps(d) + "\n")
