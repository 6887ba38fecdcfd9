"""The transfer engine's ucx transport: UCP put/get with packed rkeys (direct mode), gathered
active messages scattered by the receiver (staged mode), notifications by AM.

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
from llumnix_kv.bench.target import PeerProcess

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
    state, nbytes, done, transport, staged = a.wait(batch, TIMEOUT_S)
    assert (state, nbytes, done, transport) == (1, block * BLOCKS, block * BLOCKS, "ucx")
    assert staged  # "auto" stages host memory for a peer on this host
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


@pytest.mark.parametrize("mode", ["direct", "staged"])
def test_killed_peer_fails_with_a_typed_error(mode: str) -> None:
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
        first = engine.submit(peer, WRITE, local, remote, lens, mode=mode)
        assert engine.wait(first, TIMEOUT_S)[0] == 1

        os.kill(proc.pid, signal.SIGKILL)
        proc.join(TIMEOUT_S)
        # Until the loss is noticed a submit may still be accepted; each try is bounded by its
        # own timeout, and some try must end in a typed error.
        raised: Exception | None = None
        for _ in range(20):
            try:
                batch = engine.submit(peer, WRITE, local, remote, lens, timeout_s=2.0, mode=mode)
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


# ---------------------------------------------------------------------------------------------
# Staged mode: the segments travel gathered in a few active messages; the receiver scatters.

STAGED_SHAPES = ((1000, 1 << 10), (64, 16 << 10), (600, 100))  # (segments, bytes each)


def _shuffle(n: int) -> list[int]:
    """A fixed permutation of range(n) (destination block of source block i)."""
    return [int(j) for j in np.random.default_rng(n).permutation(n)]


def _blocks(base: int, order: list[int] | np.ndarray, block: int) -> np.ndarray:
    return _u64([base + int(j) * block for j in order])


def _permuted(data: np.ndarray, perm: list[int], block: int) -> np.ndarray:
    """The buffer that holds block i of `data` at block perm[i]."""
    out = np.empty_like(data)
    for i, j in enumerate(perm):
        out[j * block : (j + 1) * block] = data[i * block : (i + 1) * block]
    return out


@pytest.mark.parametrize(("count", "block"), STAGED_SHAPES)
def test_staged_write_read_in_one_process(pair: tuple[Any, Any], count: int, block: int) -> None:
    a, b = pair
    src = _pattern(count * block, seed=count)
    dst = np.zeros_like(src)
    back = np.zeros_like(src)
    for arr in (src, back):
        a.register_memory(arr.ctypes.data, arr.nbytes)
    b.register_memory(dst.ctypes.data, dst.nbytes)
    peer, _ = a.add_peer(b.descriptor(), "ucx")
    perm, lens = _shuffle(count), _u64([block] * count)
    remote = _blocks(dst.ctypes.data, perm, block)

    local = _blocks(src.ctypes.data, range(count), block)
    batch = a.submit(peer, WRITE, local, remote, lens, mode="staged", crc=True, timeout_s=TIMEOUT_S)
    assert a.wait(batch, TIMEOUT_S) == (1, src.nbytes, src.nbytes, "ucx", True)
    assert np.array_equal(dst, _permuted(src, perm, block))

    local = _blocks(back.ctypes.data, range(count), block)
    batch = a.submit(peer, READ, local, remote, lens, mode="staged", notify=b"read", crc=True)
    assert a.wait(batch, TIMEOUT_S) == (1, src.nbytes, src.nbytes, "ucx", True)
    assert np.array_equal(back, src)
    assert b.wait_notifications(TIMEOUT_S) == [("ucx-a", b"read")]


def test_staged_parts_of_a_large_batch(pair: tuple[Any, Any]) -> None:
    """More segments than one staged part carries, and one segment longer than a part."""
    a, b = pair
    count, block, big = 700, 512, 65 << 20
    src = _pattern(count * block + big, seed=5)
    dst = np.zeros_like(src)
    a.register_memory(src.ctypes.data, src.nbytes)
    b.register_memory(dst.ctypes.data, dst.nbytes)
    peer, _ = a.add_peer(b.descriptor(), "ucx")
    perm = _shuffle(count)
    local = [*_blocks(src.ctypes.data, range(count), block), src.ctypes.data + count * block]
    remote = [*_blocks(dst.ctypes.data, perm, block), dst.ctypes.data + count * block]
    lens = _u64([block] * count + [big])
    batch = a.submit(peer, WRITE, _u64(local), _u64(remote), lens, mode="staged")
    assert a.wait(batch, TIMEOUT_S)[0] == 1
    head = count * block
    assert np.array_equal(dst[:head], _permuted(src[:head], perm, block))
    assert np.array_equal(dst[head:], src[head:])


@pytest.mark.parametrize(("count", "block"), STAGED_SHAPES[:2])
def test_staged_across_processes(count: int, block: int) -> None:
    _apply_env()
    nbytes, seed = count * block, 21
    engine = _engine("ucx-parent")
    try:
        with PeerProcess(["ucx"], nbytes, shared=False) as child:
            child.call("fill", seed)
            theirs = _pattern(nbytes, seed)  # what "fill" wrote
            mine = np.zeros(nbytes, dtype=np.uint8)
            engine.register_memory(mine.ctypes.data, mine.nbytes)
            peer, chosen = engine.add_peer(child.descriptor, "ucx")
            assert chosen == "ucx"
            perm, lens = _shuffle(count), _u64([block] * count)
            remote = _blocks(child.addr, perm, block)
            local = _blocks(mine.ctypes.data, range(count), block)

            batch = engine.submit(peer, READ, local, remote, lens, mode="staged")
            assert engine.wait(batch, TIMEOUT_S)[::4] == (1, True)
            # Local block i holds the child's block perm[i].
            assert np.array_equal(_permuted(mine, perm, block), theirs)

            mine[:] = _pattern(nbytes, seed + 1)
            batch = engine.submit(peer, WRITE, local, remote, lens, mode="staged", notify=b"w")
            assert engine.wait(batch, TIMEOUT_S)[::4] == (1, True)
            assert child.call("notifications", TIMEOUT_S) == [("ucx-parent", b"w")]
            expected = _permuted(mine, perm, block)
            assert child.call("bytes", 0, nbytes) == expected.tobytes()
    finally:
        engine.shutdown()


@pytest.mark.parametrize("block", [1 << 10, 1 << 20])  # eager and rendezvous payloads
def test_staged_unregistered_memory_is_refused(pair: tuple[Any, Any], block: int) -> None:
    a, b = pair
    src = _pattern(4 * block, seed=1)
    dst = np.zeros(4 * block, dtype=np.uint8)
    gone = np.zeros(4 * block, dtype=np.uint8)
    a.register_memory(src.ctypes.data, src.nbytes)
    b.register_memory(dst.ctypes.data, dst.nbytes)
    handle = b.register_memory(gone.ctypes.data, gone.nbytes)
    peer, _ = a.add_peer(b.descriptor(), "ucx")
    local = _blocks(src.ctypes.data, range(4), block)
    lens = _u64([block] * 4)
    outside = _u64([dst.ctypes.data + dst.nbytes - block // 2] + [dst.ctypes.data] * 3)
    with pytest.raises(errors.UnregisteredMemoryError):  # known from the peer's descriptor
        a.submit(peer, WRITE, local, outside, lens, mode="staged")

    # The peer deregistered `gone` after publishing its descriptor: the receiver refuses.
    b.deregister_memory(handle)
    remote = _blocks(gone.ctypes.data, range(4), block)
    for op in (WRITE, READ):
        batch = a.submit(peer, op, local, remote, lens, mode="staged", timeout_s=TIMEOUT_S)
        with pytest.raises(errors.UnregisteredMemoryError):
            a.wait(batch, TIMEOUT_S)
    assert not gone.any()
    # The link still works.
    batch = a.submit(peer, WRITE, local, _blocks(dst.ctypes.data, range(4), block), lens,
                     mode="staged")  # fmt: skip
    assert a.wait(batch, TIMEOUT_S)[0] == 1
    assert np.array_equal(dst, src)


def test_auto_mode_stages_host_memory_on_one_host(pair: tuple[Any, Any]) -> None:
    """On one host "auto" stages every size (UCX's put/get of such memory would go over tcp);
    "direct" still moves segment by segment."""
    a, b = pair
    src = _pattern(1 << 20, seed=9)
    dst = np.zeros_like(src)
    a.register_memory(src.ctypes.data, src.nbytes)
    b.register_memory(dst.ctypes.data, dst.nbytes)
    peer, _ = a.add_peer(b.descriptor(), "ucx")
    for block, mode, staged in (
        (4 << 10, "auto", True),
        (256 << 10, "auto", True),
        (256 << 10, "direct", False),
    ):
        count = src.nbytes // block
        perm = _shuffle(count)
        dst[:] = 0
        local = _blocks(src.ctypes.data, range(count), block)
        remote = _blocks(dst.ctypes.data, perm, block)
        batch = a.submit(peer, WRITE, local, remote, _u64([block] * count), mode=mode)
        assert a.wait(batch, TIMEOUT_S) == (1, src.nbytes, src.nbytes, "ucx", staged)
        assert np.array_equal(dst, _permuted(src, perm, block))


def test_staged_parts_fail_when_the_link_closes() -> None:
    """A stopped peer never replies; removing it fails the waiting parts with PeerLost."""
    _apply_env()
    block, count = 1 << 10, 64
    engine = _engine("ucx-parent")
    try:
        with PeerProcess(["ucx"], block * count, shared=False) as child:
            src = _pattern(block * count, seed=2)
            engine.register_memory(src.ctypes.data, src.nbytes)
            peer, _ = engine.add_peer(child.descriptor, "ucx")
            local = _blocks(src.ctypes.data, range(count), block)
            remote = _blocks(child.addr, range(count), block)
            lens = _u64([block] * count)
            child.signal(signal.SIGSTOP)
            try:
                batches = [
                    engine.submit(peer, op, local, remote, lens, mode="staged")
                    for op in (WRITE, READ)
                ]
                time.sleep(0.2)
                assert engine.poll(batches[0])[0] == 0  # pending: no reply from a stopped peer
                engine.remove_peer(peer)
                for batch in batches:
                    with pytest.raises(errors.PeerLostError):
                        engine.wait(batch, TIMEOUT_S)
            finally:
                child.signal(signal.SIGCONT)
    finally:
        engine.shutdown()


def _stale_child(conn: Any, nbytes: int) -> None:
    """Registers two buffers, publishes its descriptor, deregisters the second buffer, then
    reports whether that buffer is still all zeros when told to exit."""
    _apply_env()
    engine = _C.TransferEngine(name="ucx-child", transports=["ucx"])
    try:
        kept = np.zeros(nbytes, dtype=np.uint8)
        gone = np.zeros(nbytes, dtype=np.uint8)
        engine.register_memory(kept.ctypes.data, kept.nbytes)
        handle = engine.register_memory(gone.ctypes.data, gone.nbytes)
        conn.send((engine.descriptor(), kept.ctypes.data, gone.ctypes.data))
        conn.recv()
        engine.deregister_memory(handle)
        conn.send("deregistered")
        conn.recv()
        conn.send((not gone.any(), kept.tobytes()))
    finally:
        engine.shutdown()


@pytest.mark.parametrize("block", [1 << 10, 1 << 20])  # eager and rendezvous payloads
def test_staged_unregistered_memory_across_processes(block: int) -> None:
    _apply_env()
    nbytes = 4 * block
    engine = _engine("ucx-parent")
    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_stale_child, args=(child_conn, nbytes), daemon=True)
    proc.start()
    child_conn.close()
    try:
        assert conn.poll(TIMEOUT_S), "the child engine did not start"
        desc, kept, gone = conn.recv()
        src = _pattern(nbytes, seed=4)
        engine.register_memory(src.ctypes.data, src.nbytes)
        peer, _ = engine.add_peer(desc, "ucx")
        conn.send("deregister")
        assert conn.poll(TIMEOUT_S) and conn.recv() == "deregistered"
        local, lens = _blocks(src.ctypes.data, range(4), block), _u64([block] * 4)
        for op in (WRITE, READ):
            remote = _blocks(gone, range(4), block)
            batch = engine.submit(peer, op, local, remote, lens, mode="staged", timeout_s=TIMEOUT_S)
            with pytest.raises(errors.UnregisteredMemoryError):
                engine.wait(batch, TIMEOUT_S)
        batch = engine.submit(peer, WRITE, local, _blocks(kept, range(4), block), lens,
                              mode="staged")  # fmt: skip
        assert engine.wait(batch, TIMEOUT_S)[0] == 1
        conn.send("exit")
        assert conn.poll(TIMEOUT_S)
        untouched, data = conn.recv()
        assert untouched, "a refused staged WRITE wrote into deregistered memory"
        assert data == src.tobytes()
    finally:
        _stop(proc)
        engine.shutdown()


def test_staged_write_crc_catches_corruption() -> None:
    _apply_env()
    a = _engine("ucx-a")
    b = _C.TransferEngine(name="ucx-b", transports=["ucx"], debug_corrupt_every=1)
    try:
        src = _pattern(64 << 10, seed=6)
        dst = np.zeros_like(src)
        a.register_memory(src.ctypes.data, src.nbytes)
        b.register_memory(dst.ctypes.data, dst.nbytes)
        peer, _ = a.add_peer(b.descriptor(), "ucx")
        local = _blocks(src.ctypes.data, range(64), 1 << 10)
        remote = _blocks(dst.ctypes.data, _shuffle(64), 1 << 10)
        lens = _u64([1 << 10] * 64)
        batch = a.submit(peer, WRITE, local, remote, lens, mode="staged", crc=True)
        with pytest.raises(errors.CorruptionError):
            a.wait(batch, TIMEOUT_S)
    finally:
        a.shutdown()
        b.shutdown()
