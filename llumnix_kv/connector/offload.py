"""Offload of KV blocks to store tiers: saved after prefill, loaded on a later prefix hit.

A *chunk* is the KV of one full engine block (all layers), packed by :func:`llumnix_kv.copy.
gather` into one contiguous buffer; its key is ``namespace_tag(namespace) + block_hash``, where
``block_hash`` is the engine's chained prefix hash of the block (vLLM's ``Request.block_hashes``)
and the 8-byte tag separates models and KV formats that would otherwise share hashes.

Tiers (:mod:`llumnix_kv.store`) are ordered, fastest first:

* lookup: a key is a hit if any tier ``contains`` it; a request loads the longest run of
  consecutive hits after its local prefix hit.
* load: each chunk is read from the first tier that has it; a chunk found in a lower tier is
  also put into the tiers above it that missed it (promotion).
* save: each chunk is put into every tier that does not hold it yet (write-through to all).
  Puts are asynchronous; :meth:`StoreStack.flush` waits for them.

One :class:`StoreStack` per tier configuration per process (:func:`acquire_stack`), so an
engine's scheduler and worker in one process see the same host-memory tier, and a disk tier's
directory (owned by one tier at a time) is opened once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any

import numpy as np

from llumnix_kv._C import KvLayout
from llumnix_kv.copy import gather, plan_copy, scatter
from llumnix_kv.errors import InvalidArgumentError, KvError
from llumnix_kv.store import StoreTier, create_tier

__all__ = [
    "BlockOffloader",
    "LoadGuard",
    "StoreStack",
    "acquire_stack",
    "namespace_tag",
    "parse_store_config",
    "release_stack",
]

logger = logging.getLogger(__name__)

TAG_BYTES = 8


def namespace_tag(namespace: str) -> bytes:
    """The key prefix of a namespace (the model and KV format whose chunks may be shared)."""
    return hashlib.sha256(b"llumnix_kv.offload/v1:" + namespace.encode()).digest()[:TAG_BYTES]


def parse_store_config(store: Mapping[str, Any]) -> dict[str, Any]:
    """Validates the ``store`` entry of the connector config; returns it as plain data.

    Format: ``{"tiers": [{"name": "cpu", "capacity_bytes": ...}, {"name": "disk", "path":
    ..., "capacity_bytes": ...}, {"name": "redis", "url": ...}], "namespace": "..."}``; each
    tier's keys other than ``name`` are its config fields. ``namespace`` is optional.
    """
    if not isinstance(store, Mapping):
        raise InvalidArgumentError(f"store must be a mapping, got {type(store).__name__}")
    unknown = sorted(set(store) - {"tiers", "namespace"})
    if unknown:
        raise InvalidArgumentError(f"unknown store keys {unknown}; known: namespace, tiers")
    tiers = store.get("tiers")
    if not isinstance(tiers, Sequence) or isinstance(tiers, str) or not tiers:
        raise InvalidArgumentError("store.tiers must be a non-empty list of tier configs")
    out_tiers = []
    for tier in tiers:
        if not isinstance(tier, Mapping) or not isinstance(tier.get("name"), str):
            raise InvalidArgumentError(f"a store tier needs a 'name', got {tier!r}")
        out_tiers.append(dict(tier))
    out: dict[str, Any] = {"tiers": out_tiers}
    if store.get("namespace") is not None:
        out["namespace"] = str(store["namespace"])
    return out


class StoreStack:
    """Ordered store tiers with lookup, load with promotion, and write-through save."""

    def __init__(self, tiers: Sequence[tuple[str, StoreTier]]) -> None:
        if not tiers:
            raise InvalidArgumentError("a store needs at least one tier")
        self.tiers = list(tiers)
        self._lock = threading.Lock()
        self._pending: list[tuple[Future[list[bool]], list[Any]]] = []
        self.chunks_saved = 0
        self.save_errors = 0
        self.hits = {name: 0 for name, _ in self.tiers}

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.tiers]

    def _contains(self, tier: StoreTier, name: str, keys: Sequence[bytes]) -> list[bool]:
        try:
            return tier.contains(keys)
        except KvError as exc:
            logger.warning("store tier %s: contains failed: %s", name, exc)
            return [False] * len(keys)

    def match(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` some tier holds now."""
        found = [False] * len(keys)
        for name, tier in self.tiers:
            todo = [i for i, hit in enumerate(found) if not hit]
            if not todo:
                break
            for i, hit in zip(
                todo, self._contains(tier, name, [keys[i] for i in todo]), strict=True
            ):
                found[i] = hit
        for n, hit in enumerate(found):
            if not hit:
                return n
        return len(found)

    def load(self, keys: Sequence[bytes], outs: Sequence[Any], timeout: float) -> list[str | None]:
        """Fills ``outs[i]`` with chunk ``keys[i]`` from the first tier that has it; per key,
        the tier's name, or None for a miss (``outs[i]`` then holds garbage)."""
        deadline = time.monotonic() + timeout
        served: list[str | None] = [None] * len(keys)
        for level, (name, tier) in enumerate(self.tiers):
            todo = [i for i, s in enumerate(served) if s is None]
            if not todo:
                break
            try:
                fut = tier.get([keys[i] for i in todo], [outs[i] for i in todo])
                hits = fut.result(timeout=max(deadline - time.monotonic(), 1e-3))
            except (KvError, FutureTimeoutError) as exc:
                logger.warning("store tier %s: get failed: %s", name, exc)
                continue
            got = [i for i, hit in zip(todo, hits, strict=True) if hit]
            for i in got:
                served[i] = name
            with self._lock:
                self.hits[name] += len(got)
            if got and level > 0:
                self._put_missing(
                    self.tiers[:level], [keys[i] for i in got], [outs[i] for i in got]
                )
        return served

    def save(self, keys: Sequence[bytes], values: Sequence[Any]) -> None:
        """Puts ``values[i]`` under ``keys[i]`` into every tier that lacks it; returns before
        the puts finish. The values must stay unchanged until :meth:`flush` (they are kept
        referenced until their puts finish)."""
        if keys:
            self._put_missing(self.tiers, keys, values)
            with self._lock:
                self.chunks_saved += len(keys)

    def _put_missing(
        self, tiers: Sequence[tuple[str, StoreTier]], keys: Sequence[bytes], values: Sequence[Any]
    ) -> None:
        for name, tier in tiers:
            have = self._contains(tier, name, keys)
            todo = [i for i, hit in enumerate(have) if not hit]
            if not todo:
                continue
            vals = [values[i] for i in todo]
            try:
                fut = tier.put([keys[i] for i in todo], vals)
            except KvError as exc:
                logger.warning("store tier %s: put failed: %s", name, exc)
                with self._lock:
                    self.save_errors += len(todo)
                continue
            with self._lock:
                self._pending.append((fut, vals))
        self.poll()

    def poll(self) -> int:
        """Drops finished puts (counting failures); returns how many are still running."""
        with self._lock:
            running = []
            for fut, vals in self._pending:
                if not fut.done():
                    running.append((fut, vals))
                    continue
                exc = fut.exception()
                if exc is not None:
                    self.save_errors += 1
                    logger.warning("store put failed: %s", exc)
            self._pending = running
            return len(running)

    def flush(self, timeout: float) -> bool:
        """Waits until every put finished or ``timeout`` passed; True when none is left."""
        deadline = time.monotonic() + timeout
        while self.poll():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def stats(self) -> dict[str, int]:
        """Stack totals, plus each tier's own counters as ``store_<tier>_<counter>`` (e.g.
        ``store_disk_corrupt``: chunks that failed their check and were dropped)."""
        with self._lock:
            out = {f"store_hits_{name}": n for name, n in self.hits.items()}
            out["store_chunks_saved"] = self.chunks_saved
            out["store_save_errors"] = self.save_errors
            out["store_saves_pending"] = len(self._pending)
        for name, tier in self.tiers:
            for key, value in tier.stats().items():
                if isinstance(value, int) and not isinstance(value, bool):
                    out[f"store_{name}_{key}"] = value
        return out

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)
        for name, tier in self.tiers:
            try:
                tier.close()
            except KvError as exc:
                logger.warning("store tier %s: close failed: %s", name, exc)


