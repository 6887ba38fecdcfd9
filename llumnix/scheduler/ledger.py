"""In-flight ledger: dispatches the instances have not reported yet.

Between a dispatch and the target's next status report that names the request, the target's
report under-states its load. Without correction a burst of arrivals all pick the same
"freest" instance (herding). The ledger adds each dispatch's demand to its target until a
report from that instance includes the request id (or, if the request never shows up, until
``ttl_s`` has passed on the report clock).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from llumnix.scheduler.cluster import DispatchRequest, InstanceStatus

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PendingLoad:
    """Aggregate demand of the in-flight dispatches to one instance."""

    num_requests: int = 0
    """Dispatched requests not yet reported by the instance."""
    blocks: int = 0
    """KV blocks they need on admission."""
    prefill_tokens: int = 0
    """Prompt tokens they will prefill (prefix hits excluded)."""
    num_high_priority: int = 0
    """How many of them have priority > 0."""


NO_PENDING = PendingLoad()
"""Shared empty value; never mutate it."""


@dataclass(slots=True)
class _Entry:
    blocks: int
    prefill_tokens: int
    high_priority: bool
    dispatched_at: float


class InFlightLedger:
    """Per-instance record of dispatched-but-unreported requests."""

    def __init__(self, ttl_s: float = 5.0) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, dict[str, _Entry]] = {}
        self._pending: dict[str, PendingLoad] = {}

    def add(
        self,
        instance_id: str,
        request: DispatchRequest,
        blocks: int,
        prefill_tokens: int,
        now: float,
    ) -> None:
        """Count ``request`` (needing ``blocks`` KV blocks) against ``instance_id``."""
        entry = _Entry(blocks, prefill_tokens, request.priority > 0, now)
        self._entries.setdefault(instance_id, {})[request.request_id] = entry
        load = self._pending.get(instance_id)
        if load is None:
            load = self._pending[instance_id] = PendingLoad()
        load.num_requests += 1
        load.blocks += blocks
        load.prefill_tokens += prefill_tokens
        load.num_high_priority += entry.high_priority

    def pending(self, instance_id: str) -> PendingLoad:
        """In-flight load of an instance (the shared empty value if none)."""
        return self._pending.get(instance_id, NO_PENDING)

    def pending_map(self) -> dict[str, PendingLoad]:
        """All non-empty in-flight loads by instance id (live; do not mutate)."""
        return self._pending

    def reconcile(self, status: InstanceStatus) -> None:
        """Drop entries the report accounts for, and entries older than the TTL."""
        entries = self._entries.get(status.instance_id)
        if not entries:
            return
        ids = status.request_ids
        deadline = status.timestamp - self.ttl_s
        done = [rid for rid, e in entries.items() if rid in ids or e.dispatched_at < deadline]
        if not done:
            return
        self._remove(status.instance_id, done)

    def discard(self, instance_id: str, request_id: str) -> None:
        """Drop one entry (its request ended before a report included it)."""
        if request_id in self._entries.get(instance_id, {}):
            self._remove(instance_id, [request_id])

    def _remove(self, instance_id: str, request_ids: list[str]) -> None:
        entries = self._entries[instance_id]
        load = self._pending[instance_id]
        for rid in request_ids:
            e = entries.pop(rid)
            load.num_requests -= 1
            load.blocks -= e.blocks
            load.prefill_tokens -= e.prefill_tokens
            load.num_high_priority -= e.high_priority
        if not entries:
            del self._entries[instance_id]
            del self._pending[instance_id]

    def drop_instance(self, instance_id: str) -> None:
        """Forget everything dispatched to a removed instance."""
        self._entries.pop(instance_id, None)
        self._pending.pop(instance_id, None)

    def __len__(self) -> int:
        return sum(len(e) for e in self._entries.values())
