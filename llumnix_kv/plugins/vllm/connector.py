"""``LlumnixConnector``: prefill-decode disaggregation for vLLM 0.32 over the transfer engine.

Pull mode (the protocol is in :mod:`llumnix_kv.connector.pd`): the prefill instance runs the
prompt with ``kv_transfer_params={"do_remote_decode": True}`` and keeps the request's blocks;
the params it returns go to the decode instance, which reads the KV into its own blocks and
tells the prefill instance, which then frees them.

Push mode (:mod:`llumnix_kv.connector.push`): both instances get the request at once, named by
one transfer id; the decode allocates blocks and the prefill writes each layer's KV into them
as soon as that layer is computed.

Store offload (``store`` in the config, :mod:`llumnix_kv.connector.offload`): full prompt
blocks are saved to the store tiers while prefilling and loaded on a later prefix hit, by
this instance or any other sharing a tier. With both, a decode instance reads the blocks the
store holds from the store and only the rest from the prefill instance.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
)

from llumnix_kv._C import KvLayout
from llumnix_kv.connector import LoadJob, PdHandoff, PdPuller, PdSendLedger
from llumnix_kv.connector.offload import (
    BlockOffloader,
    LoadGuard,
    StoreStack,
    acquire_stack,
    namespace_tag,
    release_stack,
)
from llumnix_kv.connector.pd import load_deadline, read_notice
from llumnix_kv.connector.peers import NoticeReader, PeerPool
from llumnix_kv.connector.push import PdPusher, PdPushReceiver, PushEndpoint, abort_notice
from llumnix_kv.errors import KvError, UnsupportedError
from llumnix_kv.layout import layout_to_dict
from llumnix_kv.plugins.vllm.config import LlumnixConnectorConfig
from llumnix_kv.plugins.vllm.layouts import kv_cache_layout
from llumnix_kv.plugins.vllm.stats import LlumnixKVConnectorStats, LlumnixPromMetrics
from llumnix_kv.transfer import TransferEngine

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = [
    "LlumnixConnector",
    "LlumnixConnectorMetadata",
    "LlumnixHandshake",
    "LoadSpec",
    "StoreLoad",
    "StoreSave",
]

logger = logging.getLogger(__name__)

# Keys of kv_transfer_params. Pull mode: the hand-offs (one per prefill tensor-parallel rank)
# a prefill returns. Push mode: {"transfer_id": ...} on the prefill request, plus "prefill":
# the prefill's endpoints on the decode request. A probe request returns the endpoints.
HANDOFF_KEY = "llumnix_handoff"
PUSH_KEY = "llumnix_push"
PROBE_KEY = "llumnix_probe"
ENDPOINT_KEY = "llumnix_endpoint"
# A store load not finished this long after its own timeout is abandoned by the engine.
STORE_LOAD_MARGIN_S = 5.0


@dataclass
class LlumnixHandshake(KVConnectorHandshakeMetadata):
    """What one worker tells its scheduler once its KV cache is registered."""

    engine_name: str
    descriptor: bytes  # the worker's TransferEngine.descriptor()
    layout: dict[str, Any]  # layout_to_dict of the worker's KV cache, at its addresses


@dataclass
class LoadSpec:
    """One load for the decode worker: tokens ``[tokens[0], tokens[1])`` from the prefill
    described by ``handoffs`` (one per prefill TP rank) into ``local_blocks``."""

    handoffs: list[dict[str, Any]]
    local_blocks: list[int]
    tokens: tuple[int, int]
    # Only tell the prefill to free its blocks: no request here waits for this load.
    notice_only: bool = False
    # Blocks before ``tokens[0]`` read from the store tiers first (pd+store), or None.
    store: StoreLoad | None = None
    # Push mode: the request's PUSH_KEY params (transfer id, prefill endpoints); the
    # prefill writes the tokens and ``handoffs`` is empty.
    push: dict[str, Any] | None = None


@dataclass
class PushStep:
    """Prefill side, push mode: a request this step computes tokens of."""

    transfer_id: str
    block_ids: list[int]
    computed: int  # tokens whose KV exists after this step


@dataclass
class StoreLoad:
    """Blocks to fill from the store tiers before this step's forward: chunk ``keys[i]``
    into block ``blocks[i]``. ``tokens``: the tokens the scheduler counted as loaded."""

    blocks: list[int]
    keys: list[bytes]
    tokens: int


@dataclass
class StoreSave:
    """Blocks this step's forward completes, to save after it: block ``blocks[i]`` under
    ``keys[i]``."""

    blocks: list[int]
    keys: list[bytes]


@dataclass
class LlumnixConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step."""

    loads: dict[str, LoadSpec] = field(default_factory=dict)  # request id -> load
    sends: dict[str, float] = field(default_factory=dict)  # request id -> hold seconds
    store_loads: dict[str, StoreLoad] = field(default_factory=dict)  # request id -> load
    store_saves: dict[str, StoreSave] = field(default_factory=dict)  # request id -> save
    push_steps: dict[str, PushStep] = field(default_factory=dict)  # request id -> step
    # Pushed requests that finished here: request id -> (hold seconds, finished normally).
    push_finished: dict[str, tuple[float, bool]] = field(default_factory=dict)


