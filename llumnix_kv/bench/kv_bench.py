"""``llumnix-kv bench``: KV transfer bandwidth between two processes on this host.

Three sections, each with its baselines in the same run:

* **blocks**: nixlbench-style sweeps of fixed-size blocks (16 KiB .. 4 MiB, ~32 MiB a batch,
  scattered block ids) over every transport, next to the ceiling (one ``memcpy`` of the same
  bytes in one process), raw-socket loopback moving the same blocks (the ceiling for tcp; also
  as one contiguous run), all measured interleaved, and the NIXL and Mooncake peers moving the
  same blocks where they are installed;
* **kv**: one request's KV of a real model shape (default Llama-3-8B, vLLM FlashAttention NHD,
  16-token blocks), from one block to 32k tokens, with block tables as an allocator hands them
  out after churn, so runs merge only where a real cache lets them;
* **hetero**: prefill (16-token blocks, TP1) -> decode (64-token blocks, rank 1 of TP2, and of
  TP8 where the KV heads allow: one head per token, the smallest segments a TP mismatch makes).

The peer process registers its cache in shared memory, so the shm transport maps it.
GB/s counts payload bytes, 1 GB = 1e9 bytes; latencies are per batch in milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import itertools
import json
import mmap
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

import llumnix_kv as kv
from llumnix_kv import _C
from llumnix_kv.bench import peers as peer_mod
from llumnix_kv.bench.target import PeerProcess
from llumnix_kv.bench.workload import (
    LAYOUTS,
    MODELS,
    ModelShape,
    cache_bytes,
    churned_block_table,
    flat_layout,
    model_from_config,
)
from llumnix_kv.errors import UnsupportedError
from llumnix_kv.transfer import Op, Peer, TransferEngine, plan_segments

KiB, MiB = 1 << 10, 1 << 20
BLOCK_SIZES = (16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB)
BATCH_BYTES = 32 * MiB
REQUEST_TOKENS = (16, 256, 1024, 4096, 32768)
# The block sweep moves n = max(16, BATCH_BYTES // block) blocks among the first 2n of a pool.
BLOCK_SPAN = max(2 * max(16, BATCH_BYTES // b) * b for b in BLOCK_SIZES)
TIME_PER_ROW_S = 0.6  # each row repeats until about this long (3..MAX_BATCHES batches)
# Batches a row measures at most: the more rounds, the more of a shared machine's slow spells
# average out (see summary() for what a ratio's run-to-run spread still is).
MAX_BATCHES = 100


@dataclass
class Row:
    section: str
    who: str  # transport, peer or baseline
    op: str
    size: str  # block size or request tokens
    transfer_bytes: int
    segments: int  # after merging
    threads: int  # copy threads (shm/local) or TCP streams (tcp)
    gbps: float
    lat_avg_ms: float
    lat_p50_ms: float
    lat_p99_ms: float
    batches: int = 0  # timed batches behind the figures
    note: str = ""


@dataclass
class Config:
    model: ModelShape
    layout: str
    block_tokens: int
    transports: list[str]
    ops: list[str]
    sections: list[str]
    max_tokens: int
    peers: bool
    tcp_streams: int
    seed: int
    progress: bool
    device: int  # -1: host memory; >= 0: CUDA device of both pools
    row_seconds: float = TIME_PER_ROW_S


def _human(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB and n % MiB == 0 else f"{n // KiB} KiB"


def _stats(times: list[float], nbytes: int) -> tuple[float, float, float, float]:
    """(GB/s, avg ms, p50 ms, p99 ms) of per-batch wall times."""
    ms = sorted(t * 1e3 for t in times)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return nbytes * len(times) / sum(times) / 1e9, statistics.fmean(ms), statistics.median(ms), p99


def _repeat(run: Callable[[], None], seconds: float = TIME_PER_ROW_S) -> list[float]:
    """Per-call seconds: one warm-up call, then calls until about `seconds` have passed (3 to
    MAX_BATCHES). The count does not follow the warm-up's time: a first batch into a fresh
    mapping pays its page faults and can take a hundred times longer than the rest."""
    run()
    times: list[float] = []
    while len(times) < MAX_BATCHES and (len(times) < 3 or sum(times) < seconds):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def _interleaved(
    runs: dict[Any, Callable[[], None]], seconds: float = TIME_PER_ROW_S
) -> dict[Any, list[float] | str]:
    """Per-batch seconds of each run, measured in rounds of one batch of every run, so that a
    slow spell of the machine (a busy neighbour, a daemon waking up) falls on a row and on its
    baseline alike instead of on whichever happened to be running; the order within a round is
    shuffled. One warm-up batch each, then rounds until about `seconds` per run have passed
    (3 to MAX_BATCHES). A run that cannot move this memory gets the reason instead of times."""
    out: dict[Any, list[float] | str] = {}
    times: dict[Any, list[float]] = {}
    for key, run in runs.items():
        try:
            run()
        except UnsupportedError as exc:
            out[key] = f"unsupported: {exc}"
            continue
        times[key] = []
        out[key] = times[key]
    keys = list(times)
    order = random.Random(len(keys))
    spent, rounds = 0.0, 0
    while keys and rounds < MAX_BATCHES and (rounds < 3 or spent < seconds * len(keys)):
        order.shuffle(keys)  # no run always follows the same one (and its leftover work)
        for key in keys:
            t0 = time.perf_counter()
            runs[key]()
            times[key].append(time.perf_counter() - t0)
            spent += times[key][-1]
        rounds += 1
    return out


@contextlib.contextmanager
def memcpy_batch(nbytes: int, device: int = -1) -> Iterator[tuple[Callable[[], None], float]]:
    """The ceiling: one memcpy of ``nbytes`` in one process. Yields the copy and the factor from
    its time to that of ``nbytes`` (it copies at most 512 MiB, as bandwidth is flat past that).
    Host buffers are both written first (so no page is a shared zero page); with
    ``device >= 0`` it is a device-to-device cudaMemcpy."""
    n = min(nbytes, 512 * MiB)
    if device >= 0:
        a, b = _C.cuda_malloc(n, device), _C.cuda_malloc(n, device)
        try:

            def copy() -> None:
                _C.cuda_memcpy_async(b, a, n, 0)
                _C.cuda_synchronize(0)

            yield copy, nbytes / n
        finally:
            _C.cuda_free(a)
            _C.cuda_free(b)
    else:
        ha, hb = np.full(n, 1, np.uint8), np.full(n, 2, np.uint8)

        def host_copy() -> None:
            ctypes.memmove(hb.ctypes.data, ha.ctypes.data, n)

        yield host_copy, nbytes / n


def memcpy_ceiling(nbytes: int, device: int = -1, seconds: float = TIME_PER_ROW_S) -> list[float]:
    """Per-batch seconds of memcpy_batch, repeated."""
    with memcpy_batch(nbytes, device) as (copy, scale):
        return [t * scale for t in _repeat(copy, seconds)]


Pieces = list[tuple[int, int, int]]  # (source offset, destination offset, bytes)


def _socket_sink(port_conn: Any, streams: int) -> None:
    """The receiving process of raw_socket."""
    fd, port = _C.raw_socket_listen("127.0.0.1")
    # The bytes land in the same kind of memory as the bench peer's pool (a memfd mapping,
    # TransferEngine.alloc_shared), written beforehand, at distinct addresses as a transfer's
    # do (a sink that reused one small buffer would copy into cache).
    mem_fd = os.memfd_create("llumnix-kv-raw-sink", os.MFD_CLOEXEC)
    os.ftruncate(mem_fd, BLOCK_SPAN)
    mem = mmap.mmap(mem_fd, BLOCK_SPAN)
    os.close(mem_fd)
    with mem:
        buf = np.frombuffer(mem, np.uint8)
        buf[:] = 1
        port_conn.send(port)
        _C.raw_socket_serve(fd, streams, buf.ctypes.data, BLOCK_SPAN, 60.0)
        del buf


@contextlib.contextmanager
def raw_socket(streams: int = 1) -> Iterator[Callable[[Pieces], Callable[[], None]]]:
    """Raw-socket loopback between two processes: the TCP baseline (C++, llumnix_kv/transfer/
    raw_socket.h: per stream one gather send and one scatter receive, no protocol beyond a
    table of where the pieces land). Yields a function that, for pieces (source offset,
    destination offset, bytes) inside BLOCK_SPAN, gives one batch moving them from this
    process's memory into the other's over ``streams`` connections at once."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_socket_sink, args=(child, streams), daemon=True)
    proc.start()
    try:
        if not parent.poll(60):
            raise TimeoutError("socket sink did not start")
        sender = _C.RawSocketSender("127.0.0.1", parent.recv(), streams)
        payload = np.full(BLOCK_SPAN, 3, np.uint8)

        def batch(pieces: Pieces) -> Callable[[], None]:
            table = np.array(pieces, np.uint64).reshape(-1, 3)
            if np.any(table[:, :2] + table[:, 2:] > BLOCK_SPAN):
                raise ValueError(f"raw socket pieces must lie in {BLOCK_SPAN} bytes")
            local = payload.ctypes.data + table[:, 0]
            offset, lens = table[:, 1].copy(), table[:, 2].copy()
            return lambda: sender.send(local, offset, lens)

        try:
            yield batch
        finally:
            sender.close()  # the sink returns once its connections close
        proc.join(10)
    finally:
        proc.kill()
        proc.join(10)


