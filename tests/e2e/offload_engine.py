"""Helpers of the store offload tests: an engine process that can also reset its prefix cache,
flush its connector's saves, digest its cached KV and name its blocks' hashes, and a tier that
loses every chunk."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from llumnix_kv.store import StoreTier
from llumnix_kv.store.base import completed
from tests.e2e import vllm_engine
from tests.e2e.vllm_engine import EngineProcess


class _OffloadHandlers(vllm_engine._Handlers):
    def reset_prefix_cache(self) -> bool:
        return bool(self.llm.reset_prefix_cache())

    def kv_digests(self, prompt: list[int], block_size: int) -> list[str | None]:
        """sha256 of the cached KV (all layers) of each full block of ``prompt`` in this
        engine's prefix cache; None for a block that is not cached."""
        import hashlib

        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import hash_block_tokens

        pool = self.core.scheduler.kv_cache_manager.block_pool
        context = self.llm.llm_engine.vllm_config.compilation_config.static_forward_context
        caches = []
        for name in sorted(context):
            kv = getattr(context[name], "kv_cache", None)
            if isinstance(kv, list):
                kv = kv[0] if kv else None
            if kv is not None and kv.numel():
                caches.append(kv)
        assert caches, "no KV cache tensors found"
        out: list[str | None] = []
        parent = None
        for i in range(len(prompt) // block_size):
            parent = hash_block_tokens(
                sha256, parent, prompt[i * block_size : (i + 1) * block_size]
            )
            blocks = pool.get_cached_block(parent, [0])
            if not blocks:
                out.append(None)
                continue
            digest = hashlib.sha256()
            for kv in caches:
                digest.update(
                    kv[blocks[0].block_id].contiguous().view(-1).view(torch_uint8()).numpy()
                )
            out.append(digest.hexdigest())
        return out

    def block_hashes(self, prompt: list[int], block_size: int) -> list[str]:
        """vLLM's chained hashes (hex) of the full blocks of ``prompt``: with the store's
        namespace tag in front, the keys of their chunks."""
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import hash_block_tokens

        out: list[str] = []
        parent = None
        for i in range(len(prompt) // block_size):
            parent = hash_block_tokens(
                sha256, parent, prompt[i * block_size : (i + 1) * block_size]
            )
            out.append(bytes(parent).hex())
        return out

    def flush_store(self, timeout: float) -> bool:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        connector: Any = get_kv_transfer_group()
        return bool(connector.flush_store(timeout))


def torch_uint8() -> Any:
    import torch

    return torch.uint8


def _serve(conn: Any, model: str, block_size: int, kv_transfer_config: dict | None) -> None:
    # vllm_engine._serve with the extra handlers.
    vllm_engine._Handlers = _OffloadHandlers  # type: ignore[misc]
    vllm_engine._serve(conn, model, block_size, kv_transfer_config)


class OffloadEngineProcess(EngineProcess):
    """An :class:`EngineProcess` whose engine also serves ``reset_prefix_cache``,
    ``kv_digests``, ``block_hashes`` and ``flush_store``."""

    def __init__(
        self, model: Path, *, block_size: int = 32, kv_transfer_config: dict | None = None
    ) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_serve, args=(child, str(model), block_size, kv_transfer_config), daemon=True
        )
        self.proc.start()


@dataclass
class ForgetfulTierConfig:
    pass


class ForgetfulTier(StoreTier):
    """A tier that claims every key and returns none: each load from it fails after the
    scheduler counted it (as when a chunk is evicted between lookup and load)."""

    name = "forgetful"
    config_class: ClassVar[type] = ForgetfulTierConfig

    def __init__(self, config: ForgetfulTierConfig) -> None:
        self.config = config

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return [True] * len(keys)

    def put(self, keys: Sequence[bytes], values: Sequence[Any]) -> Future[list[bool]]:
        return completed([True] * len(keys))

    def get(self, keys: Sequence[bytes], outs: Sequence[Any]) -> Future[list[bool]]:
        return completed([False] * len(keys))

    def delete(self, keys: Sequence[bytes]) -> None:
        return

    def stats(self) -> dict[str, Any]:
        return {}
