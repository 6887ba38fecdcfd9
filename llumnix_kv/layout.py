"""Describe real engine KV caches as :class:`KvLayout` values.

Every constructor takes the engine's own tensors (torch tensors, or anything with
``data_ptr()``, ``shape``, ``stride()``, ``element_size()``, ``dtype`` and ``device``), reads
their *strides* (so physically permuted caches, e.g. vLLM's HND stride order, are described as
they are in memory) and returns a validated layout. torch is never imported here.

Dim names used in the ``dims`` specs below:
``layer``, ``kv`` (K=0, V=1), ``block``, ``token`` (token within a block), ``head`` (KV head),
``slot`` (a token index across pages: SGLang's token-indexed pools, ``block = slot // page``)
and ``dim`` (elements of one head vector; must be innermost and contiguous).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from llumnix_kv._C import KvLayout, MemoryRegion
from llumnix_kv.errors import InvalidArgumentError, InvalidLayoutError, UnsupportedError

__all__ = [
    "TensorLike",
    "layout_from_dict",
    "layout_from_tensors",
    "layout_to_dict",
    "sglang_mha",
    "sglang_mla",
    "vllm_cpu",
    "vllm_cross_layer",
    "vllm_flash_attn",
    "vllm_flashinfer",
    "vllm_mla",
    "with_regions",
]

_NAMES = frozenset({"layer", "kv", "block", "token", "head", "slot", "dim"})


class TensorLike(Protocol):
    """What the constructors read of a tensor (torch.Tensor satisfies it)."""

    @property
    def shape(self) -> Sequence[int]: ...
    @property
    def dtype(self) -> Any: ...
    @property
    def device(self) -> Any: ...
    def data_ptr(self) -> int: ...
    def stride(self) -> Sequence[int]: ...
    def element_size(self) -> int: ...


def _device_index(t: TensorLike) -> int:
    dev = t.device
    kind = getattr(dev, "type", str(dev))
    if kind in ("cpu", "meta"):  # meta: a description without memory (see with_regions)
        return -1
    if kind == "cuda":
        index = getattr(dev, "index", None)
        return 0 if index is None else int(index)
    raise UnsupportedError(f"KV caches on device {dev!r} are not supported (cpu or cuda only)")


def _dtype_name(t: TensorLike) -> str:
    return str(t.dtype).removeprefix("torch.")


def _span_bytes(t: TensorLike) -> int:
    """Bytes from the tensor's first element to the end of its last one."""
    elems = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True) if n > 0)
    return elems * t.element_size()