@dataclass
class _StoreJob:
    """Worker side: a store load running on the store-load thread."""

    request_id: str
    spec: StoreLoad
    future: Future[tuple[list[int], float]]
    deadline: float  # time.monotonic(); past it the load is abandoned and reported failed
    guard: LoadGuard


@dataclass
class _Tracked:
    """Scheduler-side state of a request whose blocks the connector follows (store offload
    saves, push mode)."""

    request: Request
    block_ids: list[int]
    next_save: int | None = None  # first block not yet saved; None: set on the next step
    transfer_id: str | None = None  # push mode: the request is pushed to a decode
    preempted: bool = False


class LlumnixConnector(KVConnectorBase_V1):
    """Prefill-decode disaggregation (pull and push) and store offload over llumnix_kv.

    Scheduler side:
        - ``get_num_new_matched_tokens``: a request with ``do_remote_prefill`` and a Llumnix
          hand-off (pull) or push params loads the prompt tokens the prefill computes beyond
          the local prefix hit, asynchronously (the request waits in WAITING_FOR_REMOTE_KVS).
          A malformed hand-off is dropped once (the request is prefilled here); the store
          match of the request is remembered for ``update_state_after_alloc``.
        - ``update_state_after_alloc``: records the request's block table and token range
          for the worker; one load per request (``do_remote_prefill`` is cleared). Requests
          whose blocks are saved to the store or pushed to a decode have their block tables
          followed step by step.
        - ``build_connector_meta``: ships this step's loads, send holds, store loads and
          saves, and push steps (tokens each pushed request computes) to the workers;
          ``has_pending_push_work`` is True while some wait to be shipped.
        - ``request_finished``: on the prefill instance, a request with
          ``do_remote_decode`` keeps its blocks (returns True): pull mode returns the
          hand-off params for the decode instance and the worker frees the blocks on the
          decode's read notice or after ``send_timeout_s``; push mode frees them once its
          writes landed (or failed, or no decode asked by the deadline). A probe request
          (``llumnix_probe``) returns this instance's push endpoints. On the decode instance,
          a request aborted before its load was scheduled tells the prefill to free its
          blocks at once.

    Store offload (``store`` in the config; the protocol is in
    :mod:`llumnix_kv.connector.offload`), for every request that is not a PD load:
        - ``get_num_new_matched_tokens``: counts the consecutive full blocks after the local
          prefix hit whose keys (namespace tag + vLLM block hash) some tier holds, and returns
          them as an asynchronous load (capped one token short of the request, so the last
          token is computed).
        - ``update_state_after_alloc`` records the blocks to fill; ``build_connector_meta``
          ships them, and the full prompt blocks each step completes, to the worker.
        - Worker: ``start_load_kv`` hands the load to a store-load thread that reads the
          chunks and scatters them into the blocks while the engine runs other requests;
          ``get_finished`` reports it; ``wait_for_save`` (after the forward) gathers the
          completed blocks and puts them to every tier that lacks them. Blocks that could
          not be loaded are reported by ``get_block_ids_with_load_errors``.
        - pd+store: for a PD load, the leading blocks of the prefill's range that some tier
          holds are read from the store (on the store-load thread) and the transfer from the
          prefill covers only the rest (possibly nothing); the request waits for both.

    Worker side:
        - ``register_kv_caches``: describes the CPU_ATTN cache as a KvLayout, registers it
          with the process's TransferEngine (one per worker process) and publishes it in
          ``get_handshake_metadata``. Connects to peers and "free your blocks" notices run on
          background threads (:mod:`llumnix_kv.connector.peers`), never in an engine step.
        - ``bind_connector_metadata`` (before the forward): push mode takes the step's pushed
          requests and the decodes' readies; ``save_kv_layer`` writes each layer's new tokens
          right after its attention ran; ``wait_for_save`` closes the step.
        - ``start_load_kv``: submits this step's READs (pull), waits for pushes (push), starts
          store loads and send holds; it never waits for data.
        - ``get_finished``: loads whose data landed or failed (finished_recving), and blocks
          released by a read notice, a finished push or a deadline (finished_sending).
        - ``get_block_ids_with_load_errors``: the local blocks of failed loads, so vLLM
          recomputes them (``kv_load_failure_policy="recompute"``) or fails the request.
        - ``get_kv_connector_stats``: transfers and failures since the last step
          (:mod:`llumnix_kv.plugins.vllm.stats`).
    """

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)  # type: ignore[arg-type]
        transfer_config = vllm_config.kv_transfer_config
        assert transfer_config is not None  # the base class raised otherwise
        self.config = self._parse_config(dict(transfer_config.kv_connector_extra_config or {}))
        self.engine_id = str(transfer_config.engine_id or uuid.uuid4().hex[:8])
        # Scheduler side.
        self._handshakes: dict[int, LlumnixHandshake] = {}
        self._loads: dict[str, LoadSpec] = {}
        self._sends: dict[str, float] = {}
        self._push_finished: dict[str, tuple[float, bool]] = {}
        self._tracked: dict[str, _Tracked] = {}
        # Worker side.
        self._engine: TransferEngine | None = None
        self._layout: KvLayout | None = None
        self._layer_index: dict[str, int] = {}
        self._on_device = False
        self._peers: PeerPool | None = None
        self._notices: NoticeReader | None = None
        self._puller: PdPuller | None = None
        self._ledger: PdSendLedger | None = None
        self._pusher: PdPusher | None = None
        self._receiver: PdPushReceiver | None = None
        self._stats = LlumnixKVConnectorStats()
        self._reported: dict[str, int] = {}  # event totals already in returned stats
        self._reported_gauges: dict[str, int] = {}
        # Loads in progress: parts (store load, PD load) per request, store-load futures.
        self._parts: dict[str, int] = {}
        self._store_jobs: list[_StoreJob] = []
        self._store_pool: ThreadPoolExecutor | None = None
        self._failed_blocks: set[int] = set()
        self._tp_rank = 0
        # Store offload (both sides; one stack per tier list per process).
        self._stack: StoreStack | None = None
        self._key_tag = b""
        self._store_matches: dict[str, tuple[int, int]] = {}  # id -> (first block, blocks)
        # Store loads shipped and not finished (their blocks), and requests whose store load
        # failed: those are not matched again (a tier that claims a chunk it cannot serve
        # would make the request fail and retry forever).
        self._store_inflight: dict[str, set[int]] = {}
        self._store_failed: set[str] = set()
        self._store_loads: dict[str, StoreLoad] = {}
        self._offloader: BlockOffloader | None = None
        if self.config.store is not None:
            if vllm_config.parallel_config.tensor_parallel_size > 1:
                # Every rank would save its own head shard under the same block key.
                raise UnsupportedError("the store offload supports tensor_parallel_size 1")
            self._key_tag = namespace_tag(
                self.config.store.get("namespace") or _default_namespace(vllm_config)
            )
            self._stack = acquire_stack(self.config.store["tiers"])

    @classmethod
    def _parse_config(cls, extra: dict[str, Any]) -> LlumnixConnectorConfig:
        """The connector's settings from ``kv_connector_extra_config`` (a subclass that takes
        keys of its own removes them first)."""
        return LlumnixConnectorConfig.from_extra_config(extra)

    # ------------------------------------------------------------------ scheduler side

    def set_xfer_handshake_metadata(
        self, metadata: dict[int, KVConnectorHandshakeMetadata]
    ) -> None:
        for rank, meta in metadata.items():
            if isinstance(meta, LlumnixHandshake):
                self._handshakes[rank] = meta

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        remote_tokens = _remote_tokens(request)
        if remote_tokens is None:
            tokens = self._store_match(request, num_computed_tokens)
            return tokens, tokens > 0  # loaded asynchronously: the request waits for it
        count = min(remote_tokens, request.num_prompt_tokens) - num_computed_tokens
        if count <= 0:
            return 0, False
        # pd+store: the leading blocks the store tiers hold are read from them, the rest from
        # the prefill; the request waits for both.
        self._store_match(request, num_computed_tokens, limit=count)
        return count, True

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        params = request.kv_transfer_params
        remote_tokens = _remote_tokens(request)
        if params is None or remote_tokens is None:
            self._track(request, blocks)
            self._store_after_alloc(request, blocks, num_external_tokens)
            return
        end = min(remote_tokens, request.num_prompt_tokens)
        # num_external_tokens == 0 is a full local prefix hit: load nothing, but still send
        # the read notice so the prefill frees its blocks.
        begin = end - num_external_tokens if num_external_tokens > 0 else end
        block_ids = list(blocks.get_block_ids()[0])
        store = None
        first, num_blocks = self._store_matches.pop(request.request_id, (0, 0))
        bt = self._block_size
        num_blocks = min(num_blocks, (end - begin) // bt)
        if num_external_tokens > 0 and num_blocks > 0 and first * bt == begin:
            store = StoreLoad(
                blocks=block_ids[first : first + num_blocks],
                keys=self._store_keys(request, first, first + num_blocks),
                tokens=num_blocks * bt,
            )
            self._store_inflight[request.request_id] = set(store.blocks)
            begin += num_blocks * bt
        self._loads[request.request_id] = LoadSpec(
            handoffs=list(params.get(HANDOFF_KEY, [])),
            local_blocks=block_ids,
            tokens=(begin, end),
            notice_only=num_external_tokens == 0,
            store=store,
            push=params.get(PUSH_KEY),
        )
        params["do_remote_prefill"] = False

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        self._update_tracked(scheduler_output)
        meta = LlumnixConnectorMetadata(
            loads=self._loads,
            sends=self._sends,
            store_loads=self._store_loads,
            store_saves=self._store_saves(scheduler_output),
            push_steps=self._push_steps(scheduler_output),
            push_finished=self._push_finished,
        )
        self._loads, self._sends, self._store_loads, self._push_finished = {}, {}, {}, {}
        return meta

    def _track(self, request: Request, blocks: KVCacheBlocks) -> None:
        """Follows the block table of a request whose blocks are saved to the store tiers or
        pushed to a decode instance."""
        params = request.kv_transfer_params or {}
        push = params.get(PUSH_KEY) if params.get("do_remote_decode") else None
        transfer_id = str(push["transfer_id"]) if isinstance(push, dict) else None
        if self._stack is None and transfer_id is None:
            return
        self._tracked[request.request_id] = _Tracked(
            request, list(blocks.get_block_ids()[0]), transfer_id=transfer_id
        )

    def _update_tracked(self, scheduler_output: SchedulerOutput) -> None:
        """Block tables of tracked requests after this step's allocations."""
        for new in scheduler_output.scheduled_new_reqs:
            state = self._tracked.get(new.req_id)
            if state is not None:
                state.block_ids = list(new.block_ids[0])
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, new_ids in zip(cached.req_ids, cached.new_block_ids, strict=True):
            state = self._tracked.get(req_id)
            if state is None:
                continue
            if req_id in cached.resumed_req_ids:
                # Preempted and rescheduled: its blocks were freed and refilled.
                state.block_ids, state.next_save, state.preempted = [], None, True
            if new_ids is not None:
                state.block_ids.extend(new_ids[0])

    def _push_steps(self, scheduler_output: SchedulerOutput) -> dict[str, PushStep]:
        """Pushed requests this step computes tokens of. A request preempted here is not
        pushed further (the decode has parts of its KV from freed blocks): its push fails."""
        steps = {}
        for req_id, scheduled in scheduler_output.num_scheduled_tokens.items():
            state = self._tracked.get(req_id)
            if state is None or state.transfer_id is None or state.preempted:
                continue
            request = state.request
            computed = min(request.num_computed_tokens + scheduled, request.num_prompt_tokens)
            steps[req_id] = PushStep(state.transfer_id, list(state.block_ids), computed)
        return steps

    # Store offload, scheduler side.

    def _store_keys(self, request: Request, first: int, end: int) -> list[bytes]:
        return [self._key_tag + bytes(h) for h in request.block_hashes[first:end]]

    def _store_match(
        self, request: Request, num_computed_tokens: int, limit: int | None = None
    ) -> int:
        """Tokens after ``num_computed_tokens`` the store tiers can fill (whole blocks; at
        most ``limit`` tokens, else one token short of the request)."""
        self._store_matches.pop(request.request_id, None)
        bt = self._block_size
        if self._stack is None or num_computed_tokens % bt:
            return 0
        if request.request_id in self._store_failed:
            return 0
        first = num_computed_tokens // bt
        end = len(request.block_hashes)
        if limit is not None:
            end = min(end, first + limit // bt)
        num_blocks = self._stack.match(self._store_keys(request, first, end))
        if limit is not None:
            tokens = num_blocks * bt
        else:
            # The last token is always computed (it yields the next token's logits).
            tokens = min(num_blocks * bt, request.num_tokens - 1 - num_computed_tokens)
        if tokens <= 0:
            return 0
        self._store_matches[request.request_id] = (first, num_blocks)
        return tokens

    def _store_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if self._stack is None:
            return
        block_ids = list(blocks.get_block_ids()[0])
        first, num_blocks = self._store_matches.pop(request.request_id, (0, 0))
        if num_external_tokens <= 0 or num_blocks <= 0:
            return
        load = StoreLoad(
            blocks=block_ids[first : first + num_blocks],
            keys=self._store_keys(request, first, first + num_blocks),
            tokens=num_external_tokens,
        )
        self._store_loads[request.request_id] = load
        self._store_inflight[request.request_id] = set(load.blocks)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Notes store loads that failed (their blocks come back as invalid)."""
        invalid = connector_output.invalid_block_ids or set()
        if invalid:
            for request_id, blocks in self._store_inflight.items():
                if blocks & invalid:
                    self._store_failed.add(request_id)
        for request_id in connector_output.finished_recving or ():
            self._store_inflight.pop(request_id, None)

    def _store_saves(self, scheduler_output: SchedulerOutput) -> dict[str, StoreSave]:
        """The full prompt blocks this step completes, per request, not saved before."""
        if self._stack is None:
            return {}
        saves = {}
        bt = self._block_size
        for req_id, scheduled in scheduler_output.num_scheduled_tokens.items():
            state = self._tracked.get(req_id)
            if state is None:
                continue
            request = state.request
            computed = request.num_computed_tokens  # before this step
            if state.next_save is None:
                state.next_save = computed // bt
            end = min(
                (computed + scheduled) // bt,
                request.num_prompt_tokens // bt,
                len(request.block_hashes),
                len(state.block_ids),
            )
            if end > state.next_save:
                saves[req_id] = StoreSave(
                    blocks=state.block_ids[state.next_save : end],
                    keys=self._store_keys(request, state.next_save, end),
                )
                state.next_save = end
        return saves

    @property
    def _block_size(self) -> int:
        return int(self._vllm_config.cache_config.block_size)

    def has_pending_push_work(self) -> bool:
        # Loads and holds not yet shipped to the workers keep the engine stepping: a read
        # notice for a request aborted before it was scheduled must still reach the prefill.
        return bool(self._loads or self._sends or self._push_finished)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        tracked = self._tracked.pop(request.request_id, None)
        self._store_matches.pop(request.request_id, None)
        self._store_inflight.pop(request.request_id, None)
        self._store_failed.discard(request.request_id)
        self._store_loads.pop(request.request_id, None)
        params = request.kv_transfer_params
        if not params:
            return False, None
        if params.get(PROBE_KEY):
            return False, {ENDPOINT_KEY: self._endpoints()}
        if _remote_tokens(request) is not None:
            # Finished (aborted) before its blocks were allocated: release the prefill's.
            self._loads[request.request_id] = LoadSpec(
                list(params.get(HANDOFF_KEY, [])),
                [],
                (0, 0),
                notice_only=True,
                push=params.get(PUSH_KEY),
            )
            params["do_remote_prefill"] = False
            return False, None
        if not params.get("do_remote_decode"):
            return False, None
        finished_ok = request.status in (
            RequestStatus.FINISHED_LENGTH_CAPPED,
            RequestStatus.FINISHED_STOPPED,
        )
        if tracked is not None and tracked.transfer_id is not None:
            # Push mode: the worker holds the blocks until its writes landed (or failed).
            if not block_ids:
                return False, None
            ok = finished_ok and not tracked.preempted
            self._push_finished[request.request_id] = (self.config.send_timeout_s, ok)
            return True, None
        if not finished_ok:
            return False, None
        if not block_ids or not self._handshakes:
            if not self._handshakes:
                logger.warning("no worker handshake yet; %s is not handed off", request)
            return False, None
        num_tokens = min(request.num_computed_tokens, request.num_prompt_tokens)
        # The worker's hold starts when it sees the send, after this: no earlier than this.
        expires_at = time.time() + self.config.send_timeout_s
        handoffs = [
            PdHandoff(
                request_id=request.request_id,
                engine_name=hs.engine_name,
                descriptor=hs.descriptor,
                layout=hs.layout,
                block_ids=tuple(block_ids),
                num_tokens=num_tokens,
                expires_at=expires_at,
            ).to_params()
            for _, hs in sorted(self._handshakes.items())
        ]
        self._sends[request.request_id] = self.config.send_timeout_s
        return True, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            HANDOFF_KEY: handoffs,
        }

    def _endpoints(self) -> list[dict[str, Any]]:
        """This instance's push endpoints, one per tensor-parallel rank."""
        return [
            PushEndpoint(hs.engine_name, hs.descriptor).to_params()
            for _, hs in sorted(self._handshakes.items())
        ]

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        tensors = list(kv_caches.values())
        num_blocks = getattr(self._kv_cache_config, "num_blocks", None)
        backend, self._layout = kv_cache_layout(
            tensors, self._vllm_config.cache_config.block_size, num_blocks
        )
        self._on_device = tensors[0].device.type == "cuda"
        self._layer_index = {name: i for i, name in enumerate(kv_caches)}
        self._tp_rank = _tp_rank()
        name = f"vllm-{self.engine_id}-tp{self._tp_rank}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._engine = TransferEngine(
            name, transports=self.config.transports, listen_host=self.config.listen_host
        )
        self._engine.register_layout(self._layout)
        self._peers = PeerPool(self._engine)
        self._puller = PdPuller(self._engine, self._layout, self._peers)
        self._ledger = PdSendLedger()
        self._pusher = PdPusher(self._engine, self._layout, self._peers)
        self._receiver = PdPushReceiver(self._engine, self._layout, self._peers)
        pusher = self._pusher
        self._notices = NoticeReader(self._engine, lambda note: pusher.prepare(note.message))
        if self._stack is not None:
            self._offloader = BlockOffloader(self._layout, self._stack)
            self._store_pool = ThreadPoolExecutor(1, thread_name_prefix="llumnix-store-load")
        logger.info(
            "registered %s cache: %d layers, %d blocks of %d tokens as %s",
            backend,
            self._layout.num_layers,
            self._layout.num_blocks,
            self._layout.block_tokens,
            name,
        )

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        if self._engine is None or self._layout is None:
            return None
        return LlumnixHandshake(
            self._engine.name, self._engine.descriptor(), layout_to_dict(self._layout)
        )

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Before the step's forward (vLLM calls ``start_load_kv`` after it when no load is
        synchronous): push mode learns the step's requests here, so each layer's tokens can
        go out from ``save_kv_layer``."""
        super().bind_connector_metadata(connector_metadata)
        if self._pusher is None or not isinstance(connector_metadata, LlumnixConnectorMetadata):
            return
        self._take_notices()
        for request_id, (seconds, ok) in connector_metadata.push_finished.items():
            self._pusher.finish(request_id, seconds, ok=ok)
        for request_id, step in connector_metadata.push_steps.items():
            self._pusher.track(request_id, step.transfer_id, step.block_ids, step.computed)
        self._pusher.begin_step()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, LlumnixConnectorMetadata)
        for request_id, store_load in meta.store_loads.items():
            self._start_store_load(request_id, store_load)
        if self._engine is None:
            return
        self._take_notices()
        assert self._ledger and self._puller and self._pusher and self._receiver
        now = time.monotonic()
        for request_id, seconds in meta.sends.items():
            self._ledger.hold(request_id, seconds)
        for request_id, spec in meta.loads.items():
            deadline = now + self.config.load_timeout_s
            if spec.notice_only:
                self._send_free_notice(spec)
                continue
            if spec.store is not None:
                self._start_store_load(request_id, spec.store)
            self._parts[request_id] = self._parts.get(request_id, 0) + 1
            if spec.push is not None:
                endpoints = spec.push["prefill"]
                self._receiver.expect(
                    request_id,
                    str(spec.push["transfer_id"]),
                    PushEndpoint.from_params(endpoints[self._tp_rank % len(endpoints)]),
                    spec.local_blocks,
                    spec.tokens,
                    deadline,
                )
                continue
            handoff = PdHandoff.from_params(spec.handoffs[self._tp_rank % len(spec.handoffs)])
            job = LoadJob(
                request_id=request_id,
                handoff=handoff,
                local_blocks=spec.local_blocks,
                tokens=spec.tokens,
                deadline=load_deadline(handoff, self.config.load_timeout_s, now),
            )
            self._puller.start(job)

    def _send_free_notice(self, spec: LoadSpec) -> None:
        """Tells the prefill a request will not load (aborted, or all of it cached here), so
        it frees the blocks it holds. Sent from a background thread: the engine may stop
        stepping right after (nothing here waits for it)."""
        assert self._peers is not None
        timeout = self.config.load_timeout_s
        if spec.push is not None:
            endpoints = spec.push["prefill"]
            endpoint = PushEndpoint.from_params(endpoints[self._tp_rank % len(endpoints)])
            message = abort_notice(str(spec.push["transfer_id"]))
            self._peers.notify(endpoint.engine_name, endpoint.descriptor, message, timeout)
            return
        handoff = PdHandoff.from_params(spec.handoffs[self._tp_rank % len(spec.handoffs)])
        message = read_notice(handoff.request_id)
        self._peers.notify(handoff.engine_name, handoff.descriptor, message, timeout)

    def _start_store_load(self, request_id: str, spec: StoreLoad) -> None:
        """Reads the chunks into the request's blocks on the store-load thread; the request
        waits (WAITING_FOR_REMOTE_KVS) until :meth:`get_finished` reports it."""
        offloader, pool = self._offloader, self._store_pool
        if offloader is None or pool is None:
            self._failed_blocks.update(spec.blocks)
            return
        timeout = self.config.load_store_timeout_s
        guard = LoadGuard()

        def load() -> tuple[list[int], float]:
            began = time.monotonic()
            failed = offloader.load(
                spec.blocks, spec.keys, timeout, tokens=spec.tokens, guard=guard
            )
            return failed, time.monotonic() - began

        # The load bounds its own reads by ``timeout``; the deadline also covers a tier that
        # does not return (or a queue of loads behind one): the engine never waits past it.
        deadline = time.monotonic() + timeout + STORE_LOAD_MARGIN_S
        self._store_jobs.append(_StoreJob(request_id, spec, pool.submit(load), deadline, guard))
        self._parts[request_id] = self._parts.get(request_id, 0) + 1

    def _finished_store_loads(self) -> list[str]:
        """Requests whose store load finished; records their stats and failed blocks."""
        done, running = [], []
        now = time.monotonic()
        for job in self._store_jobs:
            request_id, spec, future = job.request_id, job.spec, job.future
            if not future.done():
                if now <= job.deadline:
                    running.append(job)
                    continue
                job.guard.abandon()  # from here on it writes none of the blocks
                logger.warning("store load of %s passed its deadline; abandoned", request_id)
                failed, seconds = list(spec.blocks), 0.0
            else:
                try:
                    failed, seconds = future.result()
                except Exception as exc:  # a tier bug must not wedge the request
                    logger.warning("store load of %s failed: %s", request_id, exc)
                    failed, seconds = list(spec.blocks), 0.0
            self._failed_blocks.update(failed)
            loaded = len(spec.blocks) - len(failed)
            if loaded and self._offloader is not None:
                self._stats.record("store_load", seconds, loaded * self._offloader.chunk_bytes)
            if failed:
                self._stats.count("store_blocks_failed", len(failed))
            done.append(request_id)
        self._store_jobs = running
        return done

    def _part_done(self, request_id: str) -> bool:
        """One part (store load, PD load) of a request's load finished; True when it was the
        last."""
        left = self._parts.get(request_id, 1) - 1
        if left > 0:
            self._parts[request_id] = left
            return False
        self._parts.pop(request_id, None)
        return True

    def _take_notices(self) -> None:
        """Hands each notification to the part of the protocol it belongs to."""
        assert self._notices and self._ledger and self._pusher and self._receiver
        for note in self._notices.take():
            message = note.message
            if not (
                self._ledger.accept(message)
                or self._pusher.accept(message)
                or self._receiver.accept(message)
            ):
                logger.warning("unexpected notification from %s: %.60r", note.peer, message)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        # Push mode: this layer's KV of the step's tokens is in the cache now (the CPU
        # attention wrote it synchronously), so it can go while later layers compute.
        layer = self._layer_index.get(layer_name)
        if self._pusher is None or layer is None or not self._pusher.stepping:
            return
        if self._on_device:
            # The attention kernels run asynchronously: the layer's KV is in the cache once
            # the current stream got there.
            torch.cuda.current_stream().synchronize()
        self._pusher.on_layer(layer)

    def wait_for_save(self) -> None:
        if self._pusher is not None:
            self._pusher.end_step()
        if self._offloader is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, LlumnixConnectorMetadata)
        for spec in meta.store_saves.values():
            # The forward that computed these blocks has run; the request holds them until
            # the scheduler sees this step's output.
            self._offloader.save(spec.blocks, spec.keys)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._engine is None:
            return None, None
        self._take_notices()
        assert self._ledger and self._puller and self._pusher and self._receiver
        sending = set(self._ledger.poll()) | set(self._pusher.poll())
        finished = self._finished_store_loads()
        for outcome in self._puller.poll() + self._receiver.poll():
            finished.append(outcome.request_id)
            self._failed_blocks.update(outcome.failed_blocks)
        recving = {request_id for request_id in finished if self._part_done(request_id)}
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def get_kv_connector_stats(self) -> LlumnixKVConnectorStats | None:
        """Transfers finished since the last call (vLLM calls it after every step)."""
        stats, self._stats = self._stats, LlumnixKVConnectorStats()
        parts = (
            ("load", self._puller),
            ("load", self._receiver),
            ("push", self._pusher),
        )
        for kind, part in parts:
            if part is not None:
                for seconds, nbytes in part.durations:
                    stats.record(kind, seconds, nbytes)
                part.durations.clear()
        failed = self._totals()
        for event, total in failed.items():
            stats.count(event, total - self._reported.get(event, 0))
        self._reported = failed
        gauges = self._gauges()
        if gauges != self._reported_gauges:
            stats.set_gauges(self._tp_rank, gauges)
            self._reported_gauges = gauges
        return None if stats.is_empty() else stats

    def _gauges(self) -> dict[str, int]:
        counters = self.counters()
        return {
            "loads_pending": counters["loads_pending"] + len(self._store_jobs),
            "holds_pending": counters["holds_pending"],
            "peers": self._peers.connected if self._peers is not None else 0,
            "registrations": self._engine.num_registrations() if self._engine else 0,
        }

    def _totals(self) -> dict[str, int]:
        puller, receiver, pusher, ledger = self._puller, self._receiver, self._pusher, self._ledger
        return {
            "failed_loads": (puller.loads_failed if puller else 0)
            + (receiver.loads_failed if receiver else 0),
            "failed_pushes": pusher.pushes_failed if pusher else 0,
            "expired_holds": (ledger.holds_expired if ledger else 0)
            + (pusher.holds_expired if pusher else 0),
        }

    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> LlumnixKVConnectorStats | None:
        return LlumnixKVConnectorStats(data=dict(data or {}))  # empty: a fresh one

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> LlumnixPromMetrics:
        return LlumnixPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._store_pool is not None:
            self._store_pool.shutdown(wait=True)  # each load is bounded by its timeout
        if self._notices is not None:
            self._notices.close()
        if self._peers is not None:
            self._peers.close()
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._stack is not None:
            release_stack(self._stack)  # the last user flushes and closes the tiers
            self._stack, self._offloader = None, None

    def flush_store(self, timeout: float) -> bool:
        """Waits until every save to the store tiers finished (or ``timeout``); True when
        none is left (also without a store)."""
        return self._stack.flush(timeout) if self._stack is not None else True

    def counters(self) -> dict[str, int]:
        """Worker-side totals since start (loads, tokens loaded, holds released)."""
        puller, ledger, pusher, receiver = self._puller, self._ledger, self._pusher, self._receiver
        store = self._offloader.stats() if self._offloader is not None else {}
        pd = (puller, receiver)
        return store | {
            "loads_done": sum(p.loads_done for p in pd if p),
            "loads_failed": sum(p.loads_failed for p in pd if p),
            "tokens_loaded": sum(p.tokens_loaded for p in pd if p),
            "loads_pending": sum(p.pending for p in pd if p),
            "reads_noticed": ledger.reads_noticed if ledger else 0,
            "holds_expired": (ledger.holds_expired if ledger else 0)
            + (pusher.holds_expired if pusher else 0),
            "holds_pending": (ledger.pending if ledger else 0) + (pusher.pending if pusher else 0),
            "pushes_done": pusher.pushes_done if pusher else 0,
            "pushes_failed": pusher.pushes_failed if pusher else 0,
            "push_layer_batches": pusher.layer_batches if pusher else 0,
            "bytes_pushed": pusher.bytes_pushed if pusher else 0,
        }


def _remote_tokens(request: Request) -> int | None:
    """Prompt tokens the prefill computed, for a request that still has to load them; None
    for any other request, or when its hand-off is malformed (it is then prefilled here)."""
    params = request.kv_transfer_params
    if not params or not params.get("do_remote_prefill"):
        return None
    push = params.get(PUSH_KEY)
    if push is not None:
        # Push mode: the prefill computes the whole prompt and writes it here.
        try:
            if not push["prefill"] or not str(push["transfer_id"]):
                raise ValueError("no prefill endpoint or transfer id")
            [PushEndpoint.from_params(e) for e in push["prefill"]]
        except (KvError, KeyError, TypeError, ValueError) as exc:
            logger.warning("ignoring the malformed push params of %s: %s", request.request_id, exc)
            params["do_remote_prefill"] = False
            return None
        return int(request.num_prompt_tokens)
    if HANDOFF_KEY not in params:
        return None
    try:
        handoffs = [PdHandoff.from_params(h) for h in params[HANDOFF_KEY]]
    except (KvError, TypeError) as exc:
        logger.warning("ignoring the malformed hand-off of %s: %s", request.request_id, exc)
        params["do_remote_prefill"] = False
        return None
    if not handoffs:
        return None
    return handoffs[0].num_tokens


def _default_namespace(vllm_config: VllmConfig) -> str:
    """Model, dtypes, block size and tensor-parallel size: what makes chunks comparable."""
    model, cache = vllm_config.model_config, vllm_config.cache_config
    return (
        f"{model.model}|{model.dtype}|{cache.cache_dtype}|bs{cache.block_size}"
        f"|tp{vllm_config.parallel_config.tensor_parallel_size}"
    )


def _tp_rank() -> int:
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    try:
        return int(get_tensor_model_parallel_rank())
    except (AssertionError, RuntimeError):
        return 0
