"""``llumnix serve``: a model served by N vLLM engines behind the Llumnix gateway, on one host.

Each engine is vLLM's own OpenAI server in a process of its own (its engine core and worker
below it), with LlumletConnector (``kv_load_failure_policy`` recompute) and its llumlet on a
free loopback port. Once every engine answers ``/health``, each is registered in the meta store
(and renewed while it lives: a dead engine's registration expires), the gateway starts, one
status line per instance and the URL are printed, and everything runs until Ctrl-C or SIGTERM;
then the gateway stops and every engine process tree is ended (SIGTERM, then SIGKILL), so
nothing is left running. With ``--pd P:D`` the first P instances are prefill instances and the
other D decode instances (their llumlets say so); the gateway splits every request between
the two pools (``--pd-mode pull|push``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from llumnix.gateway import Gateway, GatewayConfig, serve
from llumnix.llumlet import LlumletClient
from llumnix.metastore import InstanceRecord, MetaStore, MetaStoreError, open_meta_store

REGISTRATION_TTL_S = 3.0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class EngineProcess:
    """One vLLM OpenAI server with its llumlet."""

    instance_id: str
    proc: subprocess.Popen[bytes]
    url: str
    llumlet: str
    reports: str
    log: Path

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
        """SIGTERM to the server, then SIGKILL to whatever is left of its process tree."""
        try:
            family = [psutil.Process(self.proc.pid)]
            family += family[0].children(recursive=True)
        except psutil.Error:
            family = []
        if self.alive():
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        _, alive = psutil.wait_procs(family, timeout=3)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def engine_command(
    args: argparse.Namespace,
    port: int,
    llumlet_port: int,
    report_port: int,
    iid: str,
    role: str = "neutral",
) -> list[str]:
    kv = {
        "kv_connector": "LlumletConnector",
        "kv_connector_module_path": "llumnix.llumlet.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "llumlet": {
                "host": "127.0.0.1",
                "port": llumlet_port,
                "report_port": report_port,
                "instance_id": iid,
                "role": role,
            }
        },
    }
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
        "--host", "127.0.0.1", "--port", str(port), "--block-size", str(args.block_size),
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


def start_engines(args: argparse.Namespace, logs: Path) -> list[EngineProcess]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    engines = []
    roles = instance_roles(args)
    for i in range(args.instances):
        iid = f"{roles[i][0]}{i}" if roles[i] != "neutral" else f"i{i}"
        port, llumlet_port, report_port = free_port(), free_port(), free_port()
        log = logs / f"{iid}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                engine_command(args, port, llumlet_port, report_port, iid, roles[i]),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        engines.append(
            EngineProcess(
                iid,
                proc,
                f"http://127.0.0.1:{port}",
                f"127.0.0.1:{llumlet_port}",
                f"127.0.0.1:{report_port}",
                log,
            )
        )
    return engines


def wait_ready(engines: list[EngineProcess], deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    pending = list(engines)
    while pending:
        for e in list(pending):
            if not e.alive():
                raise RuntimeError(f"{e.instance_id} exited while starting:\n{e.log_tail()}")
            if e.healthy():
                pending.remove(e)
        if pending and time.monotonic() > deadline:
            names = [e.instance_id for e in pending]
            raise TimeoutError(f"{names} not ready in {deadline_s} s:\n{pending[0].log_tail()}")
        time.sleep(0.5)


def record_of(e: EngineProcess, block_size: int) -> InstanceRecord:
    with LlumletClient(e.llumlet, timeout=5.0) as client:
        s = client.status()
    return InstanceRecord(
        e.instance_id,
        e.url,
        llumlet=e.llumlet,
        reports=e.reports,
        role=s.role or "neutral",
        block_size=block_size,
        num_blocks=s.num_total_blocks,
    )


async def run(args: argparse.Namespace, engines: list[EngineProcess], store: MetaStore) -> None:
    records = {e.instance_id: record_of(e, args.block_size) for e in engines}
    for r in records.values():
        store.register(r, REGISTRATION_TTL_S)
    gateway = Gateway(
        store,
        GatewayConfig(host=args.host, port=args.port, policy=args.policy, pd_mode=args.pd_mode),
    )
    runner = await serve(gateway)
    for e in engines:
        r = records[e.instance_id]
        print(
            f"instance {e.instance_id} ({r.role}): {e.url} (pid {e.proc.pid}), "
            f"llumlet {e.llumlet}, "
            f"reports {e.reports}, "
            f"{r.num_blocks} KV blocks of {r.block_size} tokens, log {e.log}",
            flush=True,
        )
    print(
        f"Llumnix serves {args.model} on http://{args.host}:{args.port}/v1 with "
        f"{len(engines)} instances"
        + (f" ({args.pd} prefill:decode, {args.pd_mode})" if args.pd else "")
        + f", policy {args.policy} (Ctrl-C stops it)",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            for e in engines:
                try:
                    if e.alive():
                        store.register(records[e.instance_id], REGISTRATION_TTL_S)
                    else:
                        store.deregister(e.instance_id)
                except MetaStoreError as exc:
                    print(f"meta store: {exc}", file=sys.stderr, flush=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), REGISTRATION_TTL_S / 3)
    finally:
        await runner.cleanup()
        for e in engines:
            with contextlib.suppress(MetaStoreError):
                store.deregister(e.instance_id)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model on N vLLM engines behind the Llumnix gateway",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--model", required=True, help="a model name or a local model folder")
    p.add_argument("--instances", type=int, default=2)
    p.add_argument(
        "--pd",
        default="",
        metavar="P:D",
        help="prefill-decode disaggregation: P prefill and D decode instances "
        "(P + D is the instance count)",
    )
    p.add_argument(
        "--pd-mode", choices=("pull", "push"), default="pull", help="how PD moves the KV"
    )
    p.add_argument("--policy", default="llumnix", help="llumnix, round_robin, infaas++, ...")
    p.add_argument("--meta-store", default="memory", help="memory or redis://host:port/db")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--load-format", default="", help="passed to vLLM (e.g. dummy)")
    p.add_argument("--served-model-name", default="")
    p.add_argument(
        "--skip-tokenizer-init",
        action="store_true",
        help="engines take token-id prompts only (default when the model folder has none)",
    )
    p.add_argument("--no-enforce-eager", action="store_true")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--logs", type=Path, default=None, help="folder for the engines' logs")
    p.add_argument(
        "--engine-arg", action="append", help="one more vLLM argument (repeat it)", default=[]
    )


def cmd_serve(args: argparse.Namespace) -> int:
    if args.pd:
        try:
            p, d = parse_pd(args.pd)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        args.instances = p + d
    if args.instances < 1:
        print("--instances must be at least 1", file=sys.stderr)
        return 2
    model = Path(args.model)
    if model.is_dir() and not any((model / f).exists() for f in TOKENIZER_FILES):
        args.skip_tokenizer_init = True
    logs = args.logs or Path(tempfile.mkdtemp(prefix="llumnix-serve-"))
    logs.mkdir(parents=True, exist_ok=True)
    try:
        store = open_meta_store(args.meta_store)
    except (ValueError, MetaStoreError) as exc:
        print(f"--meta-store: {exc}", file=sys.stderr)
        return 2
    engines = start_engines(args, logs)
    try:
        print(f"starting {args.instances} vLLM engines (logs in {logs}) ...", flush=True)
        wait_ready(engines, args.start_timeout)
        asyncio.run(run(args, engines, store))
    except (RuntimeError, TimeoutError) as exc:
        print(f"llumnix serve: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        for e in engines:
            e.stop()
        store.close()
    return 0
