"""LlumnixConnector on real vLLM CPU engines: 1P1D vs one instance, store hits vs misses, and
transfer time vs KV bytes. Prints tables; ``--json`` writes every number.

    PYTHONPATH=. python benchmarks/connector/bench_connector.py [--quick] [--json out.json]
        [--model-config config.json] [--pd-mode pull|push] [--lengths 128,512,1024]

Engines (one OS process each, in-process engine core, one OMP thread; all started together,
all stopped at the end): ``single`` (no connector), ``prefill`` + ``decode`` (LlumnixConnector,
PD), and one engine per store tier (``cpu``, ``disk``, ``redis``; Redis is a redis-server
started here on a free loopback port). The model is a Llama config with dummy weights (no
download); prompts are random token ids, a fresh prompt for every measurement, so no prefix
cache hits unless measured on purpose. See README.md next to this file for the columns.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

from bench_engine import Engine  # noqa: E402

from tests.redis_server import REDIS_SERVER, RedisProcess  # noqa: E402

# Bigger than the tests' tiny Llama so that KV bytes are not trivial: 8 layers x 4 KV heads x
# 64 x (K+V) x bf16 = 8 KiB of KV per token, 256 KiB per 32-token block.
BENCH_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 512,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class Settings:
    lengths: tuple[int, ...] = (128, 512, 1024)  # PD prompt lengths
    reps: int = 10  # sequential TTFT requests per length and config
    batch: int = 16  # throughput: requests per length
    max_tokens: int = 32  # throughput: output tokens per request
    waves: int = 4  # 1P1D throughput: the batch is prefilled and decoded in this many waves
    store_lengths: tuple[int, ...] = (128, 512, 1024)
    store_reps: int = 5
    block_size: int = 32
    num_blocks: int = 0  # 0: enough for the largest batch
    start_timeout_s: float = 600.0
    call_timeout_s: float = 300.0


QUICK = Settings(
    lengths=(64, 256),
    reps=3,
    batch=4,
    max_tokens=8,
    waves=2,
    store_lengths=(64, 256),
    store_reps=2,
)


# ---------------------------------------------------------------- PD modes


class PullMode:
    """vLLM's NIXL-style pull: the prefill runs ``max_tokens=1`` with ``do_remote_decode``;
    its returned ``kv_transfer_params`` go to the decode request, which reads the KV."""

    name = "pull"

    def prefill_params(self) -> dict[str, Any]:
        return {"do_remote_decode": True}

    def decode_params(self, returned: dict[str, Any] | None) -> dict[str, Any]:
        if not returned or not returned.get("do_remote_prefill"):
            raise RuntimeError(f"the prefill returned no hand-off: {returned!r}")
        params = dict(returned)
        # vLLM would report the prefill's own prefix hits as the decode's cached tokens.
        params.pop("remote_prefill_cached_tokens", None)
        return params

    def setup(self, prefill: Engine, timeout: float) -> None:
        return

    def first_token(
        self, prefill: Engine, decode: Engine, prompt: list[int], timeout: float
    ) -> tuple[float, float, float, list[int]]:
        """One request through prefill and decode (``max_tokens=1`` on the decode): wall
        seconds, prefill and decode engine seconds, the decode's tokens."""
        t0 = time.perf_counter()
        p_out = prefill.call("generate", [prompt], 1, [self.prefill_params()], timeout=timeout)
        params = self.decode_params(p_out["outputs"][0]["kv_transfer_params"])
        d_out = decode.call("generate", [prompt], 1, [params], timeout=timeout)
        wall = time.perf_counter() - t0
        return wall, p_out["seconds"], d_out["seconds"], d_out["outputs"][0]["token_ids"]

    def pipeline(
        self,
        prefill: Engine,
        decode: Engine,
        chunks: list[list[list[int]]],
        max_tokens: int,
        timeout: float,
    ) -> list[list[int]]:
        """The waves through prefill and decode, prefill of wave k+1 overlapping decode of
        wave k; the decode's tokens."""
        out: list[list[int]] = []
        prefill.submit("generate", chunks[0], 1, [self.prefill_params()] * len(chunks[0]))
        for k, chunk in enumerate(chunks):
            p_out = prefill.result(timeout)
            params = [self.decode_params(o["kv_transfer_params"]) for o in p_out["outputs"]]
            decode.submit("generate", chunk, max_tokens, params)
            if k + 1 < len(chunks):
                nxt = chunks[k + 1]
                prefill.submit("generate", nxt, 1, [self.prefill_params()] * len(nxt))
            out += [o["token_ids"] for o in decode.result(timeout)["outputs"]]
        return out


