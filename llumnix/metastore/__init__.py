"""Meta store: the registry of instances, their latest status and the in-flight ledger, behind
one interface (:class:`MetaStore`) with an in-process backend (the default, one host) and a
Redis one (shared across gateways and hosts; key expiry is instance liveness).
:func:`open_meta_store` picks one from a URL."""

from __future__ import annotations

from llumnix.metastore.base import (
    InFlight,
    InstanceRecord,
    MetaStore,
    MetaStoreError,
    status_from_dict,
    status_to_dict,
)
from llumnix.metastore.memory import InProcessMetaStore


def open_meta_store(url: str = "", namespace: str = "llumnix", timeout_s: float = 0.5) -> MetaStore:
    """``""`` or ``"memory"``: in-process; ``redis://host:port/db``: Redis."""
    if url in ("", "memory"):
        return InProcessMetaStore()
    if url.startswith(("redis://", "rediss://", "unix://")):
        from llumnix.metastore.redis import RedisMetaStore

        return RedisMetaStore(url, namespace, timeout_s)
    raise ValueError(f"unknown meta store {url!r}: use 'memory' or redis://host:port/db")


__all__ = [
    "InFlight",
    "InProcessMetaStore",
    "InstanceRecord",
    "MetaStore",
    "MetaStoreError",
    "open_meta_store",
    "status_from_dict",
    "status_to_dict",
]