_stacks_lock = threading.Lock()
_stacks: dict[str, tuple[StoreStack, int]] = {}


def _stack_id(tiers: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps([dict(t) for t in tiers], sort_keys=True, default=str)


def acquire_stack(tiers: Sequence[Mapping[str, Any]]) -> StoreStack:
    """The process's stack for this tier list (built on first use); pair with
    :func:`release_stack`."""
    sid = _stack_id(tiers)
    with _stacks_lock:
        entry = _stacks.get(sid)
        if entry is None:
            built: list[tuple[str, StoreTier]] = []
            try:
                for spec in tiers:
                    cfg = {k: v for k, v in spec.items() if k != "name"}
                    built.append((str(spec["name"]), create_tier(str(spec["name"]), cfg)))
            except BaseException:
                for _, tier in built:
                    with contextlib.suppress(Exception):
                        tier.close()
                raise
            entry = (StoreStack(built), 0)
        stack, refs = entry
        _stacks[sid] = (stack, refs + 1)
        return stack


def release_stack(stack: StoreStack) -> None:
    """Drops one reference; the last one flushes and closes the tiers."""
    with _stacks_lock:
        for sid, (s, refs) in list(_stacks.items()):
            if s is stack:
                if refs > 1:
                    _stacks[sid] = (s, refs - 1)
                    return
                del _stacks[sid]
                break
        else:
            return
    stack.close()


class LoadGuard:
    """Lets the engine give up on a store load that overran its deadline: once
    :meth:`abandon` returned, the load writes no further block (its blocks may be
    recomputed or reused at once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False

    def abandon(self) -> None:
        with self._lock:  # waits for a block write in progress
            self._abandoned = True

    @contextlib.contextmanager
    def writing(self) -> Any:
        """Held around one block write; yields False once the load was abandoned."""
        with self._lock:
            yield not self._abandoned


class BlockOffloader:
    """Worker side: moves whole blocks of a paged cache to and from a :class:`StoreStack`.

    One chunk is one block, all layers, packed by :func:`gather` in the order of
    ``plan_copy(layout, layout, [block], [block])``; engines with equal layouts (model, block
    size, dtype, heads) produce equal chunks for equal keys.
    """

    def __init__(self, layout: KvLayout, stack: StoreStack) -> None:
        self.layout = layout
        self.stack = stack
        self.chunk_bytes = self._plan(0).total_bytes
        self.tokens_loaded = 0
        self.blocks_loaded = 0
        self.blocks_failed = 0

    def _plan(self, block: int) -> Any:
        bt = self.layout.block_tokens
        return plan_copy(self.layout, self.layout, [block], [block], tokens=(0, bt))

    def load(
        self,
        blocks: Sequence[int],
        keys: Sequence[bytes],
        timeout: float,
        *,
        tokens: int = 0,
        guard: LoadGuard | None = None,
    ) -> list[int]:
        """Reads chunk ``keys[i]`` into block ``blocks[i]``; returns the blocks that could not
        be filled (every block after the first miss is reported too, since a prefix must be
        contiguous). ``tokens``: the tokens this load stands for, added to ``tokens_loaded``
        when it succeeds. With a ``guard``, no block is written once it was abandoned."""
        guard = guard or LoadGuard()
        if not blocks:
            return []
        outs = [np.empty(self.chunk_bytes, dtype=np.uint8) for _ in blocks]
        served = self.stack.load(keys, outs, timeout)
        failed: list[int] = []
        for block, out, src in zip(blocks, outs, served, strict=True):
            if src is None or failed:
                failed.append(block)
                continue
            with guard.writing() as allowed:
                if allowed:
                    scatter(self._plan(block), out, self.layout)
                else:
                    failed.append(block)
        self.blocks_loaded += len(blocks) - len(failed)
        self.blocks_failed += len(failed)
        if not failed:
            self.tokens_loaded += tokens
        return failed

    def save(self, blocks: Sequence[int], keys: Sequence[bytes]) -> None:
        """Gathers each block into its own buffer and saves it under its key (asynchronous)."""
        if not blocks:
            return
        bufs = []
        for block in blocks:
            buf = np.empty(self.chunk_bytes, dtype=np.uint8)
            gather(self._plan(block), self.layout, buf)
            bufs.append(buf)
        self.stack.save(keys, bufs)

    def stats(self) -> dict[str, int]:
        out = self.stack.stats()
        out["store_tokens_loaded"] = self.tokens_loaded
        out["store_blocks_loaded"] = self.blocks_loaded
        out["store_blocks_failed"] = self.blocks_failed
        return out
