"""A real vLLM engine in its own process, driven over a pipe.

vLLM keeps one worker-side KV connector per process, so every engine of a PD pair runs in a
spawned process of its own (in-process engine core: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``). The
model is a tiny Llama config with dummy weights (seeded, so outputs agree across processes).
The parent always stops the child, killing it if it does not exit in time.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
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

ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default reserves most of the host's memory
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in this process (starts in ~3 s)
    "OMP_NUM_THREADS": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
}


def write_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    return folder


def connector_config(role: str, *, policy: str = "fail", **extra: Any) -> dict[str, Any]:
    return {
        "kv_connector": "LlumnixConnector",
        "kv_connector_module_path": "llumnix_kv.plugins.vllm",
        "kv_role": role,
        "kv_load_failure_policy": policy,
        "kv_connector_extra_config": extra,
    }


def _serve(conn: Any, model: str, block_size: int, kv_transfer_config: dict | None) -> None:
    os.environ.update(ENGINE_ENV)
    from vllm import LLM

    kwargs: dict[str, Any] = {}
    if kv_transfer_config is not None:
        kwargs["kv_transfer_config"] = kv_transfer_config
    llm = LLM(
        model=model,
        load_format="dummy",
        skip_tokenizer_init=True,
        enforce_eager=True,
        block_size=block_size,
        max_model_len=1024,
        num_gpu_blocks_override=64,
        seed=0,
        disable_log_stats=False,  # RequestOutput.num_cached_tokens comes from the stats
        **kwargs,
    )
    conn.send(("ok", None))
    handlers = _Handlers(llm)
    while True:
        cmd, *args = conn.recv()
        if cmd == "exit":
            break
        try:
            conn.send(("ok", getattr(handlers, cmd)(*args)))
        except Exception as exc:  # reported to the test, which fails with it
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    llm.llm_engine.engine_core.shutdown()
    conn.close()
    # vLLM's interpreter teardown can take many seconds; everything is shut down already.
    os._exit(0)


class _Handlers:
    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.core = llm.llm_engine.engine_core.engine_core  # in-process EngineCore

    def _params(self, max_tokens: int, kv_params: dict | None) -> Any:
        from vllm import SamplingParams

        extra = {"kv_transfer_params": kv_params} if kv_params is not None else None
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra)

    def generate(
        self, prompts: list[list[int]], max_tokens: int, kv_params: list[dict | None] | None
    ) -> list[dict[str, Any]]:
        from vllm.inputs import TokensPrompt

        kv_params = kv_params or [None] * len(prompts)
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            [self._params(max_tokens, kv) for kv in kv_params],
            use_tqdm=False,
        )
        return [
            {
                "token_ids": list(o.outputs[0].token_ids),
                "kv_transfer_params": o.kv_transfer_params,
                "num_cached_tokens": o.num_cached_tokens,
            }
            for o in outs
        ]

    def start_and_abort(self, prompt: list[int], kv_params: dict, steps: int) -> None:
        """Adds a request, runs ``steps`` engine steps (its load starts in the first) and
        aborts it."""
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        prompt_in = TokensPrompt(prompt_token_ids=prompt)
        engine.add_request("aborted", prompt_in, self._params(8, kv_params))
        for _ in range(steps):
            engine.step()
        engine.abort_request(["aborted"])

    def drain(self, timeout: float) -> dict[str, Any]:
        """Steps the engine until its scheduler holds no request (finished requests whose
        blocks a connector still holds count) or ``timeout``; returns counters."""
        deadline = time.monotonic() + timeout
        while self.core.scheduler.has_requests() and time.monotonic() < deadline:
            self.llm.llm_engine.step()
            time.sleep(0.005)
        return self.counters()

    def metrics(self, prefix: str) -> dict[str, float]:
        """Counters and histogram counts of vLLM's metrics whose name starts with ``prefix``."""
        out: dict[str, float] = {}
        for m in self.llm.get_metrics():
            if m.name.startswith(prefix):
                value = getattr(m, "value", None)
                out[m.name] = float(value if value is not None else getattr(m, "count", 0))
        return out

    def counters(self) -> dict[str, Any]:
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        scheduler = self.core.scheduler
        pool = scheduler.kv_cache_manager.block_pool
        out: dict[str, Any] = {
            "requests": len(scheduler.requests),
            "free_blocks": pool.get_num_free_blocks(),
            "total_blocks": pool.num_gpu_blocks - 1,  # block 0 is the null block
        }
        if has_kv_transfer_group():
            out.update(get_kv_transfer_group().counters())
        return out


class EngineProcess:
    """A vLLM engine in a spawned process; always stopped by ``stop`` (or the context exit)."""

    def __init__(
        self,
        model: Path,
        *,
        block_size: int = 32,
        kv_transfer_config: dict | None = None,
    ) -> None:
        """Starts the process; :meth:`ready` waits until the engine serves."""
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_serve, args=(child, str(model), block_size, kv_transfer_config), daemon=True
        )
        self.proc.start()

    def ready(self, timeout: float = 120.0) -> EngineProcess:
        self._answer("start", timeout)
        return self

    def _answer(self, what: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.2):
            if not self.proc.is_alive():
                raise RuntimeError(f"engine process exited ({self.proc.exitcode}) during {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine process did not answer {what!r} in {timeout} s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"{what}: {value}")
        return value

    def call(self, cmd: str, *args: Any, timeout: float = 60.0) -> Any:
        self.conn.send((cmd, *args))
        return self._answer(cmd, timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(10)

    def request_exit(self) -> None:
        """Asks the engine to exit without waiting (``stop`` waits)."""
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(("exit",))

    def stop(self) -> None:
        if self.proc.is_alive():
            self.request_exit()
            self.proc.join(15)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)

    def __enter__(self) -> EngineProcess:
        try:
            return self.ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
