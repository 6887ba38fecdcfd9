"""PD soak: mixed traffic through real vLLM servers with LlumnixConnector, with aborts and a
killed prefill; at the end nothing may hang, nothing may be held, every engine still serves.

    PYTHONPATH=. python benchmarks/connector/soak.py [--minutes 10] [--json soak.json]

Servers (vLLM's OpenAI server, ``python -m vllm.entrypoints.openai.api_server``, one process
tree each, multiprocess engine core as a user runs it): two prefill instances (block size 64)
and one decode instance (block size 32), all with ``kv_load_failure_policy="recompute"``, and
a plain instance for reference outputs; ``llumnix-pd-proxy`` in pull mode and one in push mode
in front of the PD instances. The model is a 3-layer Llama with one KV head of 64 (MQA) and
dummy weights.

Traffic: the official ``openai`` client keeps 16 to 32 requests in flight (the level changes
every 20 s), each through the pull or the push proxy at random, prompts of 1 to 3 blocks + 1,
1 to 32 output tokens, greedy, half of them streamed; about one in ten is aborted by the
client after a random delay. A third of the way in, prefill 0 is killed (SIGKILL to its whole
process tree) and started again 20 s later on the same port.

Every request must end within its deadline (120 s) as completed or with an HTTP error or an
SSE error event that says what failed; a request that is still open at its deadline is
counted as hung. Afterwards, within 60 s of the traffic stopping, every server must report
(Prometheus ``/metrics``) no running or waiting request, no KV block in use, and no load or
hold pending in the connector, and its transfer engine only the registrations of its KV cache
(one per layer); before that, 8 fresh greedy requests through each proxy must complete
token-identical to the plain instance, and so must a sample of the completed soak requests
(so the restarted prefill has served too). The exit status is 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import openai  # noqa: E402
import psutil  # noqa: E402

from tests.e2e.test_pd_proxy import Server, free_port, proxy_args, spawn  # noqa: E402

PREFILL_BLOCK, DECODE_BLOCK = 64, 32
MODEL = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "vocab_size": 512,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
CONNECTOR = {
    "kv_connector": "LlumnixConnector",
    "kv_connector_module_path": "llumnix_kv.plugins.vllm",
    "kv_role": "kv_both",
    "kv_load_failure_policy": "recompute",
    "kv_connector_extra_config": {"load_timeout_s": 15, "send_timeout_s": 60},
}
REQUEST_DEADLINE_S = 120.0
SETTLE_S = 60.0
START_DEADLINE_S = 300.0
RESTART_AFTER_S = 20.0
LEVEL_EVERY_S = 20.0
ABORT_FRACTION = 0.1
SAMPLE = 48
# The transfer engine registers the KV cache once: one region per CPU_ATTN layer tensor.
REGISTRATIONS = float(MODEL["num_hidden_layers"])


def serve_args(model: Path, port: int, block: int, connector: bool) -> list[str]:
    args = [
        "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--load-format", "dummy", "--skip-tokenizer-init", "--enforce-eager",
        "--block-size", str(block), "--max-model-len", "1024", "--seed", "0",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    if connector:
        args += ["--kv-transfer-config", json.dumps(CONNECTOR)]
    return args


def kill_tree(server: Server) -> None:
    """SIGKILL to a server and all its descendants at once (its engine core, its worker)."""
    try:
        family = [psutil.Process(server.proc.pid)]
        family += family[0].children(recursive=True)
    except psutil.Error:
        return
    for proc in family:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(family, timeout=10)
    with contextlib.suppress(OSError):
        server.proc.wait(10)


def metrics(server: Server) -> dict[str, float]:
    """Every sample of ``/metrics``, summed over labels, by metric name."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r"^([a-zA-Z_:][\w:]*)(?:\{[^}]*\})?\s+(\S+)$", text, re.MULTILINE):
        with contextlib.suppress(ValueError):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


# What an idle PD instance must show: nothing running, waiting, in use, or pending.
IDLE = {
    "vllm:num_requests_running": 0.0,
    "vllm:num_requests_waiting": 0.0,
    "vllm:kv_cache_usage_perc": 0.0,
    "vllm:llumnix_kv_loads_pending": 0.0,
    "vllm:llumnix_kv_holds_pending": 0.0,
}


def not_idle(server: Server) -> dict[str, float]:
    """The idle conditions a PD server does not meet now (its values)."""
    m = metrics(server)
    bad = {k: m.get(k, 0.0) for k, want in IDLE.items() if m.get(k, 0.0) != want}
    registrations = m.get("vllm:llumnix_kv_registrations")
    if registrations != REGISTRATIONS:
        bad["vllm:llumnix_kv_registrations"] = registrations if registrations is not None else -1
    return bad


@dataclass
class Outcome:
    mode: str
    prompt: list[int]
    max_tokens: int
    stream: bool
    kind: str  # completed | aborted | error | hung
    tokens: list[int] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0