class Bench:
    def __init__(self, cfg: Config, pool_bytes: int) -> None:
        self.cfg = cfg
        self.pool_bytes = pool_bytes
        dev = cfg.device
        self.peer_proc = PeerProcess(cfg.transports, pool_bytes, shared=True, device=dev)
        self.peers = PeerRunner()
        self.engine = TransferEngine(
            "bench", transports=cfg.transports, tcp_streams=cfg.tcp_streams
        )
        self._device_allocs: list[int] = []
        self.local_addr = self._alloc(self.engine)
        self.links: dict[str, Peer] = {}
        self.loopback: TransferEngine | None = None
        self.loop_addr = 0

    def _alloc(self, engine: TransferEngine) -> int:
        """A pool of pool_bytes on the bench's device, registered with `engine`, every page
        touched."""
        if self.cfg.device >= 0:
            addr = _C.cuda_malloc(self.pool_bytes, self.cfg.device)
            self._device_allocs.append(addr)
            engine.register((addr, self.pool_bytes, self.cfg.device))
            return addr
        buf = np.zeros(self.pool_bytes, np.uint8)
        buf[::4096] = 1
        engine.register(buf)  # the engine keeps the array alive
        return buf.ctypes.data

    def close(self) -> None:
        self.engine.close()
        if self.loopback is not None:
            self.loopback.close()
        self.peer_proc.stop()
        self.peers.close()
        for addr in self._device_allocs:
            _C.cuda_free(addr)
        self._device_allocs.clear()

    def link(self, transport: str) -> tuple[Peer, int]:
        """A peer reached over `transport`, and the base address of its pool. `local` uses a
        second engine in this process (same-process transfers)."""
        if transport == "local":
            if self.loopback is None:
                self.loopback = TransferEngine("bench-local", transports=["local"])
                self.loop_addr = self._alloc(self.loopback)
                self.links["local"] = self.engine.add_peer(self.loopback.descriptor(), "local")
            return self.links["local"], self.loop_addr
        if transport not in self.links:
            self.links[transport] = self.engine.add_peer(self.peer_proc.descriptor, transport)
        return self.links[transport], self.peer_proc.addr

    def threads(self, transport: str) -> int:
        return self.cfg.tcp_streams if transport == "tcp" else kv.build_info()["cpu_threads"]  # type: ignore[return-value]

    def batch(self, peer: Peer, op: str, segs: tuple[np.ndarray, ...]) -> Callable[[], None]:
        """One batch moving ``segs`` to or from ``peer``; it raises UnsupportedError when the
        transport cannot move this memory (device memory over a host-only transport)."""

        def once() -> None:
            self.engine.submit(peer, op, *segs).wait(120)

        return once

    def time_batches(self, peer: Peer, op: str, segs: tuple[np.ndarray, ...]) -> list[float] | str:
        """Per-batch seconds, or why the transport cannot run this."""
        try:
            return _repeat(self.batch(peer, op, segs), self.cfg.row_seconds)
        except UnsupportedError as exc:
            return f"unsupported: {exc}"


