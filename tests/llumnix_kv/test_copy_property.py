"""Property: for random layout pairs, block tables, head shards and token ranges, plan + CPU
executor (direct and staged) writes exactly what the element-by-element reference writes."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llumnix_kv as kv
from llumnix_kv import KvLayout
from tests.llumnix_kv.kv_formats import (
    FORMATS,
    Cache,
    Shape,
    clone_cache,
    reference_copy,
    same_bytes,
)

MHA = [f for f in FORMATS if not f.mla]
MLA = [f for f in FORMATS if f.mla]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.uint8]


@st.composite
def shard(draw: st.DrawFn, model_heads: int) -> tuple[int, int]:
    """A tensor-parallel shard [begin, end) of the model's KV heads."""
    tp = draw(st.sampled_from([d for d in (1, 2, 4) if model_heads % d == 0]))
    rank = draw(st.integers(0, tp - 1))
    per = model_heads // tp
    return rank * per, (rank + 1) * per


@st.composite
def copy_case(draw: st.DrawFn) -> dict:
    mla = draw(st.booleans())
    src_fmt = draw(st.sampled_from(MLA if mla else MHA))
    dst_fmt = draw(st.sampled_from(MLA if mla else MHA))
    model_heads = 1 if mla else draw(st.sampled_from([1, 2, 4]))
    src_heads = draw(shard(model_heads))
    dst_heads = draw(shard(model_heads))
    if max(src_heads[0], dst_heads[0]) >= min(src_heads[1], dst_heads[1]):
        dst_heads = (
            src_heads
            if (src_heads[1] - src_heads[0]) == (dst_heads[1] - dst_heads[0])
            else (0, model_heads)
        )
    layers = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([1, 3, 4, 8]))
    dtype = draw(st.sampled_from(DTYPES))
    sbs = draw(st.sampled_from([1, 2, 3, 4, 6, 16]))
    dbs = draw(st.sampled_from([1, 2, 3, 4, 6, 16]))
    total = draw(st.integers(1, 40))
    begin = draw(st.integers(0, total))
    end = draw(st.integers(begin, total))
    layer_range = draw(
        st.sampled_from([(0, layers)])
        | st.tuples(st.integers(0, layers - 1)).map(lambda t: (t[0], layers))
    )
    n_src = -(-total // sbs)
    n_dst = -(-total // dbs)
    src_pool = n_src + draw(st.integers(0, 3))
    dst_pool = n_dst + draw(st.integers(0, 3))
    src_blocks = draw(st.permutations(range(src_pool)))[:n_src]
    dst_blocks = draw(st.permutations(range(dst_pool)))[:n_dst]
    return dict(
        src_fmt=src_fmt,
        dst_fmt=dst_fmt,
        src_shape=Shape(layers, src_pool, sbs, src_heads[1] - src_heads[0], head_dim, dtype),
        dst_shape=Shape(layers, dst_pool, dbs, dst_heads[1] - dst_heads[0], head_dim, dtype),
        src_heads=src_heads,
        dst_heads=dst_heads,
        src_blocks=list(src_blocks),
        dst_blocks=list(dst_blocks),
        tokens=(begin, end),
        layers=layer_range,
        staged=draw(st.booleans()),
    )


def expected_after(case: dict) -> tuple[Cache, Cache, Cache]:
    """(src, dst, expected dst) caches for a case; the reference has run on `expected`."""
    src_fmt, dst_fmt = case["src_fmt"], case["dst_fmt"]
    src = src_fmt.alloc(case["src_shape"])
    dst = dst_fmt.alloc(case["dst_shape"])
    expected = clone_cache(dst_fmt, case["dst_shape"], dst)
    reference_copy(
        src_fmt, src, case["src_blocks"], case["src_heads"],
        dst_fmt, expected, case["dst_blocks"], case["dst_heads"],
        case["tokens"], case["layers"],
    )  # fmt: skip
    return src, dst, expected


def plan_case(case: dict, src: KvLayout, dst: KvLayout) -> kv.CopyPlan:
    return kv.plan_copy(
        src,
        dst,
        case["src_blocks"],
        case["dst_blocks"],
        case["tokens"],
        src_heads=case["src_heads"],
        dst_heads=case["dst_heads"],
        layers=case["layers"],
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=copy_case())
def test_plan_and_cpu_executor_match_reference(case: dict) -> None:
    src, dst, expected = expected_after(case)
    plan = plan_case(case, src.layout, dst.layout)
    heads = min(case["src_heads"][1], case["dst_heads"][1]) - max(
        case["src_heads"][0], case["dst_heads"][0]
    )
    tokens = case["tokens"][1] - case["tokens"][0]
    n_layers = case["layers"][1] - case["layers"][0]
    assert plan.total_bytes == (
        n_layers * src.layout.num_kv * tokens * heads * src.layout.head_bytes
    )
    assert int(np.sum(plan.len)) == plan.total_bytes
    kv.execute(plan, src.layout, dst.layout, staged=case["staged"])
    assert same_bytes(dst, expected)
