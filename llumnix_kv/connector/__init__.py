"""Engine-agnostic core of the hybrid connector (see DESIGN.md, "Control plane of the KV
path").

Per request it tracks KV jobs (:mod:`llumnix_kv.connector.jobs`): a *load* pulls a request's
tokens from a peer instance into blocks this instance allocated; a *send* holds the blocks a
peer will read until the peer says it read them or a deadline passes. The hand-off metadata a
prefill instance gives a decode instance is a :class:`PdHandoff`. Engine plugins
(:mod:`llumnix_kv.plugins`) translate their engine's hooks into these calls; nothing here
imports an engine. :mod:`llumnix_kv.connector.offload` saves full blocks to the store tiers
(:mod:`llumnix_kv.store`) and loads them back on a later prefix hit.

Invariant: no wait without a deadline, and every deadline is enforced by the engine's own
step. Nothing here blocks a step (connects, notices and store reads run on background
threads; transfers are asynchronous batches that a step polls). Every load ends, by its
deadline at the latest, as done or as failed for exactly the local blocks it was filling (the
engine recomputes them or fails the request); a failed or abandoned load writes nothing
after it was reported. Every hold of blocks for a reader ends at its deadline, and a reader
never reads past it (:func:`~llumnix_kv.connector.pd.load_deadline`).
"""

from __future__ import annotations

from llumnix_kv.connector.handoff import PdHandoff
from llumnix_kv.connector.jobs import JobState, LoadJob, SendHold
from llumnix_kv.connector.offload import (
    BlockOffloader,
    StoreStack,
    acquire_stack,
    namespace_tag,
    parse_store_config,
    release_stack,
)
from llumnix_kv.connector.pd import (
    LoadOutcome,
    PdPuller,
    PdSendLedger,
    parse_read_notice,
    read_notice,
)

__all__ = [
    "BlockOffloader",
    "JobState",
    "LoadJob",
    "LoadOutcome",
    "PdHandoff",
    "PdPuller",
    "PdSendLedger",
    "SendHold",
    "StoreStack",
    "acquire_stack",
    "namespace_tag",
    "parse_read_notice",
    "parse_store_config",
    "read_notice",
    "release_stack",
]
