"""What the Llumnix gateway adds to a request: TTFT added at p50/p99, and streamed requests a
second through one gateway process, next to calling the same upstream directly.

The upstream is a minimal OpenAI-style server that streams ``--chunks`` SSE chunks at once
(no model), with a llumlet-like report publisher (ZMQ PUB, a ``Status`` every 100 ms), so the
gateway's real dispatch path runs: reports fed to the scheduler, the policy's choice, the
in-flight ledger. Upstream, gateway and client each run in a process of their own; the client
is aiohttp with one connection pool, the same for both paths.

- latency: ``--requests`` streamed requests one at a time, alternating direct and through the
  gateway; TTFT is the time to the first chunk, total the time to ``[DONE]``.
- throughput: ``--concurrency`` streams at once for ``--seconds``, direct and through the
  gateway; the direct figure bounds what this client and upstream can do on this machine.

Run: ``python benchmarks/serving/gateway_overhead.py --json gw.json --png gw.png``
(``--quick`` for the CI smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from llumnix.launch import free_port  # noqa: E402

# ----------------------------------------------------------------------------- upstream


def run_upstream(port: int, report_port: int, chunks: int) -> None:
    import zmq

    from llumnix.llumlet import llumlet_pb2 as pb

    chunk = json.dumps(
        {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "a"}]}
    )
    body = ("".join(f"data: {chunk}\n\n" for _ in range(chunks)) + "data: [DONE]\n\n").encode()

    async def completions(request: web.Request) -> web.StreamResponse:
        req = await request.json()
        if not req.get("stream"):
            return web.json_response({"id": "x", "choices": [{"index": 0, "text": "a" * chunks}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(body)
        await resp.write_eof()
        return resp

    async def main() -> None:
        ctx = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        pub.bind(f"tcp://127.0.0.1:{report_port}")
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/health", lambda r: web.Response(text="ok"))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        seq = 0
        while True:
            seq += 1
            s = pb.Status(
                instance_id="u0", seq=seq, timestamp=time.time(), num_total_blocks=100000,
                num_free_blocks=100000, schedulable=True, role="neutral",
            )  # fmt: skip
            pub.send(s.SerializeToString())
            await asyncio.sleep(0.1)

    asyncio.run(main())


# ----------------------------------------------------------------------------- gateway


def run_gateway(port: int, upstream: str, reports: str, policy: str) -> None:
    from llumnix.gateway import Gateway, GatewayConfig, serve
    from llumnix.metastore import InstanceRecord, open_meta_store

    store = open_meta_store("memory")
    store.register(
        InstanceRecord("u0", upstream, reports=reports, num_blocks=100000, block_size=16), 3600
    )

    async def main() -> None:
        await serve(Gateway(store, GatewayConfig(port=port, policy=policy)))
        await asyncio.Event().wait()

    asyncio.run(main())


# ----------------------------------------------------------------------------- client


async def one(session: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    """(TTFT, total) in seconds of one streamed request."""
    body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 8, "stream": True}
    began = time.perf_counter()
    first = 0.0
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, resp.status
        async for _ in resp.content.iter_any():
            if not first:
                first = time.perf_counter() - began
    return first, time.perf_counter() - began


def summary(x: list[float]) -> dict[str, float]:
    a = np.asarray(x) * 1e3
    return {
        "n": len(x),
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
    }


async def latency(direct: str, gateway: str, n: int) -> dict[str, Any]:
    out: dict[str, dict[str, list[float]]] = {
        k: {"ttft": [], "total": []} for k in ("direct", "gateway")
    }
    async with aiohttp.ClientSession() as session:
        for _ in range(20):  # warm both paths (connections, first dispatch)
            await one(session, direct)
            await one(session, gateway)
        for i in range(2 * n):
            name, url = ("direct", direct) if i % 2 == 0 else ("gateway", gateway)
            ttft, total = await one(session, url)
            out[name]["ttft"].append(ttft)
            out[name]["total"].append(total)
    res: dict[str, Any] = {k: {m: summary(v) for m, v in d.items()} for k, d in out.items()}
    res["added_ttft_p50_ms"] = res["gateway"]["ttft"]["p50_ms"] - res["direct"]["ttft"]["p50_ms"]
    res["added_ttft_p99_ms"] = res["gateway"]["ttft"]["p99_ms"] - res["direct"]["ttft"]["p99_ms"]
    res["samples_ms"] = {k: [t * 1e3 for t in d["ttft"]] for k, d in out.items()}
    return res


async def throughput(url: str, concurrency: int, seconds: float) -> dict[str, float]:
    done = 0
    stop = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await one(session, url)
                done += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return {"requests": done, "seconds": elapsed, "req_per_s": done / elapsed}


def wait_http(url: str, deadline_s: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer in {deadline_s} s")
        time.sleep(0.2)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, xs in res["latency"]["samples_ms"].items():
        xs = np.sort(xs)
        a.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=name)
    a.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="TTFT, one at a time")
    a.legend()
    names = ["direct", "gateway"]
    b.bar(names, [res["throughput"][n]["req_per_s"] for n in names])
    b.set(ylabel="streamed requests/s", title=f"{res['config']['concurrency']} streams at once")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("role", nargs="?", default="bench", choices=("bench", "upstream", "gateway"))
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--report-port", type=int, default=0)
    ap.add_argument("--upstream", default="")
    ap.add_argument("--reports", default="")
    ap.add_argument("--policy", default="llumnix")
    ap.add_argument("--chunks", type=int, default=8, help="SSE chunks per streamed answer")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 100 requests, 2 s")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.role == "upstream":
        run_upstream(args.port, args.report_port, args.chunks)
        return 0
    if args.role == "gateway":
        run_gateway(args.port, args.upstream, args.reports, args.policy)
        return 0
    if args.quick:
        args.requests, args.seconds, args.concurrency = 100, 2.0, 16
    up_port, rep_port, gw_port = free_port(), free_port(), free_port()
    direct, gateway = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{gw_port}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    me = [sys.executable, str(Path(__file__).resolve())]
    procs = [
        subprocess.Popen(
            [*me, "upstream", "--port", str(up_port), "--report-port", str(rep_port),
             "--chunks", str(args.chunks)], env=env,
        ),
        subprocess.Popen(
            [*me, "gateway", "--port", str(gw_port), "--upstream", direct,
             "--reports", f"127.0.0.1:{rep_port}", "--policy", args.policy], env=env,
        ),
    ]  # fmt: skip
    try:
        wait_http(direct + "/health")
        wait_http(gateway + "/health")
        time.sleep(0.5)  # the gateway has the upstream's first report
        res: dict[str, Any] = {
            "config": {
                "requests": args.requests, "concurrency": args.concurrency,
                "seconds": args.seconds, "chunks": args.chunks, "policy": args.policy,
                "cpus": os.cpu_count(),
            },
        }  # fmt: skip
        res["latency"] = asyncio.run(latency(direct, gateway, args.requests))
        res["throughput"] = {
            name: asyncio.run(throughput(url, args.concurrency, args.seconds))
            for name, url in (("direct", direct), ("gateway", gateway))
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
            if p.poll() is None:
                p.kill()
                p.wait(10)
    lat, thr = res["latency"], res["throughput"]
    print(f"{'path':<10}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}{'total p50 ms':>14}{'req/s':>10}")
    for name in ("direct", "gateway"):
        t, tot = lat[name]["ttft"], lat[name]["total"]
        print(
            f"{name:<10}{t['p50_ms']:>13.3f}{t['p99_ms']:>13.3f}{tot['p50_ms']:>14.3f}"
            f"{thr[name]['req_per_s']:>10.0f}"
        )
    print(
        f"gateway adds TTFT p50 {lat['added_ttft_p50_ms']:.3f} ms, p99 "
        f"{lat['added_ttft_p99_ms']:.3f} ms; streams/s {thr['gateway']['req_per_s']:.0f} "
        f"through one gateway process ({thr['direct']['req_per_s']:.0f} direct, same client)"
    )
    if args.png:
        plot(res, args.png)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
