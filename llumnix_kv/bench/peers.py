"""Peer baselines for the KV transfer benchmark: NVIDIA NIXL and Mooncake Transfer Engine.

:func:`run_peer` moves the same paged-KV blocks that our own engine moves, with a peer engine,
between two OS processes on this host, and reports bandwidth and per-batch latency:

* The calling process is the *initiator*; one *target* process is started with the
  multiprocessing ``spawn`` context. Metadata goes over a multiprocessing ``Pipe``.
* Each side registers one host buffer of ``pool_blocks * block_bytes`` bytes (a paged KV pool,
  filled with a seeded pattern that differs between the two sides).
* One batch (one request's KV) moves ``num_blocks`` blocks of ``block_bytes`` bytes: source block
  ``src_block_ids[i]`` to destination block ``dst_block_ids[i]``. The *source* pool is the
  initiator's for ``WRITE`` (push) and the target's for ``READ`` (pull); the destination pool is
  the other one.
* One warm-up batch, a correctness check (the destination blocks hash equal to the source
  blocks, or :class:`RuntimeError`), then ``batches`` timed batches, one after another.

Peers and how they run here:

* ``nixl``: the ``nixl_agent`` Python API (``pip install nixl-cu12``; the ``nixl`` meta package
  also works) with its UCX backend on host (``DRAM``) memory. Descriptor lists for both pools
  are prepared once (``prep_xfer_dlist``); each batch is ``make_prepped_xfer`` + ``transfer`` +
  polling ``check_xfer_state``, as a KV connector does per request. ``UCX_MODULES=^ib,rdmacm``
  (without it the processes can crash at exit on hosts without RDMA) and
  ``UCX_NET_DEVICES=lo`` are set unless already in the environment.
* ``mooncake``: ``mooncake.engine.TransferEngine`` (``pip install
  mooncake-transfer-engine-non-cuda``; needs the system library ``libibverbs1`` even for TCP)
  with ``P2PHANDSHAKE`` metadata (no metadata server) and the ``tcp`` protocol. A batch is
  submitted as synchronous sub-batches of at most :data:`MOONCAKE_MAX_BLOCKS_PER_SUBMIT` blocks
  (its TCP transport rejects deeper per-peer queues with "queue-full").

Bandwidth is payload bytes over wall time, 1 GB = 1e9 bytes; latencies are in microseconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import itertools
import math
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

PEERS: tuple[str, ...] = ("nixl", "mooncake")
OPS: tuple[str, ...] = ("WRITE", "READ")

#: Most blocks handed to Mooncake in one submit call (its TCP transport queues at most 256
#: transfers per peer unless ``MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER`` is raised).
MOONCAKE_MAX_BLOCKS_PER_SUBMIT = 256

#: Environment set (unless already present) before a peer library is loaded.
UCX_ENV: dict[str, str] = {"UCX_MODULES": "^ib,rdmacm", "UCX_NET_DEVICES": "lo"}

_DEFAULT_SEED = 1234
_INITIATOR_SEED_OFFSET = 1
_TARGET_SEED_OFFSET = 2
_WARMUP_NOTIF = b"llumnix-bench-warmup"
_POLL_S = 0.05
_RUN_IDS = itertools.count()
# Mooncake bounds each synchronous call by MC_TRANSFER_TIMEOUT (seconds, default 30), read when
# an engine is created; run_peer sets it to its own timeout unless the user chose a value.
_MC_TIMEOUT_FROM_USER = "MC_TRANSFER_TIMEOUT" in os.environ

_NIXL_MODULES: tuple[tuple[str, str], ...] = (
    # (module, distribution)
    ("nixl", "nixl"),
    ("nixl_cu12", "nixl-cu12"),
    ("nixl_cu13", "nixl-cu13"),
)
_MOONCAKE_DISTS: tuple[str, ...] = (
    "mooncake-transfer-engine-non-cuda",
    "mooncake-transfer-engine",
)


@dataclass
class PeerResult:
    """One benchmark row for a peer engine.

    ``gbps`` is payload bytes (``block_bytes * num_blocks * batches``) over the wall time of the
    timed batches, in GB/s with 1 GB = 1e9 bytes. Latencies are per batch, from submit to
    completion, in microseconds.
    """

    peer: str
    op: str
    block_bytes: int
    num_blocks: int
    batches: int
    gbps: float
    lat_avg_us: float
    lat_p50_us: float
    lat_p99_us: float
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The row as a plain dict (for JSON output)."""
        return asdict(self)


class PeerUnavailable(Exception):
    """The peer engine is not installed or cannot be loaded here; the message says why."""


