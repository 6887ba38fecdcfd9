"""Llumnix dispatch against round-robin on real vLLM CPU engines, driven by vLLM's own serving
client (``vllm bench serve``).

One ``llumnix serve`` cluster of ``--instances`` engines (the tiny dummy-weight Llama with a
tokenizer trained here, so text prompts work) serves both policies: its own gateway runs the
Llumnix policy, and a second gateway in this process, over the same engines and the same
llumlet reports, runs round-robin. For each request rate of the sweep, ``vllm bench serve``
(random lengths, Gamma arrivals with ``--burstiness``) runs against each gateway in turn; the
table has TTFT and TPOT mean/p99, throughput, and the preemptions each engine counted during
the run (``vllm:num_preemptions_total``). With ``--migration`` a third gateway over the same
engines adds live migration driven by the rescheduler (``llumnix+migration``; its migrations
by outcome are in the JSON).

Run: ``python benchmarks/serving/bench_serving.py --json serving.json --png serving.png``
(``--quick`` for a one-rate smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from llumnix.launch import free_port  # noqa: E402
from llumnix.serve import ServeProcess  # noqa: E402

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
BENCH = (
    "import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser as P; "
    "from vllm.benchmarks.serve import add_cli_args, main; p = P(); add_cli_args(p); "
    "main(p.parse_args(sys.argv[1:]))"
)
PREEMPTIONS = re.compile(r"^vllm:num_preemptions_total\{[^}]*\}\s+(\S+)$", re.M)
AGE = "llumnix_gateway_status_age_seconds"
AGE_BUCKET = re.compile(rf'^{AGE}_bucket\{{le="([^"]+)",state="busy"\}} (\S+)$', re.M)


def write_model(folder: Path) -> Path:
    """The tiny Llama config plus a byte-level BPE tokenizer of its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 8)))
             for _ in range(2000)]  # fmt: skip
    text = [" ".join(rng.choices(words, k=50)) for _ in range(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_LLAMA["vocab_size"],
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 2048,
                "chat_template": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
            }
        )
    )  # fmt: skip
    return folder