def block_sweep(bench: Bench, rows: list[Row], tick: Callable[[], None]) -> None:
    """Per block size: the ceilings and every transport and op, measured interleaved (see
    _interleaved); then the peers, each in its own processes."""
    cfg = bench.cfg
    rng = np.random.default_rng(cfg.seed)
    streams = cfg.tcp_streams
    with contextlib.ExitStack() as stack:
        # The raw socket is tcp's baseline: measured in the runs that have tcp.
        raw = stack.enter_context(raw_socket(streams)) if "tcp" in cfg.transports else None
        for block in BLOCK_SIZES:
            n = max(16, BATCH_BYTES // block)
            nbytes = n * block
            label = _human(block)
            src_ids = rng.permutation(2 * n)[:n].astype(np.uint64)
            dst_ids = rng.permutation(2 * n)[:n].astype(np.uint64)
            same = [
                (int(i) * block, int(j) * block, block)
                for i, j in zip(src_ids, dst_ids, strict=True)
            ]
            with memcpy_batch(nbytes, cfg.device) as (copy, _):
                runs: dict[Any, Callable[[], None]] = {"memcpy": copy}
                if raw is not None:
                    runs["raw"] = raw(same)
                    runs["contiguous"] = raw([(0, 0, nbytes)])
                for transport in cfg.transports:
                    peer, remote_base = bench.link(transport)
                    segs = (
                        bench.local_addr + src_ids * block,
                        remote_base + dst_ids * block,
                        np.full(n, block, np.uint64),
                    )
                    for op in cfg.ops:
                        runs[(transport, op)] = bench.batch(peer, op, segs)
                times = _interleaved(runs, cfg.row_seconds)
            rows.append(
                _row("blocks", "memcpy (ceiling)", "-", label, nbytes, 1, 1, times["memcpy"])
            )
            for kind, who, segments in (
                ("raw", "raw socket (tcp ceiling)", n),
                ("contiguous", "raw socket, contiguous", 1),
            ):
                if kind in times:
                    row = _row("blocks", who, "-", label, nbytes, segments, streams, times[kind])
                    rows.append(row)
            tick()
            for transport in cfg.transports:
                for op in cfg.ops:
                    threads = bench.threads(transport)
                    rows.append(
                        _row(
                            "blocks",
                            transport,
                            op,
                            label,
                            nbytes,
                            n,
                            threads,
                            times[(transport, op)],
                        )
                    )
                    tick()
            if cfg.peers:
                for name in peer_mod.PEERS:
                    for op in cfg.ops:
                        rows.append(bench.peers.row(name, op, block, n, cfg.row_seconds))
                        tick()


def _peer_runner(conn: Any, log_path: str) -> None:
    """The process that runs the peers (see PeerRunner): answers ("status",) with
    peer_status() and ("run", args, kwargs) with run_peer's result, as ("ok", value),
    ("unavailable", why) or ("failed", why), until the pipe closes. Its standard error, and
    that of the peers' target processes it starts, goes to `log_path`: the peers' libraries
    log there from C++ (Mooncake logs an error on every start that is no error), and a
    failure reaches the bench as ("failed", why) anyway."""
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    while True:
        try:
            cmd, *args = conn.recv()
        except EOFError:
            return
        try:
            if cmd == "status":
                conn.send(("ok", peer_mod.peer_status()))
            else:
                conn.send(("ok", peer_mod.run_peer(*args[0], **args[1])))
        except peer_mod.PeerUnavailable as exc:
            conn.send(("unavailable", str(exc)))
        except (RuntimeError, TimeoutError, ValueError) as exc:
            conn.send(("failed", str(exc)))


class PeerRunner:
    """NIXL and Mooncake run in a process of their own, started once: their libraries (NIXL
    brings a UCX context and memory hooks, Mooncake its threads) never load into the bench
    process, where they slowed the bench's own ucx transport in the rows after them. A call
    that does not answer in time kills the process; the next call starts a fresh one."""

    def __init__(self, timeout_s: float = 300.0) -> None:
        self.timeout_s = timeout_s
        self.proc: Any = None
        self.conn: Any = None
        #: Where the peers' processes write their standard error (their libraries' logs).
        self.log_path = os.path.join(
            tempfile.gettempdir(), f"llumnix-kv-bench-peers-{os.getpid()}.log"
        )

    def _call(self, *cmd: Any) -> tuple[str, Any]:
        if self.proc is None or not self.proc.is_alive():
            ctx = mp.get_context("spawn")
            self.conn, child = ctx.Pipe()
            # Not a daemon: run_peer starts the peer's target process from there. It exits at
            # EOF on its pipe, when this process closes it or dies.
            self.proc = ctx.Process(target=_peer_runner, args=(child, self.log_path))
            self.proc.start()
            child.close()
        try:
            self.conn.send(cmd)
            if self.conn.poll(self.timeout_s):
                return self.conn.recv()
            why = f"no answer in {self.timeout_s:.0f} s"
        except (EOFError, OSError) as exc:
            why = f"peer process died: {exc}"
        self.close()
        return "failed", why

    def status(self) -> dict[str, str]:
        kind, value = self._call("status")
        return value if kind == "ok" else {p: value for p in peer_mod.PEERS}

    def row(self, name: str, op: str, block: int, n: int, seconds: float) -> Row:
        label, nbytes = _human(block), n * block
        batches = max(3, min(20, int(2e9 * seconds / nbytes)))
        kind, res = self._call("run", (name, op, block, n), {"batches": batches})
        if kind != "ok":
            why = f"not installed: {res}" if kind == "unavailable" else f"failed: {res}"
            return _row("blocks", name, op, label, nbytes, n, 0, why)
        ms = (res.lat_avg_us / 1e3, res.lat_p50_us / 1e3, res.lat_p99_us / 1e3)
        return Row("blocks", name, op, label, nbytes, n, 0, res.gbps, *ms, res.batches, res.note)

    def close(self) -> None:
        if self.proc is not None:
            self.conn.close()  # the runner returns at EOF
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(10)
            self.proc = None


def _row(
    section: str,
    who: str,
    op: str,
    size: str,
    nbytes: int,
    segs: int,
    threads: int,
    times: list[float] | str,
) -> Row:
    """A row from per-batch seconds, or from the reason the row could not run."""
    if isinstance(times, str):
        return Row(
            section, who, op, size, nbytes, segs, threads, *(float("nan"),) * 4, note=times
        )  # fmt: skip
    gbps, avg, p50, p99 = _stats(times, nbytes)
    return Row(section, who, op, size, nbytes, segs, threads, gbps, avg, p50, p99, len(times))


def kv_requests(bench: Bench, rows: list[Row], tick: Callable[[], None], hetero: bool) -> None:
    cfg = bench.cfg
    m = cfg.model
    heads = m.kv_heads
    rng = np.random.default_rng(cfg.seed + 1)
    if hetero:  # rank 1 of each decode TP degree that divides the KV heads
        src_bt, dst_bt = cfg.block_tokens, 64
        variants = [
            ((heads // tp, 2 * heads // tp), f" {src_bt}->{dst_bt} TP1->{tp}")
            for tp in hetero_tp(m)
        ]
        sizes = [min(4096, cfg.max_tokens)]
    else:
        src_bt, dst_bt = cfg.block_tokens, cfg.block_tokens
        variants = [((0, heads), "")]
        sizes = [t for t in REQUEST_TOKENS if t <= cfg.max_tokens]
    pool_src = _pool_blocks(cfg.max_tokens, src_bt)
    pool_dst = _pool_blocks(cfg.max_tokens, dst_bt)
    for (dst_heads, suffix), transport in itertools.product(variants, cfg.transports):
        peer, remote_base = bench.link(transport)
        dh = dst_heads[1] - dst_heads[0]
        local = flat_layout(m, cfg.layout, src_bt, pool_src, heads, bench.local_addr)
        remote = flat_layout(m, cfg.layout, dst_bt, pool_dst, dh, remote_base)
        for tokens in sizes:
            src_tab = churned_block_table(pool_src, -(-tokens // src_bt), rng)
            dst_tab = churned_block_table(pool_dst, -(-tokens // dst_bt), rng)
            for op in cfg.ops:
                if op == "WRITE":
                    plan = kv.plan_copy(
                        local, remote, src_tab, dst_tab, (0, tokens), dst_heads=dst_heads
                    )
                else:
                    plan = kv.plan_copy(
                        remote, local, dst_tab, src_tab, (0, tokens), src_heads=dst_heads
                    )
                segs = plan_segments(plan, local, remote, Op[op])
                times = bench.time_batches(peer, op, segs)
                size = f"{tokens} tok{suffix}"
                rows.append(
                    _row(
                        "hetero" if hetero else "kv",
                        transport,
                        op,
                        size,
                        plan.total_bytes,
                        len(plan),
                        bench.threads(transport),
                        times,
                    )
                )
                tick()
    if not hetero:
        for tokens in sizes:
            nbytes = tokens * m.bytes_per_token
            rows.append(
                _row(
                    "kv",
                    "memcpy (ceiling)",
                    "-",
                    f"{tokens} tok",
                    nbytes,
                    1,
                    1,
                    memcpy_ceiling(nbytes, cfg.device, cfg.row_seconds),
                )
            )


def hetero_tp(m: ModelShape) -> list[int]:
    """Decode TP degrees of the hetero section: 2 (the head halves) and 8 (one head each on
    Llama-3-8B: the smallest segments a TP mismatch makes), where they divide the KV heads."""
    return [] if m.mla else [tp for tp in (2, 8) if m.kv_heads % tp == 0]


def _pool_blocks(tokens: int, block_tokens: int) -> int:
    return int(-(-tokens // block_tokens) * 1.1) + 8


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'section':7} {'who':26} {'op':5} {'size':>22} {'MiB':>8} {'segments':>8} {'thr':>3} "
        f"{'GB/s':>7} {'avg ms':>8} {'p50 ms':>8} {'p99 ms':>8} {'n':>3}  note"
    )
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        if last is not None and (r.section, r.size) != last:
            print()
        last = (r.section, r.size)
        print(
            f"{r.section:7} {r.who:26} {r.op:5} {r.size:>22} {r.transfer_bytes / MiB:>8.1f} "
            f"{r.segments:>8} {r.threads:>3} {r.gbps:>7.2f} {r.lat_avg_ms:>8.3f} "
            f"{r.lat_p50_ms:>8.3f} {r.lat_p99_ms:>8.3f} {r.batches:>3}  {r.note}"
        )


def summary(rows: list[Row], device: bool = False) -> list[str]:
    """The ratios the project tracks, from this run's rows. In a run on device memory
    (`device`) every transport is set against the device-to-device memcpy ceiling."""
    out = []

    def find(section: str, who: str, op: str, size: str) -> Row | None:
        return next(
            (r for r in rows if (r.section, r.who, r.op, r.size) == (section, who, op, size)), None
        )

    for r in rows:
        if r.section != "blocks" or r.op == "-":
            continue
        block = int(r.size.split()[0]) * (MiB if "MiB" in r.size else KiB)
        if (r.who == "shm" or device) and block >= 256 * KiB:
            ceil = find("blocks", "memcpy (ceiling)", "-", r.size)
            if ceil:
                out.append(f"{r.who} {r.op} {r.size}: {r.gbps / ceil.gbps:.2f} of memcpy")
        if r.who == "tcp":
            ceil = find("blocks", "raw socket (tcp ceiling)", "-", r.size)
            if ceil:
                out.append(f"tcp {r.op} {r.size}: {r.gbps / ceil.gbps:.2f} of raw socket")
        if r.size == "16 KiB" and r.who in ("shm", "tcp", "ucx"):
            for p in peer_mod.PEERS:
                other = find("blocks", p, r.op, r.size)
                if other and other.gbps == other.gbps:  # not NaN
                    out.append(f"{r.who} {r.op} 16 KiB: {r.gbps / other.gbps:.2f}x {p}")
    # One row's ratio moves by about 5% from run to run on a small shared machine; over every
    # block size (bytes moved over time spent) it holds to about 2%.
    raw = "raw socket (tcp ceiling)"
    for op in ("WRITE", "READ"):
        pairs = [
            (r, c)
            for r in rows
            if (r.section, r.who, r.op) == ("blocks", "tcp", op)
            and (c := find("blocks", raw, "-", r.size)) is not None
            and r.gbps > 0
            and c.gbps > 0
        ]
        if len(pairs) > 1:
            ratio = _rate([r for r, _ in pairs]) / _rate([c for _, c in pairs])
            out.append(f"tcp {op}, all {len(pairs)} block sizes: {ratio:.2f} of raw socket")
    return out


def _rate(rows: list[Row]) -> float:
    """GB/s over all batches of `rows`: bytes moved over time spent."""
    moved = sum(r.transfer_bytes * r.batches for r in rows)
    return moved / sum(r.transfer_bytes * r.batches / r.gbps for r in rows)


def plot(rows: list[Row], path: str) -> list[str]:
    """Bandwidth against transfer size, a panel for each of the blocks and kv sections that
    has rows (the hetero section has one size): one colour per transport, peer or baseline;
    WRITE solid, READ dashed, baselines dotted. Returns the sections drawn; writes nothing if
    there are none."""
    sections = [s for s in ("blocks", "kv") if any(r.section == s for r in rows)]
    if not sections:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    whos = list(dict.fromkeys(r.who for r in rows))
    colors = plt.get_cmap("tab10" if len(whos) <= 10 else "tab20")
    style = {"WRITE": ("-", "o"), "READ": ("--", "^"), "-": (":", "s")}
    fig, axes = plt.subplots(1, len(sections), figsize=(6.5 * len(sections), 5), squeeze=False)
    for ax, section in zip(axes[0], sections, strict=True):
        series: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for r in rows:
            if r.section == section and r.gbps == r.gbps:
                series.setdefault((r.who, r.op), []).append(
                    (r.transfer_bytes if section == "kv" else _block_of(r), r.gbps)
                )
        for (who, op), pts in series.items():
            pts.sort()
            line, marker = style[op]
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                line,
                marker=marker,
                color=colors(whos.index(who)),
                label=who if op == "-" else f"{who} {op}",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block bytes" if section == "blocks" else "request KV bytes")
        ax.set_ylabel("GB/s")
        ax.set_title("fixed-size blocks" if section == "blocks" else "one request's KV")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return sections


def _block_of(r: Row) -> int:
    return int(r.size.split()[0]) * (MiB if "MiB" in r.size else KiB)


def parse(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="llumnix-kv bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", choices=sorted(MODELS), default="llama3-8b")
    p.add_argument(
        "--model-config", metavar="PATH", help="a Hugging Face config.json (overrides --model)"
    )
    p.add_argument("--layout", choices=LAYOUTS, default="flash_nhd")
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument(
        "--transport", action="append", help="transport(s) to run (default: every one built here)"
    )
    p.add_argument("--op", choices=["WRITE", "READ"], action="append", help="default: both")
    p.add_argument(
        "--section", choices=["blocks", "kv", "hetero"], action="append", help="default: all"
    )
    p.add_argument(
        "--max-tokens", type=int, default=32768, help="largest request in the kv section"
    )
    p.add_argument("--tcp-streams", type=int, default=2)
    p.add_argument("--no-peers", action="store_true", help="skip the NIXL and Mooncake rows")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    p.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    p.add_argument("--plot", metavar="PNG", help="plot bandwidth against transfer size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--row-seconds",
        type=float,
        default=TIME_PER_ROW_S,
        help=f"about this long per row (3 to {MAX_BATCHES} batches; default %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    model = model_from_config(a.model_config) if a.model_config else MODELS[a.model]
    with TransferEngine("probe") as probe:
        # With --device cuda only the transports that move device memory (never tcp).
        built = probe.device_transports() if a.device == "cuda" else probe.transports()
    transports = a.transport or [t for t in ("local", "shm", "ucx", "tcp") if t in built]
    missing = [t for t in transports if t not in built]
    if missing:
        memory = "CUDA device memory" if a.device == "cuda" else "memory"
        p.error(f"transport(s) {missing} cannot move {memory} here (can: {built})")
    cfg = Config(
        model=model,
        layout=a.layout,
        block_tokens=a.block_tokens,
        transports=transports,
        ops=a.op or ["WRITE", "READ"],
        sections=a.section or ["blocks", "kv", "hetero"],
        max_tokens=a.max_tokens,
        peers=not a.no_peers,
        tcp_streams=a.tcp_streams,
        seed=a.seed,
        progress=not a.no_progress,
        device=0 if a.device == "cuda" else -1,
        row_seconds=a.row_seconds,
    )
    return cfg, a


def _progress(total: int, enabled: bool) -> tuple[Callable[[], None], Callable[[], None]]:
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        return (lambda: None), (lambda: None)
    bar = tqdm(total=total, file=sys.stderr, unit="row", leave=False)
    return (lambda: bar.update(1)), bar.close


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse(argv)
    for var, level in (("MC_LOG_LEVEL", "ERROR"), ("NIXL_LOG_LEVEL", "WARN")):
        os.environ.setdefault(var, level)  # the peers log every connection at INFO
    if args.device == "cuda":
        info = kv.build_info()
        if not info["cuda_devices"]:
            print(f"--device cuda: no usable CUDA device ({info['cuda']})", file=sys.stderr)
            return 1
        cfg.peers = False  # the peers' rows are host-memory runs
    m = cfg.model
    kv_pool = cache_bytes(
        m, _pool_blocks(cfg.max_tokens, cfg.block_tokens), cfg.block_tokens, m.kv_heads
    )
    pool_bytes = max(kv_pool, BLOCK_SPAN)
    print(f"llumnix_kv {kv.__version__}: {kv.build_info()['cuda']}; transports {cfg.transports}")
    print(
        f"model {m.name}: {m.layers} layers, {m.kv_heads} KV heads x {m.head_dim}, {m.dtype}"
        f" ({m.bytes_per_token / KiB:.0f} KiB/token); layout {cfg.layout},"
        f" {cfg.block_tokens}-token blocks; {'cuda:0' if cfg.device >= 0 else 'host'} memory"
    )
    rows_total = (
        ("blocks" in cfg.sections)
        * len(BLOCK_SIZES)
        * (1 + len(cfg.transports) * len(cfg.ops) + cfg.peers * 2 * len(cfg.ops))
        + ("kv" in cfg.sections)
        * len(cfg.transports)
        * len(cfg.ops)
        * len([t for t in REQUEST_TOKENS if t <= cfg.max_tokens])
        + ("hetero" in cfg.sections) * len(hetero_tp(m)) * len(cfg.transports) * len(cfg.ops)
    )
    tick, done = _progress(rows_total, cfg.progress)
    rows: list[Row] = []
    t0 = time.perf_counter()
    bench = Bench(cfg, pool_bytes)
    try:
        if cfg.peers:
            status = ", ".join(f"{k} {v}" for k, v in bench.peers.status().items())
            print(f"peers: {status} (their logs: {bench.peers.log_path})")
        if "blocks" in cfg.sections:
            block_sweep(bench, rows, tick)
        if "kv" in cfg.sections:
            kv_requests(bench, rows, tick, hetero=False)
        if "hetero" in cfg.sections:
            kv_requests(bench, rows, tick, hetero=True)
    finally:
        done()
        bench.close()
    print()
    print_table(rows)
    print(f"\n{len(rows)} rows in {time.perf_counter() - t0:.0f} s")
    for line in summary(rows, cfg.device >= 0):
        print("  " + line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "config": {k: v for k, v in asdict(cfg).items() if k != "rows"},
                    "rows": [asdict(r) for r in rows],
                },
                f,
                indent=1,
                default=str,
            )
        print(f"wrote {args.json}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
            w.writeheader()
            w.writerows(asdict(r) for r in rows)
        print(f"wrote {args.csv}")
    if args.plot:
        if plot(rows, args.plot):
            print(f"wrote {args.plot}")
        else:
            print(f"--plot: no blocks or kv rows to plot, {args.plot} not written")
    return 0
