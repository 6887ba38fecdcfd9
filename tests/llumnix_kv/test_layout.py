"""Layouts of real engine caches: strides read from the tensors, and bad descriptions rejected."""

from __future__ import annotations

import pytest
import torch

import llumnix_kv as kv
from llumnix_kv import errors
from llumnix_kv import layout as kvl
from tests.llumnix_kv.kv_formats import (
    FORMATS_BY_NAME,
    Shape,
    clone_cache,
    reference_copy,
    same_bytes,
)

# Llama-3-8B: 32 layers, 8 KV heads of 128, bf16 -> 256-byte head vectors.
LLAMA3_8B = dict(layers=32, heads=8, head_dim=128, dtype=torch.bfloat16)


def test_llama3_8b_flash_attn_nhd_strides() -> None:
    caches = [torch.empty(2, 6, 16, 8, 128, dtype=torch.bfloat16) for _ in range(32)]
    lay = kvl.vllm_flash_attn(caches)
    assert (lay.num_layers, lay.num_kv, lay.num_blocks, lay.block_tokens, lay.num_heads) == (
        32, 2, 6, 16, 8,
    )  # fmt: skip
    assert lay.head_bytes == 256 and lay.dtype == "bfloat16"
    assert (lay.head_stride, lay.token_stride, lay.block_stride, lay.kv_stride) == (
        256, 8 * 256, 16 * 8 * 256, 6 * 16 * 8 * 256,
    )  # fmt: skip
    assert lay.region_layer_mult == 1 and lay.region_kv_mult == 0 and lay.layer_stride == 0
    assert [r.addr for r in lay.regions] == [c.data_ptr() for c in caches]
    assert lay.bytes_per_token == 32 * 2 * 8 * 256


def test_hnd_stride_order_is_read_from_memory() -> None:
    phys = torch.empty(2, 4, 8, 16, 128, dtype=torch.bfloat16)  # [2, blocks, heads, tokens, dim]
    lay = kvl.vllm_flash_attn([phys.permute(0, 1, 3, 2, 4)])  # logical NHD, as vLLM hands it
    assert lay.token_stride == 256 and lay.head_stride == 16 * 256


def test_mla_latent_576() -> None:
    caches = [torch.empty(5, 64, 576, dtype=torch.bfloat16) for _ in range(3)]
    lay = kvl.vllm_mla(caches)
    assert (lay.num_kv, lay.num_heads, lay.head_bytes, lay.block_tokens) == (1, 1, 1152, 64)


def test_vllm_cpu_tiny_model_cache() -> None:
    # The tiny Llama of the engine tests: 2 layers, 2 KV heads of 32, bf16, 128-token blocks.
    caches = [torch.empty(8, 2, 128, 64, dtype=torch.bfloat16) for _ in range(2)]
    lay = kvl.vllm_cpu(caches)
    assert (lay.num_kv, lay.num_heads, lay.head_bytes) == (2, 2, 64)
    assert (lay.kv_stride, lay.token_stride, lay.head_stride) == (64, 128, 128 * 128)


def test_sglang_mha_pages_are_token_slots() -> None:
    k = [torch.empty(4 * 16 + 16, 8, 128, dtype=torch.float16) for _ in range(2)]
    v = [torch.empty(4 * 16 + 16, 8, 128, dtype=torch.float16) for _ in range(2)]
    lay = kvl.sglang_mha(k, v, page_size=16)
    assert lay.num_blocks == 5 and lay.block_stride == 16 * 8 * 256
    assert lay.region_of(1, 0) == 1 and lay.region_of(0, 1) == 2


