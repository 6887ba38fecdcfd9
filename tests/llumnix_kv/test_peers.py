"""Peer baselines (NIXL, Mooncake Transfer Engine): tiny real transfers between two processes.

Each peer's tests are skipped where its package is not installed. Speed is not asserted (that is
the benchmark's business); correctness is checked inside ``run_peer`` and must not fail.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import sys

import pytest

from llumnix_kv.bench import peers

BLOCK = 16 * 1024  # bytes
BLOCKS = 16
BATCHES = 3
TIMEOUT_S = 15.0

_NIXL_MODULES = ("nixl", "nixl_cu12", "nixl_cu13")


def _require(peer: str) -> None:
    """Skip unless ``peer`` imports here (``pytest.importorskip`` names what is missing)."""
    for key, value in peers.UCX_ENV.items():  # before UCX is loaded into this process
        os.environ.setdefault(key, value)
    if peer == "mooncake":
        pytest.importorskip(
            "mooncake.engine",
            reason="Mooncake not installed: pip install mooncake-transfer-engine-non-cuda",
            exc_type=ImportError,  # also skip a build that does not load here
        )
        return
    found = [m for m in _NIXL_MODULES if importlib.util.find_spec(m) is not None]
    pytest.importorskip(
        f"{(found or ['nixl'])[0]}._api",
        reason="NIXL not installed: pip install nixl-cu12",
        exc_type=ImportError,
    )


def _no_children_left() -> None:
    assert multiprocessing.active_children() == []


def test_peer_status_reports_every_peer() -> None:
    status = peers.peer_status()
    assert set(status) == set(peers.PEERS)
    for line in status.values():
        assert line.startswith(("ok ", "not installed: ")), line


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(peer="ucx", op="WRITE"),
        dict(peer="nixl", op="PUT"),
        dict(peer="nixl", op="WRITE", pool_blocks=BLOCKS - 1),
        dict(peer="nixl", op="WRITE", src_block_ids=list(range(BLOCKS - 1))),
        dict(peer="mooncake", op="READ", dst_block_ids=[0] * BLOCKS),
        dict(peer="mooncake", op="READ", dst_block_ids=list(range(BLOCKS + 1, 2 * BLOCKS + 1))),
    ],
)
def test_bad_arguments_are_rejected_before_any_process_starts(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        peers.run_peer(block_bytes=BLOCK, num_blocks=BLOCKS, batches=1, **kwargs)
    _no_children_left()


def test_missing_peer_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("mooncake", "mooncake.engine"):
        monkeypatch.setitem(sys.modules, name, None)
    for name in _NIXL_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.setitem(sys.modules, f"{name}._api", None)
    with pytest.raises(peers.PeerUnavailable, match="mooncake-transfer-engine-non-cuda"):
        peers.run_peer("mooncake", "WRITE", BLOCK, BLOCKS, 1)
    with pytest.raises(peers.PeerUnavailable, match="nixl-cu12"):
        peers.run_peer("nixl", "READ", BLOCK, BLOCKS, 1)
    status = peers.peer_status()
    assert all(v.startswith("not installed: ") for v in status.values()), status
    _no_children_left()


@pytest.mark.parametrize("op", peers.OPS)
@pytest.mark.parametrize("peer", peers.PEERS)
def test_tiny_transfer_moves_the_right_bytes(peer: str, op: str) -> None:
    _require(peer)
    res = peers.run_peer(peer, op, BLOCK, BLOCKS, BATCHES, timeout_s=TIMEOUT_S)
    assert (res.peer, res.op, res.block_bytes, res.num_blocks, res.batches) == (
        peer, op, BLOCK, BLOCKS, BATCHES,
    )  # fmt: skip
    assert res.gbps > 0
    assert 0 < res.lat_p50_us <= res.lat_p99_us
    assert res.lat_avg_us > 0
    assert res.note.startswith(peer)
    _no_children_left()


@pytest.mark.parametrize("peer", peers.PEERS)
def test_explicit_block_ids_and_pool(peer: str) -> None:
    _require(peer)
    src = list(range(BLOCKS))  # contiguous source run
    dst = [3 * BLOCKS - 1 - 2 * i for i in range(BLOCKS)]  # scattered, descending
    res = peers.run_peer(
        peer,
        "WRITE",
        BLOCK,
        BLOCKS,
        1,
        src_block_ids=src,
        dst_block_ids=dst,
        pool_blocks=3 * BLOCKS,
        timeout_s=TIMEOUT_S,
    )
    assert res.gbps > 0
    _no_children_left()


@pytest.mark.parametrize("peer", peers.PEERS)
def test_a_transfer_that_moves_nothing_is_caught(
    peer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _require(peer)
    initiator = peers._NixlInitiator if peer == "nixl" else peers._MooncakeInitiator
    monkeypatch.setattr(initiator, "run_batch", lambda self, *args, **kwargs: None)
    with pytest.raises(RuntimeError, match="differ"):
        peers.run_peer(peer, "READ", BLOCK, BLOCKS, 1, timeout_s=TIMEOUT_S)
    _no_children_left()