# --------------------------------------------------------------------------------------------
# Loading the peer libraries
# --------------------------------------------------------------------------------------------


def _set_default_env(env: dict[str, str]) -> None:
    for key, value in env.items():
        os.environ.setdefault(key, value)


def _dist_version(names: Sequence[str]) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _load_nixl() -> tuple[Any, str]:
    """Return NIXL's ``_api`` module and the version of the distribution that provided it."""
    _set_default_env(UCX_ENV)
    errors: list[str] = []
    for module, dist in _NIXL_MODULES:
        try:
            api = importlib.import_module(f"{module}._api")
        except ImportError as exc:  # also ModuleNotFoundError
            errors.append(f"import {module}._api: {exc}")
            continue
        except Exception as exc:  # a broken install raises anything from native code
            errors.append(f"import {module}._api: {type(exc).__name__}: {exc}")
            continue
        return api, _dist_version([dist, "nixl-cu12", "nixl-cu13", "nixl"])
    raise PeerUnavailable(
        "NIXL is not installed or does not load ("
        + "; ".join(errors)
        + "). Install it with `pip install nixl-cu12` (with the CPU torch already installed)."
    )


def _load_mooncake() -> tuple[Any, str]:
    """Return ``mooncake.engine`` and the version of the distribution that provided it."""
    try:
        engine = importlib.import_module("mooncake.engine")
    except ImportError as exc:
        hint = (
            " (the system library libibverbs is missing: `apt-get install -y libibverbs1`)"
            if "ibverbs" in str(exc)
            else ""
        )
        raise PeerUnavailable(
            f"Mooncake Transfer Engine is not installed or does not load (import mooncake.engine:"
            f" {exc}){hint}. Install it with `pip install mooncake-transfer-engine-non-cuda` "
            "(the CUDA build needs a GPU driver to import)."
        ) from exc
    if not hasattr(engine, "TransferEngine"):
        raise PeerUnavailable("mooncake.engine has no TransferEngine (unsupported version)")
    return engine, _dist_version(_MOONCAKE_DISTS)


_LOADERS: dict[str, Callable[[], tuple[Any, str]]] = {
    "nixl": _load_nixl,
    "mooncake": _load_mooncake,
}


def peer_status() -> dict[str, str]:
    """Whether each peer loads here: ``{"nixl": "ok 1.5.1" | "not installed: <why>", ...}``."""
    status: dict[str, str] = {}
    for peer, load in _LOADERS.items():
        try:
            _, version = load()
        except PeerUnavailable as exc:
            status[peer] = f"not installed: {exc}"
        else:
            status[peer] = f"ok {version}"
    return status


# --------------------------------------------------------------------------------------------
# Pools, patterns and digests
# --------------------------------------------------------------------------------------------


def _make_pool(pool_blocks: int, block_bytes: int, seed: int) -> np.ndarray:
    """A ``[pool_blocks, block_bytes]`` uint8 pool filled with a seeded byte pattern."""
    rng = np.random.default_rng(seed)
    flat = np.frombuffer(rng.bytes(pool_blocks * block_bytes), dtype=np.uint8).copy()
    return flat.reshape(pool_blocks, block_bytes)


def _digest(pool: np.ndarray, ids: Sequence[int]) -> str:
    """Hash of the given blocks of ``pool``, in the order of ``ids``."""
    h = hashlib.blake2b(digest_size=32)
    for i in ids:
        h.update(pool[i].data)
    return h.hexdigest()


def _block_descs(base: int, num_blocks: int, block_bytes: int) -> np.ndarray:
    """``[num_blocks, 3]`` uint64 rows ``(address, length in bytes, device id 0)``, one per block
    of a contiguous pool starting at ``base``."""
    descs = np.zeros((num_blocks, 3), dtype=np.uint64)
    descs[:, 0] = np.uint64(base) + np.arange(num_blocks, dtype=np.uint64) * np.uint64(block_bytes)
    descs[:, 1] = block_bytes
    return descs


# --------------------------------------------------------------------------------------------
# Target process
# --------------------------------------------------------------------------------------------


