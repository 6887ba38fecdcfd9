"""``llumnix serve``: a model served by N vLLM engines behind the Llumnix gateway, on one host.

Each engine is vLLM's own OpenAI server in a process of its own (its engine core and worker
below it), with LlumletConnector (``kv_load_failure_policy`` recompute) and its llumlet on a
free loopback port. Once every engine answers ``/health``, each is registered in the meta store
(and renewed while it lives: a dead engine's registration expires), the gateway starts, one
status line per instance and the URL are printed, and everything runs until Ctrl-C or SIGTERM;
then the gateway stops and every engine process tree is ended (SIGTERM, then SIGKILL), so
nothing is left running. With ``--pd P:D`` the first P instances are prefill instances and the
other D decode instances (their llumlets say so); the gateway splits every request between
the two pools (``--pd-mode pull|push``). With ``--ray [ADDRESS]`` the engines are Ray actors
in placement groups on an existing Ray cluster instead (:mod:`llumnix.serve_ray`).

With ``--migration`` the gateway relays streams token by token, so they can be live-migrated
(``POST /v1/llumnix/migrate``) and continue elsewhere when their engine dies; with
``--reschedule`` (implies ``--migration``) the rescheduler migrates them by itself (load
balance, de-fragmentation, priority headroom, drain). ``llumnix drain INSTANCE`` retires an
instance: no new work, its streams migrated away, the rest finished, then its engine stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from llumnix.gateway import Gateway, GatewayConfig, serve
from llumnix.gateway.rescheduling import ReschedulingConfig
from llumnix.launch import Engine, parse_pd, start_engines
from llumnix.llumlet import LlumletClient
from llumnix.metastore import InstanceRecord, MetaStore, MetaStoreError, open_meta_store
from llumnix.serve_ray import disconnect, start_ray_engines

REGISTRATION_TTL_S = 3.0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def wait_ready(engines: list[Engine], deadline_s: float) -> None:
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


def record_of(e: Engine, block_size: int) -> InstanceRecord:
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


async def run(args: argparse.Namespace, engines: list[Engine], store: MetaStore) -> None:
    records = {e.instance_id: record_of(e, args.block_size) for e in engines}
    for r in records.values():
        store.register(r, REGISTRATION_TTL_S)
    gateway = Gateway(
        store,
        GatewayConfig(
            host=args.host,
            port=args.port,
            policy=args.policy,
            pd_mode=args.pd_mode,
            migration=args.migration or args.reschedule,
            rescheduling=ReschedulingConfig() if args.reschedule else None,
        ),
    )
    by_id = {e.instance_id: e for e in engines}
    stopped: set[str] = set()

    async def stop_instance(iid: str) -> None:  # drained: nothing is lost by stopping it
        stopped.add(iid)
        with contextlib.suppress(MetaStoreError):
            store.deregister(iid)
        await asyncio.to_thread(by_id[iid].stop)
        print(f"instance {iid} drained and stopped", flush=True)

    gateway.stop_instance = stop_instance
    runner = await serve(gateway)
    for e in engines:
        r = records[e.instance_id]
        print(
            f"instance {e.instance_id} ({r.role}): {e.url} (pid {e.pid}), "
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
                if e.instance_id in stopped:
                    continue
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
    p.add_argument(
        "--migration",
        action="store_true",
        help="relay streams token by token so they can be live-migrated "
        "(POST /v1/llumnix/migrate) and resumed elsewhere when their instance fails",
    )
    p.add_argument(
        "--reschedule",
        action="store_true",
        help="let the rescheduler live-migrate streams (load balance, de-fragmentation, "
        "priority headroom, drain); implies --migration",
    )
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
    p.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        default=None,
        metavar="ADDRESS",
        help="place the engines as actors on the Ray cluster at ADDRESS (default: the one "
        "this host belongs to), one placement group each",
    )
    p.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs in each engine's bundle")
    p.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs in each engine's bundle")
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
    engines: list[Engine] = []
    try:
        if args.ray is not None:
            engines += start_ray_engines(args, logs)
        else:
            engines += start_engines(args, logs)
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
        if args.ray is not None:
            disconnect()
        store.close()
    return 0


INSTANCE_LINE = re.compile(
    r"instance (?P<id>\w+) \((?P<role>\w+)\): (?P<url>\S+) \(pid (?P<pid>\d+)\), "
    r"llumlet (?P<llumlet>\S+), reports (?P<reports>\S+), (?P<blocks>\d+) KV blocks"
)


class ServeProcess:
    """``llumnix serve ARGS`` as a child process (its own session), for scripts and tests:
    :meth:`wait_serving` reads its output until it serves and returns its instances (id ->
    role, url, pid, llumlet, reports, blocks, from the status lines); :meth:`stop` sends
    SIGINT, as Ctrl-C does, and kills the process group if it does not exit in time."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llumnix.cli", "serve", *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_serving(self, deadline_s: float) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + deadline_s
        instances: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                break
            self.output.append(line)
            if m := INSTANCE_LINE.search(line):
                d: dict[str, Any] = m.groupdict()
                d["pid"], d["blocks"] = int(d["pid"]), int(d["blocks"])
                instances[d.pop("id")] = d
            if "Llumnix serves" in line:
                return instances
        tail = "".join(self.output[-40:])
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"llumnix serve exited ({self.proc.returncode}) before serving:\n{tail}"
            )
        raise TimeoutError(f"llumnix serve did not start serving in {deadline_s} s:\n{tail}")

    def more_output(self) -> str:
        """What it printed since :meth:`wait_serving` (or the last call), without waiting."""
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                break
            self.output.append(line)
        return "".join(self.output)

    def stop(self, timeout: float = 60.0) -> int | None:
        """Its exit code, or None when it had to be killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            return None


def add_drain_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "drain",
        help="retire an instance of llumnix serve: its streams migrated away, then stopped",
    )
    p.add_argument("instance", help="instance id, e.g. i1")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway")
    p.add_argument("--keep", action="store_true", help="drain it but do not stop its engine")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for it")
    p.add_argument("--api-key", default=os.environ.get("LLUMNIX_API_KEY", ""))


def cmd_drain(args: argparse.Namespace) -> int:
    import json
    import urllib.error
    import urllib.request

    body = {"instance": args.instance, "stop": not args.keep, "timeout_s": args.timeout}
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    req = urllib.request.Request(
        args.url.rstrip("/") + "/v1/llumnix/drain", json.dumps(body).encode(), headers
    )
    try:
        with urllib.request.urlopen(req, timeout=args.timeout + 30) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        print(f"drain failed: HTTP {err.code}: {err.read().decode(errors='replace')}",
              file=sys.stderr)  # fmt: skip
        return 1
    except OSError as exc:
        print(f"drain failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer))
    return 0
