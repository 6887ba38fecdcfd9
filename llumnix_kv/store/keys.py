"""Content addresses of token chunks, for callers that have no engine block hashes.

Chunk ``i`` of a request (tokens ``[i * chunk_tokens, (i + 1) * chunk_tokens)``) has the key

    h_i = sha256(h_{i-1} || token ids of chunk i as little-endian int64)

with ``h_{-1} = sha256(b"llumnix_kv.store.keys/v1" || salt)``. Each key therefore depends on
the whole prefix, so equal keys mean equal prefixes (and equal KV, for one model and salt).
Put the model, KV dtype and anything else that changes the KV bytes into ``salt``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from llumnix_kv.errors import InvalidArgumentError

__all__ = ["chained_chunk_keys"]

ROOT_DOMAIN = b"llumnix_kv.store.keys/v1"


def chained_chunk_keys(
    token_ids: Sequence[int] | np.ndarray, chunk_tokens: int, salt: bytes = b""
) -> list[bytes]:
    """32-byte keys of each *full* chunk of ``token_ids`` (a trailing partial chunk has none)."""
    if chunk_tokens <= 0:
        raise InvalidArgumentError("chunk_tokens must be > 0")
    tokens = np.ascontiguousarray(token_ids, dtype="<i8")
    if tokens.ndim != 1:
        raise InvalidArgumentError("token_ids must be one-dimensional")
    parent = hashlib.sha256(ROOT_DOMAIN + salt).digest()
    keys = []
    for start in range(0, len(tokens) - chunk_tokens + 1, chunk_tokens):
        parent = hashlib.sha256(parent + tokens[start : start + chunk_tokens].tobytes()).digest()
        keys.append(parent)
    return keys