class _NixlTarget:
    def __init__(self, pool: np.ndarray, name: str) -> None:
        api, self.version = _load_nixl()
        self.agent = api.nixl_agent(name, api.nixl_agent_config(backends=["UCX"]))
        reg = np.array([[pool.ctypes.data, pool.nbytes, 0]], dtype=np.uint64)
        self.reg = self.agent.register_memory(reg, "DRAM")
        self.info = {
            "metadata": self.agent.get_agent_metadata(),
            "name": name,
            "base": int(pool.ctypes.data),
        }

    def wait_notif(self, initiator: str, tag: bytes, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.agent.check_remote_xfer_done(initiator, tag):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no NIXL notification {tag!r} from {initiator} in {timeout_s}s")
            time.sleep(0.001)

    def close(self) -> None:
        self.agent.deregister_memory(self.reg)


class _MooncakeTarget:
    def __init__(self, pool: np.ndarray) -> None:
        engine_mod, self.version = _load_mooncake()
        self.engine = engine_mod.TransferEngine()
        _mooncake_init(self.engine)
        self.addr = int(pool.ctypes.data)
        _check_rc(self.engine.register_memory(self.addr, pool.nbytes), "register_memory")
        self.info = {
            "session": f"127.0.0.1:{self.engine.get_rpc_port()}",
            "base": self.addr,
        }

    def wait_notif(self, initiator: str, tag: bytes, timeout_s: float) -> None:
        """Mooncake's synchronous calls return after the remote side completed."""

    def close(self) -> None:
        self.engine.unregister_memory(self.addr)


def _target_main(
    conn: Connection, peer: str, pool_blocks: int, block_bytes: int, seed: int, name: str
) -> None:
    """Entry point of the target process: serve ``digest``/``stop`` requests over ``conn``."""
    target: _NixlTarget | _MooncakeTarget | None = None
    try:
        pool = _make_pool(pool_blocks, block_bytes, seed)
        target = _NixlTarget(pool, name) if peer == "nixl" else _MooncakeTarget(pool)
        conn.send(("ready", target.info))
        while True:
            msg = conn.recv()
            if msg[0] == "digest":
                _, ids, notif_from, timeout_s = msg
                if notif_from:
                    target.wait_notif(notif_from, _WARMUP_NOTIF, timeout_s)
                conn.send(("digest", _digest(pool, ids)))
            elif msg[0] == "stop":
                break
            else:
                raise ValueError(f"unknown request {msg[0]!r}")
        target.close()
        conn.send(("bye", None))
    except EOFError:  # the initiator went away
        pass
    except BaseException as exc:
        with contextlib.suppress(OSError, EOFError):
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()


class _Target:
    """The initiator's handle on the target process: start, request/reply, always stop."""

    def __init__(self, peer: str, pool_blocks: int, block_bytes: int, seed: int, name: str):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_target_main,
            args=(child, peer, pool_blocks, block_bytes, seed, name),
            name=f"llumnix-peer-target-{peer}",
            daemon=True,
        )
        self.proc.start()
        child.close()

    def recv(self, expect: str, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(_POLL_S):
            if self.proc.exitcode is not None and not self.conn.poll(0):
                raise RuntimeError(
                    f"peer target process exited with code {self.proc.exitcode} "
                    f"while the initiator waited for {expect!r}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"peer target did not answer {expect!r} within {timeout_s}s")
        try:
            kind, payload = self.conn.recv()
        except EOFError as exc:
            raise RuntimeError(f"peer target closed the pipe before {expect!r}") from exc
        if kind == "error":
            raise RuntimeError(f"peer target failed:\n{payload}")
        if kind != expect:
            raise RuntimeError(f"peer target answered {kind!r}, expected {expect!r}")
        return payload

    def request(self, msg: tuple[Any, ...], expect: str, timeout_s: float) -> Any:
        self.conn.send(msg)
        return self.recv(expect, timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Ask the target to stop, then terminate/kill it if needed; always joins it."""
        try:
            if self.proc.is_alive():
                try:
                    self.conn.send(("stop",))
                    self.recv("bye", timeout_s)
                except Exception:
                    pass
            self.proc.join(timeout_s)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(timeout_s)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        finally:
            self.conn.close()
            self.proc.close()


# --------------------------------------------------------------------------------------------
# Initiator side
# --------------------------------------------------------------------------------------------


def _check_rc(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"Mooncake {what} failed with code {rc}")


def _mooncake_init(engine: Any) -> None:
    _check_rc(engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", ""), "initialize")


class _NixlInitiator:
    def __init__(self, pool: np.ndarray, name: str, remote: dict[str, Any]) -> None:
        api, self.version = _load_nixl()
        self.agent = api.nixl_agent(name, api.nixl_agent_config(backends=["UCX"]))
        reg = np.array([[pool.ctypes.data, pool.nbytes, 0]], dtype=np.uint64)
        self.reg = self.agent.register_memory(reg, "DRAM")
        self.remote_name: str = self.agent.add_remote_agent(remote["metadata"])
        local_descs = _block_descs(int(pool.ctypes.data), pool.shape[0], pool.shape[1])
        remote_descs = _block_descs(int(remote["base"]), pool.shape[0], pool.shape[1])
        self.local = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", local_descs, "DRAM")
        self.remote = self.agent.prep_xfer_dlist(self.remote_name, remote_descs, "DRAM")
        tls = os.environ.get("UCX_TLS")
        self.note = f"nixl {self.version}, UCX backend" + (f" (UCX_TLS={tls})" if tls else "")

    def run_batch(
        self, op: str, local_ids: np.ndarray, remote_ids: np.ndarray, notif: bytes, timeout_s: float
    ) -> None:
        handle = self.agent.make_prepped_xfer(
            op, self.local, local_ids, self.remote, remote_ids, notif
        )
        try:
            state = self.agent.transfer(handle)
            deadline = time.monotonic() + timeout_s
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"NIXL {op} batch not done within {timeout_s}s")
                time.sleep(0)  # yield the core: the progress thread and the peer share it
                state = self.agent.check_xfer_state(handle)
            if state != "DONE":
                raise RuntimeError(f"NIXL {op} batch failed (state {state})")
        finally:
            handle.release()

    def close(self) -> None:
        self.local.release()
        self.remote.release()
        self.agent.remove_remote_agent(self.remote_name)
        self.agent.deregister_memory(self.reg)


class _MooncakeInitiator:
    def __init__(self, pool: np.ndarray, remote: dict[str, Any]) -> None:
        engine_mod, self.version = _load_mooncake()
        self.engine = engine_mod.TransferEngine()
        _mooncake_init(self.engine)
        self.addr = int(pool.ctypes.data)
        _check_rc(self.engine.register_memory(self.addr, pool.nbytes), "register_memory")
        self.session: str = remote["session"]
        self.block_bytes = int(pool.shape[1])
        self.local_addrs = _block_descs(self.addr, pool.shape[0], self.block_bytes)[:, 0]
        self.remote_addrs = _block_descs(int(remote["base"]), pool.shape[0], self.block_bytes)[:, 0]
        self.note = (
            f"mooncake {self.version}, tcp, P2PHANDSHAKE, "
            f"<= {MOONCAKE_MAX_BLOCKS_PER_SUBMIT} blocks per submit"
        )

    def run_batch(
        self, op: str, local_ids: np.ndarray, remote_ids: np.ndarray, notif: bytes, timeout_s: float
    ) -> None:
        submit = (
            self.engine.batch_transfer_sync_write
            if op == "WRITE"
            else self.engine.batch_transfer_sync_read
        )
        local = self.local_addrs[local_ids].tolist()
        remote = self.remote_addrs[remote_ids].tolist()
        deadline = time.monotonic() + timeout_s
        step = MOONCAKE_MAX_BLOCKS_PER_SUBMIT
        for start in range(0, len(local), step):
            chunk_local, chunk_remote = local[start : start + step], remote[start : start + step]
            lengths = [self.block_bytes] * len(chunk_local)
            rc = submit(self.session, chunk_local, chunk_remote, lengths)
            if rc != 0:
                raise RuntimeError(f"Mooncake {op} sub-batch failed with code {rc}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Mooncake {op} batch not done within {timeout_s}s")

    def close(self) -> None:
        self.engine.unregister_memory(self.addr)


def _check_ids(
    name: str, ids: Sequence[int] | np.ndarray, num_blocks: int, pool_blocks: int
) -> np.ndarray:
    arr = np.asarray(ids, dtype=np.int64)
    if arr.shape != (num_blocks,):
        raise ValueError(f"{name} must have num_blocks={num_blocks} ids, got {arr.shape}")
    if num_blocks and (arr.min() < 0 or arr.max() >= pool_blocks):
        raise ValueError(f"{name} must lie in [0, pool_blocks={pool_blocks})")
    if len(np.unique(arr)) != num_blocks:
        raise ValueError(f"{name} must not repeat a block")
    return arr.astype(np.int32)


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def run_peer(
    peer: str,
    op: str,
    block_bytes: int,
    num_blocks: int,
    batches: int,
    *,
    src_block_ids: list[int] | None = None,
    dst_block_ids: list[int] | None = None,
    pool_blocks: int | None = None,
    timeout_s: float = 60.0,
) -> PeerResult:
    """Move ``batches`` batches of ``num_blocks`` blocks of ``block_bytes`` bytes with a peer.

    Args:
        peer: ``"nixl"`` or ``"mooncake"``.
        op: ``"WRITE"`` (the initiator pushes its blocks into the target's pool) or ``"READ"``
            (the initiator pulls the target's blocks into its own pool).
        block_bytes: bytes per KV block.
        num_blocks: blocks per batch (one batch models one request's KV).
        batches: timed batches, run one after another after one warm-up batch.
        src_block_ids: block ids in the *source* pool (the initiator's for WRITE, the target's
            for READ); default: a seeded random choice, as an allocator hands blocks out.
        dst_block_ids: block ids in the destination pool, paired with ``src_block_ids``.
        pool_blocks: blocks in each side's registered pool; default ``2 * num_blocks``.
        timeout_s: limit for each wait (target start-up, each batch, each reply), in seconds.

    Returns:
        A :class:`PeerResult` (GB/s with 1 GB = 1e9 bytes; latencies in microseconds).

    Raises:
        PeerUnavailable: the peer library is not installed or does not load.
        RuntimeError: a transfer failed or the moved bytes differ from the source.
        TimeoutError: a wait exceeded ``timeout_s``.
    """
    if peer not in PEERS:
        raise ValueError(f"peer must be one of {PEERS}, got {peer!r}")
    op = op.upper()
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if block_bytes <= 0 or num_blocks <= 0 or batches <= 0:
        raise ValueError("block_bytes, num_blocks and batches must be positive")
    pool = 2 * num_blocks if pool_blocks is None else pool_blocks
    if pool < num_blocks:
        raise ValueError(f"pool_blocks={pool} is smaller than num_blocks={num_blocks}")
    rng = np.random.default_rng(_DEFAULT_SEED)
    src_default = rng.permutation(pool)[:num_blocks]
    dst_default = rng.permutation(pool)[:num_blocks]
    src = _check_ids(
        "src_block_ids", src_default if src_block_ids is None else src_block_ids, num_blocks, pool
    )
    dst = _check_ids(
        "dst_block_ids", dst_default if dst_block_ids is None else dst_block_ids, num_blocks, pool
    )
    _LOADERS[peer]()  # fail fast, with the reason, before starting a process
    if peer == "mooncake" and not _MC_TIMEOUT_FROM_USER:
        os.environ["MC_TRANSFER_TIMEOUT"] = str(max(1, math.ceil(timeout_s)))

    local_ids, remote_ids = (src, dst) if op == "WRITE" else (dst, src)
    run_id = f"{os.getpid()}-{next(_RUN_IDS)}"
    names = (f"llumnix-bench-init-{run_id}", f"llumnix-bench-target-{run_id}")
    target_pool_seed = _DEFAULT_SEED + _TARGET_SEED_OFFSET
    local_pool = _make_pool(pool, block_bytes, _DEFAULT_SEED + _INITIATOR_SEED_OFFSET)

    target = _Target(peer, pool, block_bytes, target_pool_seed, names[1])
    initiator: _NixlInitiator | _MooncakeInitiator | None = None
    try:
        info = target.recv("ready", timeout_s)
        if peer == "nixl":
            initiator = _NixlInitiator(local_pool, names[0], info)
        else:
            initiator = _MooncakeInitiator(local_pool, info)

        # Warm-up, then check the moved bytes once.
        notif = _WARMUP_NOTIF if (peer == "nixl" and op == "WRITE") else b""
        initiator.run_batch(op, local_ids, remote_ids, notif, timeout_s)
        remote_digest = target.request(
            ("digest", remote_ids.tolist(), names[0] if notif else "", timeout_s),
            "digest",
            timeout_s,
        )
        local_digest = _digest(local_pool, local_ids.tolist())
        if remote_digest != local_digest:
            raise RuntimeError(
                f"{peer} {op}: destination blocks differ from the source blocks after the "
                "warm-up batch"
            )

        lat_us: list[float] = []
        t0 = time.perf_counter()
        for _ in range(batches):
            t = time.perf_counter()
            initiator.run_batch(op, local_ids, remote_ids, b"", timeout_s)
            lat_us.append((time.perf_counter() - t) * 1e6)
        wall_s = time.perf_counter() - t0
        note = initiator.note
    finally:
        try:
            if initiator is not None:
                initiator.close()
        finally:
            target.close()

    payload = block_bytes * num_blocks * batches
    return PeerResult(
        peer=peer,
        op=op,
        block_bytes=block_bytes,
        num_blocks=num_blocks,
        batches=batches,
        gbps=payload / wall_s / 1e9,
        lat_avg_us=float(np.mean(lat_us)),
        lat_p50_us=_percentile(lat_us, 50),
        lat_p99_us=_percentile(lat_us, 99),
        note=note,
    )


__all__ = ["OPS", "PEERS", "PeerResult", "PeerUnavailable", "peer_status", "run_peer"]
