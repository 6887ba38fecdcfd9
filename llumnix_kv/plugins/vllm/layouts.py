"""Which vLLM attention backend's KV cache a worker registered, as a :class:`KvLayout`.

vLLM hands the connector one tensor per attention layer, with the backend's logical shape and
the strides of its physical order (e.g. FlashAttention's HND order is an NHD-shaped view), so
the layout model reads the strides and both orders come out right. Shapes (vLLM 0.32):

==============  ==========================================  ======
backend         per-layer tensor                            device
==============  ==========================================  ======
CPU_ATTN        ``[num_blocks, kv_heads, block, 2 * head]``  cpu
FLASH_ATTN      ``[2, num_blocks, block, kv_heads, head]``   cuda
FLASHINFER      ``[num_blocks, 2, block, kv_heads, head]``   cuda
MLA backends    ``[num_blocks, block, latent + rope]``       cuda
==============  ==========================================  ======
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llumnix_kv._C import KvLayout
from llumnix_kv.errors import UnsupportedError
from llumnix_kv.layout import vllm_cpu, vllm_flash_attn, vllm_flashinfer, vllm_mla

__all__ = ["SUPPORTED", "kv_cache_layout"]

SUPPORTED = (
    "CPU_ATTN [num_blocks, kv_heads, block, 2 * head] on cpu, "
    "FLASH_ATTN [2, num_blocks, block, kv_heads, head], "
    "FLASHINFER [num_blocks, 2, block, kv_heads, head], "
    "MLA [num_blocks, block, dim]"
)


def kv_cache_layout(
    tensors: Sequence[Any], block_size: int, num_blocks: int | None = None
) -> tuple[str, KvLayout]:
    """(backend name, layout) of a worker's per-layer KV cache tensors.

    Raises:
        UnsupportedError: the tensors match none of the shapes above for ``block_size``
            (and ``num_blocks``, when given).
    """
    if not tensors:
        raise UnsupportedError("no KV cache tensors registered")
    t = tensors[0]
    shape, on_cpu = tuple(t.shape), t.device.type == "cpu"

    def blocks_ok(n: int) -> bool:
        return num_blocks is None or n == num_blocks

    candidates = []
    if len(shape) == 4 and on_cpu and shape[2] == block_size and blocks_ok(shape[0]):
        candidates.append(("CPU_ATTN", vllm_cpu))
    if len(shape) == 5 and shape[2] == block_size:
        if shape[0] == 2 and blocks_ok(shape[1]):
            candidates.append(("FLASH_ATTN", vllm_flash_attn))
        if shape[1] == 2 and blocks_ok(shape[0]):
            candidates.append(("FLASHINFER", vllm_flashinfer))
    if len(shape) == 3 and shape[1] == block_size and blocks_ok(shape[0]):
        candidates.append(("MLA", vllm_mla))
    if len(candidates) != 1:
        what = "matches several backends" if candidates else "is not a supported KV cache"
        raise UnsupportedError(
            f"KV cache tensor {shape} on {t.device} ({block_size}-token blocks) {what}; "
            f"supported: {SUPPORTED}"
        )
    name, build = candidates[0]
    layout = build(tensors)
    if layout.block_tokens != block_size:
        raise UnsupportedError(
            f"{name} cache holds {layout.block_tokens}-token blocks, the engine uses {block_size}"
        )
    return name, layout
