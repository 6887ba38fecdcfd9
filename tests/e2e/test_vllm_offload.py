"""Store offload through LlumnixConnector on real vLLM 0.32 engines.

Engine A (cpu, disk and Redis tiers) runs prompts, which saves their full blocks to every
tier; after A resets its prefix cache the same prompts are served from the host-memory tier.
Engine B (a new process: its host-memory tier is empty) opens A's disk directory and is served
from disk; engine C (a new process with an empty disk directory) is served from Redis. Every
run produces the tokens of A's first run, the loaded blocks hold the KV A computed, and vLLM
counts the loaded tokens as cached (their prefill is skipped). Engine D's tier loses every
chunk between lookup and load: the failed blocks are recomputed. Engine A also prefills for C
(pd+store): C reads the full blocks from Redis and only the rest from A. A chunk file corrupted
on disk is rejected by its checksum and its blocks are recomputed, never loaded.

The first tests check the engine-agnostic core (:mod:`llumnix_kv.connector.offload`) on host
tensors, without engines.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from llumnix_kv.connector.offload import (
    BlockOffloader,
    LoadGuard,
    StoreStack,
    acquire_stack,
    namespace_tag,
    parse_store_config,
    release_stack,
)
from llumnix_kv.errors import CorruptionError, InvalidArgumentError
from llumnix_kv.layout import vllm_cpu
from llumnix_kv.store import create_tier, record
from llumnix_kv.store.disk import file_name
from tests.e2e.offload_engine import OffloadEngineProcess
from tests.e2e.vllm_engine import connector_config, write_model
from tests.redis_server import REDIS_SERVER, RedisProcess

try:
    import vllm  # noqa: F401

    ENGINES_MISSING = ""
except Exception as exc:  # a broken install raises more than ImportError
    ENGINES_MISSING = f"vllm is not importable: {exc}"
needs_vllm = pytest.mark.skipif(bool(ENGINES_MISSING), reason=ENGINES_MISSING)
if not ENGINES_MISSING and REDIS_SERVER is None:
    ENGINES_MISSING = "redis-server is not installed"
if not ENGINES_MISSING and importlib.util.find_spec("redis") is None:
    ENGINES_MISSING = "the redis client is not installed"
needs_engines = pytest.mark.skipif(bool(ENGINES_MISSING), reason=ENGINES_MISSING)

BLOCK = 32
MAX_TOKENS = 8
# Shorter than a block, one block plus a partial one, exactly two blocks (the last token is
# recomputed), and longer prompts with partial last blocks.
PROMPT_LENGTHS = (7, 40, 64, 100, 130)
FULL_BLOCKS = sum(n // BLOCK for n in PROMPT_LENGTHS)
DEADLINE_S = 60.0


def prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in PROMPT_LENGTHS]


def expected_cached(n: int) -> int:
    """Tokens served from the store: the full blocks, one token short of the prompt."""
    return min(n // BLOCK * BLOCK, n - 1)


def store_config(disk: Path, redis_url: str) -> dict[str, Any]:
    return connector_config(
        "kv_both",
        policy="fail",
        store={
            "tiers": [
                {"name": "cpu", "capacity_bytes": 64 << 20},
                {"name": "disk", "path": str(disk), "capacity_bytes": 256 << 20, "fsync": False},
                {"name": "redis", "url": redis_url, "namespace": "offload-test"},
            ]
        },
    )


# ---------------------------------------------------------------- core, no engines


def cpu_tier(capacity: int = 1 << 20) -> Any:
    return create_tier("cpu", {"capacity_bytes": capacity})


def test_stack_match_load_promote_save() -> None:
    upper, lower = cpu_tier(), cpu_tier()
    stack = StoreStack([("upper", upper), ("lower", lower)])
    keys = [b"k0", b"k1", b"k2", b"k3"]
    vals = [np.full(64, i, dtype=np.uint8) for i in range(4)]
    lower.put(keys[:2], vals[:2]).result(5.0)
    upper.put(keys[2:3], vals[2:3]).result(5.0)
    # k0, k1 in the lower tier, k2 in the upper one, k3 nowhere.
    assert stack.match(keys) == 3
    assert stack.match(keys[1:]) == 2
    assert stack.match([b"k3", b"k0"]) == 0
    outs = [np.zeros(64, dtype=np.uint8) for _ in keys]
    assert stack.load(keys, outs, timeout=5.0) == ["lower", "lower", "upper", None]
    for i in range(3):
        assert (outs[i] == i).all()
    assert stack.flush(5.0)
    assert upper.contains(keys) == [True, True, True, False]  # promoted
    stack.save([b"k3"], [vals[3]])
    assert stack.flush(5.0)
    assert upper.contains([b"k3"]) == lower.contains([b"k3"]) == [True]
    stats = stack.stats()
    assert stats["store_hits_upper"] == 1 and stats["store_hits_lower"] == 2
    assert stats["store_chunks_saved"] == 1 and stats["store_save_errors"] == 0
    stack.close()


def cache(num_blocks: int = 8, layers: int = 2) -> list[torch.Tensor]:
    """CPU_ATTN-shaped caches ([blocks, kv_heads, block, 2 * head]) in one buffer."""
    backing = torch.zeros(layers, num_blocks, 2, 32, 64, dtype=torch.bfloat16)
    return [backing[i] for i in range(layers)]


def test_block_offloader_round_trip_and_misses() -> None:
    src, dst = cache(), cache()
    gen = torch.Generator().manual_seed(0)
    for t in src:
        t.copy_(torch.randn(t.shape, generator=gen).to(torch.bfloat16))
    stack = StoreStack([("cpu", cpu_tier())])
    saver = BlockOffloader(vllm_cpu(src), stack)
    assert saver.chunk_bytes == 2 * 2 * 32 * 64 * 2  # layers, heads, tokens, K+V, bf16
    saver.save([3, 5], [b"a", b"b"])
    assert stack.flush(5.0)
    loader = BlockOffloader(vllm_cpu(dst), stack)
    assert loader.load([1, 2], [b"a", b"b"], timeout=5.0, tokens=64) == []
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(d[1], s[3]) and torch.equal(d[2], s[5])
    assert loader.tokens_loaded == 64 and loader.blocks_loaded == 2
    # A miss fails its block and every block after it (a prefix is contiguous).
    assert loader.load([4, 6, 7], [b"a", b"missing", b"b"], timeout=5.0, tokens=96) == [6, 7]
    assert loader.blocks_failed == 2 and loader.tokens_loaded == 64
    stack.close()


def test_abandoned_store_load_writes_no_block() -> None:
    """The engine gives up on a store load past its deadline (a tier that does not return):
    once ``abandon`` returned, the load's thread writes none of the blocks, which may be
    recomputed or reused at once."""
    src, dst = cache(), cache()
    for t in src:
        t.fill_(1.0)
    stack = StoreStack([("cpu", cpu_tier())])
    BlockOffloader(vllm_cpu(src), stack).save([0, 1], [b"a", b"b"])
    assert stack.flush(5.0)
    loader = BlockOffloader(vllm_cpu(dst), stack)
    guard = LoadGuard()
    guard.abandon()
    assert loader.load([2, 3], [b"a", b"b"], timeout=5.0, tokens=64, guard=guard) == [2, 3]
    assert all(not t.any() for t in dst) and loader.tokens_loaded == 0
    stack.close()


def test_store_config_and_shared_stacks(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError):
        parse_store_config({"tiers": []})
    with pytest.raises(InvalidArgumentError):
        parse_store_config({"tiers": [{"capacity_bytes": 1}]})
    with pytest.raises(InvalidArgumentError):
        parse_store_config({"tiers": [{"name": "cpu"}], "other": 1})
    tiers = parse_store_config(
        {"tiers": [{"name": "disk", "path": str(tmp_path), "capacity_bytes": 1 << 20}]}
    )["tiers"]
    # One stack per tier list per process: the disk directory is opened once.
    first, second = acquire_stack(tiers), acquire_stack(tiers)
    assert first is second
    release_stack(first)
    first.save([b"k"], [np.ones(16, dtype=np.uint8)])
    release_stack(second)  # the last reference flushes and closes
    third = acquire_stack(tiers)  # reopens the directory, which holds the chunk
    assert third is not first and third.match([b"k"]) == 1
    release_stack(third)
    assert namespace_tag("a") != namespace_tag("b") and len(namespace_tag("a")) == 8


# ---------------------------------------------------------------- real engines


def delta(after: dict[str, Any], before: dict[str, Any], key: str) -> int:
    return int(after[key]) - int(before[key])


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisProcess]:
    server = RedisProcess()
    try:
        yield server
    finally:
        server.stop()


def run(engine: OffloadEngineProcess, batch: list[list[int]]) -> list[dict[str, Any]]:
    return list(engine.call("generate", batch, MAX_TOKENS, None, timeout=DEADLINE_S))


def digests(engine: OffloadEngineProcess, batch: list[list[int]]) -> list[list[str | None]]:
    """KV digests of the blocks the store serves, except a block holding the prompt's last
    token (recomputed, in another kernel path, after the load)."""
    return [engine.call("kv_digests", p, BLOCK)[: (len(p) - 1) // BLOCK] for p in batch]


def check_served(
    engine: OffloadEngineProcess,
    batch: list[list[int]],
    want: list[list[int]],
    want_kv: list[list[str | None]],
    tier: str,
) -> None:
    """Runs ``batch`` on ``engine`` with an empty local prefix cache: every full block comes
    from ``tier``, holds the KV engine A computed, and the outputs are ``want``."""
    before = engine.call("counters")
    outs = run(engine, batch)
    after = engine.call("counters")
    assert [o["token_ids"] for o in outs] == want
    for name in ("cpu", "disk", "redis"):
        assert delta(after, before, f"store_hits_{name}") == (FULL_BLOCKS if name == tier else 0), (
            name,
            after,
        )
    assert delta(after, before, "store_blocks_failed") == 0
    loaded = delta(after, before, "store_tokens_loaded")
    assert loaded == sum(expected_cached(len(p)) for p in batch)
    # vLLM skipped the prefill of the loaded tokens.
    assert [o["num_cached_tokens"] for o in outs] == [expected_cached(len(p)) for p in batch]
    assert digests(engine, batch) == want_kv
    drained = engine.call("drain", DEADLINE_S)
    assert drained["requests"] == 0 and drained["free_blocks"] == drained["total_blocks"]


def check_failed_loads_recomputed(
    engine: OffloadEngineProcess, batch: list[list[int]], want: list[list[int]]
) -> None:
    """Loads that fail after the scheduler counted them: their blocks are reported and, with
    kv_load_failure_policy="recompute", vLLM recomputes them and the outputs are ``want``."""
    before = engine.call("counters")
    outs = run(engine, batch)
    after = engine.call("counters")
    assert delta(after, before, "store_blocks_failed") == FULL_BLOCKS
    assert delta(after, before, "store_tokens_loaded") == 0
    assert [o["token_ids"] for o in outs] == want
    drained = engine.call("drain", DEADLINE_S)
    assert drained["requests"] == 0 and drained["free_blocks"] == drained["total_blocks"]


def check_pd_store(
    prefill: OffloadEngineProcess,
    decode: OffloadEngineProcess,
    batch: list[list[int]],
    want: list[list[int]],
    want_kv: list[list[str | None]],
) -> None:
    outs = prefill.call("generate", batch, 1, [{"do_remote_decode": True}] * len(batch))
    params = [o["kv_transfer_params"] for o in outs]
    assert all(kv and kv["do_remote_prefill"] for kv in params), params
    for kv in params:
        kv.pop("remote_prefill_cached_tokens", None)
    before = decode.call("counters")
    outs = decode.call("generate", batch, MAX_TOKENS, params, timeout=DEADLINE_S)
    after = decode.call("counters")
    assert [o["token_ids"] for o in outs] == want
    full_tokens = sum(len(p) // BLOCK * BLOCK for p in batch)
    assert delta(after, before, "store_hits_redis") == full_tokens // BLOCK
    assert delta(after, before, "store_hits_cpu") == delta(after, before, "store_hits_disk") == 0
    assert delta(after, before, "store_tokens_loaded") == full_tokens
    # Only the tokens after the last full block came from the prefill.
    assert delta(after, before, "tokens_loaded") == sum(len(p) for p in batch) - full_tokens
    assert delta(after, before, "loads_done") == len(batch)
    assert delta(after, before, "loads_failed") == 0
    for prompt, out in zip(batch, outs, strict=True):
        assert out["num_cached_tokens"] >= len(prompt) - 1
    assert digests(decode, batch) == want_kv
    p_after = prefill.call("drain", DEADLINE_S)
    assert p_after["requests"] == 0 and p_after["holds_pending"] == 0
    assert p_after["free_blocks"] == p_after["total_blocks"] and p_after["holds_expired"] == 0
    d_after = decode.call("drain", DEADLINE_S)
    assert d_after["requests"] == 0 and d_after["free_blocks"] == d_after["total_blocks"]


@needs_engines
def test_offload_cpu_disk_redis(model: Path, redis_server: RedisProcess, tmp_path: Path) -> None:
    batch = prompts(11)
    disk_a, disk_c = tmp_path / "disk-a", tmp_path / "disk-c"
    started: list[OffloadEngineProcess] = []
    try:
        # A and C start together; C's disk directory stays empty.
        a = OffloadEngineProcess(
            model, block_size=BLOCK, kv_transfer_config=store_config(disk_a, redis_server.url)
        )
        started.append(a)
        c = OffloadEngineProcess(
            model, block_size=BLOCK, kv_transfer_config=store_config(disk_c, redis_server.url)
        )
        started.append(c)
        # D's only tier claims every chunk and returns none: every load fails.
        forgetful = connector_config(
            "kv_both",
            policy="recompute",
            store={"tiers": [{"name": "tests.e2e.offload_engine:ForgetfulTier"}]},
        )
        d = OffloadEngineProcess(model, block_size=BLOCK, kv_transfer_config=forgetful)
        started.append(d)
        a.ready()
        c.ready()

        # A computes the prompts and saves every full block to every tier.
        first = run(a, batch)
        want = [o["token_ids"] for o in first]
        assert all(len(t) == MAX_TOKENS for t in want)
        assert [o["num_cached_tokens"] for o in first] == [0] * len(batch)
        want_kv = digests(a, batch)
        assert all(x is not None for xs in want_kv for x in xs)
        assert a.call("flush_store", DEADLINE_S)
        counters = a.call("counters")
        assert counters["store_chunks_saved"] == FULL_BLOCKS
        assert counters["store_save_errors"] == 0

        # Same engine, local prefix cache reset: served from the host-memory tier.
        assert a.call("reset_prefix_cache")
        check_served(a, batch, want, want_kv, "cpu")

        # pd+store: A computes other prompts (saving them), then prefills them for C, which
        # reads their full blocks from Redis and only the rest of each prompt from A.
        batch2 = prompts(12)
        want2 = [o["token_ids"] for o in run(a, batch2)]
        want2_kv = digests(a, batch2)
        assert a.call("flush_store", DEADLINE_S)
        check_pd_store(a, c, batch2, want2, want2_kv)
        a.stop()  # releases the disk directory for B

        # B: a new process (empty host-memory tier) on A's disk directory.
        b = OffloadEngineProcess(
            model, block_size=BLOCK, kv_transfer_config=store_config(disk_a, redis_server.url)
        )
        started.append(b)
        # C meanwhile: empty host-memory and disk tiers, served from Redis.
        check_served(c, batch, want, want_kv, "redis")
        d.ready()
        check_failed_loads_recomputed(d, batch, want)
        b.ready()
        check_served(b, batch, want, want_kv, "disk")
    finally:
        for proc in started:
            proc.request_exit()
        for proc in started:
            proc.stop()


# ---------------------------------------------------------------- a corrupted disk chunk

CORRUPT_NAMESPACE = "corrupt-chunk-test"


def disk_store_config(disk: Path, policy: str) -> dict[str, Any]:
    return connector_config(
        "kv_both",
        policy=policy,
        store={
            "tiers": [
                {"name": "cpu", "capacity_bytes": 64 << 20},
                {"name": "disk", "path": str(disk), "capacity_bytes": 256 << 20, "fsync": False},
            ],
            "namespace": CORRUPT_NAMESPACE,
        },
    )


def flip_middle(path: Path, nbytes: int = 16) -> None:
    """Inverts ``nbytes`` bytes in the middle of ``path``; its size is unchanged."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + nbytes] = bytes(b ^ 0xFF for b in data[mid : mid + nbytes])
    with open(path, "r+b") as f:
        f.write(data)


