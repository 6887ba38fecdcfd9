"""Push mode of the PD protocol (llumnix_kv.connector.push), no engine: a prefill-side
PdPusher and a decode-side PdPushReceiver, each on its own transfer engine (tcp between
them), driven the way the vLLM connector drives them step by step."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from llumnix_kv.connector.pd import LoadOutcome  # noqa: E402
from llumnix_kv.connector.peers import PeerPool  # noqa: E402
from llumnix_kv.connector.push import (  # noqa: E402
    PdPusher,
    PdPushReceiver,
    PushEndpoint,
    PushReady,
    abort_notice,
)
from llumnix_kv.copy import execute, plan_copy  # noqa: E402
from llumnix_kv.errors import InvalidArgumentError  # noqa: E402
from llumnix_kv.layout import vllm_cpu  # noqa: E402
from llumnix_kv.transfer import TransferEngine  # noqa: E402

LAYERS, HEADS, HEAD, BLOCKS = 3, 2, 32, 16
P_BLOCKS, D_BLOCKS = [9, 2, 14, 5], [11, 3]  # 32-token blocks -> 64-token blocks


def cache(block_size: int, seed: int | None) -> list[Any]:
    gen = torch.Generator().manual_seed(seed or 0)
    shape = (BLOCKS, HEADS, block_size, 2 * HEAD)
    if seed is None:
        return [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(LAYERS)]
    return [torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(LAYERS)]


@dataclass
class Pair:
    p_cache: list[Any]
    d_cache: list[Any]
    pusher: PdPusher
    receiver: PdPushReceiver
    p_engine: TransferEngine
    d_engine: TransferEngine
    endpoint: PushEndpoint
    d_peers: PeerPool
    released: list[str]
    outcomes: list[LoadOutcome]

    def pump(self) -> None:
        """One round of both sides' polling, as get_finished does every engine step."""
        for note in self.p_engine.notifications():
            assert self.pusher.accept(note.message)
        for note in self.d_engine.notifications():
            assert self.receiver.accept(note.message)
        self.released += self.pusher.poll()
        self.outcomes += self.receiver.poll()

    def until(self, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump()
            if (what == "released" and self.released) or (what == "outcome" and self.outcomes):
                return
            time.sleep(0.005)
        raise AssertionError(f"nothing {what} within {timeout} s")

    def step(self, request_id: str, transfer_id: str, computed: int) -> None:
        """A prefill engine step computing tokens up to ``computed``, layer by layer."""
        self.pump()
        self.pusher.track(request_id, transfer_id, P_BLOCKS, computed)
        self.pusher.begin_step()
        for layer in range(LAYERS):
            self.pusher.on_layer(layer)
        self.pusher.end_step()

    def expected(self, tokens: tuple[int, int]) -> list[Any]:
        want = cache(64, seed=None)
        src, dst = vllm_cpu(self.p_cache), vllm_cpu(want)
        execute(plan_copy(src, dst, P_BLOCKS, D_BLOCKS, tokens=tokens), src, dst)
        return want


@pytest.fixture
def pair() -> Iterator[Pair]:
    p_cache, d_cache = cache(32, seed=7), cache(64, seed=None)
    p_layout, d_layout = vllm_cpu(p_cache), vllm_cpu(d_cache)
    with (
        TransferEngine("prefill", transports=["tcp"]) as p_engine,
        TransferEngine("decode", transports=["tcp"], connect_timeout=2.0) as d_engine,
    ):
        p_engine.register_layout(p_layout)
        d_engine.register_layout(d_layout)
        p_peers, d_peers = PeerPool(p_engine), PeerPool(d_engine)
        try:
            yield Pair(
                p_cache,
                d_cache,
                PdPusher(p_engine, p_layout, p_peers),
                PdPushReceiver(d_engine, d_layout, d_peers),
                p_engine,
                d_engine,
                PushEndpoint(p_engine.name, p_engine.descriptor()),
                d_peers,
                [],
                [],
            )
        finally:
            p_peers.close()
            d_peers.close()


def same(got: list[Any], want: list[Any]) -> bool:
    return all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_layer_by_layer_push_across_block_sizes(pair: Pair) -> None:
    """Chunked prefill of 100 tokens in two steps: each step's layers go out during the
    step, before the request finishes; the decode gets exactly tokens 0..99."""
    pair.receiver.expect("d1", "t1", pair.endpoint, D_BLOCKS, (0, 100), time.monotonic() + 20)
    pair.pusher.track("p1", "t1", P_BLOCKS, 0)
    deadline = time.monotonic() + 10
    while pair.pusher._pushes["t1"].ready is None:  # the decode's ready arrives
        assert time.monotonic() < deadline
        pair.pump()
        time.sleep(0.005)
    pair.step("p1", "t1", 50)
    pair.step("p1", "t1", 100)
    assert pair.pusher._pushes["t1"].pushed == 100  # every layer sent during the steps
    sent = pair.pusher._pushes["t1"].nbytes
    pair.pusher.finish("p1", 30.0, ok=True)
    pair.until("released")
    assert pair.released == ["p1"]
    assert pair.pusher._pushes == {} and pair.pusher.pushes_done == 1
    pair.until("outcome")
    (outcome,) = pair.outcomes
    assert outcome.ok and outcome.num_tokens == 100 and outcome.request_id == "d1"
    assert pair.receiver.bytes_loaded == sent > 0
    assert same(pair.d_cache, pair.expected((0, 100)))


def test_late_ready_pushes_everything_after_finish(pair: Pair) -> None:
    """The decode allocates after the prefill finished (and asks only for tokens 40..90,
    having a local prefix hit): the prefill sends the range in one go."""
    pair.step("p2", "t2", 90)
    pair.pusher.finish("p2", 30.0, ok=True)
    pair.pump()
    assert pair.released == []  # held for the decode
    pair.receiver.expect("d2", "t2", pair.endpoint, D_BLOCKS, (40, 90), time.monotonic() + 20)
    pair.until("released")
    pair.until("outcome")
    assert pair.outcomes[0].ok and pair.outcomes[0].num_tokens == 50
    assert same(pair.d_cache, pair.expected((40, 90)))


def test_abort_before_ready_frees_at_once(pair: Pair) -> None:
    pair.step("p3", "t3", 64)
    pair.pusher.finish("p3", 600.0, ok=True)
    # The decode side sends it from a background thread (the engine may stop stepping).
    pair.d_peers.notify(pair.endpoint.engine_name, pair.endpoint.descriptor, abort_notice("t3"), 10)
    pair.until("released", timeout=10)
    assert pair.released == ["p3"] and pair.pusher.holds_expired == 0


def test_finish_of_an_untracked_request_releases_at_once(pair: Pair) -> None:
    """A request vLLM holds for a push that never ran a step here: nothing to wait for."""
    pair.pusher.finish("never-stepped", 30.0, ok=False)
    assert pair.pusher.poll() == ["never-stepped"]
    assert pair.pusher.poll() == []


def test_hold_expires_without_ready(pair: Pair) -> None:
    pair.step("p4", "t4", 64)
    pair.pusher.finish("p4", 0.2, ok=True)
    pair.until("released", timeout=10)
    assert pair.pusher.holds_expired == 1 and pair.pusher.pushes_done == 0


def test_failed_prefill_reports_failed_blocks(pair: Pair) -> None:
    """A prefill request that did not finish normally (aborted, preempted) answers the
    decode with a failed done; the decode reports the blocks it was filling."""
    pair.receiver.expect("d5", "t5", pair.endpoint, D_BLOCKS, (10, 100), time.monotonic() + 20)
    pair.step("p5", "t5", 32)
    pair.pusher.finish("p5", 30.0, ok=False)
    pair.until("outcome")
    (outcome,) = pair.outcomes
    assert not outcome.ok and outcome.failed_blocks == (11, 3)
    pair.until("released")
    assert pair.pusher.pushes_failed == 1


def test_decode_deadline_without_prefill(pair: Pair) -> None:
    """No prefill ever computes the request: the decode fails the load after its deadline,
    and the prefill, told the deadline in the ready, writes nothing afterwards."""
    t0 = time.monotonic()
    pair.receiver.expect("d6", "t6", pair.endpoint, D_BLOCKS, (0, 64), t0 + 0.5)
    pair.until("outcome", timeout=10)
    assert not pair.outcomes[0].ok and pair.outcomes[0].failed_blocks == (11,)
    assert time.monotonic() - t0 < 5
    pair.step("p6", "t6", 64)  # the prefill computes it after all: too late to write
    assert pair.pusher._pushes["t6"].nbytes == 0
    pair.pusher.finish("p6", 30.0, ok=True)
    pair.until("released")
    assert pair.pusher.pushes_failed == 1
    assert all(not t.any() for t in pair.d_cache)


def test_malformed_ready_is_dropped() -> None:
    with pytest.raises(InvalidArgumentError):
        PushReady.decode(b"llumnix.push.ready:{not json")
    with pytest.raises(InvalidArgumentError):
        PushEndpoint.from_params({"engine_name": "x", "descriptor": "***"})
