"""Transfer engine: every transport moves the right bytes, notifies after the data, honours
deadlines and cancellation, survives a lost peer and garbage input, and releases everything."""

from __future__ import annotations

import contextlib
import hashlib
import signal
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

import llumnix_kv as kv
from llumnix_kv import _C, errors
from llumnix_kv import layout as kvl
from llumnix_kv.bench.target import PeerProcess
from llumnix_kv.transfer import Peer, TransferEngine
from tests.llumnix_kv.kv_formats import (
    FORMATS_BY_NAME,
    Shape,
    clone_cache,
    reference_copy,
    same_bytes,
)

BLOCK = 16 << 10
Segs = tuple[np.ndarray, np.ndarray, np.ndarray]


def scattered(n: int, nblocks: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(nblocks)[:n].astype(np.uint64)


@pytest.fixture
def baseline_registrations():
    before = _C.live_registrations()
    yield before
    assert _C.live_registrations() == before


@pytest.mark.parametrize("transport", ["local", "shm", "tcp"])
def test_plan_between_different_layouts_in_one_process(
    transport: str, baseline_registrations
) -> None:
    """Prefill cache (NHD, 16-token blocks, TP1) -> decode cache (HND, 64-token blocks, rank 1
    of TP2) through the engine, then read it back; notifications arrive after the data."""
    src_fmt, dst_fmt = (
        FORMATS_BY_NAME["vllm_flash_attn_nhd"],
        FORMATS_BY_NAME["vllm_flash_attn_hnd"],
    )
    src_shape = Shape(2, 10, 16, 8, 32, torch.bfloat16)
    dst_shape = Shape(2, 4, 64, 4, 32, torch.bfloat16)
    src, dst = src_fmt.alloc(src_shape), dst_fmt.alloc(dst_shape)
    src_blocks, dst_blocks = [9, 1, 4, 2, 7, 3, 8], [3, 1]
    expected = clone_cache(dst_fmt, dst_shape, dst)
    reference_copy(
        src_fmt, src, src_blocks, (0, 8), dst_fmt, expected, dst_blocks, (4, 8), (5, 100), (0, 2)
    )
    plan = kv.plan_copy(
        src.layout, dst.layout, src_blocks, dst_blocks, (5, 100), src_heads=(0, 8), dst_heads=(4, 8)
    )
    with (
        TransferEngine("p", transports=[transport]) as p,
        TransferEngine("d", transports=[transport]) as d,
    ):
        p.register_layout(src.layout)
        d.register_layout(dst.layout)
        peer = p.add_peer(d.descriptor(), transport)
        assert peer.transport == transport and peer.name == "d"
        batch = p.transfer(peer, plan, src.layout, dst.layout, op="WRITE", notify=b"kv ready")
        batch.wait(10)
        assert batch.transport == transport
        assert same_bytes(dst, expected)
        assert d.wait_for(b"kv ready", 5).peer == "p"
        # READ back into a fresh prefill-shaped cache.
        back = src_fmt.alloc(src_shape)
        for t in back.storage:
            t.zero_()
        p.register_layout(back.layout)
        read_plan = kv.plan_copy(
            dst.layout,
            back.layout,
            dst_blocks,
            src_blocks,
            (5, 100),
            src_heads=(4, 8),
            dst_heads=(0, 8),
        )
        p.transfer(peer, read_plan, back.layout, dst.layout, op="READ").wait(10)
        for b, s in zip(back.tensors, src.tensors, strict=True):
            for layer_tok in range(5, 100):
                blk, off = src_blocks[layer_tok // 16], layer_tok % 16
                assert torch.equal(  # compare bits: random bf16 bytes include NaNs
                    b[:, blk, off, 4:8].view(torch.int16), s[:, blk, off, 4:8].view(torch.int16)
                )


@pytest.mark.parametrize(("transport", "shared"), [("shm", True), ("shm", False), ("tcp", False)])
@pytest.mark.parametrize("op", ["WRITE", "READ"])
def test_two_processes(transport: str, shared: bool, op: str, baseline_registrations) -> None:
    """shm with mapped shared memory, shm through cross-memory attach, and tcp."""
    n = 48
    with PeerProcess([transport], 2 * n * BLOCK, shared=shared) as child:
        child.call("fill", 7)
        with TransferEngine("host", transports=[transport]) as eng:
            local = np.random.default_rng(1).integers(0, 256, n * BLOCK, dtype=np.uint8)
            eng.register(local)
            peer = eng.add_peer(child.descriptor, transport)
            assert peer.transport == transport
            ids = scattered(n, 2 * n)
            la = local.ctypes.data + np.arange(n, dtype=np.uint64) * BLOCK
            ra = child.addr + ids * BLOCK
            lens = np.full(n, BLOCK, np.uint64)
            if op == "WRITE":
                eng.submit(peer, op, la, ra, lens, notify=b"written").wait(10)
                assert child.call("notifications", 5) == [("host", b"written")]
                for i in (0, 17, n - 1):
                    got = child.call("bytes", int(ids[i]) * BLOCK, BLOCK)
                    assert got == local[i * BLOCK : (i + 1) * BLOCK].tobytes()
            else:
                eng.submit(peer, op, la, ra, lens).wait(10)
                for i in (0, 17, n - 1):
                    want = child.call("digest", int(ids[i]) * BLOCK, BLOCK)
                    assert (
                        hashlib.sha256(local[i * BLOCK : (i + 1) * BLOCK].tobytes()).hexdigest()
                        == want
                    )


@contextlib.contextmanager
def one_big_write(transport: str) -> Iterator[tuple[PeerProcess, TransferEngine, Peer, Segs]]:
    """A peer process, an engine linked to it over `transport` (one TCP stream), and the
    segments of one 64 MiB write into the peer: large enough to stay in flight once the peer
    stops reading."""
    nbytes = 64 << 20
    with (
        PeerProcess([transport], nbytes, shared=False) as child,
        TransferEngine("h", transports=[transport], tcp_streams=1) as eng,
    ):
        local = np.ones(nbytes, dtype=np.uint8)
        eng.register(local)
        peer = eng.add_peer(child.descriptor, transport)
        segs = (
            np.array([local.ctypes.data], np.uint64),
            np.array([child.addr], np.uint64),
            np.array([nbytes], np.uint64),
        )
        yield child, eng, peer, segs


def test_deadline_and_cancel_with_a_stopped_peer(baseline_registrations) -> None:
    """A peer that stops reading: waits time out, a batch deadline fails the batch, a queued
    batch can be cancelled, and nothing hangs."""
    with one_big_write("tcp") as (child, eng, peer, whole):
        child.signal(signal.SIGSTOP)
        stuck = eng.submit(peer, "WRITE", *whole)
        t0 = time.monotonic()
        with pytest.raises(errors.KvTimeoutError):
            stuck.wait(0.3)
        assert time.monotonic() - t0 < 5
        timed = eng.submit(peer, "WRITE", *whole, timeout=0.3)
        queued = eng.submit(peer, "WRITE", *whole)
        queued.cancel()
        with pytest.raises(errors.CancelledError):
            queued.wait(1)
        with pytest.raises(errors.KvTimeoutError):
            timed.wait(5)
        child.signal(signal.SIGCONT)
        stuck.wait(30)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_killed_peer_gives_typed_error_within_deadline(
    transport: str, baseline_registrations
) -> None:
    with one_big_write(transport) as (child, eng, peer, whole):
        child.signal(signal.SIGSTOP)
        in_flight = eng.submit(peer, "WRITE", *whole)
        child.signal(signal.SIGKILL)
        child.proc.join(10)
        deadline = time.monotonic() + 10
        with pytest.raises(errors.PeerLostError):
            # the batch in flight fails, and so does every later submit
            in_flight.wait(10)
            while time.monotonic() < deadline:
                eng.submit(peer, "WRITE", *whole).wait(10)
        assert time.monotonic() < deadline


@pytest.mark.parametrize("seg", [BLOCK, 100])  # scatter reads; packed through a bounce buffer
def test_crc_detects_corruption_and_names_the_batch(seg: int, baseline_registrations) -> None:
    n = 8 * BLOCK // seg
    with (
        PeerProcess(["tcp"], n * seg, shared=False, corrupt=1) as child,
        TransferEngine("h", transports=["tcp"]) as eng,
    ):
        local = np.arange(n * seg, dtype=np.uint8)
        eng.register(local)
        peer = eng.add_peer(child.descriptor)
        segs = (
            local.ctypes.data + np.arange(n, dtype=np.uint64) * seg,
            child.addr + np.arange(n, dtype=np.uint64) * seg,
            np.full(n, seg, np.uint64),
        )
        eng.submit(peer, "WRITE", *segs).wait(10)  # corrupted, undetected without CRC
        batch = eng.submit(peer, "WRITE", *segs, crc=True)
        with pytest.raises(errors.CorruptionError, match=f"batch {batch.id}"):
            batch.wait(10)


@pytest.mark.parametrize("crc", [False, True])
def test_tcp_packs_tiny_segments_both_ways(crc: bool, baseline_registrations) -> None:
    """Parts of segments under a few hundred bytes go through bounce buffers on both ends
    (tcp_transport.cc, PACKED): uneven lengths, zero-length ones, more bytes than one bounce
    buffer, several streams; READ brings back exactly what WRITE put."""
    rng = np.random.default_rng(5)
    n, size = 8000, 8 << 20
    lens = rng.integers(0, 400, n).astype(np.uint64)  # ~1.6 MB: bounce buffers, 2+ streams
    src_off = rng.choice(size // 512, n, replace=False).astype(np.uint64) * 512
    dst_off = rng.choice(size // 512, n, replace=False).astype(np.uint64) * 512
    with (
        PeerProcess(["tcp"], size, shared=False) as child,
        TransferEngine("h", transports=["tcp"], tcp_streams=3) as eng,
    ):
        local = rng.integers(0, 256, size, dtype=np.uint8)
        back = np.zeros(size, np.uint8)
        eng.register(local)
        eng.register(back)
        peer = eng.add_peer(child.descriptor)
        eng.submit(
            peer, "WRITE", local.ctypes.data + src_off, child.addr + dst_off, lens, crc=crc
        ).wait(30)
        remote = np.frombuffer(child.call("bytes", 0, size), np.uint8)
        eng.submit(
            peer, "READ", back.ctypes.data + src_off, child.addr + dst_off, lens, crc=crc
        ).wait(30)
    for s, d, k in zip(src_off.tolist(), dst_off.tolist(), lens.tolist(), strict=True):
        assert np.array_equal(remote[d : d + k], local[s : s + k])
        assert np.array_equal(back[s : s + k], local[s : s + k])
    moved = np.zeros(size, bool)
    for d, k in zip(dst_off.tolist(), lens.tolist(), strict=True):
        moved[d : d + k] = True
    assert not remote[~moved].any()


def test_unregistered_memory_is_refused(baseline_registrations) -> None:
    with TransferEngine("a", transports=["tcp"]) as a, TransferEngine("b", transports=["tcp"]) as b:
        mine, theirs = np.zeros(4096, np.uint8), np.zeros(4096, np.uint8)
        a.register(mine)
        b.register(theirs)
        peer = a.add_peer(b.descriptor())
        one = np.array([4096], np.uint64)
        with pytest.raises(errors.UnregisteredMemoryError):
            a.submit(
                peer,
                "WRITE",
                np.array([mine.ctypes.data], np.uint64),
                np.array([theirs.ctypes.data + 1], np.uint64),
                one,
            )
        with pytest.raises(errors.UnregisteredMemoryError):
            a.submit(
                peer,
                "WRITE",
                np.array([theirs.ctypes.data], np.uint64),
                np.array([theirs.ctypes.data], np.uint64),
                one,
            )


def test_bad_descriptors_and_garbage_on_the_wire(baseline_registrations) -> None:
    with (
        TransferEngine("a", transports=["shm", "tcp"]) as a,
        TransferEngine("b", transports=["shm", "tcp"]) as b,
    ):
        buf = np.zeros(1 << 16, np.uint8)
        b.register(buf)
        good = b.descriptor()
        rng = np.random.default_rng(0)
        for cut in range(0, len(good), max(1, len(good) // 50)):
            with pytest.raises(errors.BadDescriptorError):
                a.add_peer(good[:cut])
        for _ in range(200):
            blob = rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes()
            with pytest.raises(errors.KvError):
                a.add_peer(blob)
        flipped = bytearray(good)
        flipped[-30] ^= 0xFF
        with contextlib.suppress(errors.KvError):  # a flipped key byte may still parse
            a.add_peer(bytes(flipped))
        # Garbage straight into b's listener: b drops that connection and keeps serving.
        host, port = _tcp_endpoint(b)
        for payload in (b"", b"x" * 7, rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()):
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(payload)
        mine = np.ones(1 << 16, np.uint8)
        a.register(mine)
        peer = a.add_peer(good, "tcp")
        a.submit(
            peer,
            "WRITE",
            np.array([mine.ctypes.data], np.uint64),
            np.array([buf.ctypes.data], np.uint64),
            np.array([1 << 16], np.uint64),
        ).wait(10)
        assert int(buf.sum()) == 1 << 16


def _tcp_endpoint(engine: TransferEngine) -> tuple[str, int]:
    desc = engine.descriptor()
    marker = b"127.0.0.1:"
    start = desc.index(marker) + len(marker)
    end = start
    while desc[end : end + 1].isdigit():
        end += 1
    return "127.0.0.1", int(desc[start:end])


def test_registrations_are_counted_and_released() -> None:
    before = _C.live_registrations()
    eng = TransferEngine("r", transports=["shm", "tcp"])
    arrays = [np.zeros(4096, np.uint8) for _ in range(5)]
    handles = [eng.register(a) for a in arrays]
    shared = eng.alloc_shared(1 << 20)
    eng.register(shared)
    assert eng.num_registrations() == 6 and _C.live_registrations() == before + 6
    eng.deregister(handles[0])
    assert eng.num_registrations() == 5
    with pytest.raises(errors.InvalidArgumentError, match="overlaps"):
        eng.register(arrays[1])
    eng.close()
    assert _C.live_registrations() == before
    eng.close()  # idempotent


def test_a_dropped_batch_handle_frees_its_record_and_still_lands() -> None:
    """The engine keeps a batch's record (its segment table) while its handle lives: released
    explicitly or garbage collected, the id is unknown; a batch dropped in flight still lands
    and still notifies."""
    src = np.random.default_rng(3).integers(0, 256, 64 * BLOCK, dtype=np.uint8)
    dst = np.zeros_like(src)
    with (
        TransferEngine("p", transports=["tcp"]) as p,
        TransferEngine("d", transports=["tcp"]) as d,
    ):
        p.register(src)
        d.register(dst)
        peer = p.add_peer(d.descriptor(), "tcp")
        offs = np.arange(64, dtype=np.uint64) * BLOCK
        lens = np.full(64, BLOCK, np.uint64)
        segs = (src.ctypes.data + offs, dst.ctypes.data + offs, lens)

        kept = p.submit(peer, "WRITE", *segs)
        kept.wait(10)
        assert kept.poll()  # the record lives as long as the handle
        kept_id = kept.id
        kept.release()
        with pytest.raises(errors.InvalidArgumentError, match="unknown batch"):
            p._engine.poll(kept_id)
        del kept  # released twice (explicitly, then on collection): harmless

        dst[:] = 0
        dropped_id = p.submit(peer, "WRITE", *segs, notify=b"landed").id
        with pytest.raises(errors.InvalidArgumentError, match="unknown batch"):
            p._engine.poll(dropped_id)
        assert d.wait_for(b"landed", 10).peer == "p"
        assert np.array_equal(dst, src)


@pytest.mark.parametrize("op", ["WRITE", "READ"])
@pytest.mark.parametrize("past_cache", [False, True])
def test_cpu_copy_at_every_alignment_and_length(op: str, past_cache: bool) -> None:
    """The CPU copy loop (csrc/src/cpu_copy.cc) through the local transport: segments at
    random offsets modulo 64 on both sides, lengths around the vector loop's threshold and its
    64-byte steps; with `past_cache` the batch is long enough for non-temporal stores."""
    rng = np.random.default_rng(11)
    lens = [1, 63, 64, 65, 4095, 4096, 4097, 4096 + 63, (64 << 10) + 17, (1 << 20) + 5]
    if past_cache:
        lens.append((64 << 20) + 3)
    rng.shuffle(lens)
    size = sum(lens) + 64 * (len(lens) + 1)
    src = rng.integers(1, 256, size, dtype=np.uint8)
    dst = np.zeros(size, np.uint8)
    src_off, dst_off, pos_s, pos_d = [], [], 0, 0
    for n in lens:
        pos_s += int(rng.integers(0, 64))
        pos_d += int(rng.integers(0, 64))
        src_off.append(pos_s)
        dst_off.append(pos_d)
        pos_s, pos_d = pos_s + n, pos_d + n
    with (
        TransferEngine("a", transports=["local"]) as a,
        TransferEngine("b", transports=["local"]) as b,
    ):
        mine, theirs = (src, dst) if op == "WRITE" else (dst, src)
        mine_off, theirs_off = (src_off, dst_off) if op == "WRITE" else (dst_off, src_off)
        a.register(mine)
        b.register(theirs)
        peer = a.add_peer(b.descriptor(), "local")
        a.submit(
            peer,
            op,
            mine.ctypes.data + np.array(mine_off, np.uint64),
            theirs.ctypes.data + np.array(theirs_off, np.uint64),
            np.array(lens, np.uint64),
        ).wait(60)
    written = np.zeros(size, bool)
    for s, d, n in zip(src_off, dst_off, lens, strict=True):
        assert np.array_equal(dst[d : d + n], src[s : s + n]), (s, d, n)
        written[d : d + n] = True
    assert not dst[~written].any()


def test_device_transports_are_a_subset_without_tcp() -> None:
    with TransferEngine("d") as eng:
        device = eng.device_transports()
        assert set(device) <= set(eng.transports()) and "tcp" not in device
        # local and shm copy device memory with the CUDA executors, where they are built in
        assert ("local" in device) == ("shm" in device) == _C.cuda_compiled()


def test_register_layout_registers_each_region() -> None:
    lay = kvl.vllm_flash_attn([torch.ones(2, 4, 16, 2, 32, dtype=torch.float16) for _ in range(3)])
    with TransferEngine("g", transports=["local"]) as eng:
        assert len(eng.register_layout(lay)) == 3 and eng.num_registrations() == 3


def test_mode_is_validated_and_auto_stages_small_segments() -> None:
    with (
        TransferEngine("a", transports=["tcp"], staged_below_bytes=8192) as a,
        TransferEngine("b", transports=["tcp"]) as b,
    ):
        src, dst = np.arange(1 << 20, dtype=np.uint8), np.zeros(1 << 20, np.uint8)
        a.register(src)
        b.register(dst)
        peer = a.add_peer(b.descriptor())
        n = 16

        def segs(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            offs = np.arange(n, dtype=np.uint64) * size
            return src.ctypes.data + offs, dst.ctypes.data + offs, np.full(n, size, np.uint64)

        with pytest.raises(errors.InvalidArgumentError, match="mode"):
            a.submit(peer, "WRITE", *segs(1024), mode="fast")
        small = a.submit(peer, "WRITE", *segs(1024))
        small.wait(10)
        assert small.staged
        large = a.submit(peer, "WRITE", *segs(16384), mode="auto")
        large.wait(10)
        assert not large.staged
        forced = a.submit(peer, "WRITE", *segs(4096), mode="staged")
        forced.wait(10)
        assert forced.staged and np.array_equal(dst[: n * 4096], src[: n * 4096])


def test_a_batch_to_a_removed_peer_is_lost_not_hung() -> None:
    with one_big_write("tcp") as (child, eng, peer, whole):
        child.signal(signal.SIGSTOP)
        batch = eng.submit(peer, "WRITE", *whole)
        eng.remove_peer(peer)
        with pytest.raises(errors.PeerLostError):
            batch.wait(5)


@pytest.mark.parametrize("transport", ["local", "shm", "tcp"])
def test_concurrent_submitters_from_threads(transport: str, baseline_registrations) -> None:
    """The engine is shared by threads that submit, wait and receive concurrently (every
    blocking call releases the GIL): all data lands where it should and every notification
    arrives once."""
    blk, n, threads, rounds = 4096, 64, 4, 20
    src = np.random.default_rng(0).integers(0, 256, threads * n * blk, dtype=np.uint8)
    dst = np.zeros_like(src)
    with (
        TransferEngine("a", transports=[transport]) as a,
        TransferEngine("b", transports=[transport]) as b,
    ):
        a.register(src)
        b.register(dst)
        peer = a.add_peer(b.descriptor(), transport)
        failures: list[str] = []

        def worker(t: int) -> None:
            base = t * n * blk
            try:
                for r in range(rounds):
                    ids = np.random.default_rng(t * 1000 + r).permutation(n).astype(np.uint64)
                    la = src.ctypes.data + base + np.arange(n, dtype=np.uint64) * blk
                    ra = dst.ctypes.data + base + ids * blk
                    lens = np.full(n, blk, np.uint64)
                    a.submit(peer, "WRITE", la, ra, lens, notify=f"{t}/{r}".encode()).wait(10)
                    back = np.empty(n * blk, np.uint8)
                    for k in range(n):
                        off = base + int(ids[k]) * blk
                        back[k * blk : (k + 1) * blk] = dst[off : off + blk]
                    if not np.array_equal(back, src[base : base + n * blk]):
                        failures.append(f"thread {t} round {r}: data differs")
            except Exception as exc:
                failures.append(f"thread {t}: {exc!r}")

        workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert not failures
        messages: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(messages) < threads * rounds and time.monotonic() < deadline:
            messages += [m.message for m in b.notifications(5)]
        assert sorted(messages) == sorted(
            f"{t}/{r}".encode() for t in range(threads) for r in range(rounds)
        )