@pytest.mark.parametrize(
    "name",
    ["vllm_flash_attn_nhd", "vllm_flashinfer_hnd", "vllm_cpu", "vllm_cross_layer_flash_attn"],
)
def test_llama3_8b_copy_tp1_to_tp2_and_block_16_to_64(name: str) -> None:
    """Real model shape: prefill TP1 with 16-token blocks -> decode rank 1 of TP2, 64-token
    blocks, NHD -> HND, 100 tokens starting mid-block."""
    src_fmt, dst_fmt = FORMATS_BY_NAME[name], FORMATS_BY_NAME["vllm_flash_attn_hnd"]
    src_shape = Shape(LLAMA3_8B["layers"], 9, 16, 8, 128, torch.bfloat16)
    dst_shape = Shape(LLAMA3_8B["layers"], 3, 64, 4, 128, torch.bfloat16)
    src, dst = src_fmt.alloc(src_shape), dst_fmt.alloc(dst_shape)
    src_blocks, dst_blocks = [8, 0, 3, 4, 5, 6, 7, 1], [2, 0]
    expected = clone_cache(dst_fmt, dst_shape, dst)
    reference_copy(
        src_fmt, src, src_blocks, (0, 8), dst_fmt, expected, dst_blocks, (4, 8), (10, 110), (0, 32)
    )
    plan = kv.plan_copy(
        src.layout,
        dst.layout,
        src_blocks,
        dst_blocks,
        (10, 110),
        src_heads=(0, 8),
        dst_heads=(4, 8),
    )
    kv.execute(plan, src.layout, dst.layout)
    assert same_bytes(dst, expected)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda lay: setattr(lay, "token_stride", 100), "overlap"),
        (
            lambda lay: setattr(
                lay, "regions", [kv.MemoryRegion(r.addr, r.bytes - 1) for r in lay.regions]
            ),
            "spans",
        ),
        (lambda lay: setattr(lay, "head_bytes", 0), "head_bytes"),
        (lambda lay: setattr(lay, "num_kv", 3), "num_kv"),
        (lambda lay: setattr(lay, "region_layer_mult", 2), "region"),
        (lambda lay: setattr(lay, "layer_stride", 8), "stride must be 0"),
    ],
)
def test_invalid_descriptions_raise_typed_error(mutate, match: str) -> None:
    lay = kvl.vllm_flash_attn([torch.empty(2, 6, 16, 8, 128, dtype=torch.bfloat16)] * 2)
    mutate(lay)
    with pytest.raises(errors.InvalidLayoutError, match=match):
        lay.validate()


def test_dtype_and_shape_mismatch_between_tensors() -> None:
    a = torch.empty(2, 4, 16, 8, 128, dtype=torch.bfloat16)
    with pytest.raises(errors.InvalidLayoutError, match="differ"):
        kvl.vllm_flash_attn([a, a.to(torch.float16)])
    with pytest.raises(errors.InvalidLayoutError, match="differ"):
        kvl.vllm_flash_attn([a, a[:, :3]])
    with pytest.raises(errors.InvalidLayoutError, match="K buffers"):
        kvl.sglang_mha([a[0, 0]], [], page_size=16)
    with pytest.raises(errors.InvalidLayoutError, match="contiguous"):
        kvl.vllm_flash_attn([a.transpose(3, 4)])
    with pytest.raises(errors.InvalidArgumentError, match="NHD"):
        kvl.vllm_flash_attn([a], layout="NDH")
    with pytest.raises(errors.InvalidLayoutError):
        kvl.vllm_cpu([a])


def test_errors_are_builtin_compatible() -> None:
    assert issubclass(errors.InvalidLayoutError, ValueError)
    assert issubclass(errors.OutOfRangeError, IndexError)
    assert issubclass(errors.KvTimeoutError, TimeoutError)
    assert issubclass(errors.PeerLostError, ConnectionError)
    assert all(issubclass(c, errors.KvError) for c in errors._BY_CODE)


def test_layout_keeps_its_tensors_alive() -> None:
    import gc

    lay = kvl.vllm_flash_attn([torch.ones(2, 4, 16, 8, 128, dtype=torch.bfloat16)])
    gc.collect()
    dst = kvl.vllm_flash_attn([torch.zeros(2, 4, 16, 8, 128, dtype=torch.bfloat16)])
    kv.execute(kv.plan_copy(lay, dst, [0, 1], [2, 3]), lay, dst)
    (out,) = dst._owners
    assert float(out[:, 2:].float().mean()) == 1.0 and float(out[:, :2].float().abs().sum()) == 0