@needs_vllm
def test_corrupted_disk_chunk_is_recomputed(model: Path, tmp_path: Path) -> None:
    """Engine A saves the prompts' blocks to disk; one chunk file is then corrupted in place
    (same size). Engine B, a new process with an empty host-memory tier on A's directory,
    loads the prompts from disk: the disk tier's checksum rejects the corrupted chunk (a miss),
    the connector reports it and every later block of its prompt as failed, and vLLM
    recomputes them (kv_load_failure_policy="recompute"): the outputs are A's, every block
    holds A's KV (loaded before the corrupted block, recomputed from it on), the corrupted
    block does not hold the corrupted bytes, and the recomputed blocks are saved again."""
    batch = prompts(21)
    victim = len(batch) - 1  # the 130-token prompt: four full blocks
    bad = 1  # its second block; blocks 1..3 cannot be loaded (a prefix is contiguous)
    disk = tmp_path / "disk"
    started: list[OffloadEngineProcess] = []
    try:
        a = OffloadEngineProcess(
            model, block_size=BLOCK, kv_transfer_config=disk_store_config(disk, "fail")
        )
        started.append(a)
        a.ready()
        first = run(a, batch)
        want = [o["token_ids"] for o in first]
        want_kv = digests(a, batch)
        assert a.call("flush_store", DEADLINE_S)
        assert a.call("counters")["store_chunks_saved"] == FULL_BLOCKS
        hashes = a.call("block_hashes", batch[victim], BLOCK)
        a.stop()  # releases the disk directory for B

        key = namespace_tag(CORRUPT_NAMESPACE) + bytes.fromhex(hashes[bad])
        chunk = disk / file_name(key)
        size = chunk.stat().st_size
        payload = bytes(record.decode(chunk.read_bytes(), key))
        # A chunk is the block's KV in the order kv_digests hashes it: loading these bytes
        # would give the block this digest.
        assert hashlib.sha256(payload).hexdigest() == want_kv[victim][bad]
        flip_middle(chunk)
        assert chunk.stat().st_size == size
        with pytest.raises(CorruptionError):
            record.decode(chunk.read_bytes(), key)
        corrupted = chunk.read_bytes()[record.HEADER.size + len(key) :]
        corrupted_digest = hashlib.sha256(corrupted).hexdigest()
        assert corrupted_digest != want_kv[victim][bad]

        b = OffloadEngineProcess(
            model, block_size=BLOCK, kv_transfer_config=disk_store_config(disk, "recompute")
        )
        started.append(b)
        b.ready()
        before = b.call("counters")
        outs = run(b, batch)
        after = b.call("counters")
        assert [o["token_ids"] for o in outs] == want
        # The corrupted chunk is a disk miss (the other chunks are hits); its block and the
        # blocks after it in its prompt failed, every other block was loaded.
        lost = len(batch[victim]) // BLOCK - bad
        assert delta(after, before, "store_hits_disk") == FULL_BLOCKS - 1
        assert delta(after, before, "store_disk_corrupt") == 1  # the tier's own check
        assert delta(after, before, "store_blocks_failed") == lost
        assert delta(after, before, "store_blocks_loaded") == FULL_BLOCKS - lost
        assert delta(after, before, "store_tokens_loaded") == sum(
            expected_cached(len(p)) for i, p in enumerate(batch) if i != victim
        )
        # Every block holds A's KV: loaded, or recomputed (same kernels, same values) for the
        # corrupted block and those after it; never the corrupted bytes.
        got_kv = digests(b, batch)
        assert got_kv == want_kv
        assert got_kv[victim][bad] != corrupted_digest
        # The disk tier dropped the corrupted file; the recomputed blocks were saved again, so
        # the chunk is back, valid and holding A's KV.
        assert b.call("flush_store", DEADLINE_S)
        assert bytes(record.decode(chunk.read_bytes(), key)) == payload
        drained = b.call("drain", DEADLINE_S)
        assert drained["requests"] == 0 and drained["free_blocks"] == drained["total_blocks"]
    finally:
        for proc in started:
            proc.request_exit()
        for proc in started:
            proc.stop()
