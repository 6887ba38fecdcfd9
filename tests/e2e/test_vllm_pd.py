"""Prefill-decode disaggregation through LlumnixConnector on real vLLM 0.32 engines.

Each engine runs in its own process (vLLM keeps one worker-side connector per process) on a
tiny Llama with dummy weights, greedy, so a decode engine fed by a prefill engine must produce
exactly the tokens of one engine that runs the whole request.
"""

from __future__ import annotations

import inspect
import random
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

try:
    import vllm
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
except Exception as exc:  # a broken install raises more than ImportError
    pytest.skip(f"vllm is not importable: {exc}", allow_module_level=True)

from tests.e2e.offload_engine import OffloadEngineProcess
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
            # OffloadEngineProcess: also digests the KV it caches.
            started[name] = OffloadEngineProcess(
                model, block_size=block_size, kv_transfer_config=kv
            )
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


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_prefill_killed_decode_recomputes(
    model: Path, engines: dict[str, EngineProcess], mode: str
) -> None:
    """The prefill process dies (pull: after handing off; push: before computing): the
    decode's load fails within its deadline and, with kv_load_failure_policy="recompute",
    the decode engine recomputes the prompt and still produces the reference tokens."""
    d, ref = engines["d64"], engines["ref"]
    batch = prompts(4 if mode == "pull" else 8)[:2]
    want = [o["token_ids"] for o in ref.call("generate", batch, MAX_TOKENS, None)]
    with EngineProcess(
        model, block_size=32, kv_transfer_config=connector_config("kv_producer")
    ) as doomed:
        if mode == "pull":
            params = prefill(doomed, batch)
        else:
            _, params = push_params(probe(doomed), len(batch))
        doomed.kill()
    before = d.call("counters")
    t0 = time.monotonic()
    outs = d.call("generate", batch, MAX_TOKENS, params, timeout=DEADLINE_S)
    assert time.monotonic() - t0 < DEADLINE_S
    assert [o["token_ids"] for o in outs] == want
    after = d.call("drain", DEADLINE_S)
    assert after["loads_failed"] - before["loads_failed"] == len(batch)
    assert after["tokens_loaded"] == before["tokens_loaded"]
    assert after["free_blocks"] == after["total_blocks"]


def probe(p: EngineProcess) -> list[dict[str, Any]]:
    """The prefill's push endpoints (what a proxy asks a prefill instance once)."""
    (out,) = p.call("generate", [[3, 4, 5]], 1, [{"llumnix_probe": True}])
    endpoints = out["kv_transfer_params"]["llumnix_endpoint"]
    assert endpoints and all(e["engine_name"] and e["descriptor"] for e in endpoints)
    return endpoints


def push_params(endpoints: list[dict[str, Any]], n: int) -> tuple[list[dict], list[dict]]:
    """(prefill params, decode params) of ``n`` push-mode requests."""
    ids = [uuid.uuid4().hex for _ in range(n)]
    p_params = [{"do_remote_decode": True, "llumnix_push": {"transfer_id": t}} for t in ids]
    d_params = [
        {"do_remote_prefill": True, "llumnix_push": {"transfer_id": t, "prefill": endpoints}}
        for t in ids
    ]
    return p_params, d_params


def run_push(
    p: EngineProcess, d: EngineProcess, batch: list[list[int]], d_lead_s: float = 1.0
) -> list[dict[str, Any]]:
    """Sends the batch to the decode, then (``d_lead_s`` later, so the decode's readies
    are waiting) to the prefill; returns the decode's outputs."""
    p_params, d_params = push_params(probe(p), len(batch))
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(d.call, "generate", batch, MAX_TOKENS, d_params, timeout=DEADLINE_S)
        time.sleep(d_lead_s)
        p.call("generate", batch, 1, p_params, timeout=DEADLINE_S)
        # LLM.generate stops stepping when its requests finish; a server's engine loop keeps
        # stepping while finished requests hold blocks, which drain does here.
        p.call("drain", DEADLINE_S, timeout=DEADLINE_S + 10)
        return fut.result(timeout=DEADLINE_S + 10)