def layout_from_tensors(
    tensors: Sequence[TensorLike],
    dims: Sequence[str],
    *,
    region_by: Sequence[str] = (),
    num_kv: int | None = None,
    page_tokens: int | None = None,
) -> KvLayout:
    """Builds the layout of a cache made of ``tensors``, all of one shape, dtype and device.

    Args:
        tensors: one tensor per memory region, in region order.
        dims: the name of each tensor dim (see the module docstring); ``dim`` must be last.
        region_by: which of ``layer``/``kv`` select the tensor, outermost first:
            ``("layer",)``: ``tensors[layer]``; ``("layer", "kv")``: ``tensors[2*layer + kv]``;
            ``("kv", "layer")``: ``tensors[kv*num_layers + layer]``; ``()``: one tensor.
        num_kv: K/V count when ``kv`` is neither a dim nor in ``region_by`` (default 1: MLA)
            or is in ``region_by`` (default 2).
        page_tokens: tokens per page for ``slot``-indexed pools.
    """
    if not tensors:
        raise InvalidArgumentError("no tensors given")
    dims = tuple(dims)
    region_by = tuple(region_by)
    first = tensors[0]
    if len(set(dims)) != len(dims) or not set(dims) <= _NAMES:
        raise InvalidArgumentError(f"dims {dims} must be distinct names from {sorted(_NAMES)}")
    if not set(region_by) <= {"layer", "kv"} or set(region_by) & set(dims):
        raise InvalidArgumentError(f"region_by {region_by} must name layer/kv dims not in dims")
    if dims[-1] != "dim":
        raise InvalidArgumentError("the last dim must be 'dim' (the head vector)")
    if len(first.shape) != len(dims):
        raise InvalidLayoutError(f"tensor has {len(first.shape)} dims, spec names {len(dims)}")
    for t in tensors[1:]:
        if (
            tuple(t.shape) != tuple(first.shape)
            or _dtype_name(t) != _dtype_name(first)
            or t.element_size() != first.element_size()
            or _device_index(t) != _device_index(first)
        ):
            raise InvalidLayoutError(
                f"cache tensors differ: {tuple(first.shape)} {first.dtype} {first.device} vs "
                f"{tuple(t.shape)} {t.dtype} {t.device}"
            )
    elem = first.element_size()
    size = dict(zip(dims, first.shape, strict=True))
    stride = {d: s * elem for d, s in zip(dims, first.stride(), strict=True)}
    if size["dim"] > 1 and stride["dim"] != elem:
        raise InvalidLayoutError("head vectors must be contiguous (stride 1 on the 'dim' dim)")

    layout = KvLayout()
    layout.head_bytes = size["dim"] * elem
    layout.dtype = _dtype_name(first)
    layout.num_heads = size.get("head", 1)
    layout.head_stride = stride.get("head", 0)
    if "slot" in dims:
        if "block" in dims or "token" in dims or not page_tokens or page_tokens <= 0:
            raise InvalidArgumentError("a slot-indexed pool needs page_tokens and no block/token")
        layout.block_tokens = page_tokens
        layout.num_blocks = size["slot"] // page_tokens
        layout.token_stride = stride["slot"]
        layout.block_stride = stride["slot"] * page_tokens
    elif "block" in dims and "token" in dims:
        layout.block_tokens = size["token"]
        layout.num_blocks = size["block"]
        layout.token_stride = stride["token"]
        layout.block_stride = stride["block"]
    else:
        raise InvalidArgumentError("dims need 'block' and 'token', or 'slot'")

    if "kv" in dims:
        layout.num_kv, layout.kv_stride = size["kv"], stride["kv"]
    else:
        layout.num_kv = num_kv if num_kv is not None else (2 if "kv" in region_by else 1)
    per_region = layout.num_kv if "kv" in region_by else 1
    if "layer" in dims:
        layout.num_layers, layout.layer_stride = size["layer"], stride["layer"]
    elif "layer" in region_by:
        if len(tensors) % per_region:
            raise InvalidLayoutError(f"{len(tensors)} tensors do not split into K/V per layer")
        layout.num_layers = len(tensors) // per_region
    else:
        layout.num_layers = 1
    # Region multipliers, outermost first: the last name varies fastest.
    mult = 1
    for name in reversed(region_by):
        if name == "layer":
            layout.region_layer_mult = mult
            mult *= layout.num_layers
        else:
            layout.region_kv_mult = mult
            mult *= layout.num_kv
    if len(tensors) != mult:
        raise InvalidLayoutError(f"expected {mult} tensors for region_by {region_by}")
    layout.regions = [MemoryRegion(t.data_ptr(), _span_bytes(t), _device_index(t)) for t in tensors]
    layout.validate()
    layout._owners = tuple(tensors)  # the layout holds addresses: keep the memory alive
    return layout


def vllm_flash_attn(kv_caches: Sequence[TensorLike], *, layout: str = "NHD") -> KvLayout:
    """vLLM FlashAttention: one tensor per layer, ``[2, num_blocks, block_size, heads, head]``
    (NHD) or ``[2, num_blocks, heads, block_size, head]`` (HND) as logical dim order."""
    return layout_from_tensors(
        kv_caches, ("kv", "block", *_token_head(layout), "dim"), region_by=("layer",)
    )


def vllm_flashinfer(kv_caches: Sequence[TensorLike], *, layout: str = "NHD") -> KvLayout:
    """vLLM FlashInfer: one tensor per layer, ``[num_blocks, 2, block_size, heads, head]`` (NHD)
    or ``[num_blocks, 2, heads, block_size, head]`` (HND)."""
    return layout_from_tensors(
        kv_caches, ("block", "kv", *_token_head(layout), "dim"), region_by=("layer",)
    )


