"""Starting the engines of ``llumnix serve`` on this host: one vLLM OpenAI server per instance,
its own process tree, with LlumletConnector (``kv_load_failure_policy`` recompute) and its
llumlet on free ports (:func:`launch_engine`); :class:`EngineProcess` watches and stops it.
``llumnix.serve_ray`` starts the same thing inside Ray actors."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

ENV_PREFIXES = ("VLLM_", "OMP_", "PYTHONPATH", "HF_", "CUDA_", "LLUMNIX")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def service_port(host: str = "127.0.0.1") -> int:
    """A free port below the OS's ephemeral range, for a server that binds it later. A port
    from :func:`free_port` may be handed to any process that binds port 0 or connects in
    between (an engine's own ZMQ sockets did, during the minute it takes to start); the OS
    never hands out ports outside the ephemeral range by itself."""
    low, _ = _ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    return free_port(host)


class Engine(Protocol):
    """One engine instance with its llumlet, wherever it runs."""

    instance_id: str
    url: str
    llumlet: str
    reports: str
    log: Path

    @property
    def pid(self) -> int: ...
    def alive(self) -> bool: ...
    def healthy(self) -> bool: ...
    def log_tail(self, n: int = 30) -> str: ...
    def stop(self, timeout: float = 15.0) -> None: ...


@dataclass
class EngineProcess:
    """One vLLM OpenAI server with its llumlet."""

    instance_id: str
    proc: subprocess.Popen[bytes]
    url: str
    llumlet: str
    reports: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self, timeout: float = 15.0) -> None:
        stop_process_tree(self.proc, timeout)


def stop_process_tree(proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """SIGTERM to ``proc``, then, after ``timeout``, SIGKILL to whatever is left of it and its
    descendants (a vLLM server's engine core and workers)."""
    try:
        family = [psutil.Process(proc.pid)]
        family += family[0].children(recursive=True)
    except psutil.Error:
        family = []
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    _, alive = psutil.wait_procs(family, timeout=3)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def engine_command(
    args: argparse.Namespace,
    port: int,
    llumlet_port: int,
    report_port: int,
    iid: str,
    role: str = "neutral",
    host: str = "127.0.0.1",
) -> list[str]:
    kv = {
        "kv_connector": "LlumletConnector",
        "kv_connector_module_path": "llumnix.llumlet.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "llumlet": {
                "host": host,
                "port": llumlet_port,
                "report_port": report_port,
                "instance_id": iid,
                "role": role,
            }
        },
    }
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
        "--host", host, "--port", str(port), "--block-size", str(args.block_size),
        "--max-model-len", str(args.max_model_len), "--seed", "0",
        "--kv-transfer-config", json.dumps(kv),
    ]  # fmt: skip
    if args.load_format:
        cmd += ["--load-format", args.load_format]
    if args.served_model_name:
        cmd += ["--served-model-name", args.served_model_name]
    if not args.no_enforce_eager:
        cmd += ["--enforce-eager"]
    if args.skip_tokenizer_init:
        cmd += ["--skip-tokenizer-init"]
    return cmd + list(args.engine_arg or [])


def parse_pd(spec: str) -> tuple[int, int]:
    """``P:D`` (prefill and decode instance counts, both at least 1)."""
    try:
        p, d = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"--pd takes P:D, two counts such as 1:3, not {spec!r}") from None
    if p < 1 or d < 1:
        raise ValueError(f"--pd {spec}: both counts must be at least 1")
    return p, d


def instance_roles(args: argparse.Namespace) -> list[str]:
    """Each instance's role: all neutral, or with ``--pd P:D`` P prefill then D decode."""
    if not args.pd:
        return ["neutral"] * args.instances
    p, d = parse_pd(args.pd)
    return ["prefill"] * p + ["decode"] * d


def engine_env(args: argparse.Namespace) -> dict[str, str]:
    """What the engines' environment adds to their host's: this process's vLLM, OpenMP and
    Python path settings, and the KV cache size."""
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    return env


def launch_engine(
    args: argparse.Namespace, iid: str, role: str, host: str, logs: Path, env: dict[str, str]
) -> EngineProcess:
    """Starts one vLLM server with its llumlet on ``host`` (ports chosen free there)."""
    port, llumlet_port, report_port = service_port(host), service_port(host), service_port(host)
    log = logs / f"{iid}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            engine_command(args, port, llumlet_port, report_port, iid, role, host),
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return EngineProcess(
        iid, proc, f"http://{host}:{port}", f"{host}:{llumlet_port}", f"{host}:{report_port}", log
    )


def instance_ids(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(instance id, role) of each instance: i0, i1, ... or p0, d1, ... with ``--pd``."""
    roles = instance_roles(args)
    return [(f"{r[0]}{i}" if r != "neutral" else f"i{i}", r) for i, r in enumerate(roles)]


def start_engines(args: argparse.Namespace, logs: Path) -> list[EngineProcess]:
    env = engine_env(args)
    return [
        launch_engine(args, iid, role, "127.0.0.1", logs, env) for iid, role in instance_ids(args)
    ]
