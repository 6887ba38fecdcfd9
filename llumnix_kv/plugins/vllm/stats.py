"""The connector's transfer stats in vLLM's connector-stats pipeline.

Workers return a :class:`LlumnixKVConnectorStats` from ``get_kv_connector_stats`` after each
step; vLLM aggregates them across workers and intervals, logs :meth:`reduce`'s summary ("KV
Transfer metrics" in its periodic stats line) and records them in the Prometheus metrics of
:class:`LlumnixPromMetrics` (``vllm:llumnix_kv_*``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.v1.metrics.utils import create_metric_per_engine

if TYPE_CHECKING:
    from vllm.config import VllmConfig

__all__ = ["KINDS", "LlumnixKVConnectorStats", "LlumnixPromMetrics"]

# Transfer kinds: a PD load on the decode side (pull READ or received push), a push on the
# prefill side, a load from the store tiers.
KINDS = ("load", "push", "store_load")
# Counted events.
COUNTS = ("failed_loads", "failed_pushes", "expired_holds", "store_blocks_failed")
# Current values per worker (sent when they change): KV work the connector still has open and
# what its transfer engine holds. All zero but ``registrations`` (the KV cache's memory
# regions: one per layer tensor) on an idle engine, whatever ran before: a leak shows as a
# gauge that does not come back.
GAUGES = ("loads_pending", "holds_pending", "peers", "registrations")


@dataclass
class LlumnixKVConnectorStats(KVConnectorStats):
    """Per kind: ``<kind>_s`` and ``<kind>_bytes`` lists (one entry per finished transfer);
    event counts; and ``gauges``, the latest :data:`GAUGES` per worker rank. Plain lists,
    dicts and ints, so vLLM can ship it between processes."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {f"{k}_{f}": [] for k in KINDS for f in ("s", "bytes")}
        self.data.update({c: 0 for c in COUNTS})
        self.data["gauges"] = {}

    def set_gauges(self, rank: int, values: dict[str, int]) -> None:
        self.data["gauges"][str(rank)] = {g: int(values[g]) for g in GAUGES}

    def record(self, kind: str, seconds: float, nbytes: int) -> None:
        self.data[f"{kind}_s"].append(float(seconds))
        self.data[f"{kind}_bytes"].append(int(nbytes))

    def count(self, event: str, n: int = 1) -> None:
        self.data[event] += n

    def is_empty(self) -> bool:
        return (
            not any(self.data[f"{k}_s"] for k in KINDS)
            and not any(self.data[c] for c in COUNTS)
            and not self.data.get("gauges")
        )

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in other.data.items():
            if key == "gauges":  # the later report of a worker replaces its earlier one
                self.data["gauges"] = {**self.data.get("gauges", {}), **value}
            elif isinstance(value, list):
                self.data.setdefault(key, []).extend(value)
            else:
                self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {}
        for kind in KINDS:
            secs = np.asarray(self.data[f"{kind}_s"], dtype=np.float64)
            nbytes = np.asarray(self.data[f"{kind}_bytes"], dtype=np.float64)
            out[f"{kind} transfers"] = len(secs)
            if len(secs):
                out[f"{kind} avg ms"] = round(float(secs.mean()) * 1e3, 3)
                out[f"{kind} p90 ms"] = round(float(np.percentile(secs, 90)) * 1e3, 3)
                mb, total_s = float(nbytes.sum()) / 2**20, float(secs.sum())
                out[f"{kind} MB"] = round(mb, 3)
                out[f"{kind} MB/s"] = round(mb / total_s, 3) if total_s else 0
        out.update({c: int(self.data[c]) for c in COUNTS})
        gauges = self.data.get("gauges") or {}
        if gauges:
            out.update({g: sum(w[g] for w in gauges.values()) for g in GAUGES})
        return out


class LlumnixPromMetrics(KVConnectorPromMetrics):
    """``vllm:llumnix_kv_<kind>_bytes_total`` and ``..._transfers_total`` counters, a
    ``vllm:llumnix_kv_<kind>_seconds`` histogram per kind, a counter per event and a gauge
    ``vllm:llumnix_kv_<gauge>`` per gauge (summed over the engine's workers)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        buckets = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
        self._bytes: dict[str, dict[int, Any]] = {}
        self._transfers: dict[str, dict[int, Any]] = {}
        self._seconds: dict[str, dict[int, Any]] = {}
        self._events: dict[str, dict[int, Any]] = {}
        for kind in KINDS:
            self._bytes[kind] = self._per_engine(
                self._counter_cls,
                name=f"vllm:llumnix_kv_{kind}_bytes",
                documentation=f"Bytes moved by finished Llumnix KV transfers ({kind}).",
            )
            self._transfers[kind] = self._per_engine(
                self._counter_cls,
                name=f"vllm:llumnix_kv_{kind}_transfers",
                documentation=f"Finished Llumnix KV transfers ({kind}).",
            )
            self._seconds[kind] = self._per_engine(
                self._histogram_cls,
                name=f"vllm:llumnix_kv_{kind}_seconds",
                documentation=f"Duration of Llumnix KV transfers ({kind}).",
                buckets=buckets,
            )
        for event in COUNTS:
            self._events[event] = self._per_engine(
                self._counter_cls,
                name=f"vllm:llumnix_kv_{event}",
                documentation=f"Llumnix KV connector events: {event.replace('_', ' ')}.",
            )
        self._gauges: dict[str, dict[int, Any]] = {}
        self._latest: dict[int, dict[str, dict[str, int]]] = {}  # engine -> rank -> gauges
        for gauge in GAUGES:
            self._gauges[gauge] = self._per_engine(
                self._gauge_cls,
                name=f"vllm:llumnix_kv_{gauge}",
                documentation=f"Llumnix KV connector now: {gauge.replace('_', ' ')}.",
                multiprocess_mode="mostrecent",
            )

    def _per_engine(self, cls: type, **kwargs: Any) -> dict[int, Any]:
        return create_metric_per_engine(
            cls(labelnames=self._labelnames, **kwargs), self.per_engine_labelvalues
        )

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for kind in KINDS:
            secs = transfer_stats_data.get(f"{kind}_s", [])
            nbytes = transfer_stats_data.get(f"{kind}_bytes", [])
            for s in secs:
                self._seconds[kind][engine_idx].observe(s)
            if secs:
                self._transfers[kind][engine_idx].inc(len(secs))
                self._bytes[kind][engine_idx].inc(sum(nbytes))
        for event in COUNTS:
            n = transfer_stats_data.get(event, 0)
            if n:
                self._events[event][engine_idx].inc(n)
        gauges = transfer_stats_data.get("gauges") or {}
        if gauges:
            latest = self._latest.setdefault(engine_idx, {})
            latest.update(gauges)
            for gauge in GAUGES:
                self._gauges[gauge][engine_idx].set(sum(w[gauge] for w in latest.values()))
