"""One real vLLM CPU engine in its own OS process, driven over a pipe, for the connector
benchmark.

vLLM keeps one worker-side KV connector per process, so each engine (single instance, prefill,
decode, one per store tier) runs in a spawned process of its own with the in-process engine
core (``VLLM_ENABLE_V1_MULTIPROCESSING=0``). The model is a local ``config.json`` with dummy
weights (seeded: every process holds the same weights), prompts are token ids.

Besides generating, the engine process times the connector's loads, from two sources kept
apart: the connector's own per-transfer stats (``get_kv_connector_stats``, where the connector
has them; a copy is taken as vLLM collects them), and timing wrappers around the worker-side
connector's PD puller (``start`` to the ``poll`` that reports the load finished) and store
offloader (``load``). Each record has its kind, bytes or tokens, and seconds.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default reserves most of the host's memory
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in this process
    "OMP_NUM_THREADS": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
}


def _serve(conn: Any, spec: dict[str, Any]) -> None:
    os.environ.update(ENGINE_ENV)
    try:
        from vllm import LLM

        kwargs: dict[str, Any] = {}
        if spec.get("kv_transfer_config") is not None:
            kwargs["kv_transfer_config"] = spec["kv_transfer_config"]
        llm = LLM(
            model=spec["model"],
            load_format="dummy",
            skip_tokenizer_init=True,
            enforce_eager=True,
            block_size=spec["block_size"],
            max_model_len=spec["max_model_len"],
            num_gpu_blocks_override=spec["num_blocks"],
            max_num_batched_tokens=max(spec["max_model_len"], 2048),
            seed=0,
            disable_log_stats=False,  # RequestOutput.num_cached_tokens comes from the stats
            **kwargs,
        )
        handlers = _Handlers(llm, float(spec.get("idle_sleep_s", 0.0)))
    except BaseException as exc:
        with contextlib.suppress(OSError):
            conn.send(("error", f"engine start failed: {type(exc).__name__}: {exc}"))
        raise
    conn.send(("ok", None))
    while True:
        cmd, *args = conn.recv()
        if cmd == "exit":
            break
        try:
            conn.send(("ok", getattr(handlers, cmd)(*args)))
        except Exception as exc:  # reported to the benchmark, which stops with it
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    llm.llm_engine.engine_core.shutdown()
    conn.close()
    os._exit(0)  # vLLM's interpreter teardown can take many seconds


class _Handlers:
    def __init__(self, llm: Any, idle_sleep_s: float = 0.0) -> None:
        self.llm = llm
        self.idle_sleep_s = idle_sleep_s
        self._next_id = 0
        self.loads: list[dict[str, Any]] = []
        self._started: dict[str, tuple[float, int]] = {}
        self._connector: Any = None
        self._instrument()

    # ------------------------------------------------------------------ instrumentation

    def _instrument(self) -> None:
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        if not has_kv_transfer_group():
            return
        self._connector = connector = get_kv_transfer_group()  # the worker-side connector
        self._wrap_connector_stats(connector)
        puller = getattr(connector, "_puller", None)
        if puller is not None and hasattr(puller, "start") and hasattr(puller, "poll"):
            start, poll = puller.start, puller.poll

            # The wrappers only observe: a field they miss skips the record, never the call.
            def timed_start(job: Any, *args: Any, **kwargs: Any) -> Any:
                with contextlib.suppress(AttributeError, TypeError, ValueError):
                    begin, end = job.tokens
                    self._started[job.request_id] = (time.perf_counter(), max(end - begin, 0))
                return start(job, *args, **kwargs)

            def timed_poll(*args: Any, **kwargs: Any) -> Any:
                outcomes = poll(*args, **kwargs)
                now = time.perf_counter()
                for outcome in outcomes:
                    rid = getattr(outcome, "request_id", None)
                    t0, tokens = self._started.pop(rid, (None, 0))
                    if t0 is not None and tokens > 0:
                        self.loads.append(
                            {
                                "source": "instrumented",
                                "kind": "pd",
                                "tokens": tokens,
                                "ok": bool(getattr(outcome, "ok", False)),
                                "seconds": now - t0,
                            }
                        )
                return outcomes

            puller.start, puller.poll = timed_start, timed_poll
        offloader = getattr(connector, "_offloader", None)
        if offloader is not None and hasattr(offloader, "load"):
            load = offloader.load

            def hits() -> dict[str, int]:
                stack = getattr(offloader, "stack", None)
                stats = getattr(stack, "stats", None)
                return dict(stats()) if stats is not None else {}

            def timed_load(blocks: Any, keys: Any, *args: Any, **kwargs: Any) -> Any:
                before = hits()
                t0 = time.perf_counter()
                failed = load(blocks, keys, *args, **kwargs)
                seconds = time.perf_counter() - t0
                after = hits()
                tiers = [
                    k.removeprefix("store_hits_")
                    for k in after
                    if k.startswith("store_hits_") and after[k] > before.get(k, 0)
                ]
                with contextlib.suppress(AttributeError, TypeError, ValueError):
                    self.loads.append(
                        {
                            "source": "instrumented",
                            "kind": "store",
                            "tiers": tiers,
                            "blocks": len(blocks),
                            "failed": len(failed),
                            "bytes": len(blocks) * int(offloader.chunk_bytes),
                            "ok": not failed,
                            "seconds": seconds,
                        }
                    )
                return failed

            offloader.load = timed_load

    def _wrap_connector_stats(self, connector: Any) -> None:
        """The connector's own per-transfer timing, where it has one: vLLM calls
        ``get_kv_connector_stats`` after every step; a copy of each transfer's seconds and
        bytes (``<kind>_s`` / ``<kind>_bytes`` lists of the stats' data) is kept here and the
        stats go on to vLLM unchanged."""
        get_stats = getattr(connector, "get_kv_connector_stats", None)
        if get_stats is None:
            return

        def copied_stats(*args: Any, **kwargs: Any) -> Any:
            stats = get_stats(*args, **kwargs)
            data = getattr(stats, "data", None)
            if isinstance(data, dict):
                for key, secs in data.items():
                    nbytes = data.get(key[:-2] + "_bytes")
                    if not key.endswith("_s") or not isinstance(secs, list):
                        continue
                    if not isinstance(nbytes, list) or len(nbytes) != len(secs):
                        continue
                    for sec, nb in zip(secs, nbytes, strict=True):
                        self.loads.append(
                            {
                                "source": "connector",
                                "kind": key[:-2],
                                "seconds": float(sec),
                                "bytes": int(nb),
                                "ok": True,
                            }
                        )
            return stats

        connector.get_kv_connector_stats = copied_stats

    # ------------------------------------------------------------------ commands

    def _params(self, max_tokens: int, kv_params: dict | None) -> Any:
        from vllm import SamplingParams

        extra = {"kv_transfer_params": kv_params} if kv_params is not None else None
        return SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra
        )

    def generate(
        self, prompts: list[list[int]], max_tokens: int, kv_params: list[dict | None] | None
    ) -> dict[str, Any]:
        """Runs the prompts as one batch; the outputs and the engine-side seconds."""
        from vllm.inputs import TokensPrompt

        kv_params = kv_params or [None] * len(prompts)
        t0 = time.perf_counter()
        if self.idle_sleep_s > 0:
            outs = self._generate_idle(prompts, max_tokens, kv_params)
        else:
            outs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=p) for p in prompts],
                [self._params(max_tokens, kv) for kv in kv_params],
                use_tqdm=False,
            )
        seconds = time.perf_counter() - t0
        return {
            "seconds": seconds,
            "outputs": [
                {
                    "token_ids": list(o.outputs[0].token_ids),
                    "kv_transfer_params": o.kv_transfer_params,
                    "num_cached_tokens": o.num_cached_tokens,
                }
                for o in outs
            ],
        }

    def _generate_idle(
        self, prompts: list[list[int]], max_tokens: int, kv_params: list[dict | None]
    ) -> list[Any]:
        """LLM.generate's loop (add the requests, step until all finished), but sleeping
        ``idle_sleep_s`` after a step that produced no output (requests waiting for their
        KV), instead of spinning on a core the other engines need."""
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        ids = []
        for prompt, kv in zip(prompts, kv_params, strict=True):
            rid = f"bench-{self._next_id}"
            self._next_id += 1
            engine.add_request(
                rid, TokensPrompt(prompt_token_ids=prompt), self._params(max_tokens, kv)
            )
            ids.append(rid)
        done: dict[str, Any] = {}
        while len(done) < len(ids):
            outs = engine.step()
            for out in outs:
                if out.finished:
                    done[out.request_id] = out
            if not outs:
                time.sleep(self.idle_sleep_s)
        return [done[rid] for rid in ids]

    def take_loads(self) -> list[dict[str, Any]]:
        loads, self.loads = self.loads, []
        return loads

    def reset_prefix_cache(self) -> bool:
        return bool(self.llm.reset_prefix_cache())

    def flush_store(self, timeout: float) -> bool:
        flush = getattr(self._connector, "flush_store", None)
        return bool(flush(timeout)) if flush is not None else True

    def counters(self) -> dict[str, Any]:
        counters = getattr(self._connector, "counters", None)
        return dict(counters()) if counters is not None else {}

    def blocks(self) -> dict[str, int]:
        """The scheduler's requests (finished ones whose blocks a connector holds count) and
        its KV block pool: what a leak shows up in."""
        scheduler = self.llm.llm_engine.engine_core.engine_core.scheduler
        pool = scheduler.kv_cache_manager.block_pool
        return {
            "requests": len(scheduler.requests),
            "free_blocks": pool.get_num_free_blocks(),
            "total_blocks": pool.num_gpu_blocks - 1,  # block 0 is the null block
        }

    def drain(self, timeout: float) -> int:
        """Steps the engine until no request is left (PD holds included) or ``timeout``;
        returns the requests left."""
        scheduler = self.llm.llm_engine.engine_core.engine_core.scheduler
        deadline = time.monotonic() + timeout
        while scheduler.has_requests() and time.monotonic() < deadline:
            self.llm.llm_engine.step()
            time.sleep(0.002)
        return len(scheduler.requests)


class Engine:
    """A vLLM engine in a spawned process. ``submit``/``result`` let the caller overlap two
    engines; every wait has a deadline; ``stop`` always ends the process."""

    def __init__(
        self,
        name: str,
        model: Path,
        *,
        block_size: int,
        max_model_len: int,
        num_blocks: int,
        kv_transfer_config: dict | None = None,
        idle_sleep_s: float = 0.0,
    ) -> None:
        self.name = name
        spec = {
            "idle_sleep_s": idle_sleep_s,
            "model": str(model),
            "block_size": block_size,
            "max_model_len": max_model_len,
            "num_blocks": num_blocks,
            "kv_transfer_config": kv_transfer_config,
        }
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, spec), daemon=True)
        self.proc.start()
        self._busy = True  # until the start answer has been read

    def ready(self, timeout: float) -> Engine:
        self._answer("start", timeout)
        return self

    def _answer(self, what: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.05):
            if not self.proc.is_alive():
                raise RuntimeError(f"{self.name}: engine process exited during {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no answer to {what!r} in {timeout} s")
        status, value = self.conn.recv()
        self._busy = False
        if status != "ok":
            raise RuntimeError(f"{self.name}: {what}: {value}")
        return value

    def submit(self, cmd: str, *args: Any) -> None:
        assert not self._busy, f"{self.name}: a command is still running"
        self._busy = True
        self._cmd = cmd
        self.conn.send((cmd, *args))

    def result(self, timeout: float) -> Any:
        return self._answer(self._cmd, timeout)

    def call(self, cmd: str, *args: Any, timeout: float) -> Any:
        self.submit(cmd, *args)
        return self.result(timeout)

    def stop(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(("exit",))
            self.proc.join(15)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
