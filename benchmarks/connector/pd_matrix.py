"""PD correctness matrix of LlumnixConnector on real vLLM CPU engines, as a pass/fail table.

    PYTHONPATH=. python benchmarks/connector/pd_matrix.py [--slice ci|full] [--json out.json]
        [--heads 1,2,8] [--head-dims 64,128] [--pairs 32:32,64:32] [--modes pull,push]

Every case sends 8 concurrent greedy requests (one batch; prompt lengths from 1 token to 3
blocks + 1 of the larger block size) through a prefill and a decode engine and checks:
the decode's tokens equal a plain engine's; no load, push or hold failed or expired (the
decode runs ``kv_load_failure_policy="recompute"``, so a failed transfer would cost only time
and would otherwise go unseen); afterwards both engines hold no request and every KV block is
free; nothing is pending in either connector. The full matrix is KV heads {1, 2, 8} x head_dim
{64, 128} x block sizes (prefill, decode) {(32,32), (64,32), (32,64), (32,96)} x {pull, push}
(48 cases, ~8 min here); ``--slice ci`` is the fixed part that CI runs
(``tests/e2e/test_pd_matrix.py``). The exit status is 1 when a case fails.

Per model (KV heads, head_dim) the engines start together, one OS process each: ``ref`` (no
connector), one prefill per prefill block size, one decode per decode block size. A case that
fails by a timeout or an engine error restarts that model's engines before the next case.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

from bench_connector import PullMode, PushMode, pd_mode  # noqa: E402
from bench_engine import Engine  # noqa: E402

HEADS = (1, 2, 8)
HEAD_DIMS = (64, 128)
PAIRS = ((32, 32), (64, 32), (32, 64), (32, 96))  # CPU_ATTN takes multiples of 32
MODES = ("pull", "push")
# The CI slice: the shape that hung an engine (MQA, head_dim 64, 64 -> 32) and a block-size
# change that is no power of two, in both modes, plus 8 KV heads of 128 with equal blocks.
CI_SLICE = (
    (1, 64, ((64, 32), (32, 96)), MODES),
    (8, 128, ((32, 64),), MODES),
)
CONCURRENCY = 8
MAX_TOKENS = 8
START_TIMEOUT_S = 240.0
CASE_TIMEOUT_S = 90.0
LOAD_TIMEOUT_S = 20.0
SEND_TIMEOUT_S = 30.0


def model_config(heads: int, head_dim: int) -> dict[str, Any]:
    """A 3-layer Llama with ``heads`` KV heads of ``head_dim`` (8 query heads)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": heads,
        "head_dim": head_dim,
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


def prompt_lengths(block: int) -> list[int]:
    """One length per concurrent request, from 1 token to 3 blocks + 1, on the block edges."""
    return [1, 2, block - 1, block, block + 1, 2 * block + 1, 3 * block, 3 * block + 1]


def connector(role: str, **extra: Any) -> dict[str, Any]:
    return {
        "kv_connector": "LlumnixConnector",
        "kv_connector_module_path": "llumnix_kv.plugins.vllm",
        "kv_role": role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    }


@dataclass
class Case:
    heads: int
    head_dim: int
    prefill_block: int
    decode_block: int
    mode: str
    ok: bool = False
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return (
            f"kv{self.heads} d{self.head_dim} {self.prefill_block}->{self.decode_block} {self.mode}"
        )


class ModelEngines:
    """The engines of one model: ``ref``, ``p<block>`` and ``d<block>``."""

    def __init__(self, folder: Path, prefill_blocks: set[int], decode_blocks: set[int]) -> None:
        self.folder = folder
        self.specs: dict[str, tuple[int, dict | None]] = {"ref": (32, None)}
        for b in sorted(prefill_blocks):
            self.specs[f"p{b}"] = (b, connector("kv_producer", send_timeout_s=SEND_TIMEOUT_S))
        for b in sorted(decode_blocks):
            self.specs[f"d{b}"] = (b, connector("kv_consumer", load_timeout_s=LOAD_TIMEOUT_S))
        self.engines: dict[str, Engine] = {}

    def start(self) -> None:
        self.stop()
        for name, (block, kv) in self.specs.items():
            self.engines[name] = Engine(
                name,
                self.folder,
                block_size=block,
                max_model_len=1024,
                num_blocks=4096 // block + 16,
                kv_transfer_config=kv,
            )
        for engine in self.engines.values():
            engine.ready(START_TIMEOUT_S)

    def __getitem__(self, name: str) -> Engine:
        return self.engines[name]

    def stop(self) -> None:
        for engine in self.engines.values():
            engine.stop()
        self.engines = {}


