"""`llumnix-kv bench`: the plain-socket baseline moves the bytes it claims to and rejects pieces
outside its sink; a short run of the whole bench writes every row and the tracked ratios.
Speed is not asserted here (that is the benchmark's output)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llumnix_kv import _C, errors
from llumnix_kv.bench import kv_bench

KiB = 1 << 10


def _serve(span: int, streams: int, timeout_s: float = 10.0) -> tuple[Any, ...]:
    """A sink served by a thread of this process (the call releases the GIL): its buffer, port,
    thread and the dict that gets the error it ended with, if any."""
    dst = np.zeros(span, np.uint8)
    fd, port = _C.raw_socket_listen()
    ended: dict[str, BaseException] = {}

    def run() -> None:
        try:
            _C.raw_socket_serve(fd, streams, dst.ctypes.data, span, timeout_s)
        except BaseException as exc:  # handed to the test
            ended["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return dst, port, thread, ended


def test_raw_socket_moves_pieces_into_place() -> None:
    rng = np.random.default_rng(1)
    block, n = 4 * KiB, 96
    src = rng.integers(0, 256, 2 * n * block, dtype=np.uint8)
    dst, port, thread, ended = _serve(2 * n * block, streams=3)
    src_ids, dst_ids = rng.permutation(2 * n)[:n], rng.permutation(2 * n)[:n]
    sender = _C.RawSocketSender("127.0.0.1", port, 3)
    lens = np.full(n, block, np.uint64)
    sender.send(src.ctypes.data + src_ids.astype(np.uint64) * block, dst_ids * block, lens)
    sender.send(src.ctypes.data + src_ids.astype(np.uint64) * block, dst_ids * block, lens)
    sender.close()
    thread.join(10)
    assert not thread.is_alive() and not ended
    for s, d in zip(src_ids, dst_ids, strict=True):
        assert np.array_equal(dst[d * block : (d + 1) * block], src[s * block : (s + 1) * block])
    untouched = np.setdiff1d(np.arange(2 * n), dst_ids)
    assert not dst.reshape(2 * n, block)[untouched].any()


def test_raw_socket_rejects_a_piece_outside_the_sink() -> None:
    src = np.ones(8 * KiB, np.uint8)
    dst, port, thread, ended = _serve(4 * KiB, streams=1)
    sender = _C.RawSocketSender("127.0.0.1", port, 1)
    one = np.array([4 * KiB], np.uint64)
    with pytest.raises(errors.PeerLostError):  # the sink drops the connection, no ack comes
        sender.send(np.array([src.ctypes.data], np.uint64), np.array([KiB], np.uint64), one)
    thread.join(10)
    assert isinstance(ended.get("error"), errors.OutOfRangeError)
    assert not dst.any()
    sender.close()


@pytest.mark.parametrize("seed", range(6))
def test_raw_socket_sink_survives_garbage(seed: int) -> None:
    """Random or truncated bytes end the sink's connection with an error or a clean stop."""
    rng = np.random.default_rng(seed)
    _, port, thread, ended = _serve(64 * KiB, streams=1)
    head = np.array([rng.integers(0, 1 << 30), rng.integers(0, 1 << 40)], np.uint64).tobytes()
    junk = head[: int(rng.integers(0, 17))] + rng.bytes(int(rng.integers(0, 4096)))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(junk)
    thread.join(10)
    assert not thread.is_alive()
    assert "error" not in ended or isinstance(ended["error"], errors.KvError)


def test_raw_socket_sink_waits_for_senders_with_a_deadline() -> None:
    _, _, thread, ended = _serve(4 * KiB, streams=1, timeout_s=0.5)
    thread.join(10)
    assert isinstance(ended.get("error"), errors.KvTimeoutError)


def test_raw_socket_send_to_a_sink_that_stops_reading_times_out() -> None:
    payload = np.ones(64 << 20, np.uint8)  # more than the socket buffers hold
    with socket.create_server(("127.0.0.1", 0)) as srv:
        sender = _C.RawSocketSender("127.0.0.1", srv.getsockname()[1], 1, 0.5)
        conn, _ = srv.accept()  # connected, never read
        with conn, pytest.raises(errors.KvTimeoutError):
            sender.send(
                np.array([payload.ctypes.data], np.uint64),
                np.zeros(1, np.uint64),
                np.array([payload.nbytes], np.uint64),
            )
        sender.close()


def test_raw_socket_sender_checks_its_arrays() -> None:
    _, port, thread, _ = _serve(4 * KiB, streams=1)
    sender = _C.RawSocketSender("127.0.0.1", port, 1)
    with pytest.raises(errors.InvalidArgumentError):
        sender.send(np.zeros(2, np.uint64), np.zeros(1, np.uint64), np.zeros(2, np.uint64))
    sender.close()
    thread.join(10)
    with pytest.raises(errors.PeerLostError):
        sender.send(np.zeros(1, np.uint64), np.zeros(1, np.uint64), np.zeros(1, np.uint64))


