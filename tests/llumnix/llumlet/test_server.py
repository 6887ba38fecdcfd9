"""The llumlet on loopback: pushed reports (after steps, never more often than the min
interval, heartbeats while idle, the latest one for a slow reader) and the gRPC service
(status on demand, health, drain, the shared token, typed UNIMPLEMENTED answers)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import grpc
import pytest

from llumnix.llumlet import (
    Llumlet,
    LlumletClient,
    LlumletConfig,
    ReportSubscriber,
    Scheduled,
    StatusTracker,
)


@pytest.fixture
def llumlet() -> Iterator[Llumlet]:
    tracker = StatusTracker("i0", 16)
    blocks = {"free": 100}
    server = Llumlet(
        tracker,
        lambda: (blocks["free"], 100),
        LlumletConfig(min_interval_s=0.05, heartbeat_s=0.3),
    )
    server.blocks = blocks  # type: ignore[attr-defined]
    server.start()
    try:
        yield server
    finally:
        server.stop()


def client(llumlet: Llumlet, token: str = "") -> LlumletClient:
    return LlumletClient(f"127.0.0.1:{llumlet.port}", token=token, timeout=5.0)


def test_status_reflects_the_engine_after_a_step(llumlet: Llumlet) -> None:
    with client(llumlet) as c:
        first = c.status()
        assert (first.instance_id, first.num_free_blocks, first.num_total_blocks) == (
            "i0",
            100,
            100,
        )
        llumlet.tracker.add("r", 32)
        llumlet.tracker.step([Scheduled("r", 0, 32, new_blocks=2, resumed=True)])
        llumlet.blocks["free"] = 98  # type: ignore[attr-defined]
        llumlet.publish()
        s = c.status()
        assert s.seq > first.seq and s.incarnation == first.incarnation
        assert (s.num_running, s.num_free_blocks, s.running_tokens) == (1, 98, 32)
        assert s.requests[0].request_id == "r" and s.requests[0].blocks == 2


def subscriber(llumlet: Llumlet, latest_only: bool = True) -> ReportSubscriber:
    sub = ReportSubscriber(f"127.0.0.1:{llumlet.report_port}", latest_only=latest_only)
    deadline = time.monotonic() + 10
    while sub.recv(0.5) is None:  # joined once a heartbeat arrives
        assert time.monotonic() < deadline, "no report reached the subscriber"
    return sub


def test_reports_follow_steps_at_most_once_per_interval_and_heartbeat_when_idle(
    llumlet: Llumlet,
) -> None:
    with subscriber(llumlet, latest_only=False) as sub:
        began = time.time()
        for _ in range(50):  # 50 steps in ~0.5 s: at most one report per 50 ms
            llumlet.tracker.step([])
            llumlet.on_step()
            time.sleep(0.01)
        busy_end = time.time()
        reports = []
        deadline = time.monotonic() + 1.0  # then idle: heartbeats
        while time.monotonic() < deadline:
            s = sub.recv(0.1)
            if s is not None:
                reports.append((s.timestamp, s))  # when the llumlet took it
    busy = [s for t, s in reports if began <= t <= busy_end + 0.06]
    assert 5 <= len(busy) <= (busy_end - began) / 0.05 + 2, len(busy)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(reports) if a[0] >= began]
    assert min(gaps) >= 0.04
    # After the last step the pending change goes out within the interval, then heartbeats.
    assert max(s.step_id for _, s in reports) == 50
    idle = [s for t, s in reports if t > busy_end + 0.1]
    assert 2 <= len(idle) <= 5
    seqs = [s.seq for _, s in reports]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_a_slow_reader_gets_the_latest_report_not_a_backlog(llumlet: Llumlet) -> None:
    with subscriber(llumlet) as sub:
        for _ in range(20):
            llumlet.tracker.step([])
            llumlet.publish()
        latest = llumlet.latest().seq
        time.sleep(0.1)
        s = sub.recv(2.0)
        assert s is not None and s.seq == latest


def test_health_and_drain(llumlet: Llumlet) -> None:
    with client(llumlet) as c:
        health = c.health()
        assert health.healthy and health.instance_id == "i0" and health.incarnation
        assert c.drain(True) is True
        s = c.status()
        assert s.draining and not s.schedulable
        assert c.drain(False) is False
        assert c.status().schedulable


def test_abort_and_migration_are_typed_unimplemented(llumlet: Llumlet) -> None:
    with client(llumlet) as c:
        for call in (lambda: c.abort(["r"]), lambda: c.migrate_out("r", "i1")):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_token_protects_every_call() -> None:
    server = Llumlet(StatusTracker("i0", 16), lambda: (1, 1), LlumletConfig(token="s3cret"))
    server.start()
    try:
        for token in ("", "wrong"):
            with client(server, token) as c:
                with pytest.raises(grpc.RpcError) as err:
                    c.status()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with client(server, "s3cret") as c:
            assert c.status().instance_id == "i0"
    finally:
        server.stop()


def test_stop_closes_the_report_socket_and_the_server() -> None:
    server = Llumlet(StatusTracker("i0", 16), lambda: (1, 1), LlumletConfig())
    server.start()
    port = server.report_port
    server.stop(grace=0.5)
    with client(server) as c, pytest.raises(grpc.RpcError):
        c.status(timeout=2)
    again = Llumlet(StatusTracker("i0", 16), lambda: (1, 1), LlumletConfig(report_port=port))
    again.start()  # the port is free again
    again.stop()


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="unknown"):
        LlumletConfig.from_dict({"prot": 1})
    with pytest.raises(ValueError, match="role"):
        LlumletConfig.from_dict({"role": "both"})
    with pytest.raises(ValueError, match="min_interval_s"):
        LlumletConfig.from_dict({"min_interval_s": 1.0, "heartbeat_s": 0.5})
    assert LlumletConfig.from_dict(None).host == "127.0.0.1"