def check_push(engines: dict[str, EngineProcess], decode: str, seed: int) -> None:
    p, d, ref = engines["p32"], engines[decode], engines["ref"]
    batch = prompts(seed)
    want = [o["token_ids"] for o in ref.call("generate", batch, MAX_TOKENS, None)]
    d_before, p_before = d.call("counters"), p.call("counters")
    outs = run_push(p, d, batch)
    assert [o["token_ids"] for o in outs] == want
    d_after = d.call("drain", DEADLINE_S)
    assert d_after["tokens_loaded"] - d_before["tokens_loaded"] == sum(PROMPT_LENGTHS)
    assert d_after["loads_failed"] == d_before["loads_failed"]
    for prompt, out in zip(batch, outs, strict=True):
        assert out["num_cached_tokens"] >= len(prompt) - 1
    assert d_after["requests"] == 0 and d_after["free_blocks"] == d_after["total_blocks"]
    if decode == "d32":
        # The decode's cache holds the prefill's KV, byte for byte (outputs of the dummy
        # model alone would not show it), for every full block before the last prompt token
        # (the decode computes that one itself).
        for prompt in batch:
            full = (len(prompt) - 1) // 32
            want_kv = p.call("kv_digests", prompt, 32)[:full]
            assert None not in want_kv
            assert d.call("kv_digests", prompt, 32)[:full] == want_kv
    p_after = p.call("drain", DEADLINE_S)
    assert p_after["pushes_done"] - p_before["pushes_done"] == len(batch)
    assert p_after["pushes_failed"] == p_before["pushes_failed"]
    # The readies were waiting, so the KV went out layer by layer during the prefill's forward.
    assert p_after["push_layer_batches"] > p_before["push_layer_batches"]
    assert p_after["holds_expired"] == p_before["holds_expired"]
    assert p_after["requests"] == 0 and p_after["free_blocks"] == p_after["total_blocks"]


def test_push_matches_single_engine(engines: dict[str, EngineProcess]) -> None:
    check_push(engines, "d32", seed=5)


def test_push_heterogeneous_block_sizes(engines: dict[str, EngineProcess]) -> None:
    check_push(engines, "d64", seed=6)


def test_connector_stats_reach_vllm_metrics(engines: dict[str, EngineProcess]) -> None:
    """The connector's transfer stats go through vLLM's get_kv_connector_stats pipeline into
    its Prometheus metrics: loads on the decode, pushes on the prefill."""
    p, d = engines["p32"], engines["d32"]
    d_before = d.call("metrics", "vllm:llumnix_kv_")
    p_before = p.call("metrics", "vllm:llumnix_kv_")
    batch = prompts(7)[:3]
    run_push(p, d, batch)
    d.call("drain", DEADLINE_S)
    p.call("drain", DEADLINE_S)
    d_after = d.call("metrics", "vllm:llumnix_kv_")
    p_after = p.call("metrics", "vllm:llumnix_kv_")

    def delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta(d_after, d_before, "vllm:llumnix_kv_load_transfers") == len(batch)
    assert delta(d_after, d_before, "vllm:llumnix_kv_load_bytes") > 0
    assert delta(d_after, d_before, "vllm:llumnix_kv_load_seconds") == len(batch)
    assert delta(p_after, p_before, "vllm:llumnix_kv_push_transfers") == len(batch)
    pushed = delta(p_after, p_before, "vllm:llumnix_kv_push_bytes")
    assert pushed == delta(d_after, d_before, "vllm:llumnix_kv_load_bytes")
    assert delta(d_after, d_before, "vllm:llumnix_kv_failed_loads") == 0


def test_push_decode_abort_before_alloc_frees_prefill(engines: dict[str, EngineProcess]) -> None:
    """A decode request aborted before it was scheduled tells the prefill at once: the
    prefill frees the blocks it held for the push without waiting for its deadline."""
    p, d = engines["p32"], engines["d32"]
    prompt = prompts(9)[2]
    p_params, d_params = push_params(probe(p), 1)
    before = p.call("counters")
    p.call("generate", [prompt], 1, p_params)
    assert p.call("counters")["holds_pending"] == before["holds_pending"] + 1
    d.call("start_and_abort", prompt, d_params[0], 0)
    d_after = d.call("drain", DEADLINE_S)  # the abort notice goes out in the next step
    assert d_after["free_blocks"] == d_after["total_blocks"]
    p_after = p.call("drain", DEADLINE_S)
    assert p_after["holds_pending"] == before["holds_pending"]
    assert p_after["holds_expired"] == before["holds_expired"]
    assert p_after["free_blocks"] == p_after["total_blocks"]


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
    "get_kv_connector_stats": ("self",),
    "bind_connector_metadata": ("self", "connector_metadata"),
    "update_connector_output": ("self", "connector_output"),
    "build_kv_connector_stats": ("data",),
    "build_prom_metrics": ("vllm_config", "metric_types", "labelnames", "per_engine_labelvalues"),
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
