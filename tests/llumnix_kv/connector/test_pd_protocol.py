"""The engine-agnostic PD protocol (llumnix_kv.connector) between two processes, no engine:
a prefill-side process holds blocks in a PdSendLedger, this process pulls them with a
PdPuller into a cache of another block size."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from llumnix_kv.connector import LoadJob, PdHandoff, PdPuller, PdSendLedger, read_notice  # noqa: E402
from llumnix_kv.connector.pd import HOLD_MARGIN_S, load_deadline  # noqa: E402
from llumnix_kv.connector.peers import PeerPool  # noqa: E402
from llumnix_kv.copy import execute, plan_copy  # noqa: E402
from llumnix_kv.layout import layout_to_dict, vllm_cpu  # noqa: E402
from llumnix_kv.transfer import TransferEngine  # noqa: E402

LAYERS, HEADS, HEAD, BLOCKS = 2, 2, 32, 16


def cache(block_size: int, seed: int | None) -> list[Any]:
    """A vLLM CPU_ATTN cache: per layer [blocks, heads, block_size, 2 * head] bf16."""
    gen = torch.Generator().manual_seed(seed or 0)
    shape = (BLOCKS, HEADS, block_size, 2 * HEAD)
    return [
        torch.randn(shape, generator=gen).to(torch.bfloat16)
        if seed is not None
        else torch.zeros(shape, dtype=torch.bfloat16)
        for _ in range(LAYERS)
    ]


def _prefill_side(conn: Any) -> None:
    tensors = cache(32, seed=7)
    layout = vllm_cpu(tensors)
    with TransferEngine("prefill", transports=["shm", "tcp"]) as engine:
        engine.register_layout(layout)
        ledger = PdSendLedger()

        def poll() -> list[str]:
            for note in engine.notifications():
                ledger.accept(note.message)
            return ledger.poll()

        conn.send((engine.name, engine.descriptor(), layout_to_dict(layout)))
        while True:
            cmd, *args = conn.recv()
            if cmd == "exit":
                return
            if cmd == "hold":
                ledger.hold(*args)
                conn.send(None)
            elif cmd == "poll":  # until something is released or the timeout
                deadline = time.monotonic() + args[0]
                released = poll()
                while not released and time.monotonic() < deadline:
                    time.sleep(0.01)
                    released = poll()
                conn.send((released, ledger.reads_noticed, ledger.holds_expired))


class Prefill:
    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_prefill_side, args=(child,), daemon=True)
        self.proc.start()
        assert self.conn.poll(60), "prefill side did not start"
        self.name, self.descriptor, self.layout = self.conn.recv()

    def call(self, *cmd: Any, timeout: float = 30.0) -> Any:
        self.conn.send(cmd)
        assert self.conn.poll(timeout), f"no answer to {cmd[0]}"
        return self.conn.recv()

    def handoff(self, request_id: str, blocks: list[int], num_tokens: int) -> PdHandoff:
        return PdHandoff(
            request_id, self.name, self.descriptor, self.layout, tuple(blocks), num_tokens
        )

    def stop(self) -> None:
        if self.proc.is_alive():
            self.conn.send(("exit",))
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)


@pytest.fixture
def prefill() -> Iterator[Prefill]:
    side = Prefill()
    try:
        yield side
    finally:
        side.stop()


def pull(puller: PdPuller, job: LoadJob, timeout: float = 20.0) -> Any:
    puller.start(job)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for outcome in puller.poll():
            return outcome
        time.sleep(0.005)
    raise AssertionError("load did not finish")


def test_pull_across_block_sizes_releases_on_notice(prefill: Prefill) -> None:
    p_blocks, d_blocks, tokens = [9, 2, 14, 5], [11, 3], (0, 100)
    got = cache(64, seed=None)
    local = vllm_cpu(got)
    with TransferEngine("decode", transports=["shm", "tcp"]) as engine:
        engine.register_layout(local)
        puller = PdPuller(engine, local, PeerPool(engine))
        prefill.call("hold", "r1", 30.0)
        job = LoadJob(
            "d1", prefill.handoff("r1", p_blocks, 100), d_blocks, tokens, time.monotonic() + 20
        )
        outcome = pull(puller, job)
        assert outcome.ok and outcome.num_tokens == 100 and not outcome.failed_blocks
        assert prefill.call("poll", 10.0) == (["r1"], 1, 0)
    # The same copy done locally from a replica of the prefill's cache.
    want = cache(64, seed=None)
    src, dst = vllm_cpu(cache(32, seed=7)), vllm_cpu(want)
    execute(plan_copy(src, dst, p_blocks, d_blocks, tokens=tokens), src, dst)
    assert any(t.abs().sum() > 0 for t in want)
    for got_t, want_t in zip(got, want, strict=True):
        assert torch.equal(got_t, want_t)


def test_hold_expires_without_notice_and_early_notice_is_kept(prefill: Prefill) -> None:
    prefill.call("hold", "lost", 0.3)
    t0 = time.monotonic()
    assert prefill.call("poll", 10.0) == (["lost"], 0, 1)
    assert time.monotonic() - t0 < 5
    # A notice that arrives before its hold is known releases the hold at once.
    local = vllm_cpu(cache(64, seed=None))
    with TransferEngine("decode", transports=["shm", "tcp"]) as engine:
        engine.register_layout(local)
        puller = PdPuller(engine, local, PeerPool(engine))
        job = LoadJob("d2", prefill.handoff("early", [1], 32), [], (0, 0), time.monotonic() + 20)
        assert pull(puller, job).ok
        assert read_notice("early").endswith(b"early")
        time.sleep(0.2)
        prefill.call("hold", "early", 30.0)
        assert prefill.call("poll", 10.0) == (["early"], 1, 1)


def test_lost_prefill_fails_the_load_with_its_blocks(prefill: Prefill) -> None:
    handoff = prefill.handoff("r3", [0, 1, 2], 80)
    prefill.proc.kill()
    prefill.proc.join(10)
    local = vllm_cpu(cache(64, seed=None))
    with TransferEngine("decode", transports=["shm", "tcp"], connect_timeout=2.0) as engine:
        engine.register_layout(local)
        puller = PdPuller(engine, local, PeerPool(engine))
        t0 = time.monotonic()
        job = LoadJob("d3", handoff, [4, 7, 9], (10, 80), time.monotonic() + 5)
        outcome = pull(puller, job)
        assert time.monotonic() - t0 < 10
        assert not outcome.ok and outcome.error
        assert outcome.failed_blocks == (4, 7)  # the blocks holding tokens 10..79 of 64
        assert puller.loads_failed == 1 and puller.pending == 0


def test_load_deadline_ends_before_the_prefill_frees_the_blocks() -> None:
    now = time.monotonic()
    handoff = PdHandoff("r", "p", b"d", {}, (0,), 1, expires_at=time.time() + 10.0)
    assert load_deadline(handoff, 30.0, now) == pytest.approx(now + 10.0 - HOLD_MARGIN_S, abs=0.1)
    assert load_deadline(handoff, 3.0, now) == pytest.approx(now + 3.0)
    unknown = PdHandoff("r", "p", b"d", {}, (0,), 1)  # from a prefill that does not say
    assert load_deadline(unknown, 3.0, now) == pytest.approx(now + 3.0)
    # The expiry travels with the hand-off (JSON-safe).
    assert PdHandoff.from_params(handoff.to_params()) == handoff
    assert PdHandoff.from_params(unknown.to_params()).expires_at is None


def test_expired_hold_is_never_read(prefill: Prefill) -> None:
    """A hand-off whose hold ends within the margin fails the load before any byte moves:
    the prefill may already reuse the blocks, and the decode's blocks keep what they had."""
    handoff = PdHandoff(
        "r4",
        prefill.name,
        prefill.descriptor,
        prefill.layout,
        (0, 1, 2),
        80,
        expires_at=time.time() + HOLD_MARGIN_S / 2,
    )
    tensors = cache(64, seed=None)
    local = vllm_cpu(tensors)
    with TransferEngine("decode", transports=["shm", "tcp"]) as engine:
        engine.register_layout(local)
        puller = PdPuller(engine, local, PeerPool(engine))
        job = LoadJob("d4", handoff, [4, 7, 9], (0, 80), load_deadline(handoff, 20.0))
        outcome = pull(puller, job)
        assert not outcome.ok and "before the read" in outcome.error
        assert outcome.failed_blocks == (4, 7)
        assert all(not t.any() for t in tensors)  # nothing was read
    # No read notice reached the prefill: it frees the blocks at its own deadline.
    prefill.call("hold", "r4", 0.2)
    released, noticed, expired = prefill.call("poll", 5.0)
    assert released == ["r4"] and noticed == 0 and expired == 1
