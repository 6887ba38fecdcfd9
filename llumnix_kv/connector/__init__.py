"""Engine-agnostic core of the hybrid connector (see DESIGN.md, "Control plane of the KV
path").

Per request it tracks KV jobs (:mod:`llumnix_kv.connector.jobs`): a *load* pulls a request's
tokens from a peer instance into blocks this instance allocated; a *send* holds the blocks a
peer will read until the peer says it read them or a deadline passes. The hand-off metadata a
prefill instance gives a decode instance is a :class:`PdHandoff`. Engine plugins
(:mod:`llumnix_kv.plugins`) translate their engine's hooks into these calls; nothing here
imports an engine.
"""

from __future__ import annotations

from llumnix_kv.connector.handoff import PdHandoff
from llumnix_kv.connector.jobs import JobState, LoadJob, SendHold
from llumnix_kv.connector.pd import (
    LoadOutcome,
    PdPuller,
    PdSendLedger,
    parse_read_notice,
    read_notice,
)

__all__ = [
    "JobState",
    "LoadJob",
    "LoadOutcome",
    "PdHandoff",
    "PdPuller",
    "PdSendLedger",
    "SendHold",
    "parse_read_notice",
    "read_notice",
]
