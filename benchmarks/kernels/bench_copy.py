"""KV copy kernel benchmark: GB/s of plan execution against a same-run baseline.

CPU rows compare the CPU executor with one ``memcpy`` of the same number of bytes between two
flat buffers (the single-thread ceiling of moving those bytes); CUDA rows (when a device is
usable) compare the CUDA executor with one device-to-device ``cudaMemcpyAsync``.

The workload is Llama-3-8B-shaped (32 layers, 8 KV heads of 128, bf16: 2 KiB per token per
layer per K or V). Block tables are drawn at random from a pool twice the request's size, as an
allocator hands them out after churn, so runs merge only where a real cache would let them;
``contiguous`` rows use consecutive blocks to show merging.

    python benchmarks/kernels/bench_copy.py [--tokens 2048] [--reps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

import llumnix_kv as kv
from llumnix_kv import _C
from llumnix_kv import layout as kvl

LAYERS, HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16
MLA_LATENT = 576


@dataclass
class Case:
    name: str
    src: str  # cache format, see make_cache
    dst: str
    src_block: int
    dst_block: int
    src_heads: tuple[int, int] = (0, HEADS)
    dst_heads: tuple[int, int] = (0, HEADS)
    contiguous: bool = False
    staged: bool = False


@dataclass
class Row:
    device: str
    case: str
    block_tokens: str
    heads: str
    mode: str
    segments: int
    avg_segment_kib: float
    mib: float
    threads: int
    ms: float
    gbps: float
    baseline_gbps: float
    ratio: float


def make_cache(fmt: str, blocks: int, block: int, heads: int, device: str = "cpu") -> kv.KvLayout:
    """A zero-filled (so every page is touched) cache of one engine format."""

    def t(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=DTYPE, device=device)

    if fmt == "flash_nhd":
        return kvl.vllm_flash_attn([t(2, blocks, block, heads, HEAD_DIM) for _ in range(LAYERS)])
    if fmt == "flash_hnd":
        caches = [t(2, blocks, heads, block, HEAD_DIM) for _ in range(LAYERS)]
        return kvl.vllm_flash_attn(caches, layout="HND")
    if fmt == "flashinfer_nhd":
        return kvl.vllm_flashinfer([t(blocks, 2, block, heads, HEAD_DIM) for _ in range(LAYERS)])
    if fmt == "vllm_cpu":
        return kvl.vllm_cpu([t(blocks, heads, block, 2 * HEAD_DIM) for _ in range(LAYERS)])
    if fmt == "sglang_mha":
        slots = (blocks + 1) * block
        k = [t(slots, heads, HEAD_DIM) for _ in range(LAYERS)]
        v = [t(slots, heads, HEAD_DIM) for _ in range(LAYERS)]
        return kvl.sglang_mha(k, v, page_size=block)
    if fmt == "mla":
        return kvl.vllm_mla([t(blocks, block, MLA_LATENT) for _ in range(LAYERS)])
    raise ValueError(fmt)


CASES = [
    *(
        Case(f"flash NHD, {b}-token blocks", "flash_nhd", "flash_nhd", b, b)
        for b in (16, 32, 64, 128)
    ),
    Case("flash NHD, contiguous blocks", "flash_nhd", "flash_nhd", 16, 16, contiguous=True),
    Case("flashinfer NHD (K|V per block)", "flashinfer_nhd", "flashinfer_nhd", 32, 32),
    Case("vLLM CPU cache", "vllm_cpu", "vllm_cpu", 128, 128),
    Case("SGLang MHA pages", "sglang_mha", "sglang_mha", 64, 64),
    Case("MLA 576 latent", "mla", "mla", 64, 64, (0, 1), (0, 1)),
    Case("block size 16 -> 64", "flash_nhd", "flash_nhd", 16, 64),
    Case("NHD -> HND", "flash_nhd", "flash_hnd", 16, 16),
    Case("NHD -> HND, staged", "flash_nhd", "flash_hnd", 16, 16, staged=True),
    Case("TP1 -> TP2 rank 1 (NHD)", "flash_nhd", "flash_nhd", 16, 16, (0, 8), (4, 8)),
    Case(
        "TP1 -> TP2 rank 1 (NHD), staged",
        "flash_nhd",
        "flash_nhd",
        16,
        16,
        (0, 8),
        (4, 8),
        staged=True,
    ),
    Case("TP1 -> TP2 rank 1 (HND)", "flash_hnd", "flash_hnd", 16, 16, (0, 8), (4, 8)),
]


def block_tables(case: Case, tokens: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    tables = []
    for block in (case.src_block, case.dst_block):
        n = -(-tokens // block)
        if case.contiguous:
            tables.append(np.arange(n, dtype=np.int64))
        else:
            tables.append(rng.choice(2 * n, size=n, replace=False).astype(np.int64))
    return tuple(tables)


def timed(fn: Callable[[], None], reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_cpu(case: Case, tokens: int, reps: int, rng: np.random.Generator) -> Row:
    src_tab, dst_tab = block_tables(case, tokens, rng)
    sh, dh = case.src_heads, case.dst_heads
    src = make_cache(case.src, 2 * len(src_tab), case.src_block, sh[1] - sh[0])
    dst = make_cache(case.dst, 2 * len(dst_tab), case.dst_block, dh[1] - dh[0])
    plan = kv.plan_copy(src, dst, src_tab, dst_tab, (0, tokens), src_heads=sh, dst_heads=dh)
    staging = np.zeros(plan.total_bytes, dtype=np.uint8) if case.staged else None
    seconds = timed(lambda: kv.execute(plan, src, dst, staged=case.staged, staging=staging), reps)
    # Both buffers written first: np.zeros alone maps the shared zero page, and a copy from it
    # reads one cached page instead of memory.
    a = np.full(plan.total_bytes, 1, dtype=np.uint8)
    b = np.full(plan.total_bytes, 2, dtype=np.uint8)
    base = timed(lambda: ctypes.memmove(b.ctypes.data, a.ctypes.data, a.nbytes), reps)
    return make_row("cpu", case, plan, seconds, base, _C.cpu_threads())


def make_row(
    device: str, case: Case, plan: kv.CopyPlan, seconds: float, base: float, threads: int
) -> Row:
    gbps = plan.total_bytes / seconds / 1e9
    base_gbps = plan.total_bytes / base / 1e9
    blocks = (
        str(case.src_block)
        if case.src_block == case.dst_block
        else f"{case.src_block}->{case.dst_block}"
    )
    heads = "all" if case.src_heads == case.dst_heads else f"{case.src_heads}->{case.dst_heads}"
    return Row(
        device=device,
        case=case.name,
        block_tokens=blocks,
        heads=heads,
        mode="staged" if case.staged else "direct",
        segments=len(plan),
        avg_segment_kib=plan.total_bytes / max(len(plan), 1) / 1024,
        mib=plan.total_bytes / 2**20,
        threads=threads,
        ms=seconds * 1e3,
        gbps=gbps,
        baseline_gbps=base_gbps,
        ratio=gbps / base_gbps,
    )


def run_cuda(case: Case, tokens: int, reps: int, rng: np.random.Generator) -> Row:
    """The same case in device memory (allocated by the module itself, so a CPU build of torch
    is enough): layouts are described on the meta device and rebased onto device buffers."""
    src_tab, dst_tab = block_tables(case, tokens, rng)
    sh, dh = case.src_heads, case.dst_heads
    allocations: list[int] = []

    def on_device(layout: kv.KvLayout) -> kv.KvLayout:
        regions = []
        for r in layout.regions:
            allocations.append(_C.cuda_malloc(r.bytes, 0))
            regions.append(kv.MemoryRegion(allocations[-1], r.bytes, 0))
        return kvl.with_regions(layout, regions)

    try:
        src = on_device(
            make_cache(case.src, 2 * len(src_tab), case.src_block, sh[1] - sh[0], "meta")
        )
        dst = on_device(
            make_cache(case.dst, 2 * len(dst_tab), case.dst_block, dh[1] - dh[0], "meta")
        )
        plan = kv.plan_copy(src, dst, src_tab, dst_tab, (0, tokens), src_heads=sh, dst_heads=dh)
        staging = None
        if case.staged:
            allocations.append(_C.cuda_malloc(plan.total_bytes, 0))
            staging = (allocations[-1], plan.total_bytes)

        def copy() -> None:
            kv.execute(plan, src, dst, staged=case.staged, staging=staging)
            _C.cuda_synchronize(0)

        seconds = timed(copy, reps)
        a, b = allocations[0], allocations[len(src.regions)]
        per_region = min(src.regions[0].bytes, dst.regions[0].bytes)
        flat_a = _C.cuda_malloc(plan.total_bytes, 0)
        flat_b = _C.cuda_malloc(plan.total_bytes, 0)
        allocations += [flat_a, flat_b]
        del a, b, per_region

        def baseline() -> None:
            _C.cuda_memcpy_async(flat_b, flat_a, plan.total_bytes, 0)
            _C.cuda_synchronize(0)

        base = timed(baseline, reps)
        return make_row("cuda", case, plan, seconds, base, 0)
    finally:
        for p in allocations:
            _C.cuda_free(p)


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'dev':4} {'case':34} {'blk':>7} {'heads':>16} {'mode':>6} {'segments':>9} "
        f"{'avg KiB':>8} {'MiB':>7} {'thr':>3} {'ms':>8} {'GB/s':>7} {'base':>7} {'ratio':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.device:4} {r.case:34} {r.block_tokens:>7} {r.heads:>16} {r.mode:>6} "
            f"{r.segments:>9} {r.avg_segment_kib:>8.2f} {r.mib:>7.1f} {r.threads:>3} "
            f"{r.ms:>8.2f} {r.gbps:>7.2f} {r.baseline_gbps:>7.2f} {r.ratio:>6.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per request copy")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    info = kv.build_info()
    print(f"llumnix_kv {info['version']}: {info['cuda']}; CPU threads {info['cpu_threads']}")
    print(f"workload: Llama-3-8B shapes, {args.tokens} tokens, median of {args.reps}\n")
    rng = np.random.default_rng(args.seed)
    devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    if "cuda" in devices and info["cuda_devices"] == 0:
        if args.device == "cuda":
            print("no usable CUDA device", file=sys.stderr)
            return 1
        devices.remove("cuda")
    rows = []
    for device in devices:
        run = run_cpu if device == "cpu" else run_cuda
        for case in CASES:
            rows.append(run(case, args.tokens, args.reps, rng))
    print_table(rows)
    big = [r for r in rows if r.device == "cpu" and r.avg_segment_kib >= 64 and r.mode == "direct"]
    if big:
        worst = min(r.ratio for r in big)
        print(f"\nCPU executor, segments >= 64 KiB: worst ratio to same-run memcpy {worst:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"build": info, "tokens": args.tokens, "rows": [asdict(r) for r in rows]},
                f,
                indent=1,
            )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