class Soak:
    def __init__(self, args: argparse.Namespace, logs: Path, model: Path) -> None:
        self.args = args
        self.logs = logs
        self.model = model
        self.rng = random.Random(args.seed)
        self.servers: dict[str, Server] = {}
        self.ports: dict[str, int] = {}
        self.outcomes: list[Outcome] = []
        self.events: list[str] = []

    # ------------------------------------------------------------------ servers

    def start(self, name: str, block: int, connector: bool) -> Server:
        port = self.ports.setdefault(name, free_port())
        server = spawn(name, serve_args(self.model, port, block, connector), port, self.logs)
        self.servers[name] = server
        return server

    def start_all(self) -> None:
        self.start("plain", DECODE_BLOCK, False)
        for name in ("prefill0", "prefill1"):
            self.start(name, PREFILL_BLOCK, True)
        self.start("decode", DECODE_BLOCK, True)
        deadline = time.monotonic() + START_DEADLINE_S
        for server in list(self.servers.values()):
            server.wait_healthy(deadline)
        prefills = [self.servers["prefill0"].url, self.servers["prefill1"].url]
        for mode in ("pull", "push"):
            port = free_port()
            args = proxy_args(port, prefills[0], self.servers["decode"].url, 60.0, mode)
            args += ["--prefill", prefills[1]]
            self.servers[f"proxy-{mode}"] = spawn(f"proxy-{mode}", args, port, self.logs)
        for mode in ("pull", "push"):
            self.servers[f"proxy-{mode}"].wait_healthy(time.monotonic() + 60)

    def stop_all(self) -> None:
        for server in self.servers.values():
            server.stop()

    async def kill_and_restart(self, at: float) -> None:
        await asyncio.sleep(at)
        self.events.append(f"{time.strftime('%X')} killed prefill0")
        await asyncio.to_thread(kill_tree, self.servers["prefill0"])
        await asyncio.sleep(RESTART_AFTER_S)
        server = self.start("prefill0", PREFILL_BLOCK, True)
        await asyncio.to_thread(server.wait_healthy, time.monotonic() + START_DEADLINE_S)
        self.events.append(f"{time.strftime('%X')} prefill0 serves again")

    # ------------------------------------------------------------------ traffic

    def client(self, mode: str) -> openai.AsyncOpenAI:
        url = self.servers[f"proxy-{mode}"].url if mode != "plain" else self.servers["plain"].url
        return openai.AsyncOpenAI(
            base_url=url + "/v1", api_key="none", timeout=REQUEST_DEADLINE_S, max_retries=0
        )

    def prompt(self) -> list[int]:
        n = self.rng.randint(1, 3 * PREFILL_BLOCK + 1)
        return [self.rng.randrange(3, 500) for _ in range(n)]

    async def one(
        self,
        clients: dict[str, openai.AsyncOpenAI],
        mode: str,
        prompt: list[int],
        max_tokens: int,
        stream: bool,
    ) -> Outcome:
        out = Outcome(mode, prompt, max_tokens, stream, "completed")
        began = time.monotonic()
        kwargs: dict[str, Any] = {
            "model": str(self.model), "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "extra_body": {"ignore_eos": True, "return_token_ids": True},
        }  # fmt: skip

        async def request() -> None:
            if stream:
                events = await clients[mode].completions.create(stream=True, **kwargs)
                async for chunk in events:
                    error = getattr(chunk, "error", None)
                    if error:
                        out.kind, out.error = "error", f"SSE error event: {error}"
                        break
                    out.tokens += list(chunk.choices[0].token_ids or [])
            else:
                resp = await clients[mode].completions.create(**kwargs)
                out.tokens = list(resp.choices[0].token_ids or [])

        try:
            await asyncio.wait_for(request(), REQUEST_DEADLINE_S + 5)
        except asyncio.TimeoutError:
            out.kind, out.error = "hung", f"no answer in {REQUEST_DEADLINE_S} s"
        except openai.APIStatusError as exc:
            out.kind, out.error = "error", f"HTTP {exc.status_code}: {str(exc)[:160]}"
        except openai.APIError as exc:
            hung = isinstance(exc, openai.APITimeoutError)
            out.kind, out.error = ("hung" if hung else "error"), f"{type(exc).__name__}: {exc}"
        if out.kind == "completed" and len(out.tokens) != max_tokens:
            out.kind, out.error = "error", f"{len(out.tokens)} of {max_tokens} tokens"
        out.seconds = time.monotonic() - began
        return out

    async def aborted(self, task: asyncio.Task[Outcome], after: float) -> Outcome | None:
        """Cancels the request after ``after`` s (the client closes its connection)."""
        done, _ = await asyncio.wait({task}, timeout=after)
        if done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None

    async def traffic(self, seconds: float) -> None:
        clients = {m: self.client(m) for m in ("pull", "push")}
        end = time.monotonic() + seconds
        level, next_level = 16, 0.0
        running: set[asyncio.Task[Outcome | None]] = set()
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_level:
                level, next_level = self.rng.randint(16, 32), now + LEVEL_EVERY_S
            while len(running) < level:
                mode = self.rng.choice(("pull", "push"))
                prompt, max_tokens = self.prompt(), self.rng.randint(1, 32)
                stream = self.rng.random() < 0.5
                req = asyncio.ensure_future(self.one(clients, mode, prompt, max_tokens, stream))
                if self.rng.random() < ABORT_FRACTION:
                    after = self.rng.uniform(0.0, 0.5)
                    task = asyncio.ensure_future(self.aborted(req, after))
                    task.add_done_callback(
                        lambda t, m=mode, p=prompt, n=max_tokens, s=stream: self.record(
                            t, Outcome(m, p, n, s, "aborted")
                        )
                    )
                else:
                    task = req  # type: ignore[assignment]
                    task.add_done_callback(lambda t: self.record(t, None))
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.sleep(0.01)
        if running:
            await asyncio.wait(running, timeout=REQUEST_DEADLINE_S + 10)
        for task in running:  # still open after every deadline: hung
            task.cancel()
        for c in clients.values():
            await c.close()

    def record(self, task: asyncio.Task[Any], aborted: Outcome | None) -> None:
        if task.cancelled():
            self.outcomes.append(Outcome("?", [], 0, False, "hung", error="never ended"))
            return
        result = task.result()
        self.outcomes.append(result if result is not None else aborted)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ checks

    def settle(self) -> dict[str, dict[str, float]]:
        """Waits for every PD server to be idle; what is still not, per server."""
        deadline = time.monotonic() + SETTLE_S
        pd = ("prefill0", "prefill1", "decode")
        while True:
            left = {}
            for name in pd:
                try:
                    bad = not_idle(self.servers[name])
                except OSError as exc:
                    bad = {f"/metrics failed: {exc}": -1.0}
                if bad:
                    left[name] = bad
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(1.0)

    async def identical(self, cases: Sequence[tuple[str, list[int], int]]) -> list[str]:
        """Runs each (mode, prompt, max_tokens) through its proxy and on the plain instance;
        the mismatches."""
        clients = {m: self.client(m) for m in ("pull", "push", "plain")}
        bad = []
        for mode, prompt, n in cases:
            got = await self.one(clients, mode, prompt, n, False)
            want = await self.one(clients, "plain", prompt, n, False)
            if got.kind != "completed" or got.tokens != want.tokens:
                bad.append(
                    f"{mode} {len(prompt)} tokens: {got.kind} {got.error} {got.tokens} "
                    f"!= {want.tokens}"
                )
        for c in clients.values():
            await c.close()
        return bad


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--logs", type=Path, default=None, help="the servers' logs (a new folder)")
    args = parser.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="pd-soak-")
    logs = args.logs or Path(tempfile.mkdtemp(prefix="pd-soak-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    model = Path(tmp.name) / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(MODEL))
    soak = Soak(args, logs, model)
    seconds = args.minutes * 60
    summary: dict[str, Any] = {"minutes": args.minutes, "logs": str(logs)}
    try:
        soak.start_all()

        async def run() -> None:
            killer = asyncio.create_task(soak.kill_and_restart(seconds / 3))
            await soak.traffic(seconds)
            await killer

        began = time.monotonic()
        asyncio.run(run())
        summary["traffic_s"] = round(time.monotonic() - began, 1)
        kinds = Counter(o.kind for o in soak.outcomes)
        errors = Counter(
            o.error.split(":")[0] + ": " + o.error.split(":", 2)[-1][:60]
            for o in soak.outcomes
            if o.kind == "error"
        )
        summary.update(
            requests=len(soak.outcomes),
            outcomes=dict(kinds),
            by_mode=dict(Counter(f"{o.mode} {o.kind}" for o in soak.outcomes)),
            errors=dict(errors.most_common(8)),
            events=soak.events,
            longest_s=round(max((o.seconds for o in soak.outcomes), default=0.0), 1),
        )
        rng = random.Random(args.seed + 1)
        fresh = [(mode, soak.prompt(), rng.randint(1, 16)) for mode in ("pull", "push")
                 for _ in range(8)]  # fmt: skip
        completed = [o for o in soak.outcomes if o.kind == "completed"]
        sample = rng.sample(completed, min(SAMPLE, len(completed)))
        cases = fresh + [(o.mode, o.prompt, o.max_tokens) for o in sample]
        summary["mismatches"] = asyncio.run(soak.identical(cases))
        summary["not_idle_after_settle"] = soak.settle()
        metrics_now = {n: metrics(soak.servers[n]) for n in ("prefill0", "prefill1", "decode")}
        summary["connector"] = {
            n: {k.removeprefix("vllm:llumnix_kv_"): v for k, v in m.items()
                if k.startswith("vllm:llumnix_kv_") and "bytes" not in k
                and not k.endswith(("_bucket", "_sum", "_count", "_created"))}
            for n, m in metrics_now.items()
        }  # fmt: skip
        summary["checked_identical"] = len(cases)
    finally:
        soak.stop_all()
    ok = (
        summary.get("outcomes", {}).get("hung", 0) == 0
        and not summary.get("not_idle_after_settle", {"?": 1})
        and not summary.get("mismatches", ["?"])
    )
    summary["ok"] = ok
    print(json.dumps(summary, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
