"""Live-migration downtime on real vLLM CPU engines, against abort-and-recompute.

One ``llumnix serve --migration`` cluster of two engines (a dummy-weight Llama). For each
context length, a greedy stream of ``--output-tokens`` tokens is migrated to the other engine
after ``--migrate-at`` tokens, in two ways through the same gateway and the same cut:

- ``live``: Llumnix's pre-copy (KV stages into the destination's prefix cache while the source
  decodes), then the cut; the destination recomputes only the tail;
- ``recompute``: the baseline a user has without KV migration: abort on the source, continue on
  the destination with prompt + output so far and no KV (``max_stages: 0``), so it prefills
  the whole context again.

Downtime is what the client sees at the switch: the gap between the source's last token and
the destination's first as the client receives them (``gap``; the gateway says after how many
tokens it cut), next to the gateway's own measure of it (``gateway``), the largest gap of the
stream from the migration request on (``worst``: pre-copy stages slow the source too, on two
shared cores) and the stream's median inter-token gap before the migration (``ITL``);
``steps`` = gap / ITL. Also: the migration's total time, its stages and the KV it moved.
Every stream is checked whole (all its tokens, ``[DONE]``) and greedy-equal to the same
request without migration. From the live rows it fits the simulator's migration cost model
(per-stage overhead, copy bandwidth, commit overhead: ``EngineProfile``'s ``migration_*``
fields), printed and in the JSON.

Run: ``python benchmarks/migration/bench_migration.py --json migration.json --png
migration.png`` (``--quick`` for the CI smoke run).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from llumnix.launch import free_port  # noqa: E402
from llumnix.serve import ServeProcess  # noqa: E402

MODEL = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
    "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 512,
    "max_position_embeddings": 16384, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
KV_BYTES_PER_TOKEN = (
    MODEL["num_hidden_layers"] * 2 * MODEL["num_key_value_heads"] * MODEL["head_dim"] * 2
)


def post(url: str, body: dict[str, Any], timeout: float = 300) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def run_one(
    url: str, model: str, prompt: list[int], n: int, at: int, max_stages: int | None
) -> dict[str, Any]:
    """One stream migrated after ``at`` tokens; its token ids, arrival times and summary."""
    body = {
        "model": model, "prompt": prompt, "max_tokens": n, "temperature": 0.0, "stream": True,
        "ignore_eos": True, "return_token_ids": True,
    }  # fmt: skip
    req = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    ids: list[int] = []
    times: list[float] = []
    summary: dict[str, Any] = {}
    asked_at = 0.0
    thread = None
    with urllib.request.urlopen(req, timeout=600) as resp:
        rid, src = resp.headers["X-Request-Id"], resp.headers["X-Llumnix-Instance"]
        dst = {"i0": "i1", "i1": "i0"}[src]

        def migrate() -> None:
            ask = {"request_id": rid, "destination": dst}
            if max_stages is not None:
                ask["max_stages"] = max_stages
            sent = time.monotonic()
            status, answer = post(url + "/v1/llumnix/migrate", ask)
            if status != 200:  # say when, against the stream's own progress
                answer = {"state": f"HTTP {status}: {answer}", "sent_s": sent - asked_at,
                          "answered_s": time.monotonic() - asked_at, "tokens": len(ids),
                          "stream_ended_s": (times[-1] - asked_at) if times else None}  # fmt: skip
            summary.update(answer)

        done = False
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"the stream failed: {event}")
            now = time.monotonic()
            for c in event["choices"]:
                got = c.get("token_ids") or []
                ids += got
                times += [now] * len(got)
            if thread is None and len(ids) >= at:
                asked_at = time.monotonic()
                thread = threading.Thread(target=migrate)
                thread.start()
    assert thread is not None
    thread.join(600)
    if not done or len(ids) != n:
        raise RuntimeError(f"the stream ended with {len(ids)} of {n} tokens (done={done})")
    # Tokens of one event share a time; the inter-token gap is taken between events.
    before = [b - a for a, b in itertools.pairwise(times[2:at]) if b > a]
    during = [b - a for a, b in itertools.pairwise(times) if b > asked_at]
    k = summary.get("cut_after_tokens") or 0
    return {
        "ids": ids, "summary": summary, "src": src, "itl_s": statistics.median(before),
        "gap_s": times[k] - times[k - 1] if 0 < k < len(times) else 0.0,
        "worst_gap_s": max(during) if during else 0.0,
    }  # fmt: skip


def reference(engine_url: str, model: str, prompt: list[int], n: int) -> list[int]:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    status, answer = post(engine_url + "/v1/completions", body, timeout=600)
    assert status == 200, answer
    return list(answer["choices"][0]["token_ids"])


def calibrate(rows: list[dict[str, Any]], block_size: int) -> dict[str, float]:
    """The simulator's migration cost model (``llumnix.sim.profile.EngineProfile``) from the
    live rows: pre-copy time (total minus downtime) = stages x per-stage overhead + bytes /
    bandwidth, fitted by least squares; the commit overhead is the median downtime (the sim's
    final stage: suspend to commit)."""
    live = [r for r in rows if r["mode"] == "live" and r["stages"]]
    if len(live) < 2:
        return {}
    a = [(float(r["stages"]), r["kv_mib_moved"] * 2**20) for r in live]
    y = [r["total_ms_p50"] - r["downtime_ms_p50"] for r in live]
    s11 = sum(u * u for u, _ in a)
    s12 = sum(u * v for u, v in a)
    s22 = sum(v * v for _, v in a)
    t1 = sum(u * w for (u, _), w in zip(a, y, strict=True))
    t2 = sum(v * w for (_, v), w in zip(a, y, strict=True))
    det = s11 * s22 - s12 * s12
    if det <= 0:
        return {}
    overhead, per_byte = (t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det
    return {
        "migration_stage_overhead_ms": round(overhead, 2),
        "migration_bandwidth_bytes_per_s": round(1e3 / per_byte) if per_byte > 0 else 0,
        "migration_commit_overhead_ms": round(
            statistics.median(r["downtime_ms_p50"] for r in live), 2
        ),
        "migration_final_stage_tokens": 2 * block_size,
        "migration_max_stages": 3,
    }


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="256,1024,2048,4096,8192")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--output-tokens", type=int, default=160)
    ap.add_argument("--migrate-at", type=int, default=60)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="two short lengths, one repeat")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--png", type=Path)
    args = ap.parse_args()
    lengths = [256, 1024] if args.quick else [int(x) for x in args.lengths.split(",")]
    repeats = 1 if args.quick else args.repeats
    n, at = args.output_tokens, args.migrate_at
    tmp = Path(tempfile.mkdtemp(prefix="llumnix-migration-bench-"))
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text(json.dumps(MODEL))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    serving = ServeProcess(
        ["--model", str(tmp / "model"), "--load-format", "dummy", "--port", str(port),
         "--instances", "2", "--migration", "--block-size", str(args.block_size),
         "--max-model-len", str(max(lengths) + n + 64), "--logs", str(tmp / "logs")],
        env=env,
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    try:
        engines = serving.wait_serving(600)
        url, model = f"http://127.0.0.1:{port}", str(tmp / "model")
        rng = random.Random(0)
        for length in lengths:
            for mode, stages in (("live", None), ("recompute", 0)):
                runs = []
                for _ in range(repeats):
                    prompt = [rng.randrange(3, 500) for _ in range(length)]
                    r = run_one(url, model, prompt, n, at, stages)
                    want = reference(engines[r["src"]]["url"], model, prompt, n)
                    r["equal"] = r.pop("ids") == want
                    runs.append(r)
                s = [r["summary"] for r in runs]
                if any(x.get("state") != "done" for x in s):
                    raise RuntimeError(f"{mode} {length}: {s}\n{serving.more_output()[-4000:]}")
                row = {
                    "length": length, "mode": mode, "runs": len(runs),
                    "gap_ms_p50": 1e3 * pct([r["gap_s"] for r in runs], 0.5),
                    "gap_ms_max": 1e3 * max(r["gap_s"] for r in runs),
                    "worst_gap_ms_p50": 1e3 * pct([r["worst_gap_s"] for r in runs], 0.5),
                    "downtime_ms_p50": 1e3 * pct([x["downtime_s"] for x in s], 0.5),
                    "itl_ms_p50": 1e3 * pct([r["itl_s"] for r in runs], 0.5),
                    "total_ms_p50": 1e3 * pct([x["total_s"] for x in s], 0.5),
                    "stages": max(x["stages"] for x in s),
                    "kv_mib_moved": max(x["copied_tokens"] for x in s) * KV_BYTES_PER_TOKEN / 2**20,
                    "token_identical": all(r["equal"] for r in runs),
                }  # fmt: skip
                row["steps"] = row["gap_ms_p50"] / row["itl_ms_p50"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        serving.stop()
    print()
    head = ("length", "mode", "gap p50", "gap max", "gateway", "worst", "ITL", "steps",
            "total", "stages", "KV MiB", "equal")  # fmt: skip
    print(" ".join(f"{h:>9}" for h in head))
    for r in rows:
        cells = (
            r["length"], r["mode"], f"{r['gap_ms_p50']:.1f}ms", f"{r['gap_ms_max']:.1f}ms",
            f"{r['downtime_ms_p50']:.1f}ms", f"{r['worst_gap_ms_p50']:.1f}ms",
            f"{r['itl_ms_p50']:.1f}ms", f"{r['steps']:.1f}",
            f"{r['total_ms_p50']:.0f}ms", r["stages"], f"{r['kv_mib_moved']:.2f}",
            "yes" if r["token_identical"] else "NO",
        )  # fmt: skip
        print(" ".join(f"{c:>9}" for c in cells))
    live = {r["length"]: r for r in rows if r["mode"] == "live"}
    if len(live) > 1:
        lo, hi = live[min(live)], live[max(live)]
        print(f"\nlive downtime {max(live)} vs {min(live)} tokens: "
              f"{hi['gap_ms_p50'] / lo['gap_ms_p50']:.2f}x")  # fmt: skip
    calibration = calibrate(rows, args.block_size)
    if calibration:
        print("\nsimulator migration cost model, fitted here (EngineProfile fields):")
        print("  " + json.dumps(calibration))
    if args.json:
        meta = {"model": MODEL, "output_tokens": n, "migrate_at": at, "block_size": args.block_size}
        out = {**meta, "rows": rows, "calibration": calibration}
        args.json.write_text(json.dumps(out, indent=1))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for mode in ("live", "recompute"):
            pts = [r for r in rows if r["mode"] == mode]
            ax.plot([r["length"] for r in pts], [r["gap_ms_p50"] for r in pts], "o-", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("client-visible downtime p50 (ms)")
        ax.set_title("Migration downtime: live pre-copy vs abort-and-recompute")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
    return 0 if all(r["token_identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