def leftovers(engine: Engine, what: str) -> list[str]:
    """What a finished case must not leave on an engine: requests, used blocks, pending
    connector work."""
    engine.call("drain", 20.0, timeout=40.0)
    blocks = engine.call("blocks", timeout=10.0)
    counters = engine.call("counters", timeout=10.0)
    out = []
    if blocks["requests"]:
        out.append(f"{what} still has {blocks['requests']} requests")
    if blocks["free_blocks"] != blocks["total_blocks"]:
        used = blocks["total_blocks"] - blocks["free_blocks"]
        out.append(f"{what} still uses {used} blocks")
    for key in ("loads_pending", "holds_pending"):
        if counters.get(key):
            out.append(f"{what} {key}={counters[key]}")
    return out


FAILURE_COUNTERS = ("loads_failed", "pushes_failed", "holds_expired")


def run_case(engines: ModelEngines, case: Case, mode: PullMode | PushMode, seed: int) -> None:
    block = max(case.prefill_block, case.decode_block)
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in prompt_lengths(block)]
    ref, p, d = engines["ref"], engines[f"p{case.prefill_block}"], engines[f"d{case.decode_block}"]
    want = [
        o["token_ids"]
        for o in ref.call("generate", prompts, MAX_TOKENS, None, timeout=CASE_TIMEOUT_S)["outputs"]
    ]
    before = {n: e.call("counters", timeout=10.0) for n, e in (("prefill", p), ("decode", d))}
    began = time.perf_counter()
    mode.setup(p, CASE_TIMEOUT_S)
    got = mode.pipeline(p, d, [prompts], MAX_TOKENS, CASE_TIMEOUT_S)
    case.seconds = time.perf_counter() - began
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        if w != g:
            case.problems.append(f"prompt of {len(prompts[i])} tokens: {g} != {w}")
    case.problems += leftovers(p, "prefill") + leftovers(d, "decode")
    for name, engine in (("prefill", p), ("decode", d)):
        after = engine.call("counters", timeout=10.0)
        for key in FAILURE_COUNTERS:
            delta = after.get(key, 0) - before[name].get(key, 0)
            if delta:
                case.problems.append(f"{name} {key}+{delta}")
    case.ok = not case.problems


def plan(
    args: argparse.Namespace,
) -> list[tuple[int, int, tuple[tuple[int, int], ...], Sequence[str]]]:
    if args.slice == "ci":
        return list(CI_SLICE)
    pairs = tuple(tuple(int(x) for x in p.split(":")) for p in args.pairs.split(","))
    modes = tuple(args.modes.split(","))
    return [
        (h, hd, pairs, modes)  # type: ignore[misc]
        for h in (int(x) for x in args.heads.split(","))
        for hd in (int(x) for x in args.head_dims.split(","))
    ]


def run(args: argparse.Namespace) -> Iterator[Case]:
    modes = {m: pd_mode(m) for m in MODES}
    seed = 0
    with tempfile.TemporaryDirectory(prefix="pd-matrix-") as tmp:
        for heads, head_dim, pairs, mode_names in plan(args):
            folder = Path(tmp) / f"kv{heads}-d{head_dim}"
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(model_config(heads, head_dim)))
            engines = ModelEngines(folder, {p for p, _ in pairs}, {d for _, d in pairs})
            try:
                engines.start()
                for prefill_block, decode_block in pairs:
                    for mode in mode_names:
                        seed += 1
                        case = Case(heads, head_dim, prefill_block, decode_block, mode)
                        try:
                            run_case(engines, case, modes[mode], seed)
                        except (RuntimeError, TimeoutError) as exc:
                            case.ok = False
                            case.problems.append(f"{type(exc).__name__}: {exc}")
                            engines.start()  # a hung or broken engine must not fail the rest
                        yield case
            finally:
                engines.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slice", choices=("ci", "full"), default="full")
    parser.add_argument("--heads", default=",".join(map(str, HEADS)))
    parser.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)))
    parser.add_argument("--pairs", default=",".join(f"{p}:{d}" for p, d in PAIRS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    began = time.monotonic()
    cases = []
    print(f"{'case':<28} {'result':<6} {'seconds':>8}  problems", flush=True)
    for case in run(args):
        cases.append(case)
        result = "pass" if case.ok else "FAIL"
        print(
            f"{case.name:<28} {result:<6} {case.seconds:>8.2f}  {'; '.join(case.problems)}",
            flush=True,
        )
    passed = sum(c.ok for c in cases)
    print(f"cases: {passed} pass, {len(cases) - passed} fail", flush=True)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "slice": args.slice,
                    "concurrency": CONCURRENCY,
                    "max_tokens": MAX_TOKENS,
                    "seconds": time.monotonic() - began,
                    "cases": [asdict(c) | {"name": c.name} for c in cases],
                },
                indent=2,
            )
        )
    return 0 if cases and passed == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main())
