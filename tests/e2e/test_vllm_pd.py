"""Prefill-decode disaggregation through LlumnixConnector on real vLLM 0.32 engines.

Each engine runs in its own process (vLLM keeps one worker-side connector per process) on a
tiny Llama with dummy weights, greedy, so a decode engine fed by a prefill engine must produce
exactly the tokens of one engine that runs the whole request.
"""

from __future__ import annotations

import inspect
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    import vllm
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
except Exception as exc:  # a broken install raises more than ImportError
    pytest.skip(f"vllm is not importable: {exc}", allow_module_level=True)

from tests.e2e.vllm_engine import EngineProcess, connector_config, write_model

MAX_TOKENS = 8
# Lengths cross 32- and 64-token block boundaries and include a partial last block.
PROMPT_LENGTHS = (7, 33, 64, 100, 130)
DEADLINE_S = 60.0


def prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def engines(model: Path) -> Iterator[dict[str, EngineProcess]]:
    """A reference engine (no connector), a prefill engine (block size 32) and decode
    engines with block sizes 32 and 64, started together."""
    specs: dict[str, tuple[int, dict | None]] = {
        "ref": (32, None),
        "p32": (32, connector_config("kv_producer", send_timeout_s=30)),
        "d32": (32, connector_config("kv_consumer", load_timeout_s=20)),
        "d64": (64, connector_config("kv_consumer", policy="recompute", load_timeout_s=20)),
    }
    started: dict[str, EngineProcess] = {}
    try:
        for name, (block_size, kv) in specs.items():
            started[name] = EngineProcess(model, block_size=block_size, kv_transfer_config=kv)
        for proc in started.values():
            proc.ready()
        yield started
    finally:
        for proc in started.values():
            proc.request_exit()
        for proc in started.values():
            proc.stop()


def prefill(p: EngineProcess, batch: list[list[int]]) -> list[dict[str, Any]]:
    outs = p.call("generate", batch, 1, [{"do_remote_decode": True}] * len(batch))
    params = [o["kv_transfer_params"] for o in outs]
    assert all(kv and kv["do_remote_prefill"] for kv in params), params
    for kv in params:
        # vLLM reports this (the prefill's own prefix hits) as the decode's
        # num_cached_tokens; without it the decode reports the tokens it did not compute.
        kv.pop("remote_prefill_cached_tokens", None)
    return params


def check_pd(engines: dict[str, EngineProcess], decode: str, seed: int) -> None:
    p, d, ref = engines["p32"], engines[decode], engines["ref"]
    batch = prompts(seed)
    want = [o["token_ids"] for o in ref.call("generate", batch, MAX_TOKENS, None)]
    before = d.call("counters")
    params = prefill(p, batch)
    outs = d.call("generate", batch, MAX_TOKENS, params)
    assert [o["token_ids"] for o in outs] == want
    # The decode engine loaded every prompt token and computed only the last one (vLLM
    # recomputes it to sample the first output token).
    after = d.call("counters")
    assert after["tokens_loaded"] - before["tokens_loaded"] == sum(PROMPT_LENGTHS)
    assert after["loads_failed"] == before["loads_failed"]
    for prompt, out in zip(batch, outs, strict=True):
        assert out["num_cached_tokens"] >= len(prompt) - 1
    # Every block is back on both sides: the prefill freed its blocks on the read notices.
    p_after = p.call("drain", DEADLINE_S)
    assert p_after["requests"] == 0 and p_after["holds_pending"] == 0
    assert p_after["free_blocks"] == p_after["total_blocks"]
    assert p_after["holds_expired"] == 0
    d_after = d.call("drain", DEADLINE_S)
    assert d_after["requests"] == 0 and d_after["free_blocks"] == d_after["total_blocks"]


def test_pd_matches_single_engine(engines: dict[str, EngineProcess]) -> None:
    check_pd(engines, "d32", seed=1)


def test_pd_with_local_prefix_hits(engines: dict[str, EngineProcess]) -> None:
    """The same prompts again: the decode engine has their leading full blocks cached and
    loads only the rest of each prompt."""
    p, d, ref = engines["p32"], engines["d32"], engines["ref"]
    batch = prompts(1)
    want = [o["token_ids"] for o in ref.call("generate", batch, MAX_TOKENS, None)]
    before = d.call("counters")
    outs = d.call("generate", batch, MAX_TOKENS, prefill(p, batch))
    assert [o["token_ids"] for o in outs] == want
    after = d.call("counters")
    loaded = after["tokens_loaded"] - before["tokens_loaded"]
    assert 0 < loaded < sum(PROMPT_LENGTHS)
    assert after["loads_done"] - before["loads_done"] == len(batch)
    assert after["loads_failed"] == before["loads_failed"]
    for prompt, out in zip(batch, outs, strict=True):
        assert out["num_cached_tokens"] >= len(prompt) - 1
    p_after = p.call("drain", DEADLINE_S)
    assert p_after["free_blocks"] == p_after["total_blocks"] and p_after["holds_expired"] == 0


