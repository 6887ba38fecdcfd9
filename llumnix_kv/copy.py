"""Plan and run KV copies between layouts.

A copy moves tokens ``[begin, end)`` of one request from a source cache (its block table, the
KV heads it holds) to a destination cache. :func:`plan_copy` turns that into a
:class:`CopyPlan` of merged byte segments; :func:`execute` runs a plan on the memory of two
layouts, directly (segment by segment) or staged (gather into one contiguous buffer, then
scatter), on the CPU or with CUDA.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import numpy as np

from llumnix_kv import _C
from llumnix_kv._C import CopyPlan, KvLayout
from llumnix_kv.errors import InvalidArgumentError, UnsupportedError

__all__ = ["CopyMode", "execute", "gather", "plan_copy", "scatter"]


class CopyMode(enum.IntEnum):
    """Executor modes (csrc/include/llumnix_kv/copy.h)."""

    DIRECT = 0  # region -> region
    GATHER = 1  # region -> staging buffer (segments packed in plan order)
    SCATTER = 2  # staging buffer -> region


def _block_table(blocks: Any, side: str) -> np.ndarray:
    table = np.asarray(blocks)
    if table.size == 0:
        return np.zeros(0, dtype=np.int64)
    if table.ndim != 1 or table.dtype.kind not in "iu":
        raise InvalidArgumentError(
            f"{side} block table must be a 1-D sequence of integers, got {table.dtype}"
            f" with shape {table.shape}"
        )
    return table.astype(np.int64, copy=False)


def plan_copy(
    src: KvLayout,
    dst: KvLayout,
    src_blocks: Sequence[int] | np.ndarray,
    dst_blocks: Sequence[int] | np.ndarray,
    tokens: tuple[int, int] | None = None,
    *,
    src_heads: tuple[int, int] | None = None,
    dst_heads: tuple[int, int] | None = None,
    layers: tuple[int, int] | None = None,
) -> CopyPlan:
    """Plans the copy of a request's KV from ``src`` to ``dst``.

    Args:
        src_blocks, dst_blocks: block tables; entry ``i`` is the physical block holding the
            request's tokens ``[i * block_tokens, (i + 1) * block_tokens)``.
        tokens: the token range ``[begin, end)`` to copy; default: every token both tables hold.
        src_heads, dst_heads: global KV-head range ``[begin, end)`` each cache holds (its tensor
            parallel shard); default ``(0, num_heads)``. Heads held by both are copied.
        layers: layer range ``[begin, end)``; default: all.

    Raises:
        OutOfRangeError, InvalidArgumentError, LayoutMismatchError, InvalidLayoutError.
    """
    sb = _block_table(src_blocks, "src")
    db = _block_table(dst_blocks, "dst")
    if tokens is None:
        tokens = (0, min(len(sb) * src.block_tokens, len(db) * dst.block_tokens))
    return _C.plan_copy(src, dst, sb, db, tokens[0], tokens[1], src_heads, dst_heads, layers)


def _buffer(obj: Any) -> tuple[int, int]:
    """(address, bytes) of a staging buffer: a numpy array, a tensor, or an (addr, bytes) pair."""
    if isinstance(obj, tuple):
        return int(obj[0]), int(obj[1])
    if isinstance(obj, np.ndarray):
        return obj.ctypes.data, obj.nbytes
    if hasattr(obj, "data_ptr"):
        return obj.data_ptr(), obj.numel() * obj.element_size()
    raise InvalidArgumentError(f"cannot use {type(obj).__name__} as a staging buffer")


def _bases(layout: KvLayout) -> list[int]:
    return [r.addr for r in layout.regions]


def _on_device(*layouts: KvLayout) -> bool:
    return any(r.device >= 0 for layout in layouts for r in layout.regions)


def _run(
    plan: CopyPlan,
    mode: CopyMode,
    src: list[int],
    dst: list[int],
    staging: tuple[int, int],
    cuda: bool,
    stream: int,
    num_threads: int,
) -> None:
    if cuda:
        _C.copy_cuda(plan, int(mode), src, dst, staging[0], staging[1], stream)
    else:
        _C.copy_cpu(plan, int(mode), src, dst, staging[0], staging[1], num_threads)


def execute(
    plan: CopyPlan,
    src: KvLayout,
    dst: KvLayout,
    *,
    staged: bool = False,
    staging: Any = None,
    stream: int = 0,
    num_threads: int = 0,
) -> None:
    """Runs ``plan`` from ``src``'s memory to ``dst``'s.

    Host layouts run on the CPU executor (blocking, GIL released, ``num_threads`` threads, 0 for
    the pool size). If either side is on a CUDA device the CUDA executor runs it as one launch
    ordered on ``stream`` (a ``cudaStream_t`` as an int, e.g. ``torch.cuda.current_stream().
    cuda_stream``) and returns before it finishes. ``staged`` gathers into ``staging`` (a buffer
    of at least ``plan.total_bytes``; allocated on the host when omitted, required on a device)
    and scatters from it.
    """
    plan.check_bounds(src, dst)
    cuda = _on_device(src, dst)
    if cuda and not _C.cuda_compiled():
        raise UnsupportedError("the caches are on a CUDA device but CUDA is not compiled in")
    if not staged:
        _run(plan, CopyMode.DIRECT, _bases(src), _bases(dst), (0, 0), cuda, stream, num_threads)
        return
    if staging is None:
        if cuda:
            raise InvalidArgumentError("staged CUDA copies need a staging buffer")
        staging = np.empty(plan.total_bytes, dtype=np.uint8)
    buf = _buffer(staging)
    _run(plan, CopyMode.GATHER, _bases(src), [], buf, cuda, stream, num_threads)
    _run(plan, CopyMode.SCATTER, [], _bases(dst), buf, cuda, stream, num_threads)


def gather(
    plan: CopyPlan, src: KvLayout, staging: Any, *, stream: int = 0, num_threads: int = 0
) -> None:
    """Packs the plan's source segments into ``staging`` (segment i at ``plan.staging_off[i]``)."""
    plan.check_bounds(src, None)
    cuda = _on_device(src)
    _run(plan, CopyMode.GATHER, _bases(src), [], _buffer(staging), cuda, stream, num_threads)


def scatter(
    plan: CopyPlan, staging: Any, dst: KvLayout, *, stream: int = 0, num_threads: int = 0
) -> None:
    """Unpacks ``staging`` (as :func:`gather` packed it) into the plan's destination segments."""
    plan.check_bounds(None, dst)
    cuda = _on_device(dst)
    _run(plan, CopyMode.SCATTER, [], _bases(dst), _buffer(staging), cuda, stream, num_threads)
