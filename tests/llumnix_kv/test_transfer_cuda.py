"""Device memory through the transfer engine: local (same process, cudaMemcpy) and shm (CUDA IPC
between processes). Skipped where no CUDA device is usable (tests/conftest.py)."""

from __future__ import annotations

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
