"""Real engine KV cache formats for tests: how each engine allocates its cache, the llumnix_kv
constructor that describes it, and an independent reference accessor that indexes the engine's
tensors the way the engine does (no strides, no layout model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llumnix_kv import KvLayout
from llumnix_kv import layout as kvl


@dataclass(frozen=True)
class Shape:
    layers: int
    blocks: int
    block_tokens: int
    heads: int  # KV heads this cache holds (1 for MLA)
    head_dim: int  # elements of one head vector (the latent width for MLA)
    dtype: torch.dtype


@dataclass
class Cache:
    storage: list[torch.Tensor]  # every byte the cache owns, for whole-cache comparison
    tensors: list[torch.Tensor]  # what the engine hands to a connector
    layout: KvLayout


@dataclass(frozen=True)
class Format:
    name: str
    mla: bool
    alloc: Callable[[Shape], Cache]
    # (cache, layer, kv, block, token_in_block, local_head) -> 1-D view of one head vector
    head: Callable[[Cache, int, int, int, int, int], torch.Tensor]


def _rand(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    return raw.view(dtype).view(shape)


def _per_layer(
    make: Callable[[Shape], tuple[torch.Tensor, torch.Tensor]],
    describe: Callable[[list[torch.Tensor]], KvLayout],
) -> Callable[[Shape], Cache]:
    def alloc(s: Shape) -> Cache:
        pairs = [make(s) for _ in range(s.layers)]
        tensors = [p[1] for p in pairs]
        return Cache([p[0] for p in pairs], tensors, describe(tensors))

    return alloc


def _plain(shape: Callable[[Shape], tuple[int, ...]]):
    def make(s: Shape) -> tuple[torch.Tensor, torch.Tensor]:
        t = _rand(shape(s), s.dtype)
        return t, t

    return make


def _permuted(physical: Callable[[Shape], tuple[int, ...]], to_logical: tuple[int, ...]):
    """vLLM allocates in the backend's stride order and permutes to the logical shape."""

    def make(s: Shape) -> tuple[torch.Tensor, torch.Tensor]:
        t = _rand(physical(s), s.dtype)
        return t, t.permute(*to_logical)

    return make


def _cross_layer_alloc(
    physical: Callable[[Shape], tuple[int, ...]], to_logical: tuple[int, ...], backend: str
) -> Callable[[Shape], Cache]:
    def alloc(s: Shape) -> Cache:
        t = _rand(physical(s), s.dtype)
        logical = t.permute(*to_logical)
        return Cache([t], [logical], kvl.vllm_cross_layer(logical, backend=backend))

    return alloc


def _sglang_mha(s: Shape) -> Cache:
    slots = (s.blocks + 1) * s.block_tokens  # SGLang allocates size + page_size slots
    k = [_rand((slots, s.heads, s.head_dim), s.dtype) for _ in range(s.layers)]
    v = [_rand((slots, s.heads, s.head_dim), s.dtype) for _ in range(s.layers)]
    return Cache(k + v, k + v, kvl.sglang_mha(k, v, page_size=s.block_tokens))


def _sglang_mla(s: Shape) -> Cache:
    slots = (s.blocks + 1) * s.block_tokens
    bufs = [_rand((slots, 1, s.head_dim), s.dtype) for _ in range(s.layers)]
    return Cache(bufs, bufs, kvl.sglang_mla(bufs, page_size=s.block_tokens))


def _sglang_slot_head(c: Cache, layer: int, kv: int, block: int, tok: int, h: int) -> torch.Tensor:
    n_layers = len(c.tensors) // 2
    bs = c.layout.block_tokens
    return c.tensors[kv * n_layers + layer][block * bs + tok, h]


