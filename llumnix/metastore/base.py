"""The meta store's interface: instance registry, latest status per instance, in-flight ledger.

A registration lives ``ttl_s`` unless renewed: an instance whose llumlet or launcher stops
renewing it disappears by itself (in Redis, by key expiry). A status is the latest report of
an instance (:class:`~llumnix.scheduler.InstanceStatus`) with the reporter's ``timestamp``
(wall clock, seconds), so its age is ``now - timestamp``: the number the scheduler's
``staleness`` filter reads. In-flight entries count what a gateway dispatched to an instance
until its reports include the request (shared by every gateway using the store).

Every backend raises :class:`MetaStoreError` when it cannot answer within its timeout; callers
(the gateway) fall back rather than wait.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from llumnix.scheduler.cluster import InstanceStatus


class MetaStoreError(RuntimeError):
    """The meta store could not answer (down, timed out, or held garbage)."""


@dataclass(frozen=True)
class InstanceRecord:
    """What a gateway needs to reach one engine instance."""

    instance_id: str
    url: str
    """Base URL of its OpenAI-compatible HTTP server."""
    llumlet: str = ""
    """host:port of its llumlet's gRPC service (empty: no llumlet, lite mode)."""
    reports: str = ""
    """host:port of its llumlet's report socket (ZMQ PUB)."""
    role: str = "neutral"
    """prefill, decode or neutral."""
    block_size: int = 16
    num_blocks: int = 0
    failure_domain: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> InstanceRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class InFlight:
    """One dispatch not yet in its instance's reports."""

    request_id: str
    blocks: int
    prefill_tokens: int
    at: float
    """When it was dispatched (wall clock, seconds)."""


_STATUS_FIELDS = [f.name for f in dataclasses.fields(InstanceStatus) if f.name != "metric_cache"]


def status_to_dict(s: InstanceStatus) -> dict[str, Any]:
    out = {name: getattr(s, name) for name in _STATUS_FIELDS}
    out["request_ids"] = sorted(s.request_ids)
    out["prefix_ids"] = sorted(s.prefix_ids)
    return out


def status_from_dict(values: dict[str, Any]) -> InstanceStatus:
    values = {k: v for k, v in values.items() if k in _STATUS_FIELDS}
    values["request_ids"] = frozenset(values.get("request_ids", ()))
    values["prefix_ids"] = frozenset(values.get("prefix_ids", ()))
    return InstanceStatus(**values)


class MetaStore(abc.ABC):
    """Registry + latest status + in-flight ledger of the instances of one deployment."""

    @abc.abstractmethod
    def register(self, record: InstanceRecord, ttl_s: float) -> None:
        """Adds or renews an instance for ``ttl_s`` seconds."""

    @abc.abstractmethod
    def deregister(self, instance_id: str) -> None:
        """Removes an instance with its status and in-flight entries."""

    @abc.abstractmethod
    def instances(self) -> dict[str, InstanceRecord]:
        """The instances registered and not expired."""

    @abc.abstractmethod
    def put_status(self, status: InstanceStatus, ttl_s: float) -> None:
        """Stores an instance's latest report (kept ``ttl_s``; an older report never
        replaces a newer one)."""

    @abc.abstractmethod
    def statuses(self) -> dict[str, InstanceStatus]:
        """The latest report of every instance that has one."""

    @abc.abstractmethod
    def add_inflight(self, instance_id: str, entry: InFlight) -> None: ...

    @abc.abstractmethod
    def settle(self, instance_id: str, request_ids: Iterable[str]) -> None:
        """Drops the in-flight entries an instance's report now accounts for."""

    @abc.abstractmethod
    def inflight(self, instance_id: str, now: float, ttl_s: float) -> list[InFlight]:
        """An instance's in-flight entries younger than ``ttl_s`` (older ones are dropped)."""

    def close(self) -> None:
        return None