class PushMode:
    """Push mode, with the ``kv_transfer_params`` keys the connector module defines
    (``PUSH_KEY``, ``PROBE_KEY``, ``ENDPOINT_KEY``): a probe request to the prefill returns its
    endpoints; each request then goes to both engines at once, to the prefill with
    ``do_remote_decode`` and a transfer id, to the decode with ``do_remote_prefill``, the same
    transfer id and the prefill's endpoints; the prefill writes the KV into the decode's
    blocks layer by layer."""

    name = "push"

    def __init__(self, keys: dict[str, str]) -> None:
        self.push_key, self.probe_key, self.endpoint_key = (
            keys["PUSH_KEY"],
            keys["PROBE_KEY"],
            keys["ENDPOINT_KEY"],
        )
        self.endpoints: list[Any] | None = None

    def setup(self, prefill: Engine, timeout: float) -> None:
        out = prefill.call("generate", [[5, 6, 7, 8]], 1, [{self.probe_key: True}], timeout=timeout)
        params = out["outputs"][0]["kv_transfer_params"] or {}
        self.endpoints = params.get(self.endpoint_key)
        if not self.endpoints:
            raise RuntimeError(f"the prefill's probe returned no endpoints: {params!r}")

    def _params(self, n: int) -> tuple[list[dict], list[dict]]:
        p_params, d_params = [], []
        for _ in range(n):
            tid = uuid.uuid4().hex
            p_params.append({"do_remote_decode": True, self.push_key: {"transfer_id": tid}})
            d_params.append(
                {
                    "do_remote_prefill": True,
                    self.push_key: {"transfer_id": tid, "prefill": self.endpoints},
                }
            )
        return p_params, d_params

    def first_token(
        self, prefill: Engine, decode: Engine, prompt: list[int], timeout: float
    ) -> tuple[float, float, float, list[int]]:
        p_params, d_params = self._params(1)
        t0 = time.perf_counter()
        decode.submit("generate", [prompt], 1, d_params)
        prefill.submit("generate", [prompt], 1, p_params)
        p_out = prefill.result(timeout)
        # LLM.generate returns when the request finished; the prefill engine must go on
        # stepping for its worker to finish the writes (a server's engine loop does).
        prefill.submit("drain", timeout)
        d_out = decode.result(timeout)
        wall = time.perf_counter() - t0
        prefill.result(timeout + 10)
        return wall, p_out["seconds"], d_out["seconds"], d_out["outputs"][0]["token_ids"]

    def pipeline(
        self,
        prefill: Engine,
        decode: Engine,
        chunks: list[list[list[int]]],
        max_tokens: int,
        timeout: float,
    ) -> list[list[int]]:
        """Each wave to both engines at once (the decode is busy until its wave is done, so
        waves do not overlap)."""
        out: list[list[int]] = []
        for chunk in chunks:
            p_params, d_params = self._params(len(chunk))
            decode.submit("generate", chunk, max_tokens, d_params)
            prefill.submit("generate", chunk, 1, p_params)
            prefill.result(timeout)
            prefill.submit("drain", timeout)
            out += [o["token_ids"] for o in decode.result(timeout)["outputs"]]
            prefill.result(timeout + 10)
        return out


