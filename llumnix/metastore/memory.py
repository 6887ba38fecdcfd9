"""The in-process meta store: the default on one host (one gateway process)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from llumnix.metastore.base import InFlight, InstanceRecord, MetaStore
from llumnix.scheduler.cluster import InstanceStatus


class InProcessMetaStore(MetaStore):
    """Dicts under a lock; expiry is checked on read (monotonic clock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._instances: dict[str, tuple[InstanceRecord, float]] = {}  # record, expires at
        self._statuses: dict[str, tuple[InstanceStatus, float]] = {}
        self._inflight: dict[str, dict[str, InFlight]] = {}

    def register(self, record: InstanceRecord, ttl_s: float) -> None:
        with self._lock:
            self._instances[record.instance_id] = (record, time.monotonic() + ttl_s)

    def deregister(self, instance_id: str) -> None:
        with self._lock:
            self._instances.pop(instance_id, None)
            self._statuses.pop(instance_id, None)
            self._inflight.pop(instance_id, None)

    def instances(self) -> dict[str, InstanceRecord]:
        now = time.monotonic()
        with self._lock:
            for iid in [i for i, (_, exp) in self._instances.items() if exp <= now]:
                del self._instances[iid]
                self._statuses.pop(iid, None)
                self._inflight.pop(iid, None)
            return {iid: record for iid, (record, _) in self._instances.items()}

    def put_status(self, status: InstanceStatus, ttl_s: float) -> None:
        with self._lock:
            old = self._statuses.get(status.instance_id)
            if old is None or old[0].timestamp <= status.timestamp:
                self._statuses[status.instance_id] = (status, time.monotonic() + ttl_s)

    def statuses(self) -> dict[str, InstanceStatus]:
        now = time.monotonic()
        with self._lock:
            return {iid: s for iid, (s, exp) in self._statuses.items() if exp > now}

    def add_inflight(self, instance_id: str, entry: InFlight) -> None:
        with self._lock:
            self._inflight.setdefault(instance_id, {})[entry.request_id] = entry

    def settle(self, instance_id: str, request_ids: Iterable[str]) -> None:
        with self._lock:
            entries = self._inflight.get(instance_id)
            if entries:
                for request_id in request_ids:
                    entries.pop(request_id, None)

    def inflight(self, instance_id: str, now: float, ttl_s: float) -> list[InFlight]:
        with self._lock:
            entries = self._inflight.get(instance_id, {})
            for request_id in [r for r, e in entries.items() if now - e.at > ttl_s]:
                del entries[request_id]
            return list(entries.values())
