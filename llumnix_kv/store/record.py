"""The stored form of one chunk, shared by the disk and remote tiers.

A record is ``header | key | payload``. The header is 20 bytes, little-endian::

    magic    4s   b"LKVC"
    version  u8   RECORD_VERSION
    flags    u8   0 (reserved)
    key_len  u16  bytes of key that follow the header
    length   u64  bytes of payload that follow the key
    crc32    u32  zlib.crc32 over key then payload

The key is stored so that a file or value found under the wrong name (a hashed file name
collision, a misplaced copy) is detected like any other corruption.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

from llumnix_kv.errors import CorruptionError

__all__ = ["HEADER", "RECORD_VERSION", "decode", "encode_header"]

MAGIC = b"LKVC"
RECORD_VERSION = 1
HEADER = struct.Struct("<4sBBHQI")


def checksum(key: bytes, payload: Any) -> int:
    """crc32 of key then payload (zlib releases the GIL for large buffers)."""
    return zlib.crc32(payload, zlib.crc32(key)) & 0xFFFFFFFF


def encode_header(key: bytes, payload: Any) -> bytes:
    """Header and key of a record; the payload (a flat byte buffer) follows them."""
    nbytes = memoryview(payload).nbytes
    return HEADER.pack(MAGIC, RECORD_VERSION, 0, len(key), nbytes, checksum(key, payload)) + key


def decode(record: bytes | memoryview, key: bytes) -> memoryview:
    """The payload of ``record`` (a view, no copy); CorruptionError if any check fails."""
    view = memoryview(record)
    if view.nbytes < HEADER.size:
        raise CorruptionError(f"record of {view.nbytes} bytes is shorter than its header")
    magic, version, _flags, key_len, length, crc = HEADER.unpack_from(view)
    if magic != MAGIC or version != RECORD_VERSION:
        raise CorruptionError(f"bad record magic/version {magic!r}/{version}")
    if view.nbytes != HEADER.size + key_len + length:
        raise CorruptionError(
            f"record is {view.nbytes} bytes, header says {HEADER.size + key_len + length}"
        )
    stored_key = view[HEADER.size : HEADER.size + key_len]
    if stored_key != key:
        raise CorruptionError("record holds a different key")
    payload = view[HEADER.size + key_len :]
    if checksum(key, payload) != crc:
        raise CorruptionError("record checksum mismatch")
    return payload
