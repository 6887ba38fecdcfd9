"""The llumlet inside an unmodified vLLM 0.32 engine: :class:`LlumletConnector`.

It is LlumnixConnector (PD, store offload) whose scheduler side also follows the engine for the
llumlet. The scheduler-side KV connector is the one extension point that runs in the engine-core
process, in the scheduler's own thread, with every step: vLLM calls ``on_new_request`` when a
request enters the queue, ``get_num_new_matched_tokens`` with its local prefix hit,
``build_connector_meta`` with each step's ``SchedulerOutput`` (scheduled requests, their new
blocks and computed tokens, preemptions) and ``request_finished`` when it ends or is aborted,
and binds the scheduler's block pool (``bind_gpu_block_pool``), whose free-block count is the
truth. A stat logger would see only the front end's coarse per-output-batch numbers, a general
plugin no scheduler state at all; so the llumlet is a connector, and its reports are exact at
each step.

Load it in place of LlumnixConnector, with its settings under ``"llumlet"`` (see
:class:`~llumnix.llumlet.server.LlumletConfig`)::

    kv_transfer_config={
        "kv_connector": "LlumletConnector",
        "kv_connector_module_path": "llumnix.llumlet.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "llumlet": {"port": 50051, "report_port": 50052, "instance_id": "i0"}
        },
    }
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from llumnix.llumlet.server import Llumlet, LlumletConfig
from llumnix.llumlet.status import Scheduled, StatusTracker
from llumnix_kv.plugins.vllm import LlumnixConnector, LlumnixConnectorConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

_ROLE_OF_KV_ROLE = {"kv_producer": "prefill", "kv_consumer": "decode", "kv_both": "neutral"}

__all__ = ["LlumletConnector"]


def _num_blocks(block_ids: tuple[list[int], ...] | None) -> int:
    return sum(len(group) for group in block_ids) if block_ids else 0


class LlumletConnector(LlumnixConnector):
    """LlumnixConnector plus the instance's llumlet (scheduler side, engine-core process)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        transfer = vllm_config.kv_transfer_config
        assert transfer is not None
        self.llumlet_config = LlumletConfig.from_dict(
            (transfer.kv_connector_extra_config or {}).get("llumlet")
        )
        super().__init__(vllm_config, role, kv_cache_config)
        self.llumlet: Llumlet | None = None
        self._pool: BlockPool | None = None
        if role != KVConnectorRole.SCHEDULER:
            return
        config = self.llumlet_config
        tracker = StatusTracker(
            config.instance_id or self.engine_id,
            vllm_config.cache_config.block_size,
            config.role or _ROLE_OF_KV_ROLE.get(str(transfer.kv_role), "neutral"),
        )
        self.llumlet = Llumlet(tracker, self._blocks, config)
        self.llumlet.start()

    @classmethod
    def _parse_config(cls, extra: dict[str, Any]) -> LlumnixConnectorConfig:
        extra.pop("llumlet", None)
        return super()._parse_config(extra)

    def _blocks(self) -> tuple[int, int]:
        """(free, total) blocks of the scheduler's pool; its null block is never usable."""
        pool = self._pool
        if pool is None:
            return 0, 0
        return pool.get_num_free_blocks(), pool.num_gpu_blocks - 1

    # ------------------------------------------------------------------ scheduler hooks

    def bind_gpu_block_pool(self, gpu_block_pool: BlockPool) -> None:
        super().bind_gpu_block_pool(gpu_block_pool)
        self._pool = gpu_block_pool

    def on_new_request(self, request: Request) -> None:
        super().on_new_request(request)
        if self.llumlet is not None:
            self.llumlet.tracker.add(request.request_id, request.num_prompt_tokens)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        external, is_async = super().get_num_new_matched_tokens(request, num_computed_tokens)
        if self.llumlet is not None:
            self.llumlet.tracker.matched(request.request_id, num_computed_tokens + (external or 0))
        return external, is_async

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = super().build_connector_meta(scheduler_output)
        if self.llumlet is not None:
            self.llumlet.tracker.step(
                _scheduled(scheduler_output), scheduler_output.preempted_req_ids or ()
            )
            self.llumlet.on_step()
        return meta

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        if self.llumlet is not None:
            self.llumlet.tracker.finish(request.request_id)
        return super().request_finished(request, block_ids)

    def shutdown(self) -> None:
        if self.llumlet is not None:
            self.llumlet.stop()
            self.llumlet = None
        super().shutdown()


def _scheduled(out: SchedulerOutput) -> list[Scheduled]:
    tokens = out.num_scheduled_tokens
    steps = [
        Scheduled(
            request_id=new.req_id,
            computed_tokens=new.num_computed_tokens,
            scheduled_tokens=tokens.get(new.req_id, 0),
            new_blocks=_num_blocks(new.block_ids),
            resumed=True,  # a new request's block ids are its whole table
        )
        for new in out.scheduled_new_reqs
    ]
    cached = out.scheduled_cached_reqs
    for i, request_id in enumerate(cached.req_ids):
        steps.append(
            Scheduled(
                request_id=request_id,
                computed_tokens=cached.num_computed_tokens[i],
                scheduled_tokens=tokens.get(request_id, 0),
                output_tokens=cached.num_output_tokens[i],
                new_blocks=_num_blocks(cached.new_block_ids[i]),
                resumed=request_id in cached.resumed_req_ids,
            )
        )
    return steps
