from __future__ import annotations

import numpy as np
import pytest

from llumnix_kv.errors import CorruptionError, InvalidArgumentError
from llumnix_kv.store import chained_chunk_keys, create_tier, record, register_tier, tier_names
from llumnix_kv.store.cpu import CpuTier, CpuTierConfig


def test_builtin_tiers_are_registered() -> None:
    assert {"cpu", "disk", "redis"} <= set(tier_names())
    tier = create_tier("cpu", CpuTierConfig(capacity_bytes=1024))
    assert isinstance(tier, CpuTier)
    tier = create_tier("cpu", {"capacity_bytes": 1024, "chunk_bytes": 256})
    assert tier.stats()["capacity_bytes"] == 1024


def test_module_path_escape_hatch_and_errors() -> None:
    tier = create_tier("llumnix_kv.store.cpu:CpuTier", {"capacity_bytes": 16})
    assert tier.name == "cpu"
    with pytest.raises(InvalidArgumentError, match="unknown store tier"):
        create_tier("nope", {})
    with pytest.raises(InvalidArgumentError, match="cannot load"):
        create_tier("no.such.module:Tier", {})
    with pytest.raises(InvalidArgumentError, match="not a StoreTier"):
        create_tier("llumnix_kv.store.cpu:CpuTierConfig", {})
    with pytest.raises(InvalidArgumentError, match="bad config"):
        create_tier("cpu", {"capacity": 1})
    with pytest.raises(InvalidArgumentError, match="already registered"):
        register_tier("cpu", "llumnix_kv.store.cpu", "CpuTier")


def test_chained_keys_depend_on_the_whole_prefix() -> None:
    tokens = list(range(10))
    keys = chained_chunk_keys(tokens, 4)
    assert len(keys) == 2 and all(len(k) == 32 for k in keys)  # the 2-token tail has no key
    assert chained_chunk_keys(np.arange(8), 4) == keys
    assert chained_chunk_keys([*tokens[:8], 99], 4) == keys
    changed = chained_chunk_keys([99, *tokens[1:]], 4)
    assert changed[0] != keys[0] and changed[1] != keys[1]  # chunk 1 is the same tokens
    assert chained_chunk_keys(tokens, 4, salt=b"model-b") != keys
    assert chained_chunk_keys([], 4) == []
    with pytest.raises(InvalidArgumentError):
        chained_chunk_keys(tokens, 0)


def test_record_detects_every_kind_of_damage() -> None:
    payload = np.arange(100, dtype=np.uint8)
    blob = record.encode_header(b"key", payload) + payload.tobytes()
    assert bytes(record.decode(blob, b"key")) == payload.tobytes()
    for damaged in (
        blob[:-1],  # truncated
        blob + b"x",  # trailing bytes
        b"XKVC" + blob[4:],  # magic
        blob[:-1] + bytes([blob[-1] ^ 1]),  # payload bit flip
        blob[:20] + b"kez" + blob[23:],  # stored key bit flip
    ):
        with pytest.raises(CorruptionError):
            record.decode(damaged, b"key")
    with pytest.raises(CorruptionError):
        record.decode(blob, b"other")
    with pytest.raises(CorruptionError):
        record.decode(b"short", b"key")