FORMATS: list[Format] = [
    Format(
        "vllm_flash_attn_nhd",
        False,
        _per_layer(
            _plain(lambda s: (2, s.blocks, s.block_tokens, s.heads, s.head_dim)),
            lambda ts: kvl.vllm_flash_attn(ts),
        ),
        lambda c, ly, k, b, t, h: c.tensors[ly][k, b, t, h],
    ),
    Format(
        # vLLM's HND stride order: physical [2, blocks, heads, tokens, dim], logical NHD
        "vllm_flash_attn_hnd_strides",
        False,
        _per_layer(
            _permuted(
                lambda s: (2, s.blocks, s.heads, s.block_tokens, s.head_dim), (0, 1, 3, 2, 4)
            ),
            lambda ts: kvl.vllm_flash_attn(ts),
        ),
        lambda c, ly, k, b, t, h: c.tensors[ly][k, b, t, h],
    ),
    Format(
        "vllm_flash_attn_hnd",
        False,
        _per_layer(
            _plain(lambda s: (2, s.blocks, s.heads, s.block_tokens, s.head_dim)),
            lambda ts: kvl.vllm_flash_attn(ts, layout="HND"),
        ),
        lambda c, ly, k, b, t, h: c.tensors[ly][k, b, h, t],
    ),
    Format(
        "vllm_flashinfer_nhd",
        False,
        _per_layer(
            _plain(lambda s: (s.blocks, 2, s.block_tokens, s.heads, s.head_dim)),
            lambda ts: kvl.vllm_flashinfer(ts),
        ),
        lambda c, ly, k, b, t, h: c.tensors[ly][b, k, t, h],
    ),
    Format(
        "vllm_flashinfer_hnd",
        False,
        _per_layer(
            _plain(lambda s: (s.blocks, 2, s.heads, s.block_tokens, s.head_dim)),
            lambda ts: kvl.vllm_flashinfer(ts, layout="HND"),
        ),
        lambda c, ly, k, b, t, h: c.tensors[ly][b, k, h, t],
    ),
    Format(
        "vllm_cpu",
        False,
        _per_layer(
            _plain(lambda s: (s.blocks, s.heads, s.block_tokens, 2 * s.head_dim)),
            lambda ts: kvl.vllm_cpu(ts),
        ),
        lambda c, ly, k, b, t, h: c.tensors[ly][
            b, h, t, k * c.tensors[ly].shape[-1] // 2 : (k + 1) * c.tensors[ly].shape[-1] // 2
        ],
    ),
    Format(
        # cross-layer blocks: physical [blocks, layers, 2, tokens, heads, dim]
        "vllm_cross_layer_flash_attn",
        False,
        _cross_layer_alloc(
            lambda s: (s.blocks, s.layers, 2, s.block_tokens, s.heads, s.head_dim),
            (1, 2, 0, 3, 4, 5),
            "flash_attn",
        ),
        lambda c, ly, k, b, t, h: c.tensors[0][ly, k, b, t, h],
    ),
    Format("sglang_mha", False, _sglang_mha, _sglang_slot_head),
    Format(
        "vllm_mla",
        True,
        _per_layer(
            _plain(lambda s: (s.blocks, s.block_tokens, s.head_dim)), lambda ts: kvl.vllm_mla(ts)
        ),
        lambda c, ly, k, b, t, h: c.tensors[ly][b, t],
    ),
    Format(
        "vllm_cross_layer_mla",
        True,
        _cross_layer_alloc(
            lambda s: (s.blocks, s.layers, s.block_tokens, s.head_dim), (1, 0, 2, 3), "mla"
        ),
        lambda c, ly, k, b, t, h: c.tensors[0][ly, b, t],
    ),
    Format("sglang_mla", True, _sglang_mla, _sglang_slot_head),
]
FORMATS_BY_NAME = {f.name: f for f in FORMATS}


def reference_copy(
    src_fmt: Format,
    src: Cache,
    src_blocks: list[int],
    src_heads: tuple[int, int],
    dst_fmt: Format,
    dst: Cache,
    dst_blocks: list[int],
    dst_heads: tuple[int, int],
    tokens: tuple[int, int],
    layers: tuple[int, int],
) -> None:
    """Copies head vector by head vector through the engines' own indexing."""
    sbs, dbs = src.layout.block_tokens, dst.layout.block_tokens
    num_kv = src.layout.num_kv
    h0, h1 = max(src_heads[0], dst_heads[0]), min(src_heads[1], dst_heads[1])
    for layer in range(*layers):
        for kv in range(num_kv):
            for t in range(*tokens):
                for h in range(h0, h1):
                    dst_fmt.head(
                        dst, layer, kv, dst_blocks[t // dbs], t % dbs, h - dst_heads[0]
                    ).copy_(
                        src_fmt.head(
                            src, layer, kv, src_blocks[t // sbs], t % sbs, h - src_heads[0]
                        )
                    )


def clone_cache(fmt: Format, shape: Shape, cache: Cache) -> Cache:
    """A new cache of the same format whose bytes equal ``cache``'s."""
    other = fmt.alloc(shape)
    for a, b in zip(other.storage, cache.storage, strict=True):
        a.copy_(b)
    return other


def same_bytes(a: Cache, b: Cache) -> bool:
    return all(
        torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
        for x, y in zip(a.storage, b.storage, strict=True)
    )
