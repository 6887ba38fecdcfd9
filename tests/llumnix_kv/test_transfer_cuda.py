"""Device memory through the transfer engine: local (same process, cudaMemcpy) and shm (CUDA IPC
between processes). Skipped where no CUDA device is usable (tests/conftest.py)."""

from __future__ import annotations

import contextlib
import hashlib

import numpy as np
import pytest

from llumnix_kv import _C
from llumnix_kv.bench.target import PeerProcess
from llumnix_kv.transfer import TransferEngine

pytestmark = pytest.mark.cuda

BLOCK = 64 << 10
N = 32


def _device_buffer(data: np.ndarray) -> int:
    ptr = _C.cuda_malloc(data.nbytes, 0)
    _C.cuda_memcpy_sync(ptr, data.ctypes.data, data.nbytes)
    return ptr


def _read(ptr: int, nbytes: int) -> np.ndarray:
    host = np.empty(nbytes, np.uint8)
    _C.cuda_memcpy_sync(host.ctypes.data, ptr, nbytes)
    return host


def _segments(local: int, remote: int, ids: np.ndarray) -> tuple[np.ndarray, ...]:
    return (
        local + np.arange(N, dtype=np.uint64) * BLOCK,
        remote + ids.astype(np.uint64) * BLOCK,
        np.full(N, BLOCK, np.uint64),
    )


def test_local_device_to_device_and_host() -> None:
    src = np.random.default_rng(0).integers(0, 256, N * BLOCK, dtype=np.uint8)
    d_src, d_dst = _device_buffer(src), _device_buffer(np.zeros(2 * N * BLOCK, np.uint8))
    host = np.zeros(2 * N * BLOCK, np.uint8)
    try:
        with (
            TransferEngine("a", transports=["local"]) as a,
            TransferEngine("b", transports=["local"]) as b,
        ):
            a.register((d_src, N * BLOCK, 0))
            b.register((d_dst, 2 * N * BLOCK, 0))
            b.register(host)
            peer = a.add_peer(b.descriptor(), "local")
            ids = np.random.default_rng(1).permutation(2 * N)[:N]
            a.submit(peer, "WRITE", *_segments(d_src, d_dst, ids)).wait(10)
            a.submit(peer, "WRITE", *_segments(d_src, host.ctypes.data, ids)).wait(10)
            out = _read(d_dst, 2 * N * BLOCK)
            for i, j in enumerate(ids):
                want = src[i * BLOCK : (i + 1) * BLOCK]
                assert np.array_equal(out[j * BLOCK : (j + 1) * BLOCK], want)
                assert np.array_equal(host[j * BLOCK : (j + 1) * BLOCK], want)
    finally:
        _C.cuda_free(d_src)
        _C.cuda_free(d_dst)


@pytest.mark.parametrize("op", ["WRITE", "READ"])
def test_shm_cuda_ipc_between_processes(op: str) -> None:
    src = np.random.default_rng(2).integers(0, 256, N * BLOCK, dtype=np.uint8)
    d_local = _device_buffer(src)
    try:
        with (
            PeerProcess(["shm"], 2 * N * BLOCK, device=0) as child,
            TransferEngine("h", transports=["shm"]) as eng,
        ):
            child.call("fill", 3)
            eng.register((d_local, N * BLOCK, 0))
            peer = eng.add_peer(child.descriptor, "shm")
            ids = np.random.default_rng(4).permutation(2 * N)[:N]
            eng.submit(peer, op, *_segments(d_local, child.addr, ids), notify=b"done").wait(10)
            local = _read(d_local, N * BLOCK)
            for i, j in enumerate(ids[:4]):
                theirs = child.call("digest", int(j) * BLOCK, BLOCK)
                mine = hashlib.sha256(local[i * BLOCK : (i + 1) * BLOCK].tobytes()).hexdigest()
                assert theirs == mine
            assert child.call("notifications", 5) == [("h", b"done")]
    finally:
        _C.cuda_free(d_local)


@pytest.mark.parametrize("transport", ["local", "shm"])
def test_device_batches_do_not_wait_for_the_default_stream(transport: str) -> None:
    """An inference engine keeps the legacy default stream busy; a transfer on device memory
    runs on the link's own non-blocking stream and lands while that work is still running."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    src = np.random.default_rng(5).integers(0, 256, N * BLOCK, dtype=np.uint8)
    d_src, d_dst = _device_buffer(src), _device_buffer(np.zeros(N * BLOCK, np.uint8))
    ids = np.arange(N)[::-1].copy()
    try:
        with contextlib.ExitStack() as stack:
            eng = stack.enter_context(TransferEngine("s", transports=[transport]))
            eng.register((d_src, N * BLOCK, 0))
            if transport == "local":
                other = stack.enter_context(TransferEngine("o", transports=["local"]))
                other.register((d_dst, N * BLOCK, 0))
                peer, remote = eng.add_peer(other.descriptor(), "local"), d_dst
            else:
                child = stack.enter_context(PeerProcess(["shm"], N * BLOCK, device=0))
                peer, remote = eng.add_peer(child.descriptor, "shm"), child.addr
            segs = _segments(d_src, remote, ids)
            eng.submit(peer, "WRITE", *segs).wait(10)  # warm: stream, module, IPC mapping
            torch.cuda._sleep(4_000_000_000)  # seconds of GPU time on stream 0
            eng.submit(peer, "WRITE", *segs).wait(10)
            assert not torch.cuda.default_stream().query(), "stream 0 ended first"
            if transport == "local":
                out = _read(d_dst, N * BLOCK)
                for i, j in enumerate(ids):
                    assert np.array_equal(
                        out[j * BLOCK : (j + 1) * BLOCK], src[i * BLOCK : (i + 1) * BLOCK]
                    )
    finally:
        torch.cuda.synchronize()  # the sleep, before the buffers go
        _C.cuda_free(d_src)
        _C.cuda_free(d_dst)
