"""CUDA executor: the same property as the CPU executor, on device memory.

Caches are built on the host (the reference runs there), mirrored into device buffers that the
module allocates itself (a CPU build of torch is enough), copied on the device and read back.
Skipped where no CUDA device is usable (tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import llumnix_kv as kv
from llumnix_kv import _C, errors
from llumnix_kv import layout as kvl
from tests.llumnix_kv.kv_formats import Cache, same_bytes
from tests.llumnix_kv.test_copy_property import copy_case, expected_after, plan_case

pytestmark = pytest.mark.cuda


class DeviceMirror:
    """Device buffers holding the bytes of a host cache's regions."""

    def __init__(self, cache: Cache) -> None:
        self.host = cache
        self.ptrs = [_C.cuda_malloc(r.bytes, 0) for r in cache.layout.regions]
        for p, r in zip(self.ptrs, cache.layout.regions, strict=True):
            _C.cuda_memcpy_sync(p, r.addr, r.bytes)
        regions = [
            kv.MemoryRegion(p, r.bytes, 0)
            for p, r in zip(self.ptrs, cache.layout.regions, strict=True)
        ]
        self.layout = kvl.with_regions(cache.layout, regions)

    def read_back(self) -> None:
        for p, r in zip(self.ptrs, self.host.layout.regions, strict=True):
            _C.cuda_memcpy_sync(r.addr, p, r.bytes)

    def free(self) -> None:
        for p in self.ptrs:
            _C.cuda_free(p)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=copy_case())
def test_cuda_executor_matches_reference(case: dict) -> None:
    src, dst, expected = expected_after(case)
    d_src, d_dst = DeviceMirror(src), DeviceMirror(dst)
    staging = _C.cuda_malloc(1 << 20, 0)
    try:
        plan = plan_case(case, d_src.layout, d_dst.layout)
        assert plan.total_bytes <= 1 << 20
        kv.execute(
            plan, d_src.layout, d_dst.layout, staged=case["staged"], staging=(staging, 1 << 20)
        )
        _C.cuda_synchronize(0)
        d_dst.read_back()
    finally:
        d_src.free()
        d_dst.free()
        _C.cuda_free(staging)
    assert same_bytes(dst, expected)


def _flat(t: torch.Tensor) -> Cache:
    """A one-region cache whose single block is ``t``'s bytes as one head vector per token."""
    view = t.view(1, 1, -1)
    return Cache([t], [view], kvl.layout_from_tensors([view], ("block", "token", "dim")))


def test_cuda_large_unaligned_segments() -> None:
    """A segment longer than one kernel piece (32 KiB), at several alignments."""
    n = 200_000
    base = torch.randint(0, 256, (n + 16,), dtype=torch.uint8)
    for offset in (0, 1, 3, 8):
        out = torch.zeros(n, dtype=torch.uint8)
        src, dst = DeviceMirror(_flat(base[offset : offset + n])), DeviceMirror(_flat(out))
        try:
            kv.execute(kv.plan_copy(src.layout, dst.layout, [0], [0]), src.layout, dst.layout)
            _C.cuda_synchronize(0)
            dst.read_back()
        finally:
            src.free()
            dst.free()
        assert torch.equal(out, base[offset : offset + n])


def test_cuda_staged_without_buffer_is_rejected() -> None:
    host = torch.zeros(2, 4, 16, 8, 128, dtype=torch.bfloat16)
    mirror = DeviceMirror(Cache([host], [host], kvl.vllm_flash_attn([host])))
    try:
        plan = kv.plan_copy(mirror.layout, mirror.layout, [0], [1])
        with pytest.raises(errors.InvalidArgumentError, match="staging"):
            kv.execute(plan, mirror.layout, mirror.layout, staged=True)
    finally:
        mirror.free()


def test_build_reports_cuda() -> None:
    info = kv.build_info()
    assert info["cuda_compiled"] and info["cuda_devices"] > 0
    assert np.int64(_C.cuda_device_count()) > 0
