"""Copy plans: runs merge wherever both sides are contiguous, and bad input copies nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import llumnix_kv as kv
from llumnix_kv import errors
from llumnix_kv import layout as kvl


def flash(blocks: int = 16, bs: int = 16, heads: int = 8, layout: str = "NHD", layers: int = 4):
    shape = (2, blocks, bs, heads, 128) if layout == "NHD" else (2, blocks, heads, bs, 128)
    caches = [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(layers)]
    return caches, kvl.vllm_flash_attn(caches, layout=layout)


def test_contiguous_blocks_merge_into_one_segment_per_region() -> None:
    _, a = flash()
    _, b = flash()
    plan = kv.plan_copy(a, b, [3, 4, 5, 6], [8, 9, 10, 11])
    assert len(plan) == 4 * 2  # one per (layer, K/V) region run
    assert plan.total_bytes == 4 * 2 * 64 * 8 * 256
    assert set(plan.len.tolist()) == {4 * 16 * 8 * 256}


def test_scattered_blocks_give_one_segment_per_block() -> None:
    _, a = flash()
    _, b = flash()
    plan = kv.plan_copy(a, b, [3, 7, 5], [1, 9, 2])
    assert len(plan) == 4 * 2 * 3


def test_cross_layer_contiguous_blocks_are_one_segment() -> None:
    phys = torch.zeros(16, 4, 2, 16, 8, 128, dtype=torch.bfloat16)
    lay = kvl.vllm_cross_layer(phys.permute(1, 2, 0, 3, 4, 5))
    plan = kv.plan_copy(lay, lay, [2, 3, 4], [10, 11, 12])
    assert len(plan) == 1 and plan.total_bytes == 3 * 4 * 2 * 16 * 8 * 256


def test_hnd_head_slice_is_one_segment_per_head_run() -> None:
    _, src = flash(heads=8, layout="HND")
    _, dst = flash(heads=4, layout="HND")
    # TP1 -> rank 1 of TP2: heads 4..8 of a block are one run of 4 heads x 16 tokens in the
    # source and the whole block in the destination.
    plan = kv.plan_copy(src, dst, [1, 2], [1, 2], src_heads=(0, 8), dst_heads=(4, 8))
    assert len(plan) == 4 * 2 * 2  # layers * kv * blocks
    assert set(plan.len.tolist()) == {4 * 16 * 256}
    # HND -> NHD: only single head vectors are contiguous on both sides.
    _, wide = flash(heads=8, layout="HND")
    _, nhd = flash(heads=8)
    plan = kv.plan_copy(wide, nhd, [1], [1], layers=(0, 1))
    assert len(plan) == 2 * 16 * 8


def test_nhd_head_slice_is_one_segment_per_token() -> None:
    _, src = flash(heads=8)
    _, dst = flash(heads=4)
    plan = kv.plan_copy(src, dst, [1], [1], src_heads=(0, 8), dst_heads=(4, 8), layers=(0, 1))
    assert len(plan) == 2 * 16 and set(plan.len.tolist()) == {4 * 256}


def test_block_size_change_16_to_64_merges_contiguous_runs() -> None:
    _, src = flash(bs=16)
    _, dst = flash(bs=64)
    plan = kv.plan_copy(src, dst, [0, 1, 2, 3], [5], layers=(0, 1))
    assert len(plan) == 2  # 4 contiguous 16-token blocks fill one 64-token block, per K/V


def test_incremental_token_range() -> None:
    _, a = flash()
    _, b = flash(bs=48)
    plan = kv.plan_copy(a, b, [0, 1, 2, 3], [7, 3], tokens=(40, 60), layers=(0, 1))
    assert plan.total_bytes == 2 * 20 * 8 * 256
    # tokens 40..48 land in dst block 7, 48..60 in dst block 3: two runs per K/V
    assert len(plan) == 4


def test_plan_is_pure_data() -> None:
    _, a = flash()
    plan = kv.plan_copy(a, a, [0, 1], [2, 3], layers=(1, 2))
    assert plan.src_region.dtype == np.int32 and plan.src_off.dtype == np.int64
    assert plan.staging_off.tolist() == [0, *np.cumsum(plan.len).tolist()]
    assert set(plan.src_region.tolist()) == {1}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(src_blocks=[0, 16]), errors.OutOfRangeError, "block id 16"),
        (dict(dst_blocks=[-1, 2]), errors.OutOfRangeError, "block id -1"),
        (dict(tokens=(0, 33)), errors.OutOfRangeError, "token range"),
        (dict(tokens=(5, 3)), errors.InvalidArgumentError, "malformed"),
        (dict(layers=(2, 9)), errors.OutOfRangeError, "layer range"),
        (dict(src_heads=(0, 4)), errors.InvalidArgumentError, "head range"),
        (dict(src_blocks=[0.5, 1.0]), errors.InvalidArgumentError, "integers"),
        (dict(src_blocks=[[0, 1]]), errors.InvalidArgumentError, "1-D"),
    ],
)
def test_bad_input_raises_typed_error(kwargs, error, match) -> None:
    _, a = flash()
    _, b = flash()
    args = dict(src_blocks=[0, 1], dst_blocks=[2, 3], tokens=(0, 32)) | kwargs
    with pytest.raises(error, match=match):
        kv.plan_copy(a, b, args.pop("src_blocks"), args.pop("dst_blocks"), **args)


def test_disjoint_heads_and_different_models_raise() -> None:
    _, a = flash(heads=4)
    _, b = flash(heads=4)
    with pytest.raises(errors.InvalidArgumentError, match="disjoint"):
        kv.plan_copy(a, b, [0], [0], src_heads=(0, 4), dst_heads=(4, 8))
    _, other = flash(layers=3)
    with pytest.raises(errors.LayoutMismatchError):
        kv.plan_copy(a, other, [0], [0])
    fp16 = kvl.vllm_flash_attn([torch.zeros(2, 16, 16, 4, 128, dtype=torch.float16)] * 4)
    with pytest.raises(errors.LayoutMismatchError):
        kv.plan_copy(a, fp16, [0], [0])


def test_failed_execution_copies_nothing() -> None:
    src_t, src = flash(blocks=16)
    dst_t, dst = flash(blocks=4)
    for t in src_t:
        t.fill_(1.0)
    plan = kv.plan_copy(src, src, [0, 1], [14, 15])  # valid for src, out of dst's bounds
    with pytest.raises(errors.OutOfRangeError):
        kv.execute(plan, src, dst)
    assert all(int(t.count_nonzero()) == 0 for t in dst_t)


def test_staging_buffer_too_small() -> None:
    _, a = flash()
    _, b = flash()
    plan = kv.plan_copy(a, b, [0], [1])
    with pytest.raises(errors.InvalidArgumentError, match="staging"):
        kv.execute(plan, a, b, staged=True, staging=np.empty(10, np.uint8))