def test_short_bench_run_writes_every_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "kv.json"
    argv = ["--transport", "shm", "--transport", "tcp", "--max-tokens", "256", "--no-peers"]
    argv += ["--no-progress", "--row-seconds", "0.01", "--json", str(out)]
    assert kv_bench.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    keys = {(r["section"], r["who"], r["op"], r["size"]) for r in rows}
    for block in ("16 KiB", "64 KiB", "256 KiB", "1 MiB", "4 MiB"):
        for who in ("memcpy (ceiling)", "raw socket (tcp ceiling)", "raw socket, contiguous"):
            assert ("blocks", who, "-", block) in keys
        for who in ("shm", "tcp"):
            for op in ("WRITE", "READ"):
                assert ("blocks", who, op, block) in keys
    for tokens in ("16 tok", "256 tok"):
        assert ("kv", "tcp", "READ", tokens) in keys
        assert ("kv", "memcpy (ceiling)", "-", tokens) in keys
    for tp in (2, 8):
        assert ("hetero", "tcp", "WRITE", f"256 tok 16->64 TP1->{tp}") in keys
    for r in rows:
        assert math.isfinite(r["gbps"]) and r["gbps"] > 0 and r["batches"] >= 3, r
    printed = capsys.readouterr().out
    assert "tcp WRITE 16 KiB:" in printed and "of raw socket" in printed
    assert "tcp READ, all 5 block sizes:" in printed
    assert "shm READ 4 MiB:" in printed and "of memcpy" in printed


def test_device_runs_take_only_transports_that_move_device_memory(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):  # tcp never moves device memory
        kv_bench.parse(["--device", "cuda", "--transport", "tcp"])
    assert "cannot move CUDA device memory" in capsys.readouterr().err


@pytest.mark.cuda
def test_short_bench_run_on_device_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every transport that moves device memory, against the device-to-device memcpy."""
    cfg, _ = kv_bench.parse(["--device", "cuda"])
    assert cfg.device == 0 and "local" in cfg.transports and "tcp" not in cfg.transports
    out = tmp_path / "kv.json"
    argv = ["--device", "cuda", "--max-tokens", "256", "--no-progress", "--row-seconds", "0.01"]
    assert kv_bench.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert not any(r["who"].startswith("raw socket") for r in rows)
    keys = {(r["section"], r["who"], r["op"], r["size"]) for r in rows}
    for transport in cfg.transports:
        for op in ("WRITE", "READ"):
            assert ("blocks", transport, op, "4 MiB") in keys
            assert ("kv", transport, op, "256 tok") in keys
    for r in rows:
        assert math.isfinite(r["gbps"]) and r["gbps"] > 0 and r["batches"] >= 3, r
    assert "local WRITE 4 MiB:" in capsys.readouterr().out


def test_peer_rows_run_in_a_process_of_their_own(capfd: pytest.CaptureFixture[str]) -> None:
    """NIXL and Mooncake run in the runner's process: a row is measured (installed) or says
    why not; what their libraries log goes to the runner's log file, not into the bench's
    table; closing stops the process, and a later call starts a fresh one."""
    runner = kv_bench.PeerRunner(timeout_s=120)
    try:
        status = runner.status()
        assert set(status) == {"nixl", "mooncake"}
        for name in ("nixl", "mooncake"):
            row = runner.row(name, "WRITE", 16 * KiB, 16, 0.01)
            if status[name].startswith("ok"):
                assert row.gbps > 0 and row.batches >= 3, row
            else:
                assert row.note.startswith("not installed") and math.isnan(row.gbps)
        assert capfd.readouterr().err == ""
        assert os.path.exists(runner.log_path)
        first = runner.proc
        runner.close()
        assert first is not None and not first.is_alive()
        assert set(runner.status()) == {"nixl", "mooncake"} and runner.proc is not first
    finally:
        runner.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(runner.log_path)


def test_plot_draws_a_panel_for_each_section_with_rows(tmp_path: Path) -> None:
    def row(section: str, who: str, op: str, size: str, nbytes: int) -> kv_bench.Row:
        return kv_bench.Row(section, who, op, size, nbytes, 1, 1, 1.0, 1.0, 1.0, 1.0, 3, "")

    kv_rows = [row("kv", "tcp", "WRITE", f"{t} tok", t * 128 * KiB) for t in (16, 256)]
    blocks = [
        row("blocks", "shm", "READ", "16 KiB", 32 << 20),
        row("blocks", "shm", "READ", "1 MiB", 32 << 20),
    ]
    hetero = [row("hetero", "tcp", "WRITE", "256 tok 16->64 TP1->2", 32 << 20)]
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error"
        )  # e.g. matplotlib's "no artists ... legend" on an empty panel
        assert kv_bench.plot(kv_rows + hetero, str(tmp_path / "kv.png")) == ["kv"]
        assert kv_bench.plot(blocks + kv_rows, str(tmp_path / "both.png")) == ["blocks", "kv"]
    assert (tmp_path / "kv.png").stat().st_size > 0 and (tmp_path / "both.png").stat().st_size > 0
    assert kv_bench.plot(hetero, str(tmp_path / "none.png")) == []
    assert not (tmp_path / "none.png").exists()
