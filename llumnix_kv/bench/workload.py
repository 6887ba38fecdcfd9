"""KV-shaped workloads for the transfer benchmark: model shapes, cache layouts laid over flat
buffers, and block tables as a paged allocator hands them out after churn."""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llumnix_kv import KvLayout, MemoryRegion
from llumnix_kv import layout as kvl
from llumnix_kv.errors import InvalidArgumentError

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1, "uint8": 1}


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    kv_heads: int  # 1 for MLA
    head_dim: int  # elements of one head vector (the latent width for MLA)
    dtype: str = "bfloat16"
    mla: bool = False

    @property
    def bytes_per_token(self) -> int:
        return self.layers * (1 if self.mla else 2) * self.kv_heads * self.head_dim * 2


MODELS = {
    "llama3-8b": ModelShape("llama3-8b", 32, 8, 128),
    "llama2-7b": ModelShape("llama2-7b", 32, 32, 128, "float16"),
    "qwen2.5-7b": ModelShape("qwen2.5-7b", 28, 4, 128),
    "deepseek-v2-lite": ModelShape("deepseek-v2-lite", 27, 1, 576, mla=True),
}


def model_from_config(path: str | Path) -> ModelShape:
    """The KV shape of a Hugging Face ``config.json`` (MHA/GQA, or MLA via kv_lora_rank)."""
    cfg = json.loads(Path(path).read_text())
    dtype = str(cfg.get("torch_dtype", "bfloat16"))
    if dtype not in _DTYPE_BYTES:
        raise InvalidArgumentError(f"unsupported torch_dtype {dtype!r} in {path}")
    layers = int(cfg["num_hidden_layers"])
    if "kv_lora_rank" in cfg:  # DeepSeek-style MLA: one latent vector per token and layer
        latent = int(cfg["kv_lora_rank"]) + int(cfg.get("qk_rope_head_dim", 64))
        return ModelShape(Path(path).parent.name or "model", layers, 1, latent, dtype, mla=True)
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads", heads))
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    return ModelShape(Path(path).parent.name or "model", layers, kv_heads, head_dim, dtype)


LAYOUTS = ("flash_nhd", "flash_hnd", "flashinfer_nhd", "vllm_cpu")


def cache_bytes(model: ModelShape, num_blocks: int, block_tokens: int, heads: int) -> int:
    return (
        model.layers
        * (1 if model.mla else 2)
        * num_blocks
        * block_tokens
        * heads
        * (model.head_dim * 2)
    )


def flat_layout(
    model: ModelShape, layout: str, block_tokens: int, num_blocks: int, heads: int, base: int
) -> KvLayout:
    """The layout of a cache whose per-layer tensors lie back to back from ``base`` (one flat
    buffer, e.g. shared memory or a peer's registered pool)."""
    import torch  # the layout is described with meta tensors: no memory is touched

    dtype = getattr(torch, model.dtype)

    def t(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta")

    L, d = model.layers, model.head_dim
    if model.mla:
        described = kvl.vllm_mla([t(num_blocks, block_tokens, d) for _ in range(L)])
    elif layout in ("flash_nhd", "flash_hnd"):
        dims = (block_tokens, heads) if layout == "flash_nhd" else (heads, block_tokens)
        caches = [t(2, num_blocks, *dims, d) for _ in range(L)]
        described = kvl.vllm_flash_attn(caches, layout="NHD" if layout == "flash_nhd" else "HND")
    elif layout == "flashinfer_nhd":
        described = kvl.vllm_flashinfer(
            [t(num_blocks, 2, block_tokens, heads, d) for _ in range(L)]
        )
    elif layout == "vllm_cpu":
        described = kvl.vllm_cpu([t(num_blocks, heads, block_tokens, 2 * d) for _ in range(L)])
    else:
        raise InvalidArgumentError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    per_layer = cache_bytes(model, num_blocks, block_tokens, heads) // L
    regions = [MemoryRegion(base + i * per_layer, per_layer, -1) for i in range(L)]
    return kvl.with_regions(described, regions)


def churned_block_table(pool_blocks: int, need: int, rng: np.random.Generator) -> np.ndarray:
    """Blocks a paged allocator (free queue: allocate from the head, free to the tail, as in
    vLLM) hands to a request of ``need`` blocks after many requests came and went: mostly
    scattered, with the short runs real caches have."""
    if need > pool_blocks:
        raise InvalidArgumentError(f"{need} blocks do not fit a pool of {pool_blocks}")
    free = deque(range(pool_blocks))
    live: list[list[int]] = []
    for _ in range(4 * pool_blocks // 16 + 64):
        if live and (rng.random() < 0.5 or len(free) < 64):
            blocks = live.pop(int(rng.integers(len(live))))
            free.extend(reversed(blocks))  # a finished request frees its blocks tail first
        else:
            n = min(int(rng.integers(1, 64)), len(free))
            live.append([free.popleft() for _ in range(n)])
    while live:
        free.extend(reversed(live.pop(int(rng.integers(len(live))))))
    return np.array([free.popleft() for _ in range(need)], dtype=np.int64)
