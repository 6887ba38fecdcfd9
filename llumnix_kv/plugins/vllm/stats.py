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


@dataclass
class LlumnixKVConnectorStats(KVConnectorStats):
    """Per kind: ``<kind>_s`` and ``<kind>_bytes`` lists (one entry per finished transfer);
    plus event counts. Plain lists and ints, so vLLM can ship it between processes."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {f"{k}_{f}": [] for k in KINDS for f in ("s", "bytes")}
        self.data.update({c: 0 for c in COUNTS})

    def record(self, kind: str, seconds: float, nbytes: int) -> None:
        self.data[f"{kind}_s"].append(float(seconds))
        self.data[f"{kind}_bytes"].append(int(nbytes))

    def count(self, event: str, n: int = 1) -> None:
        self.data[event] += n

    def is_empty(self) -> bool:
        return not any(self.data[f"{k}_s"] for k in KINDS) and not any(self.data[c] for c in COUNTS)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in other.data.items():
            if isinstance(value, list):
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
        return out


class LlumnixPromMetrics(KVConnectorPromMetrics):
    """``vllm:llumnix_kv_<kind>_bytes_total`` and ``..._transfers_total`` counters, a
    ``vllm:llumnix_kv_<kind>_seconds`` histogram per kind, and a counter per event."""

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
