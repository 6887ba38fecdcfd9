"""Configuration of the vLLM connector, read from ``kv_connector_extra_config``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llumnix_kv.connector.offload import parse_store_config
from llumnix_kv.errors import InvalidArgumentError

__all__ = ["LlumnixConnectorConfig"]


@dataclass(frozen=True)
class LlumnixConnectorConfig:
    """Connector settings; every field is a key of ``kv_connector_extra_config``."""

    load_timeout_s: float = 30.0
    """Deadline of one load (connect, READ, data landed) on the decode side. A load that
    misses it is reported as failed and its blocks are recomputed or the request fails, per
    vLLM's ``kv_load_failure_policy``."""

    send_timeout_s: float = 120.0
    """How long the prefill side holds a finished request's blocks for the decode side's
    read. Past it the blocks are freed without a read notice, so blocks never leak."""

    transports: tuple[str, ...] = ("local", "shm", "ucx", "tcp")
    """Transports the worker's transfer engine may use, best first (tcp is always there)."""

    listen_host: str = "127.0.0.1"
    """Address the transfer engine's tcp transport (and control channel) listens on; peers on
    other hosts need a routable one."""

    store: dict[str, Any] | None = None
    """Offload of prefix blocks to store tiers, or None for none. Format::

        {"tiers": [{"name": "cpu", "capacity_bytes": 1 << 30},
                   {"name": "disk", "path": "/var/cache/kv", "capacity_bytes": 64 << 30},
                   {"name": "redis", "url": "redis://127.0.0.1:6379/0"}],
         "namespace": "..."}

    Tiers are looked up fastest first (list order); each tier's keys other than ``name`` are
    its config fields (:mod:`llumnix_kv.store`). Every full prompt block a prefill computes is
    saved to every tier that lacks it; a later request loads the blocks after its local
    prefix hit from the first tier holding them. ``namespace`` (default: model, dtypes,
    block size and tensor-parallel size) separates chunks of different models and formats.

    The scheduler looks keys up in the same tier objects the worker fills: both must run in
    one process (vLLM's in-process or single-process executor, tensor_parallel_size 1)."""

    load_store_timeout_s: float = 10.0
    """Deadline of one request's load from the store tiers; blocks not read by then are
    reported as failed."""

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> LlumnixConnectorConfig:
        extra = dict(extra or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise InvalidArgumentError(
                f"unknown kv_connector_extra_config keys {unknown}; known: {sorted(known)}"
            )
        if "transports" in extra:
            extra["transports"] = tuple(extra["transports"])
        if extra.get("store") is not None:
            extra["store"] = parse_store_config(extra["store"])
        for key in ("load_timeout_s", "send_timeout_s", "load_store_timeout_s"):
            if key in extra:
                extra[key] = float(extra[key])
                if extra[key] <= 0:
                    raise InvalidArgumentError(f"{key} must be positive, got {extra[key]}")
        return cls(**extra)