def vllm_cpu(kv_caches: Sequence[TensorLike]) -> KvLayout:
    """vLLM CPU backend (CPU_ATTN): one tensor per layer,
    ``[num_blocks, heads, block_size, 2 * head]`` with K in ``[..., :head]`` and V after it."""
    views = []
    for t in kv_caches:
        if len(t.shape) != 4:
            raise InvalidLayoutError(f"expected [blocks, heads, block_size, 2*head], got {t.shape}")
        kv_dim = t.shape[-1]
        if kv_dim % 2:
            raise InvalidLayoutError(f"last dim {kv_dim} is not K|V of equal halves")
        views.append(t.unflatten(-1, (2, kv_dim // 2)))  # type: ignore[attr-defined]
    return layout_from_tensors(views, ("block", "head", "token", "kv", "dim"), region_by=("layer",))


def vllm_mla(kv_caches: Sequence[TensorLike]) -> KvLayout:
    """vLLM MLA: one tensor per layer, ``[num_blocks, block_size, kv_lora_rank + rope_dim]``."""
    return layout_from_tensors(kv_caches, ("block", "token", "dim"), region_by=("layer",))


_CROSS_LAYER_DIMS = {
    "flash_attn": ("kv", "block", "token", "head", "dim"),
    "flash_attn_hnd": ("kv", "block", "head", "token", "dim"),
    "flashinfer": ("block", "kv", "token", "head", "dim"),
    "flashinfer_hnd": ("block", "kv", "head", "token", "dim"),
    "mla": ("block", "token", "dim"),
}


def vllm_cross_layer(kv_cache: TensorLike, *, backend: str = "flash_attn") -> KvLayout:
    """vLLM cross-layer blocks: one tensor for all layers whose logical shape is the attention
    backend's per-layer shape with ``num_layers`` prepended (its stride order puts each block's
    layers together in memory, which the strides describe)."""
    try:
        per_layer = _CROSS_LAYER_DIMS[backend]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown backend {backend!r}; one of {sorted(_CROSS_LAYER_DIMS)}"
        ) from None
    return layout_from_tensors([kv_cache], ("layer", *per_layer))


def sglang_mha(
    k_buffers: Sequence[TensorLike], v_buffers: Sequence[TensorLike], *, page_size: int
) -> KvLayout:
    """SGLang MHATokenToKVPool: per layer a K and a V buffer ``[size + page_size, heads, head]``,
    token-indexed; page ``p`` holds slots ``[p * page_size, (p + 1) * page_size)``."""
    if len(k_buffers) != len(v_buffers):
        raise InvalidLayoutError(f"{len(k_buffers)} K buffers but {len(v_buffers)} V buffers")
    return layout_from_tensors(
        [*k_buffers, *v_buffers],
        ("slot", "head", "dim"),
        region_by=("kv", "layer"),
        page_tokens=page_size,
    )


def sglang_mla(kv_buffers: Sequence[TensorLike], *, page_size: int) -> KvLayout:
    """SGLang MLATokenToKVPool: per layer one buffer ``[size + page_size, 1, latent]``."""
    return layout_from_tensors(
        kv_buffers, ("slot", "head", "dim"), region_by=("layer",), page_tokens=page_size
    )


def with_regions(layout: KvLayout, regions: Sequence[MemoryRegion]) -> KvLayout:
    """The same layout over other memory: a device mirror, or a peer's copy of the cache.
    The caller keeps that memory alive for as long as the layout is used."""
    out = KvLayout(layout)
    out.regions = list(regions)
    out.validate()
    return out


def _token_head(layout: str) -> tuple[str, str]:
    if layout == "NHD":
        return ("token", "head")
    if layout == "HND":
        return ("head", "token")
    raise InvalidArgumentError(f"layout must be 'NHD' or 'HND', got {layout!r}")


_LAYOUT_FIELDS = (
    "num_layers",
    "num_kv",
    "num_blocks",
    "block_tokens",
    "num_heads",
    "head_bytes",
    "dtype",
    "region_layer_mult",
    "region_kv_mult",
    "layer_stride",
    "kv_stride",
    "block_stride",
    "token_stride",
    "head_stride",
)


def layout_to_dict(layout: KvLayout) -> dict[str, Any]:
    """The layout as plain data (ints, a str, a list of ``[addr, bytes, device]``), for
    JSON or msgpack; :func:`layout_from_dict` reads it back in any process."""
    out: dict[str, Any] = {name: getattr(layout, name) for name in _LAYOUT_FIELDS}
    out["regions"] = [[r.addr, r.bytes, r.device] for r in layout.regions]
    return out


def layout_from_dict(data: dict[str, Any]) -> KvLayout:
    """Inverse of :func:`layout_to_dict`. The regions are addresses in the process that
    described the layout: use the result as a peer's (remote) layout, never to touch memory
    here."""
    layout = KvLayout()
    try:
        for name in _LAYOUT_FIELDS:
            setattr(layout, name, data[name])
        layout.regions = [MemoryRegion(int(a), int(n), int(d)) for a, n, d in data["regions"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"not a layout description: {exc}") from exc
    layout.validate()
    return layout
