from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from llumnix_kv.errors import InvalidArgumentError
from llumnix_kv.store import record
from llumnix_kv.store.disk import DiskTier, DiskTierConfig, file_name
from tests.llumnix_kv.store.conftest import chunk, keys_for

CHUNK = 64 * 1024
RECORD = record.HEADER.size + len(b"k-0") + CHUNK  # file bytes of one chunk keyed b"k-<digit>"
ROOT = Path(__file__).resolve().parents[3]


def open_tier(path: Path, capacity: int = 64 * RECORD, **kw: object) -> DiskTier:
    return DiskTier(DiskTierConfig(path=str(path), capacity_bytes=capacity, **kw))  # type: ignore[arg-type]


def test_round_trip_and_restart(tmp_path: Path) -> None:
    keys = keys_for("k", 5)
    vals = [chunk(i, CHUNK) for i in range(5)]
    with open_tier(tmp_path, fsync=False) as tier:
        fut = tier.put(keys, vals)
        assert fut.result(10.0) == [True] * 5
        assert tier.contains([*keys, b"nope"]) == [True] * 5 + [False]
        outs = [np.empty(CHUNK, np.uint8) for _ in range(6)]
        assert tier.get([*keys, b"nope"], outs).result(10.0) == [True] * 5 + [False]
        for v, o in zip(vals, outs, strict=False):
            np.testing.assert_array_equal(v, o)
        tier.delete([keys[4]])
        assert tier.stats()["bytes_used"] == 4 * RECORD
    with open_tier(tmp_path) as tier:  # a restarted tier serves the previous chunks
        assert tier.contains(keys) == [True] * 4 + [False]
        assert tier.stats()["bytes_used"] == 4 * RECORD
        outs = [np.empty(CHUNK, np.uint8) for _ in range(4)]
        assert tier.get(keys[:4], outs).result(10.0) == [True] * 4
        for v, o in zip(vals[:4], outs, strict=True):
            np.testing.assert_array_equal(v, o)


def test_long_keys_are_hashed_into_names(tmp_path: Path) -> None:
    key = bytes(range(200))
    assert len(file_name(key)) < 100
    with open_tier(tmp_path) as tier:
        tier.put([key], [chunk(1, CHUNK)]).result(10.0)
        out = np.empty(CHUNK, np.uint8)
        assert tier.get([key], [out]).result(10.0) == [True]
        np.testing.assert_array_equal(out, chunk(1, CHUNK))


def test_one_tier_per_directory(tmp_path: Path) -> None:
    with open_tier(tmp_path), pytest.raises(InvalidArgumentError, match="in use"):
        open_tier(tmp_path)
    open_tier(tmp_path).close()  # free again once the owner closed


def test_lru_eviction_by_file_bytes(tmp_path: Path) -> None:
    keys = keys_for("k", 5)
    with open_tier(tmp_path, capacity=3 * RECORD) as tier:
        for i in range(3):  # one by one: within a batch, recency follows write completion
            tier.put([keys[i]], [chunk(i, CHUNK)]).result(10.0)
        tier.get([keys[0]], [np.empty(CHUNK, np.uint8)]).result(10.0)
        tier.put([keys[3]], [chunk(3, CHUNK)]).result(10.0)  # evicts k-1
        assert tier.contains(keys[:4]) == [True, False, True, True]
        assert not (tmp_path / file_name(keys[1])).exists()
        s = tier.stats()
        assert s["evictions"] == 1 and s["bytes_used"] == 3 * RECORD
        assert tier.put([b"huge"], [chunk(9, 4 * CHUNK)]).result(10.0) == [False]
    # A restart with a smaller capacity evicts the oldest files first.
    with open_tier(tmp_path, capacity=2 * RECORD) as tier:
        assert tier.stats()["bytes_used"] == 2 * RECORD
        assert sum(tier.contains(keys[:4])) == 2
    chunk_files = [p for p in tmp_path.iterdir() if p.suffix == ".chunk"]
    assert sum(p.stat().st_size for p in chunk_files) == 2 * RECORD


def test_partial_files_are_never_served(tmp_path: Path) -> None:
    key, value = b"k-0", chunk(0, CHUNK)
    with open_tier(tmp_path) as tier:
        tier.put([key], [value]).result(10.0)
    full = (tmp_path / file_name(key)).read_bytes()
    # A crash mid-write leaves a temp file; a power loss without fsync can leave a short file.
    (tmp_path / f"{file_name(b'k-1')}.0123abcd.tmp").write_bytes(full[: len(full) // 2])
    (tmp_path / file_name(b"k-2")).write_bytes(full[: len(full) // 2])
    with open_tier(tmp_path) as tier:
        assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
        assert tier.contains([b"k-1"]) == [False]
        out = np.full(CHUNK, 3, np.uint8)
        assert tier.get([b"k-1", b"k-2"], [out, out]).result(10.0) == [False, False]
        assert (out == 3).all()
        assert tier.stats()["corrupt"] == 1
        assert not (tmp_path / file_name(b"k-2")).exists()


def test_flipped_byte_is_a_miss_and_removed(tmp_path: Path) -> None:
    key = b"k-0"
    with open_tier(tmp_path) as tier:
        tier.put([key], [chunk(0, CHUNK)]).result(10.0)
        path = tmp_path / file_name(key)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        out = np.zeros(CHUNK, np.uint8)
        assert tier.get([key], [out]).result(10.0) == [False]
        assert not out.any()
        s = tier.stats()
        assert (s["corrupt"], s["misses"], s["hits"], s["entries"], s["bytes_used"]) == (
            1,
            1,
            0,
            0,
            0,
        )
        assert not path.exists()
        assert tier.contains([key]) == [False]
        # Recomputed and stored again, it is served.
        tier.put([key], [chunk(0, CHUNK)]).result(10.0)
        assert tier.get([key], [out]).result(10.0) == [True]
        np.testing.assert_array_equal(out, chunk(0, CHUNK))


def test_wrong_out_size_fails_the_future(tmp_path: Path) -> None:
    with open_tier(tmp_path) as tier:
        tier.put([b"k-0"], [chunk(0, CHUNK)]).result(10.0)
        with pytest.raises(InvalidArgumentError):
            tier.get([b"k-0"], [np.empty(CHUNK + 1, np.uint8)]).result(10.0)


CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from llumnix_kv.store.disk import DiskTier, DiskTierConfig
    tier = DiskTier(DiskTierConfig(path=sys.argv[1], capacity_bytes=1 << 40, fsync=False))
    i = 0
    while True:
        batch = [i + j for j in range(8)]
        vals = [np.full(int(sys.argv[2]), k % 251, np.uint8) for k in batch]
        tier.put([str(k).encode() for k in batch], vals)
        i += 8
        print(i, flush=True)
    """
)


def test_killed_writer_leaves_only_whole_chunks(tmp_path: Path) -> None:
    nbytes = 256 * 1024
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), str(nbytes)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 20.0
        while int(proc.stdout.readline() or 0) < 64 and time.monotonic() < deadline:
            pass
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10.0)
    with open_tier(tmp_path, capacity=1 << 40) as tier:
        n = tier.stats()["entries"]
        assert n > 0
        keys = [str(k).encode() for k in range(4096)]
        present = [k for k, c in zip(keys, tier.contains(keys), strict=True) if c]
        assert len(present) == n
        outs = [np.empty(nbytes, np.uint8) for _ in present]
        assert all(tier.get(present, outs).result(30.0))
        for key, out in zip(present, outs, strict=True):
            assert (out == int(key) % 251).all()
        assert tier.stats()["corrupt"] == 0