def test_pd_heterogeneous_block_sizes(engines: dict[str, EngineProcess]) -> None:
    check_pd(engines, "d64", seed=2)


def test_decode_abort_frees_prefill_blocks(engines: dict[str, EngineProcess]) -> None:
    """A decode request aborted while its load is in flight, and one aborted before it was
    scheduled: both engines get every block back, and the prefill frees on read notices
    rather than its deadline."""
    p, d = engines["p32"], engines["d64"]
    batch = prompts(3)
    params = prefill(p, batch[3:5])
    noticed = p.call("counters")["reads_noticed"]
    d.call("start_and_abort", batch[3], params[0], 1)  # load submitted, then aborted
    d.call("start_and_abort", batch[4], params[1], 0)  # aborted before scheduling
    d_after = d.call("drain", DEADLINE_S)
    assert d_after["requests"] == 0 and d_after["free_blocks"] == d_after["total_blocks"]
    p_after = p.call("drain", DEADLINE_S)
    assert p_after["requests"] == 0 and p_after["free_blocks"] == p_after["total_blocks"]
    assert p_after["reads_noticed"] - noticed == 2
    assert p_after["holds_expired"] == 0


def test_prefill_killed_decode_recomputes(model: Path, engines: dict[str, EngineProcess]) -> None:
    """The prefill process dies after handing off: the decode's load fails within its
    deadline and, with kv_load_failure_policy="recompute", the decode engine recomputes the
    prompt and still produces the reference tokens."""
    d, ref = engines["d64"], engines["ref"]
    batch = prompts(4)[:2]
    want = [o["token_ids"] for o in ref.call("generate", batch, MAX_TOKENS, None)]
    with EngineProcess(
        model, block_size=32, kv_transfer_config=connector_config("kv_producer")
    ) as doomed:
        params = prefill(doomed, batch)
        doomed.kill()
    before = d.call("counters")
    t0 = time.monotonic()
    outs = d.call("generate", batch, MAX_TOKENS, params, timeout=DEADLINE_S)
    assert time.monotonic() - t0 < DEADLINE_S
    assert [o["token_ids"] for o in outs] == want
    after = d.call("counters")
    assert after["loads_failed"] - before["loads_failed"] == len(batch)
    assert after["tokens_loaded"] == before["tokens_loaded"]
    drained = d.call("drain", DEADLINE_S)
    assert drained["free_blocks"] == drained["total_blocks"]


# Parameter names and kinds of KVConnectorBase_V1's abstract methods and of the optional
# hooks LlumnixConnector overrides, as of vLLM 0.32.0.
BASE_API = {
    "build_connector_meta": ("self", "scheduler_output"),
    "get_num_new_matched_tokens": ("self", "request", "num_computed_tokens"),
    "save_kv_layer": ("self", "layer_name", "kv_layer", "attn_metadata", "**kwargs"),
    "start_load_kv": ("self", "forward_context", "**kwargs"),
    "update_state_after_alloc": ("self", "request", "blocks", "num_external_tokens"),
    "wait_for_layer_load": ("self", "layer_name"),
    "wait_for_save": ("self",),
    "__init__": ("self", "vllm_config", "role", "kv_cache_config"),
    "register_kv_caches": ("self", "kv_caches"),
    "get_handshake_metadata": ("self",),
    "set_xfer_handshake_metadata": ("self", "metadata"),
    "get_finished": ("self", "finished_req_ids"),
    "get_block_ids_with_load_errors": ("self",),
    "request_finished": ("self", "request", "block_ids"),
    "shutdown": ("self",),
}
ABSTRACT = {
    "build_connector_meta",
    "get_num_new_matched_tokens",
    "save_kv_layer",
    "start_load_kv",
    "update_state_after_alloc",
    "wait_for_layer_load",
    "wait_for_save",
}


def _params(fn: Any) -> tuple[str, ...]:
    out = []
    for p in inspect.signature(fn).parameters.values():
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        out.append(prefix + p.name)
    return tuple(out)


def test_base_class_api_snapshot() -> None:
    """Fails on a vLLM upgrade that changes the connector contract this plugin implements."""
    assert vllm.__version__.startswith("0.32."), vllm.__version__
    assert set(KVConnectorBase_V1.__abstractmethods__) == ABSTRACT
    got = {name: _params(getattr(KVConnectorBase_V1, name)) for name in BASE_API}
    assert got == BASE_API

    from llumnix_kv.plugins.vllm import LlumnixConnector

    assert not getattr(LlumnixConnector, "__abstractmethods__", None)
    for name, params in BASE_API.items():
        assert _params(getattr(LlumnixConnector, name)) == params, name
