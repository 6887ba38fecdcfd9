"""The transfer engine's ucx transport: UCP put/get with packed rkeys, notifications by AM.

Skipped where llumnix_kv was built without UCX. UCX reads its environment when an engine starts,
so ``UCX_ENV`` is applied (keeping what the caller set) before any engine exists; it pins UCX to
the loopback interface. Every wait has a deadline; no test asserts a speed.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from llumnix_kv import _C, errors

UCX_ENV: dict[str, str] = {"UCX_NET_DEVICES": "lo"}
WRITE, READ = 0, 1
TIMEOUT_S = 10.0  # bound on any single wait
BLOCK_SIZES = (16 << 10, 1 << 20)  # bytes
BLOCKS = 8


def _apply_env() -> None:
    for key, value in UCX_ENV.items():
        os.environ.setdefault(key, value)


def _engine(name: str) -> Any:
    _apply_env()
    engine = _C.TransferEngine(name=name, transports=["ucx"])
    if "ucx" not in engine.transports():
        engine.shutdown()
        pytest.skip("llumnix_kv was built without UCX (or UCX failed to initialise)")
    return engine


def _pattern(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def _u64(values: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.uint64)


def _scatter(n: int) -> list[int]:
    """Destination block of source block i: a fixed permutation that is not the identity."""
    return [(5 * i + 3) % n for i in range(n)]


@pytest.fixture
def pair() -> Iterator[tuple[Any, Any]]:
    a, b = _engine("ucx-a"), _engine("ucx-b")
    try:
        yield a, b
    finally:
        a.shutdown()
        b.shutdown()


@pytest.mark.parametrize("block", BLOCK_SIZES)
def test_write_read_and_notify_in_one_process(pair: tuple[Any, Any], block: int) -> None:
    a, b = pair
    src = _pattern(block * BLOCKS, seed=block)
    dst = np.zeros(block * BLOCKS, dtype=np.uint8)
    back = np.zeros_like(dst)
    for arr in (src, back):
        a.register_memory(arr.ctypes.data, arr.nbytes)
    b.register_memory(dst.ctypes.data, dst.nbytes)
    peer, chosen = a.add_peer(b.descriptor(), "ucx")
    assert chosen == "ucx"
    perm = _scatter(BLOCKS)
    lens = _u64([block] * BLOCKS)

    local = _u64([src.ctypes.data + i * block for i in range(BLOCKS)])
    remote = _u64([dst.ctypes.data + perm[i] * block for i in range(BLOCKS)])
    batch = a.submit(peer, WRITE, local, remote, lens, notify=b"written", timeout_s=TIMEOUT_S)
    state, nbytes, done, transport, _staged = a.wait(batch, TIMEOUT_S)
    assert (state, nbytes, done, transport) == (1, block * BLOCKS, block * BLOCKS, "ucx")
    for i in range(BLOCKS):
        j = perm[i]
        assert np.array_equal(dst[j * block : (j + 1) * block], src[i * block : (i + 1) * block])
    assert b.wait_notifications(TIMEOUT_S) == [("ucx-a", b"written")]

    # READ the scattered blocks back into their original order; a large notification travels
    # by rendezvous.
    local = _u64([back.ctypes.data + i * block for i in range(BLOCKS)])
    big = bytes(_pattern(1 << 20, seed=7))
    batch = a.submit(peer, READ, local, remote, lens, notify=big, timeout_s=TIMEOUT_S)
    assert a.wait(batch, TIMEOUT_S)[0] == 1
    assert np.array_equal(back, src)
    assert b.wait_notifications(TIMEOUT_S) == [("ucx-a", big)]


def test_unregistered_remote_address_is_refused(pair: tuple[Any, Any]) -> None:
    a, b = pair
    src = np.ones(1 << 16, dtype=np.uint8)
    dst = np.zeros(1 << 16, dtype=np.uint8)
    a.register_memory(src.ctypes.data, src.nbytes)
    b.register_memory(dst.ctypes.data, dst.nbytes)
    peer, _ = a.add_peer(b.descriptor(), "ucx")
    outside = dst.ctypes.data + dst.nbytes  # one past the registered region
    with pytest.raises(errors.UnregisteredMemoryError):
        a.submit(peer, WRITE, _u64([src.ctypes.data]), _u64([outside]), _u64([64]))
    with pytest.raises(errors.UnregisteredMemoryError):  # straddles the region's end
        a.submit(peer, WRITE, _u64([src.ctypes.data]), _u64([outside - 32]), _u64([64]))
    assert not dst.any()


def test_shutdown_releases_every_registration() -> None:
    start = _C.live_registrations()
    a, b = _engine("ucx-a"), _engine("ucx-b")
    bufs = [np.zeros(1 << 20, dtype=np.uint8) for _ in range(4)]
    try:
        for buf in bufs[:2]:
            a.register_memory(buf.ctypes.data, buf.nbytes)
        for buf in bufs[2:]:
            b.register_memory(buf.ctypes.data, buf.nbytes)
        peer, _ = a.add_peer(b.descriptor(), "ucx")
        batch = a.submit(
            peer, WRITE, _u64([bufs[0].ctypes.data]), _u64([bufs[2].ctypes.data]), _u64([4096])
        )
        assert a.wait(batch, TIMEOUT_S)[0] == 1
        assert _C.live_registrations() == start + 4
    finally:
        a.shutdown()
        b.shutdown()
    assert _C.live_registrations() == start


# ---------------------------------------------------------------------------------------------
# Two processes.


def _child(conn: Any, nbytes: int, seed: int, mode: str) -> None:
    """Target engine: publishes its descriptor, then waits for a notification (mode "notify")
    and reports whether its buffer holds the expected pattern, or just idles (mode "idle")."""
    _apply_env()
    engine = _C.TransferEngine(name="ucx-child", transports=["ucx"])
    try:
        if "ucx" not in engine.transports():
            conn.send(("no-ucx", b"", 0))
            return
        buf = np.zeros(nbytes, dtype=np.uint8)
        engine.register_memory(buf.ctypes.data, buf.nbytes)
        conn.send(("ready", engine.descriptor(), buf.ctypes.data))
        if mode == "idle":
            time.sleep(60)  # the parent kills us
            return
        notes = engine.wait_notifications(TIMEOUT_S)
        conn.send(("done", notes, bool(np.array_equal(buf, _pattern(nbytes, seed)))))
    finally:
        engine.shutdown()


def _start_child(nbytes: int, seed: int, mode: str) -> tuple[Any, Any, bytes, int]:
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child_conn, nbytes, seed, mode), daemon=True)
    proc.start()
    child_conn.close()
    if not parent_conn.poll(TIMEOUT_S):
        raise AssertionError("the child engine did not start")
    tag, desc, addr = parent_conn.recv()
    if tag == "no-ucx":
        pytest.skip("ucx is not available in the child process")
    return proc, parent_conn, desc, addr


def _stop(proc: Any) -> None:
    if proc.is_alive():
        proc.terminate()
    proc.join(TIMEOUT_S)
    if proc.is_alive():
        proc.kill()
        proc.join(TIMEOUT_S)


def test_write_and_notify_across_processes() -> None:
    block, seed = 1 << 20, 11
    nbytes = block * BLOCKS
    engine = _engine("ucx-parent")
    proc = None
    try:
        proc, conn, desc, remote_base = _start_child(nbytes, seed, "notify")
        expected = _pattern(nbytes, seed)
        perm = _scatter(BLOCKS)
        src = np.empty_like(expected)
        for i in range(BLOCKS):  # source block i lands in the child's block perm[i]
            src[i * block : (i + 1) * block] = expected[perm[i] * block : (perm[i] + 1) * block]
        engine.register_memory(src.ctypes.data, src.nbytes)
        peer, chosen = engine.add_peer(desc, "ucx")
        assert chosen == "ucx"
        local = _u64([src.ctypes.data + i * block for i in range(BLOCKS)])
        remote = _u64([remote_base + perm[i] * block for i in range(BLOCKS)])
        batch = engine.submit(
            peer, WRITE, local, remote, _u64([block] * BLOCKS), notify=b"kv ready",
            timeout_s=TIMEOUT_S,
        )  # fmt: skip
        assert engine.wait(batch, TIMEOUT_S)[0] == 1
        assert conn.poll(TIMEOUT_S), "the child reported nothing"
        tag, notes, data_ok = conn.recv()
        assert tag == "done"
        assert notes == [("ucx-parent", b"kv ready")]
        assert data_ok, "the child's buffer does not hold what was written"
    finally:
        if proc is not None:
            _stop(proc)
        engine.shutdown()


def test_killed_peer_fails_with_a_typed_error() -> None:
    block = 1 << 16
    engine = _engine("ucx-parent")
    proc = None
    try:
        proc, _conn, desc, remote_base = _start_child(block * BLOCKS, 0, "idle")
        src = _pattern(block * BLOCKS, seed=3)
        engine.register_memory(src.ctypes.data, src.nbytes)
        peer, _ = engine.add_peer(desc, "ucx")
        local = _u64([src.ctypes.data + i * block for i in range(BLOCKS)])
        remote = _u64([remote_base + i * block for i in range(BLOCKS)])
        lens = _u64([block] * BLOCKS)
        assert engine.wait(engine.submit(peer, WRITE, local, remote, lens), TIMEOUT_S)[0] == 1

        os.kill(proc.pid, signal.SIGKILL)
        proc.join(TIMEOUT_S)
        # Until the loss is noticed a submit may still be accepted; each try is bounded by its
        # own timeout, and some try must end in a typed error.
        raised: Exception | None = None
        for _ in range(20):
            try:
                batch = engine.submit(peer, WRITE, local, remote, lens, timeout_s=2.0)
                engine.wait(batch, 2.0 + TIMEOUT_S)
            except (errors.PeerLostError, errors.KvTimeoutError) as exc:
                raised = exc
                break
            time.sleep(0.05)
        assert raised is not None, "writes to a killed peer kept succeeding"
    finally:
        if proc is not None:
            _stop(proc)
        engine.shutdown()