@contextlib.contextmanager
def cluster(
    model: Path, instances: int, logs: Path, blocks: int
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """``llumnix serve`` (Llumnix policy); yields its URL and its instances."""
    port = free_port()
    serving = ServeProcess(
        ["--model", str(model), "--instances", str(instances), "--load-format", "dummy",
         "--port", str(port), "--policy", "llumnix", "--logs", str(logs),
         "--max-model-len", "2048",
         *([f"--engine-arg=--num-gpu-blocks-override={blocks}"] if blocks else [])],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        engines = serving.wait_serving(900)
        yield f"http://127.0.0.1:{port}", [{"id": i, **e} for i, e in engines.items()]
    finally:
        serving.stop()


@contextlib.contextmanager
def gateway_over(engines: list[dict[str, Any]], **config: Any) -> Iterator[str]:
    """Another gateway (``GatewayConfig(**config)``) over the same engines, in a thread of
    this process."""
    from llumnix.gateway import Gateway, GatewayConfig, serve_in_thread
    from llumnix.metastore import InstanceRecord, open_meta_store

    store = open_meta_store("memory")
    for e in engines:
        store.register(
            InstanceRecord(
                e["id"], e["url"], llumlet=e["llumlet"], reports=e["reports"], role=e["role"],
                block_size=32, num_blocks=int(e["blocks"]),
            ),
            3600,
        )  # fmt: skip
    gateway = Gateway(store, GatewayConfig(port=free_port(), **config))
    with serve_in_thread(gateway) as url:
        yield url


def migrations(url: str) -> dict[str, float]:
    """The gateway's live migrations so far, by outcome."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.findall(r'^llumnix_gateway_migrations_total\{outcome="(\w+)"\} (\S+)$', text, re.M)
    return {k: float(v) for k, v in found}


def preemptions(engines: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for e in engines:
        with urllib.request.urlopen(e["url"] + "/metrics", timeout=10) as r:
            m = PREEMPTIONS.search(r.read().decode())
        out[e["id"]] = float(m.group(1)) if m else 0.0
    return out


def status_ages(url: str) -> dict[str, float]:
    """The gateway's histogram of report age at dispatch onto a busy engine (one that reports
    after each step): cumulative counts by bucket bound, plus ``sum`` and ``count``."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {le: float(n) for le, n in AGE_BUCKET.findall(text)}
    for key in ("sum", "count"):
        m = re.search(rf'^{AGE}_{key}\{{state="busy"\}} (\S+)$', text, re.M)
        out[key] = float(m.group(1)) if m else 0.0
    return out


def age_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean age (ms) and the smallest bucket bound holding 99% of this run's dispatches."""
    n = after["count"] - before["count"]
    if n <= 0:
        return {"dispatches": 0, "mean_ms": 0.0, "p99_le_ms": 0.0}
    bounds = sorted((float(le), le) for le in after if le not in ("sum", "count"))
    p99 = next((b for b, le in bounds if after[le] - before.get(le, 0.0) >= 0.99 * n), float("inf"))
    return {
        "dispatches": n,
        "mean_ms": (after["sum"] - before["sum"]) / n * 1e3,
        "p99_le_ms": p99 * 1e3,
    }


def bench(
    url: str, model: Path, rate: float, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    cmd = [
        sys.executable, "-c", BENCH, "--backend", "openai", "--base-url", url,
        "--endpoint", "/v1/completions", "--model", str(model), "--tokenizer", str(model),
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--random-range-ratio", "0.9",
        "--num-prompts", str(args.num_prompts), "--request-rate", str(rate),
        "--burstiness", str(args.burstiness), "--seed", "0", "--ignore-eos",
        "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--disable-tqdm",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.run_timeout)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"vllm bench serve failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def run_one(
    policy: str,
    url: str,
    rate: float,
    model: Path,
    engines: list[dict[str, Any]],
    args: argparse.Namespace,
    work: Path,
) -> dict[str, Any]:
    before, ages = preemptions(engines), status_ages(url)
    res = bench(url, model, rate, args, work / f"{policy}-{rate}.json")
    after = preemptions(engines)
    row = {"policy": policy, "rate": rate, **{k: res.get(k) for k in KEYS}}
    row["preemptions"] = {i: after[i] - before[i] for i in after}
    row["status_age"] = age_summary(ages, status_ages(url))
    print(
        f"{policy:<18} rate {rate:>5.1f}: completed {row['completed']}, "
        f"TTFT mean {row['mean_ttft_ms']:.1f} p99 {row['p99_ttft_ms']:.1f} ms, "
        f"TPOT mean {row['mean_tpot_ms']:.1f} p99 {row['p99_tpot_ms']:.1f} ms, "
        f"{row['request_throughput']:.2f} req/s, preemptions {row['preemptions']}, "
        f"report age at dispatch to a busy engine mean {row['status_age']['mean_ms']:.1f} ms, "
        f"p99 <= {row['status_age']['p99_le_ms']:.0f} ms",
        flush=True,
    )
    return row


KEYS = ("completed", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms",
        "request_throughput", "output_throughput")  # fmt: skip


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for policy in sorted({r["policy"] for r in rows}):
        rs = [r for r in rows if r["policy"] == policy]
        for ax, key in zip(axes, ("p99_ttft_ms", "mean_tpot_ms"), strict=True):
            ax.plot([r["rate"] for r in rs], [r[key] for r in rs], marker="o", label=policy)
            ax.set(xlabel="request rate (req/s)", ylabel=key.replace("_", " "))
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--rates", default="2,4,8,16")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--burstiness", type=float, default=0.5, help="Gamma shape; 1 = Poisson")
    ap.add_argument(
        "--kv-blocks",
        type=int,
        default=160,
        help="KV blocks (of 32 tokens) per engine, small so that load shows (0: vLLM's own)",
    )
    ap.add_argument("--run-timeout", type=float, default=900.0)
    ap.add_argument(
        "--migration",
        action="store_true",
        help="also a gateway with live migration driven by the rescheduler (llumnix+migration)",
    )
    ap.add_argument("--quick", action="store_true", help="2 engines, one rate, 20 prompts")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.instances, args.rates, args.num_prompts = 2, "4", 20
        args.input_len, args.output_len = 64, 16
    work = Path(tempfile.mkdtemp(prefix="llumnix-bench-serving-"))
    model = write_model(work / "model")
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        llumnix_url, engines = stack.enter_context(
            cluster(model, args.instances, work / "logs", args.kv_blocks)
        )
        gateways = [
            ("round_robin", stack.enter_context(gateway_over(engines, policy="round_robin"))),
            ("llumnix", llumnix_url),
        ]
        if args.migration:
            from llumnix.gateway.rescheduling import ReschedulingConfig

            moving = gateway_over(
                engines, policy="llumnix", migration=True, rescheduling=ReschedulingConfig()
            )
            url = stack.enter_context(moving)
            gateways.append(("llumnix+migration", url))
        for rate in (float(r) for r in args.rates.split(",")):
            for policy, url in gateways:
                rows.append(run_one(policy, url, rate, model, engines, args, work))
                if policy == "llumnix+migration":
                    rows[-1]["migrations"] = migrations(url)
    head = f"{'policy':<18}{'rate':>6}{'done':>6}{'TTFT mean':>11}{'TTFT p99':>10}"
    print(head + f"{'TPOT mean':>11}{'TPOT p99':>10}{'req/s':>8}{'preempt':>9}")
    for r in rows:
        print(
            f"{r['policy']:<18}{r['rate']:>6.1f}{r['completed']:>6}{r['mean_ttft_ms']:>11.1f}"
            f"{r['p99_ttft_ms']:>10.1f}{r['mean_tpot_ms']:>11.1f}{r['p99_tpot_ms']:>10.1f}"
            f"{r['request_throughput']:>8.2f}{sum(r['preemptions'].values()):>9.0f}"
        )
    config = {k: v for k, v in vars(args).items() if k not in ("json", "png")}
    if args.json:
        args.json.write_text(json.dumps({"config": config, "rows": rows}, indent=1))
    if args.png:
        plot(rows, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
