"""KV store tiers: content-addressed chunks in host memory, on local disk and on Redis.

The store backend of the hybrid connector gathers one chunk (the KV of ``chunk_tokens``
consecutive tokens, all layers, one contiguous buffer) into a staging buffer and puts it under
its chained prefix hash; later it gets hits back into staging buffers and scatters them into the
paged cache. See :mod:`llumnix_kv.store.base` for the contract::

    tier = create_tier("disk", {"path": "/var/cache/kv", "capacity_bytes": 64 << 30})
    keys = chained_chunk_keys(token_ids, chunk_tokens=256, salt=b"model-a/bf16")
    tier.put(keys, staging_buffers).result(timeout=5.0)
    hits = tier.get(keys, staging_buffers).result(timeout=5.0)

Tiers: ``cpu`` (:mod:`.cpu`), ``disk`` (:mod:`.disk`), ``redis`` (:mod:`.redis`); more can be
registered with :func:`register_tier` or named as ``"package.module:ClassName"``.
"""

from __future__ import annotations

from llumnix_kv.store.base import (
    ChunkKey,
    StoreTier,
    TierClosedError,
    TierUnavailableError,
)
from llumnix_kv.store.keys import chained_chunk_keys
from llumnix_kv.store.registry import create_tier, register_tier, tier_class, tier_names

__all__ = [
    "ChunkKey",
    "StoreTier",
    "TierClosedError",
    "TierUnavailableError",
    "chained_chunk_keys",
    "create_tier",
    "register_tier",
    "tier_class",
    "tier_names",
]
