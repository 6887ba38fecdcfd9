"""Configuration of the vLLM connector, read from ``kv_connector_extra_config``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
        for key in ("load_timeout_s", "send_timeout_s"):
            if key in extra:
                extra[key] = float(extra[key])
                if extra[key] <= 0:
                    raise InvalidArgumentError(f"{key} must be positive, got {extra[key]}")
        return cls(**extra)