def pd_mode(name: str) -> PullMode | PushMode:
    if name == "pull":
        return PullMode()
    keys = push_keys()
    if keys is None:
        raise SystemExit(
            f"--pd-mode {name} is not available: LlumnixConnector "
            "(llumnix_kv/plugins/vllm/connector.py) does not define push-mode "
            "kv_transfer_params (PUSH_KEY, PROBE_KEY, ENDPOINT_KEY); only --pd-mode pull runs"
        )
    return PushMode(keys)


def push_keys() -> dict[str, str] | None:
    """The connector's push-mode kv_transfer_params keys, or None without push mode."""
    try:
        module = importlib.import_module("llumnix_kv.plugins.vllm.connector")
    except ImportError:
        return None
    names = ("PUSH_KEY", "PROBE_KEY", "ENDPOINT_KEY")
    keys = {n: getattr(module, n, None) for n in names}
    if not all(isinstance(v, str) for v in keys.values()):
        return None
    return {n: str(v) for n, v in keys.items()}


# ---------------------------------------------------------------- helpers


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of a non-empty sequence."""
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary_ms(xs: Sequence[float]) -> dict[str, float]:
    return {
        "mean_ms": 1e3 * statistics.fmean(xs),
        "p50_ms": 1e3 * percentile(xs, 50),
        "p99_ms": 1e3 * percentile(xs, 99),
        "n": len(xs),
    }


def kv_bytes_per_token(cfg: dict[str, Any]) -> int:
    heads = int(cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
    head_dim = int(cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]))
    dtype = DTYPE_BYTES.get(str(cfg.get("torch_dtype", "bfloat16")), 2)
    return int(cfg["num_hidden_layers"]) * heads * head_dim * 2 * dtype


class Prompts:
    """Fresh random token-id prompts (ids 3 .. vocab-1: no BOS/EOS), reproducible."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.vocab = vocab

    def make(self, length: int) -> list[int]:
        return [self.rng.randrange(3, self.vocab) for _ in range(length)]


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"
        return str(x)

    body = [[cell(x) for x in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def timed(engine: Engine, timeout: float, *args: Any) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    out = engine.call("generate", *args, timeout=timeout)
    return time.perf_counter() - t0, out


def connector(role: str, **extra: Any) -> dict[str, Any]:
    return {
        "kv_connector": "LlumnixConnector",
        "kv_connector_module_path": "llumnix_kv.plugins.vllm",
        "kv_role": role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    }


def store_connector(tier: dict[str, Any]) -> dict[str, Any]:
    return connector("kv_both", store={"tiers": [tier], "namespace": "bench"})


def evict_page_cache(folder: Path) -> int:
    """Asks the kernel to drop the page cache of the chunk files (best effort, no root)."""
    n = 0
    for path in folder.glob("*.chunk"):
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n


# ---------------------------------------------------------------- 1P1D vs single


def bench_pd(
    engines: dict[str, Engine], mode: PullMode | PushMode, s: Settings, gen: Prompts
) -> dict[str, Any]:
    single, prefill, decode = engines["single"], engines["prefill"], engines["decode"]
    t = s.call_timeout_s
    ttft_rows, tput_rows, loads = [], [], []
    for length in s.lengths:
        ttft: dict[str, list[float]] = {"single": [], "1p1d": []}
        parts: dict[str, list[float]] = {"prefill": [], "handoff": [], "decode_first": []}
        mismatches = 0
        for _ in range(s.reps):
            prompt = gen.make(length)
            wall, ref = timed(single, t, [prompt], 1, None)
            ttft["single"].append(wall)
            wall, p_secs, d_secs, tokens = mode.first_token(prefill, decode, prompt, t)
            ttft["1p1d"].append(wall)
            parts["prefill"].append(p_secs)
            parts["decode_first"].append(d_secs)
            if mode.name == "pull":  # in push mode prefill and decode overlap
                parts["handoff"].append(wall - p_secs - d_secs)
            if tokens != ref["outputs"][0]["token_ids"]:
                mismatches += 1
        for load in decode.call("take_loads", timeout=t):
            if load["ok"] and load["kind"] in ("pd", "load"):
                loads.append({"length": length, "label": f"pd-{mode.name}", **load})
        for load in prefill.call("take_loads", timeout=t):
            if load["ok"] and load["kind"] == "push":  # the prefill's side of a push
                loads.append({"length": length, "label": "pd-push-send", **load})
        for config, xs in ttft.items():
            row: dict[str, Any] = {"config": config, "prompt_len": length, **summary_ms(xs)}
            if config == "1p1d":
                row["parts_mean_ms"] = {k: 1e3 * statistics.fmean(v) for k, v in parts.items() if v}
                row["first_token_mismatches"] = mismatches
            ttft_rows.append(row)

        # Throughput: one batch on the single instance; the same batch through prefill and
        # decode in waves, prefill of wave k+1 overlapping decode of wave k.
        batch = [gen.make(length) for _ in range(s.batch)]
        wall, ref = timed(single, t, batch, s.max_tokens, None)
        want = [o["token_ids"] for o in ref["outputs"]]
        n_out = sum(len(x) for x in want)
        tput_rows.append(
            {
                "config": "single",
                "prompt_len": length,
                "requests": len(batch),
                "output_tokens": n_out,
                "seconds": wall,
                "output_tok_s": n_out / wall,
            }
        )
        n = max(1, min(s.waves, len(batch)))
        size = -(-len(batch) // n)
        chunks = [batch[i : i + size] for i in range(0, len(batch), size)]
        t0 = time.perf_counter()
        got = mode.pipeline(prefill, decode, chunks, s.max_tokens, t)
        wall = time.perf_counter() - t0
        n_out = sum(len(x) for x in got)
        tput_rows.append(
            {
                "config": "1p1d",
                "prompt_len": length,
                "requests": len(batch),
                "output_tokens": n_out,
                "seconds": wall,
                "output_tok_s": n_out / wall,
                "waves": s.waves,
                "requests_matching_single": sum(a == b for a, b in zip(got, want, strict=True)),
            }
        )
        # Batched loads overlap: not in the transfer table.
        decode.call("take_loads", timeout=t)
        prefill.call("take_loads", timeout=t)
        prefill.call("drain", 30.0, timeout=t + 30)  # frees the blocks of read hand-offs
    return {"ttft": ttft_rows, "throughput": tput_rows, "loads": loads}


# ---------------------------------------------------------------- store hit vs miss


def bench_store(
    engines: dict[str, Engine],
    tiers: list[str],
    disk_dir: Path | None,
    s: Settings,
    gen: Prompts,
) -> dict[str, Any]:
    single = engines["single"]
    t = s.call_timeout_s
    rows, loads = [], []
    for length in s.store_lengths:
        blocks = length // s.block_size
        miss: list[float] = []
        per: dict[str, dict[str, list[float]]] = {}
        served: dict[str, int] = {}
        for _ in range(s.store_reps):
            prompt = gen.make(length)
            wall, _ = timed(single, t, [prompt], 1, None)
            miss.append(wall)
            for tier in tiers:
                eng = engines[tier]
                wall, _ = timed(eng, t, [prompt], 1, None)  # computed, saved to the tier
                variants = ["disk", "disk-cold"] if tier == "disk" else [tier]
                for v in variants:
                    rec = per.setdefault(v, {"miss_save": [], "hit": []})
                    rec["miss_save"].append(wall)
                if not eng.call("flush_store", t, timeout=t + 10):
                    raise RuntimeError(f"{tier}: saves still pending after {t} s")
                eng.call("take_loads", timeout=t)
                for v in variants:
                    if v == "disk-cold" and disk_dir is not None:
                        evict_page_cache(disk_dir)
                    eng.call("reset_prefix_cache", timeout=t)
                    before = eng.call("counters", timeout=t)
                    wall, _ = timed(eng, t, [prompt], 1, None)
                    after = eng.call("counters", timeout=t)
                    per[v]["hit"].append(wall)
                    key = f"store_hits_{tier}"
                    got = int(after.get(key, 0)) - int(before.get(key, 0))
                    served[v] = served.get(v, 0) + int(got == blocks)
                    for load in eng.call("take_loads", timeout=t):
                        if load["ok"] and load["kind"] in ("store", "store_load"):
                            loads.append({"length": length, "label": f"store-{v}", **load})
        base = summary_ms(miss)
        rows.append({"tier": "none (miss)", "prompt_len": length, "ttft": base})
        for v, rec in per.items():
            hit = summary_ms(rec["hit"])
            rows.append(
                {
                    "tier": v,
                    "prompt_len": length,
                    "blocks": blocks,
                    "miss_save": summary_ms(rec["miss_save"]),
                    "ttft": hit,
                    "speedup_vs_miss": base["mean_ms"] / hit["mean_ms"],
                    "hits_served_from_tier": served.get(v, 0),
                    "reps": s.store_reps,
                }
            )
    return {"rows": rows, "loads": loads}


# ---------------------------------------------------------------- transfer table


def transfer_rows(loads: list[dict], bpt: int) -> list[dict]:
    """Per kind, prompt length and timing source: KV bytes and transfer time of the
    requests measured one at a time."""
    groups: dict[tuple[str, int, str], list[dict]] = {}
    for load in loads:
        groups.setdefault((load["label"], load["length"], load["source"]), []).append(load)
    rows = []
    for (label, length, source), items in sorted(groups.items()):
        nbytes = statistics.fmean(x["bytes"] if "bytes" in x else x["tokens"] * bpt for x in items)
        secs = [x["seconds"] for x in items]
        mean = statistics.fmean(secs)
        rows.append(
            {
                "kind": label,
                "prompt_len": length,
                "source": source,
                "kv_bytes": int(nbytes),
                "transfer": summary_ms(secs),
                "gb_s": nbytes / mean / 1e9 if mean > 0 else 0.0,
            }
        )
    return rows


# ---------------------------------------------------------------- main


def print_tables(result: dict[str, Any]) -> None:
    pd = result.get("pd")
    if pd:
        rows = []
        for r in pd["ttft"]:
            parts = r.get("parts_mean_ms", {})
            rows.append(
                [
                    r["config"],
                    r["prompt_len"],
                    r["mean_ms"],
                    r["p50_ms"],
                    r["p99_ms"],
                    parts.get("prefill", "-"),
                    parts.get("handoff", "-"),
                    parts.get("decode_first", "-"),
                    r["n"],
                ]
            )
        print(
            table(
                f"\nTTFT, one request at a time ({result['meta']['pd_mode']} mode)",
                [
                    "config",
                    "prompt",
                    "mean ms",
                    "p50 ms",
                    "p99 ms",
                    "prefill ms",
                    "handoff ms",
                    "decode 1st ms",
                    "n",
                ],
                rows,
            )
        )
        rows = [
            [
                r["config"],
                r["prompt_len"],
                r["requests"],
                r["output_tokens"],
                r["seconds"],
                r["output_tok_s"],
                r.get("requests_matching_single", "-"),
            ]
            for r in pd["throughput"]
        ]
        print(
            table(
                "\nThroughput (one batch per prompt length)",
                ["config", "prompt", "requests", "out tokens", "seconds", "out tok/s", "match"],
                rows,
            )
        )
    store = result.get("store")
    if store:
        rows = []
        for r in store["rows"]:
            ms = r.get("miss_save")
            rows.append(
                [
                    r["tier"],
                    r["prompt_len"],
                    r["ttft"]["mean_ms"],
                    r["ttft"]["p50_ms"],
                    r["ttft"]["p99_ms"],
                    ms["mean_ms"] if ms else "-",
                    r.get("speedup_vs_miss", "-"),
                    f"{r['hits_served_from_tier']}/{r['reps']}" if "reps" in r else "-",
                ]
            )
        print(
            table(
                "\nStore: TTFT of a prompt computed (none) vs served from a tier",
                ["tier", "prompt", "mean ms", "p50 ms", "p99 ms", "miss+save ms", "speedup", "hit"],
                rows,
            )
        )
        for note in store.get("notes", []):
            print(f"  note: {note}")
    rows = [
        [
            r["kind"],
            r["prompt_len"],
            r["source"],
            r["kv_bytes"] / 2**20,
            r["transfer"]["mean_ms"],
            r["transfer"]["p50_ms"],
            r["gb_s"],
            r["transfer"]["n"],
        ]
        for r in result.get("transfer", {}).get("rows", [])
    ]
    if rows:
        print(
            table(
                "\nTransfer time vs KV bytes (per request)",
                ["kind", "prompt", "source", "KV MiB", "mean ms", "p50 ms", "GB/s", "n"],
                rows,
            )
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer lengths and reps")
    p.add_argument("--json", type=Path, help="write every number to this file")
    p.add_argument("--model-config", type=Path, help="a Llama config.json (default: built in)")
    p.add_argument("--pd-mode", choices=("pull", "push"), default="pull")
    p.add_argument("--sections", default="pd,store", help="comma list of pd, store")
    p.add_argument("--lengths", help="PD prompt lengths, e.g. 128,512,1024")
    p.add_argument("--store-lengths", help="store prompt lengths")
    p.add_argument("--reps", type=int, help="TTFT requests per length and config")
    p.add_argument("--store-reps", type=int)
    p.add_argument("--batch", type=int, help="throughput requests per length")
    p.add_argument("--max-tokens", type=int, help="throughput output tokens per request")
    p.add_argument("--waves", type=int, help="1P1D throughput pipeline waves")
    p.add_argument("--block-size", type=int, help="engine block size (a multiple of 32)")
    p.add_argument("--num-blocks", type=int, help="KV blocks per engine (default: enough)")
    p.add_argument("--no-redis", action="store_true", help="skip the Redis tier")
    p.add_argument(
        "--idle-sleep-ms",
        type=float,
        default=0.0,
        help="engines sleep this long after a step with no output (requests waiting for KV) "
        "instead of stepping again at once as LLM.generate and vLLM's engine loop do "
        "(default 0: like vLLM)",
    )
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings(**asdict(QUICK)) if args.quick else Settings()

    def ints(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split(",") if x.strip())

    if args.lengths:
        s.lengths = ints(args.lengths)
    if args.store_lengths:
        s.store_lengths = ints(args.store_lengths)
    for name in ("reps", "store_reps", "batch", "max_tokens", "waves", "block_size", "num_blocks"):
        value = getattr(args, name)
        if value is not None:
            setattr(s, name, value)
    return s


@contextlib.contextmanager
def started(procs: list[Any]) -> Iterator[list[Any]]:
    try:
        yield procs
    finally:
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.stop()


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(f"stopped by signal {signum}")  # runs the cleanup of every engine


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    args = parse_args(argv)
    s = settings_from(args)
    mode = pd_mode(args.pd_mode)
    sections = {x.strip() for x in args.sections.split(",") if x.strip()}
    unknown = sections - {"pd", "store"}
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; known: pd, store")
    cfg = json.loads(args.model_config.read_text()) if args.model_config else dict(BENCH_LLAMA)
    bpt = kv_bytes_per_token(cfg)
    longest = max((*s.lengths, *s.store_lengths))
    max_model_len = -(-(longest + s.max_tokens + 1) // 256) * 256
    if max_model_len > int(cfg.get("max_position_embeddings", max_model_len)):
        raise SystemExit(f"prompts of {longest} tokens exceed the model's positions")
    if not s.num_blocks:
        per_batch = s.batch * -(-(longest + s.max_tokens) // s.block_size)
        s.num_blocks = max(256, 2 * per_batch + 16)

    notes: list[str] = []
    tiers = []
    if "store" in sections:
        tiers = ["cpu", "disk", "redis"]
        if args.no_redis:
            tiers.remove("redis")
            notes.append("Redis row skipped: --no-redis")
        elif REDIS_SERVER is None:
            tiers.remove("redis")
            notes.append("Redis row skipped: redis-server is not installed")
        elif importlib.util.find_spec("redis") is None:
            tiers.remove("redis")
            notes.append("Redis row skipped: the redis Python client is not installed")

    result: dict[str, Any] = {
        "meta": {
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model_config": cfg,
            "kv_bytes_per_token": bpt,
            "pd_mode": mode.name,
            "settings": asdict(s),
            "max_model_len": max_model_len,
            "quick": bool(args.quick),
            "idle_sleep_ms": args.idle_sleep_ms,
            "loadavg_start": os.getloadavg(),
        }
    }
    t_start = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="llumnix-connector-bench-") as tmp,
        started([]) as procs,
    ):
        model = Path(tmp) / "model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(cfg))
        disk_dir = Path(tmp) / "disk"
        redis = None
        if "redis" in tiers:
            redis = RedisProcess()
            procs.append(redis)
        specs: dict[str, dict | None] = {"single": None}
        if "pd" in sections:
            specs["prefill"] = connector("kv_producer", send_timeout_s=120)
            specs["decode"] = connector("kv_consumer", load_timeout_s=60)
        tier_cfgs = {
            "cpu": {"name": "cpu", "capacity_bytes": 1 << 30},
            "disk": {"name": "disk", "path": str(disk_dir), "capacity_bytes": 4 << 30},
            "redis": {"name": "redis", "url": redis.url if redis else ""},
        }
        for tier in tiers:
            specs[tier] = store_connector(tier_cfgs[tier])
        engines: dict[str, Engine] = {}
        for name, kv in specs.items():
            engines[name] = Engine(
                name,
                model,
                block_size=s.block_size,
                max_model_len=max_model_len,
                num_blocks=s.num_blocks,
                kv_transfer_config=kv,
                idle_sleep_s=args.idle_sleep_ms / 1e3,
            )
            procs.append(engines[name])
        deadline = time.monotonic() + s.start_timeout_s
        for eng in engines.values():
            eng.ready(max(deadline - time.monotonic(), 1.0))
        result["meta"]["startup_s"] = time.perf_counter() - t_start
        print(f"{len(engines)} engines ready in {result['meta']['startup_s']:.1f} s", flush=True)

        gen = Prompts(int(cfg["vocab_size"]), seed=1234)
        warm = gen.make(2 * s.block_size + 3)
        for name, eng in engines.items():
            if name not in ("prefill", "decode"):
                eng.call("generate", [warm], 2, None, timeout=s.call_timeout_s)
        if "pd" in sections:
            mode.setup(engines["prefill"], s.call_timeout_s)
            mode.first_token(engines["prefill"], engines["decode"], warm, s.call_timeout_s)
            engines["decode"].call("take_loads", timeout=s.call_timeout_s)
            engines["prefill"].call("take_loads", timeout=s.call_timeout_s)
            result["pd"] = bench_pd(engines, mode, s, gen)
            print("pd done", flush=True)
        if tiers:
            for tier in tiers:
                engines[tier].call("take_loads", timeout=s.call_timeout_s)
            result["store"] = bench_store(engines, tiers, disk_dir, s, gen)
        if "store" in sections:
            notes.append(
                "disk: chunk files just written (page cache); disk-cold: after "
                "posix_fadvise(DONTNEED) on every chunk file"
            )
            result.setdefault("store", {"rows": [], "loads": []})["notes"] = notes
    result["transfer"] = {
        "sources": {
            "connector": "the connector's own per-transfer stats (get_kv_connector_stats)",
            "instrumented": "engine-process timing of the connector's PD puller (start -> the "
            "poll that reports the load done; engine-step resolution) and of its store "
            "offloader's load()",
        },
        "rows": transfer_rows(
            result.get("pd", {}).get("loads", []) + result.get("store", {}).get("loads", []),
            bpt,
        ),
    }
    result["meta"]["total_s"] = time.perf_counter() - t_start
    result["meta"]["loadavg_end"] = os.getloadavg()
    print_tables(result)
    load = ", ".join(f"{x:.1f}" for x in result["meta"]["loadavg_end"])
    print(f"\ntotal {result['meta']['total_s']:.1f} s; load average at the end {load}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
