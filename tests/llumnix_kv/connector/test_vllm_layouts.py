"""The vLLM plugin recognises each attention backend's KV cache from the registered tensors
(shapes and strides as vLLM 0.32 allocates them; CPU tensors stand in for GPU ones)."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from llumnix_kv.copy import execute, plan_copy  # noqa: E402
from llumnix_kv.errors import UnsupportedError  # noqa: E402
from llumnix_kv.plugins.vllm.layouts import kv_cache_layout  # noqa: E402

LAYERS, BLOCKS, BS, HEADS, HEAD = 2, 6, 16, 4, 8


def randn(*shape: int) -> Any:
    return torch.randn(*shape).to(torch.bfloat16)


def flash(hnd: bool) -> list[Any]:
    """FlashAttention: logical [2, blocks, block, heads, head]; HND lays heads out before
    tokens (vLLM's stride order), seen through the same logical shape."""
    if not hnd:
        return [randn(2, BLOCKS, BS, HEADS, HEAD) for _ in range(LAYERS)]
    return [randn(2, BLOCKS, HEADS, BS, HEAD).permute(0, 1, 3, 2, 4) for _ in range(LAYERS)]


@pytest.mark.parametrize(
    ("make", "backend"),
    [
        (lambda: [randn(BLOCKS, HEADS, BS, 2 * HEAD) for _ in range(LAYERS)], "CPU_ATTN"),
        (lambda: flash(hnd=False), "FLASH_ATTN"),
        (lambda: flash(hnd=True), "FLASH_ATTN"),
        (lambda: [randn(BLOCKS, 2, BS, HEADS, HEAD) for _ in range(LAYERS)], "FLASHINFER"),
        (lambda: [randn(BLOCKS, BS, 576) for _ in range(LAYERS)], "MLA"),
    ],
)
def test_backends_are_recognised(make: Any, backend: str) -> None:
    tensors = make()
    name, layout = kv_cache_layout(tensors, BS, BLOCKS)
    assert name == backend
    assert layout.num_layers == LAYERS and layout.block_tokens == BS
    assert layout.num_blocks == BLOCKS


def test_hnd_and_nhd_flash_caches_copy_token_for_token() -> None:
    """A copy planned between the NHD and the HND view moves every (layer, k/v, token,
    head) element to the same logical place: the strides were read, not assumed."""
    src, dst = flash(hnd=False), [t.zero_() for t in flash(hnd=True)]
    _, s_layout = kv_cache_layout(src, BS, BLOCKS)
    _, d_layout = kv_cache_layout(dst, BS, BLOCKS)
    execute(plan_copy(s_layout, d_layout, [3, 1], [0, 5], tokens=(0, 2 * BS)), s_layout, d_layout)
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(d[:, 0], s[:, 3]) and torch.equal(d[:, 5], s[:, 1])


def test_unknown_or_ambiguous_caches_are_refused() -> None:
    with pytest.raises(UnsupportedError, match="not a supported KV cache"):
        kv_cache_layout([randn(BLOCKS, BS)], BS)
    with pytest.raises(UnsupportedError, match="not a supported KV cache"):
        kv_cache_layout([randn(2, BLOCKS, 32, HEADS, HEAD)], BS)  # other block size
    # Two blocks: [2, 2, block, heads, head] fits FlashAttention and FlashInfer alike.
    with pytest.raises(UnsupportedError, match="several backends"):
        kv_cache_layout([randn(2, 2, BS, HEADS, HEAD)], BS, num_blocks=2)
    # The engine's block count rules out a reading: [2, 6, ...] is no 2-block FlashInfer cache.
    assert kv_cache_layout([randn(2, 6, BS, HEADS, HEAD)], BS, num_blocks=6)[0] == "FLASH_ATTN"
    with pytest.raises(UnsupportedError):
        kv_cache_layout([randn(2, 6, BS, HEADS, HEAD)], BS, num_blocks=5)
    with pytest.raises(UnsupportedError):
        kv_cache_layout([], BS)
