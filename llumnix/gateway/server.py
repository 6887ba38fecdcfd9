"""The gateway: an OpenAI-compatible HTTP front that places every request with the Llumnix
scheduler on live load and forwards it to the chosen engine instance.

Instances come from the meta store (re-read every ``refresh_s``). The gateway subscribes to
each llumlet's pushed reports (ZMQ, asyncio) and feeds every one to the scheduler
(:class:`~llumnix.scheduler.Scheduler`), so a dispatch sees the state after the instance's last
step plus what this gateway dispatched since (the in-flight ledger). An instance silent for
``suspect_after_s`` (its heartbeats stopped) whose ``/health`` then fails, or that failed a
request, gets no new work until it reports again; the ``staleness`` filter also drops
reports older than ``staleness_s``.

A request is forwarded with ``X-Request-Id: <gateway id>`` and its response streamed back as
it comes, with ``X-Llumnix-Instance: <instance id>`` added. Before any byte reached the
client, a failed instance (connection refused or reset, no answer) is skipped and the request
dispatched again elsewhere, up to ``max_attempts``; after that, a stream ends with an SSE
error event that says what failed. A client that disconnects cancels the handler, which
closes the upstream connection, which aborts the request in vLLM and frees its blocks. If the
scheduler fails or finds no eligible instance, the gateway falls back to round-robin over the
instances not known to be down, logged and counted (``llumnix_gateway_fallback_total``).

**Prefill-decode disaggregation.** Instances registered with the role ``prefill`` or
``decode`` form two pools, each placed by its own :class:`~llumnix.scheduler.Scheduler` (same
policy, stage ``PREFILL`` or ``DECODE``: a pool's load and in-flight ledger are its own). Once
any instance has a PD role, every request is split as the LlumnixConnector expects
(``pd_mode``):

- ``pull``: the prompt runs on a prefill instance with ``max_tokens=1`` and
  ``do_remote_decode``; its answer's ``kv_transfer_params`` (the hand-off) go with the
  original request to a decode instance, which reads the KV instead of computing it. A failed
  prefill instance is skipped like any other; one that rejects the request (4xx, e.g. a prompt
  too long) has its answer passed on as it is.
- ``push``: both requests go out at once, named by one transfer id; the prefill writes each
  layer's KV into the decode's blocks as soon as it is computed. The prefill's push endpoints
  come from a one-token probe, cached per instance until it fails. The prefill request runs
  in the background and is cancelled when the client's request ends before it.

A decode instance that fails before the first byte is replaced by another one (the hand-off
stays valid until its hold expires); if the KV cannot be read in time the decode recomputes
it (``kv_load_failure_policy: recompute``), so nothing waits without a deadline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import zmq
import zmq.asyncio
from aiohttp import web
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llumnix.gateway.migration import (
    LiveRequest,
    Migration,
    MigrationError,
    Outcome,
    sse,
    sse_lines,
    stage_prompt,
    why_not_migratable,
)
from llumnix.gateway.rescheduling import GatewayRescheduler, ReschedulingConfig
from llumnix.llumlet import LlumletClient
from llumnix.llumlet import llumlet_pb2 as pb
from llumnix.llumlet.status import to_instance_status
from llumnix.metastore import InstanceRecord, MetaStore, MetaStoreError
from llumnix.scheduler import (
    DispatchRequest,
    InstanceInfo,
    InstanceStatus,
    Scheduler,
    SchedulerConfig,
    Stage,
)
from llumnix_kv.proxy.pd_proxy import ENDPOINT_KEY, PROBE_KEY, PUSH_KEY, prefill_body

logger = logging.getLogger(__name__)

# The gateway's request ids, and how to find one in an engine's internal request id (vLLM
# makes "cmpl-<X-Request-Id>-<index>-<random>" of it).
_ID_PREFIX = "llx-"
_ID_IN_ENGINE_ID = re.compile(r"llx-[0-9a-f]{16}")
POLICY_ALIASES = {"llumnix": "load_balance"}
ROLES = ("neutral", "prefill", "decode")
PD_MODES = ("pull", "push")


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "llumnix"
    """A dispatch policy name (``llumnix`` = ``load_balance``, ``round_robin``, ...)."""
    staleness_s: float = 2.0
    """An instance whose last report is older is not dispatched to."""
    refresh_s: float = 1.0
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 600.0
    """Longest silence of an upstream response (between two chunks)."""
    max_attempts: int = 3
    suspect_after_s: float = 1.0
    """No report for this long (about four missed heartbeats): the instance's ``/health`` is
    checked (within ``health_timeout_s``); if it fails, the instance gets no new work until it
    reports again. A busy host can delay heartbeats; only a failed check marks it down."""
    health_timeout_s: float = 2.0
    api_key: str = ""
    """When set, clients must send ``Authorization: Bearer <api_key>``."""
    pd_mode: str = "pull"
    """How prefill and decode instances share a request's KV: ``pull`` or ``push``."""
    migration: bool = False
    """Relay migratable streams token by token so they can be live-migrated
    (:mod:`llumnix.gateway.migration`) and resumed elsewhere when their instance fails."""
    migration_max_stages: int = 3
    migration_last_stage_blocks: int = 2
    """Cut over once at most this many full blocks were added since the last stage."""
    migration_stage_timeout_s: float = 30.0
    migration_timeout_s: float = 120.0
    rescheduling: ReschedulingConfig | None = None
    """With ``migration``: the rescheduler's pairs become live migrations
    (:mod:`llumnix.gateway.rescheduling`); None: migrations only when asked for."""

    def __post_init__(self) -> None:
        if self.pd_mode not in PD_MODES:
            raise ValueError(f"pd_mode must be one of {PD_MODES}, not {self.pd_mode!r}")


class _Upstream(Exception):
    """An instance failed before the client got anything: try another."""


class _Answer(Exception):
    """A prefill instance's own answer to pass on to the client (it rejected the request)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    """The OpenAI error schema, as vLLM's server writes it."""
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def error_response(status: int, message: str, kind: str) -> web.Response:
    return web.json_response(error_body(status, message, kind), status=status)


def prompt_tokens(body: dict[str, Any], chat: bool) -> int:
    """The prompt's length in tokens: exact for token-id prompts, else estimated from text
    (about 4 characters a token; the gateway has no tokenizer)."""
    if chat:
        text = "".join(
            m.get("content", "") if isinstance(m.get("content"), str) else json.dumps(m)
            for m in body.get("messages", [])
            if isinstance(m, dict)
        )
        return len(text) // 4 + 1
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    if isinstance(prompt, list):
        return sum(len(p) if isinstance(p, list) else len(str(p)) // 4 + 1 for p in prompt)
    return len(str(prompt)) // 4 + 1


class Gateway:
    def __init__(self, store: MetaStore, config: GatewayConfig | None = None) -> None:
        self.store = store
        self.config = config or GatewayConfig()
        policy = POLICY_ALIASES.get(self.config.policy, self.config.policy)
        # One scheduler per role: PD pools are placed apart, each with its own load.
        self.schedulers = {
            role: Scheduler(
                SchedulerConfig(
                    policy=policy, policy_kwargs={"staleness_s": self.config.staleness_s}
                )
            )
            for role in ROLES
        }
        self._push_endpoints: dict[str, list[Any]] = {}  # prefill instance -> its endpoints
        self._prefills: set[asyncio.Task[Any]] = set()
        self.records: dict[str, InstanceRecord] = {}
        self._feeds: dict[str, asyncio.Task[None]] = {}
        self._down: set[str] = set()  # instances whose stream broke or that failed a request
        self._rr = itertools.count()
        self._session: aiohttp.ClientSession | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._zmq = zmq.asyncio.Context()
        self._open = 0
        self.live: dict[str, LiveRequest] = {}  # migratable streams being relayed
        self.moved_from: collections.Counter[str] = collections.Counter()  # migrations done
        self.rescheduler: GatewayRescheduler | None = None
        self._rescheduling: asyncio.Task[None] | None = None
        self.stop_instance: Callable[[str], Awaitable[None]] | None = None
        """Stops an instance's engine (set by ``llumnix serve``): ``drain`` with ``stop``."""
        reg = self.metrics_registry = CollectorRegistry()
        self.m_requests = Counter(
            "llumnix_gateway_requests", "Requests by outcome", ["outcome"], registry=reg
        )
        self.m_dispatch = Histogram(
            "llumnix_gateway_dispatch_seconds",
            "Time to choose an instance",
            buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1),
            registry=reg,
        )
        self.m_age = Histogram(
            "llumnix_gateway_status_age_seconds",
            "Age of the chosen instance's last report when a request was placed on it, by "
            "whether that report showed running requests (busy: it reports after each step) "
            "or none (idle: heartbeats only, its state unchanged)",
            ["state"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0),
            registry=reg,
        )
        self.m_fallback = Counter(
            "llumnix_gateway_fallback", "Round-robin fallbacks", ["reason"], registry=reg
        )
        self.m_redispatch = Counter(
            "llumnix_gateway_redispatch", "Requests sent again after an instance failed",
            registry=reg,
        )  # fmt: skip
        self.m_errors = Counter("llumnix_gateway_errors", "Errors by kind", ["kind"], registry=reg)
        self.m_open = Gauge("llumnix_gateway_open_requests", "Requests in progress", registry=reg)
        self.m_instance = Gauge(
            "llumnix_gateway_instance", "Last report of each instance", ["instance", "field"],
            registry=reg,
        )  # fmt: skip
        self.m_migrations = Counter(
            "llumnix_gateway_migrations", "Live migrations by outcome", ["outcome"], registry=reg
        )
        self.m_resumed = Counter(
            "llumnix_gateway_resumed", "Streams continued on another instance after theirs "
            "failed mid-stream", registry=reg,
        )  # fmt: skip
        self.m_downtime = Histogram(
            "llumnix_gateway_migration_downtime_seconds",
            "Gap between the source's last token and the destination's first, at the gateway",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
            registry=reg,
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self, app: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.config.connect_timeout_s,
                sock_read=self.config.read_timeout_s,
            )
        )
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_loop())
        if self.config.migration and self.config.rescheduling is not None:
            self.rescheduler = GatewayRescheduler(self, self.config.rescheduling)
            self._rescheduling = asyncio.create_task(self.rescheduler.run())

    async def close(self, app: web.Application) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self._rescheduling is not None:
            self._rescheduling.cancel()
        if self.rescheduler is not None:
            await self.rescheduler.close()
        for task in self._feeds.values():
            task.cancel()
        await asyncio.gather(*self._feeds.values(), return_exceptions=True)
        self._zmq.destroy(linger=0)  # closes any socket left, so it cannot block
        if self._session is not None:
            await self._session.close()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_s)
            await self.refresh()

    async def refresh(self) -> None:
        """Follows the meta store's instances: new ones are added and followed, gone ones
        forgotten. A meta store that does not answer keeps the last known set."""
        try:
            records = await asyncio.to_thread(self.store.instances)
        except MetaStoreError as exc:
            self.m_errors.labels("meta_store").inc()
            logger.warning("meta store: %s; keeping %d known instances", exc, len(self.records))
            return
        for iid in set(self.records) - set(records):
            logger.info("instance %s left", iid)
            self.scheduler_of(iid).remove_instance(iid)
            self.records.pop(iid)
            self._push_endpoints.pop(iid, None)
            task = self._feeds.pop(iid, None)
            if task is not None:
                task.cancel()
        for iid, record in records.items():
            if record.role not in ROLES:
                logger.warning("instance %s has an unknown role %r: ignored", iid, record.role)
                continue
            if self.records.get(iid) == record:
                continue
            old_record = self.records.get(iid)
            if old_record is not None and old_record.role != record.role:
                self.scheduler_of(iid).remove_instance(iid)
            self._push_endpoints.pop(iid, None)
            self.records[iid] = record
            info = InstanceInfo(iid, record.num_blocks, record.block_size, record.failure_domain)
            # Unknown load until its first report: not schedulable by the policy (the
            # round-robin fallback may still use it).
            self.scheduler_of(iid).add_instance(
                info, InstanceStatus(iid, num_total_blocks=record.num_blocks, schedulable=False)
            )
            if record.reports:
                old = self._feeds.pop(iid, None)
                if old is not None:
                    old.cancel()
                self._feeds[iid] = asyncio.create_task(self._follow(record))

    async def _follow(self, record: InstanceRecord) -> None:
        """Feeds an instance's pushed reports to the scheduler. Silence longer than
        ``suspect_after_s`` (heartbeats stopped) marks it down until the next report; ZMQ
        reconnects by itself."""
        sock = self._zmq.socket(zmq.SUB)
        sock.setsockopt(zmq.CONFLATE, 1)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.setsockopt(zmq.LINGER, 0)
        try:
            try:
                sock.connect(f"tcp://{record.reports}")
            except zmq.ZMQError as exc:
                self.m_errors.labels("bad_report_address").inc()
                logger.error("instance %s: bad report address %r: %s", record.instance_id,
                             record.reports, exc)  # fmt: skip
                return
            while True:
                if not await sock.poll(int(self.config.suspect_after_s * 1000)):
                    self.m_errors.labels("silent_instance").inc()
                    if not await self._answers_health(record):
                        if record.instance_id not in self._down:
                            logger.warning("no report from %s and its health check failed: "
                                           "suspect", record.instance_id)  # fmt: skip
                        self._suspect(record.instance_id)
                    continue
                data = await sock.recv()
                try:
                    report = pb.Status.FromString(data)
                except DecodeError:
                    self.m_errors.labels("bad_report").inc()
                    continue
                self.on_status(record.instance_id, report)
        finally:
            sock.close(linger=0)

    async def _answers_health(self, record: InstanceRecord) -> bool:
        """Whether the instance's ``/health`` answers 200 within ``health_timeout_s``."""
        if self._session is None:
            return False
        timeout = aiohttp.ClientTimeout(total=self.config.health_timeout_s)
        try:
            async with self._session.get(record.url + "/health", timeout=timeout) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    def scheduler_of(self, instance_id: str) -> Scheduler:
        """The scheduler of the instance's pool (its role)."""
        return self.schedulers[self.records[instance_id].role]

    @property
    def disaggregated(self) -> bool:
        """Whether requests are split into a prefill and a decode (some instance has a PD
        role)."""
        return any(r.role != "neutral" for r in self.records.values())

    def on_status(self, instance_id: str, report: pb.Status) -> None:
        if instance_id not in self.records:
            return
        scheduler = self.scheduler_of(instance_id)
        if instance_id not in scheduler.view:
            return
        status = to_instance_status(report)
        status.request_ids = frozenset(
            m.group(0) for r in report.requests if (m := _ID_IN_ENGINE_ID.search(r.request_id))
        )
        scheduler.on_status(status)
        self._down.discard(instance_id)

    def is_down(self, instance_id: str) -> bool:
        """Whether the instance is known to be down (silent and failing its health check, or
        it failed a request) until it reports again."""
        return instance_id in self._down

    def _suspect(self, instance_id: str) -> None:
        """The instance may be down: no new work until it reports again."""
        self._down.add(instance_id)
        self._push_endpoints.pop(instance_id, None)
        if instance_id not in self.records:
            return
        view = self.scheduler_of(instance_id).view
        status = view.statuses.get(instance_id)
        if status is not None and status.schedulable:
            view.update(replace(status, schedulable=False, metric_cache={}))

    # ------------------------------------------------------------------ dispatch

    def choose(self, r: DispatchRequest, exclude: set[str], role: str = "neutral") -> str | None:
        """An instance of ``role`` for ``r``, none of ``exclude``: the scheduler's choice, else
        round-robin over those not known to be down; None if there is none."""
        began = time.perf_counter()
        target = None
        scheduler = self.schedulers[role]
        try:
            target = scheduler.dispatch(r, time.time())
        except Exception:  # a broken policy must not stop serving
            logger.exception("scheduler failed; falling back to round-robin")
            self.m_fallback.labels("scheduler_error").inc()
        self.m_dispatch.observe(time.perf_counter() - began)
        if target is not None and target not in exclude:
            chosen = scheduler.view.statuses[target]
            state = "busy" if chosen.num_running else "idle"
            self.m_age.labels(state).observe(time.time() - chosen.timestamp)
            return target
        if target is not None:
            scheduler.ledger.discard(target, r.request_id)
        live = [
            i
            for i, rec in self.records.items()
            if rec.role == role and i not in exclude and i not in self._down
        ]
        if not live:
            return None
        self.m_fallback.labels("no_eligible_instance").inc()
        logger.info("no eligible %s instance for %s by the policy: round-robin", role, r.request_id)
        return live[next(self._rr) % len(live)]

    async def _attempts(
        self,
        role: str,
        r: DispatchRequest,
        tried: set[str],
        call: Callable[[str], Awaitable[Any]],
    ) -> tuple[str, Any] | None:
        """Calls ``call(instance)`` on instances of ``role`` the scheduler chooses until one
        does not raise :class:`_Upstream` (at most ``max_attempts``); returns (instance,
        result), or None when every try failed or no instance was left."""
        for attempt in range(self.config.max_attempts):
            target = self.choose(r, tried, role)
            if target is None:
                return None
            if attempt:
                self.m_redispatch.inc()
            tried.add(target)
            try:
                return target, await call(target)
            except _Upstream as exc:
                logger.warning("%s on %s: %s", r.request_id, target, exc)
                self.m_errors.labels("upstream").inc()
                self._suspect(target)
            finally:
                self.schedulers[role].ledger.discard(target, r.request_id)
        return None

    # ------------------------------------------------------------------ HTTP

    def _authorized(self, request: web.Request) -> bool:
        key = self.config.api_key
        return not key or request.headers.get("Authorization") == f"Bearer {key}"

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "/v1/completions", chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "/v1/chat/completions", chat=True)

    async def _handle(self, request: web.Request, path: str, chat: bool) -> web.StreamResponse:
        if not self._authorized(request):
            return error_response(401, "missing or wrong API key", "AuthenticationError")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self.m_requests.labels("bad_request").inc()
            return error_response(400, f"request body is not JSON: {exc}", "Bad Request")
        if not isinstance(body, dict):
            self.m_requests.labels("bad_request").inc()
            return error_response(400, "request body must be a JSON object", "Bad Request")
        rid = _ID_PREFIX + uuid.uuid4().hex[:16]
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 0
        r = DispatchRequest(
            rid,
            prompt_tokens(body, chat),
            expected_output_tokens=max_tokens if isinstance(max_tokens, int) else 0,
        )
        self._open += 1
        self.m_open.set(self._open)
        try:
            if self.disaggregated:
                return await self._handle_pd(request, path, body, chat, r)
            tried: set[str] = set()
            if self.config.migration and why_not_migratable(body, chat) is None:
                done = await self._attempts(
                    "neutral", r, tried, lambda t: self._relay(request, t, path, body, rid, chat)
                )
            else:
                done = await self._attempts(
                    "neutral", r, tried, lambda t: self._forward(request, t, path, body, rid)
                )
            return self._finish(done, tried, "")
        finally:
            self._open -= 1
            self.m_open.set(self._open)

    def _finish(
        self, done: tuple[str, Any] | None, tried: set[str], what: str
    ) -> web.StreamResponse:
        if done is not None:
            self.m_requests.labels("forwarded").inc()
            response: web.StreamResponse = done[1]
            return response
        self.m_requests.labels("unavailable").inc()
        which = f"after trying {sorted(tried)}" if tried else "none is registered and up"
        return error_response(
            503, f"no {what}engine instance could serve it ({which})", "ServiceUnavailable"
        )

    async def _handle_pd(
        self, request: web.Request, path: str, body: dict[str, Any], chat: bool, r: DispatchRequest
    ) -> web.StreamResponse:
        rid = r.request_id
        if body.get("n", 1) not in (1, None):
            self.m_requests.labels("bad_request").inc()
            return error_response(400, "only n=1 is supported with PD", "BadRequestError")
        prompt = body.get("prompt")
        batched = isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], list | str)
        if not chat and batched:
            self.m_requests.labels("bad_request").inc()
            return error_response(
                400, "batched prompts are not supported with PD", "BadRequestError"
            )
        tried_p: set[str] = set()
        rp = replace(r, stage=Stage.PREFILL)
        task: asyncio.Task[Any] | None = None
        try:
            if self.config.pd_mode == "pull":
                try:
                    got = await self._attempts(
                        "prefill", rp, tried_p, lambda p: self._prefill(p, path, body, chat, rid)
                    )
                except _Answer as answer:
                    self.m_requests.labels("rejected").inc()
                    return answer.response
                if got is None:
                    return self._finish(None, tried_p, "prefill ")
                kv = got[1]
            else:
                got = await self._attempts(
                    "prefill", rp, tried_p, lambda p: self._endpoints(p, body.get("model"))
                )
                if got is None:
                    return self._finish(None, tried_p, "prefill ")
                prefill, endpoints = got
                transfer = uuid.uuid4().hex
                p_body = prefill_body(
                    body, chat, {"do_remote_decode": True, PUSH_KEY: {"transfer_id": transfer}}
                )
                task = asyncio.create_task(self._post_prefill(prefill, path, p_body, rid))
                kv = {
                    "do_remote_prefill": True,
                    PUSH_KEY: {"transfer_id": transfer, "prefill": endpoints},
                }
            decode_body = dict(body)
            if kv is None:
                decode_body.pop("kv_transfer_params", None)
            else:
                decode_body["kv_transfer_params"] = kv
            tried_d: set[str] = set()
            done = await self._attempts(
                "decode",
                replace(r, stage=Stage.DECODE),
                tried_d,
                lambda d: self._forward(request, d, path, decode_body, rid),
            )
            return self._finish(done, tried_d, "decode ")
        finally:
            if task is not None and not task.done():
                task.cancel()

    async def _prefill(
        self, target: str, path: str, body: dict[str, Any], chat: bool, rid: str
    ) -> dict[str, Any] | None:
        """Pull mode: runs the prompt on ``target``; returns its hand-off, or None when it
        returned none (the decode instance then computes the prompt)."""
        data = await self._post_prefill(target, path, prefill_body(body, chat), rid)
        try:
            params = json.loads(data).get("kv_transfer_params")
        except (ValueError, AttributeError) as exc:
            raise _Upstream(f"invalid JSON from the prefill: {exc}") from exc
        if not isinstance(params, dict):
            logger.warning(
                "prefill %s gave no hand-off for %s: the decode computes it", target, rid
            )
            return None
        return params

    async def _post_prefill(self, target: str, path: str, body: dict[str, Any], rid: str) -> bytes:
        """POSTs a prefill request; returns a 200 answer's body. A 4xx answer is the
        client's to see (:class:`_Answer`); anything else fails the instance."""
        assert self._session is not None
        headers = {"X-Request-Id": rid, "Content-Type": "application/json"}
        try:
            async with self._session.post(
                self.records[target].url + path, json=body, headers=headers
            ) as resp:
                data = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise _Upstream(f"prefill {type(exc).__name__}: {exc}") from exc
        if resp.status == 200:
            return data
        if 400 <= resp.status < 500:
            raise _Answer(
                web.Response(
                    status=resp.status,
                    body=data,
                    content_type="application/json",
                    headers={"X-Request-Id": rid, "X-Llumnix-Instance": target},
                )
            )
        raise _Upstream(f"prefill answered HTTP {resp.status}: {data[:200]!r}")

    async def _endpoints(self, target: str, model: Any) -> list[Any]:
        """Push mode: the prefill instance's push endpoints, from a one-token probe (cached
        until the instance fails or re-registers)."""
        cached = self._push_endpoints.get(target)
        if cached:
            return cached
        probe = {
            "model": model,
            "prompt": [0],
            "max_tokens": 1,
            "kv_transfer_params": {PROBE_KEY: True},
        }
        try:
            data = await self._post_prefill(target, "/v1/completions", probe, "probe")
            endpoints = json.loads(data)["kv_transfer_params"][ENDPOINT_KEY]
        except _Answer as exc:
            raise _Upstream(f"the push probe was rejected: HTTP {exc.response.status}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise _Upstream(
                "no push endpoint in the probe's answer (is it LlumnixConnector?)"
            ) from exc
        if not isinstance(endpoints, list) or not endpoints:
            raise _Upstream("the prefill has no push endpoint yet")
        self._push_endpoints[target] = endpoints
        return endpoints

    async def _forward(
        self, request: web.Request, target: str, path: str, body: dict[str, Any], rid: str
    ) -> web.StreamResponse:
        upstream = await self._post(target, path, body, rid)
        async with upstream:
            if upstream.status != 200 or not body.get("stream"):
                return await self._whole_answer(upstream, target, rid)
            response = web.StreamResponse(
                status=200,
                headers={
                    "Content-Type": upstream.headers.get("Content-Type", "text/event-stream"),
                    "Cache-Control": "no-cache",
                    "X-Request-Id": rid,
                    "X-Llumnix-Instance": target,
                },
            )
            first = True
            try:
                async for chunk in upstream.content.iter_any():
                    if first:
                        await response.prepare(request)
                        first = False
                    await response.write(chunk)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                if first:
                    raise _Upstream(f"{type(exc).__name__} before the first chunk: {exc}") from exc
                self.m_errors.labels("upstream_mid_stream").inc()
                self._suspect(target)
                event = error_body(
                    502, f"instance {target} failed mid-stream: {exc}", "upstream_error"
                )
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await response.write(f"data: {json.dumps(event)}\n\n".encode())
                    await response.write(b"data: [DONE]\n\n")
            if first:
                raise _Upstream("the stream ended before its first chunk")
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write_eof()
            return response

    # ------------------------------------------------------------------ live streams

    async def _relay(
        self, request: web.Request, target: str, path: str, body: dict[str, Any], rid: str,
        chat: bool,
    ) -> web.StreamResponse:  # fmt: skip
        """A migratable stream, relayed event by event (:mod:`llumnix.gateway.migration`):
        it can be cut over to another instance at a token boundary, and continues elsewhere
        when its instance fails mid-stream."""
        live = LiveRequest(rid, body, chat, target)
        prompt = body.get("prompt")
        if not chat and isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            live.prompt_ids = list(prompt)
        upstream = await self._post(target, path, live.upstream_body(), rid)
        if upstream.status != 200:
            async with upstream:
                return await self._whole_answer(upstream, target, rid)
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Request-Id": rid,
                "X-Llumnix-Instance": target,
            },
        )
        self.live[rid] = live
        try:
            outcome = await self._pump(live, upstream, response, request)
            while outcome != "done":
                upstream.close()
                if outcome == "broken" and not response.prepared:
                    raise _Upstream("the stream ended before its first event")
                resumed = await self._resume(live, outcome)
                if resumed is None:
                    self._settle(live, Outcome.FAILED, "no instance could continue the request")
                    event = error_body(
                        502, f"no instance could continue the request after {live.instance}",
                        "upstream_error",
                    )  # fmt: skip
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await response.write(sse(event) + b"data: [DONE]\n\n")
                    break
                upstream = resumed
                outcome = await self._pump(live, upstream, response, request)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write_eof()
            return response
        finally:
            upstream.close()
            self.live.pop(rid, None)
            self._settle(live, Outcome.CANCELLED, "the request ended before the cut")

    async def _post(
        self, target: str, path: str, body: dict[str, Any], rid: str
    ) -> aiohttp.ClientResponse:
        assert self._session is not None
        headers = {"X-Request-Id": rid, "Content-Type": "application/json"}
        try:
            return await self._session.post(self.records[target].url + path, json=body,
                                            headers=headers)  # fmt: skip
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, KeyError) as exc:
            raise _Upstream(f"{type(exc).__name__}: {exc}") from exc

    async def _whole_answer(
        self, upstream: aiohttp.ClientResponse, target: str, rid: str
    ) -> web.Response:
        """An upstream answer read whole and passed on as it is (an error, or an answer that
        is not streamed)."""
        try:
            data = await upstream.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise _Upstream(f"{type(exc).__name__} reading the answer: {exc}") from exc
        return web.Response(
            status=upstream.status,
            body=data,
            headers={
                "Content-Type": upstream.headers.get("Content-Type", "application/json"),
                "X-Request-Id": rid,
                "X-Llumnix-Instance": target,
            },
        )

    async def _pump(
        self,
        live: LiveRequest,
        upstream: aiohttp.ClientResponse,
        response: web.StreamResponse,
        request: web.Request,
    ) -> str:
        """Relays one instance's events: ``done`` once ``[DONE]`` is relayed, ``cut`` when a
        migration asked to switch (right after a token event), ``broken`` when the stream
        failed or ended early."""
        try:
            async for line in sse_lines(upstream.content):
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if not response.prepared:
                    await response.prepare(request)
                if data == b"[DONE]":
                    await response.write(b"data: [DONE]\n\n")
                    return "done"
                try:
                    chunk = json.loads(data)
                except ValueError:
                    self.m_errors.labels("bad_event").inc()
                    continue
                out = live.absorb(chunk)
                if out is not None:
                    await response.write(sse(out))
                mig = live.migration
                if mig is None:
                    continue
                if mig.resumed:
                    self._commit(live, mig)
                elif mig.cut.is_set() and not live.finished:
                    return "cut"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            logger.warning("%s: stream from %s broke: %s", live.request_id, live.instance, exc)
        return "broken"  # ended early; a partial last line is never relayed

    def _commit(self, live: LiveRequest, mig: Migration) -> None:
        """The first event after a cut was relayed: done if it came from the destination,
        rolled back if from the source."""
        if live.instance == mig.destination:
            mig.downtime_s = time.monotonic() - mig.cut_token_at
            self.m_downtime.observe(mig.downtime_s)
            live.migrations += 1
            self.moved_from[mig.source] += 1
            self._settle(live, Outcome.DONE, "")
        else:
            self._settle(live, Outcome.ROLLED_BACK, mig.reason or "the destination failed")

    def _settle(self, live: LiveRequest, outcome: Outcome, reason: str) -> None:
        mig = live.migration
        if mig is None:
            return
        live.migration = None
        mig.state, mig.reason = outcome.value, mig.reason or reason
        self.m_migrations.labels(outcome.value).inc()
        if mig.result is not None and not mig.result.done():
            mig.result.set_result(outcome)

    async def _resume(self, live: LiveRequest, why: str) -> aiohttp.ClientResponse | None:
        """Continues the request on another instance: after a cut the destination, else (it
        failed) the source; after a failure the migration's destination if any, else the
        scheduler's choice. Returns the new stream, or None when no instance took it."""
        mig = live.migration
        failed = live.instance
        if why == "cut":
            assert mig is not None
            mig.cut_token_at = live.last_token_at
            mig.cut_after_tokens = len(live.output_ids)
            preferred = [mig.destination, failed]
        else:
            self.m_errors.labels("upstream_mid_stream").inc()
            self._suspect(failed)
            preferred = [mig.destination] if mig is not None else []
            if mig is not None:
                mig.reason = f"the source {failed} failed"
        if live.prompt_ids is None:
            return None  # nothing to continue from (no event yet: cannot happen mid-stream)
        tried = {failed} if why != "cut" else set()
        r = DispatchRequest(live.request_id, len(live.tokens))
        for _ in range(self.config.max_attempts + len(preferred)):
            target = preferred.pop(0) if preferred else self.choose(r, tried)
            if target is None:
                return None
            if target in tried:
                continue
            tried.add(target)
            try:
                upstream = await self._post(target, "/v1/completions", live.continuation(),
                                            f"{live.request_id}-r{live.segment + 1}")  # fmt: skip
            except _Upstream as exc:
                logger.warning("%s: resuming on %s: %s", live.request_id, target, exc)
                self._suspect(target)
                continue
            finally:
                self.schedulers["neutral"].ledger.discard(target, live.request_id)
            if upstream.status != 200:
                text = await upstream.text()
                upstream.close()
                logger.warning("%s: %s refused the continuation: HTTP %d %s", live.request_id,
                               target, upstream.status, text[:200])  # fmt: skip
                continue
            if why != "cut":
                self.m_resumed.inc()
            if mig is not None:
                mig.resumed = True  # its next event commits (or rolls back) the migration
            live.begin_segment(target)
            logger.info("%s continues on %s after %d tokens (%s)", live.request_id, target,
                        len(live.output_ids), why)  # fmt: skip
            return upstream
        return None

    # ------------------------------------------------------------------ migration

    async def migrate(
        self, request_id: str, destination: str, max_stages: int | None = None
    ) -> dict[str, Any]:
        """Live-migrates a relayed stream to ``destination``; returns the migration's summary
        once it is done, rolled back or cancelled. Raises :class:`MigrationError` when it
        cannot start. ``max_stages`` (at most the configured number) bounds the pre-copy
        stages; 0 moves no KV: the destination recomputes (the abort-and-recompute
        baseline)."""
        limit = self.config.migration_max_stages
        if max_stages is not None and not 0 <= max_stages <= limit:
            raise MigrationError(400, f"max_stages must be within 0..{limit}")
        live = self.live.get(request_id)
        if live is None:
            raise MigrationError(404, f"no migratable stream {request_id!r} in progress")
        if live.migration is not None:
            raise MigrationError(409, f"{request_id} is already being migrated")
        if live.finished or live.prompt_ids is None:
            raise MigrationError(409, f"{request_id} has finished or not started")
        record = self.records.get(destination)
        if record is None or destination in self._down:
            raise MigrationError(400, f"destination {destination!r} is not a live instance")
        if destination == live.instance:
            raise MigrationError(400, f"{request_id} already runs on {destination}")
        if record.role != "neutral" or self.records[live.instance].role != "neutral":
            raise MigrationError(400, "only requests between neutral instances migrate")
        mig = Migration(live.instance, destination, max_stages=limit if max_stages is None
                        else max_stages)  # fmt: skip
        mig.result = asyncio.get_running_loop().create_future()
        live.migration = mig
        try:
            await asyncio.wait_for(self._migrate(live, mig), self.config.migration_timeout_s)
        except asyncio.TimeoutError:
            if live.migration is mig and mig.state != "committing":
                self._settle(live, Outcome.ROLLED_BACK, "the migration's deadline passed")
        return mig.summary(request_id)

    async def _migrate(self, live: LiveRequest, mig: Migration) -> None:
        mig.state = "copying"
        block = self.records[mig.source].block_size
        copied = 0
        for _ in range(mig.max_stages):
            prompt = stage_prompt(live, block)
            if prompt is None or (len(prompt) - 1 - copied) // block <= (
                self.config.migration_last_stage_blocks
            ):
                break
            try:
                await asyncio.wait_for(self._stage(live, mig, prompt),
                                       self.config.migration_stage_timeout_s)  # fmt: skip
            except (_Upstream, _Answer, asyncio.TimeoutError, ValueError) as exc:
                what = exc.response.status if isinstance(exc, _Answer) else exc
                self._settle(live, Outcome.ROLLED_BACK, f"stage {mig.stages + 1} failed: {what}")
                return
            if live.migration is not mig:
                return  # the request ended meanwhile
            copied = len(prompt) - 1
            mig.stages, mig.copied_tokens = mig.stages + 1, copied
        if live.migration is not mig or live.finished:
            self._settle(live, Outcome.CANCELLED, "the request finished on the source")
            return
        mig.state = "committing"
        mig.cut.set()
        assert mig.result is not None
        await mig.result

    async def _stage(self, live: LiveRequest, mig: Migration, prompt: list[int]) -> None:
        """One pre-copy stage: the source hands off the KV of ``prompt[:-1]`` (a one-token
        request hitting its own cache), the destination reads what it lacks of it."""
        rid = f"{live.request_id}-m{live.migrations}s{mig.stages + 1}"
        base: dict[str, Any] = {k: live.body[k] for k in ("model", "cache_salt") if k in live.body}
        one: dict[str, Any] = {
            **base,
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0.0,
            "stream": False,
        }
        send = {**one, "kv_transfer_params": {"do_remote_decode": True}}
        data = await self._post_prefill(mig.source, "/v1/completions", send, rid)
        handoff = json.loads(data).get("kv_transfer_params")
        if not isinstance(handoff, dict):
            raise _Upstream(f"the source {mig.source} handed off no KV")
        await self._post_prefill(mig.destination, "/v1/completions",
                                 {**one, "kv_transfer_params": handoff}, rid)  # fmt: skip

    async def migrate_endpoint(self, request: web.Request) -> web.Response:
        """``POST /v1/llumnix/migrate {"request_id": ..., "destination": ...}`` (optional
        ``max_stages``)."""
        if not self._authorized(request):
            return error_response(401, "missing or wrong API key", "AuthenticationError")
        try:
            body = await request.json()
            rid, dst = str(body["request_id"]), str(body["destination"])
            stages = body.get("max_stages")
            if stages is not None and (isinstance(stages, bool) or not isinstance(stages, int)):
                raise TypeError(f"max_stages must be an integer, not {stages!r}")
        except (ValueError, KeyError, TypeError) as exc:
            return error_response(
                400, f"expected {{request_id, destination[, max_stages]}}: {exc}",
                "BadRequestError",
            )  # fmt: skip
        try:
            return web.json_response(await self.migrate(rid, dst, stages))
        except MigrationError as exc:
            return error_response(exc.status, str(exc), "MigrationError")

    async def drain(self, instance_id: str, stop: bool, timeout_s: float) -> dict[str, Any]:
        """Retires an instance: its llumlet reports it draining (no new work), the
        rescheduler's drain policy live-migrates its streams away, the rest finish where they
        are; once it holds no request, ``stop`` stops its engine. Raises
        :class:`MigrationError` when it cannot start."""
        record = self.records.get(instance_id)
        if record is None:
            raise MigrationError(404, f"no instance {instance_id!r}")
        if not record.llumlet:
            raise MigrationError(400, f"instance {instance_id} has no llumlet to drain it")
        if stop and self.stop_instance is None:
            raise MigrationError(400, "this gateway cannot stop instances (not llumnix serve)")

        def call() -> None:
            with LlumletClient(record.llumlet, timeout=5.0) as llumlet:
                llumlet.drain(True)

        try:
            await asyncio.to_thread(call)
        except Exception as exc:  # grpc.RpcError and connection errors
            raise MigrationError(
                502, f"the llumlet of {instance_id} did not answer: {exc}"
            ) from exc
        began, moved = time.monotonic(), self.moved_from[instance_id]
        view = self.scheduler_of(instance_id).view
        while True:
            s = view.statuses.get(instance_id)
            on_it = [r for r in self.live.values() if r.instance == instance_id]
            if s is not None and s.draining and not s.num_requests and not on_it:
                break
            if time.monotonic() - began > timeout_s:
                raise MigrationError(
                    504,
                    f"{instance_id} still holds {s.num_requests if s else '?'} requests after "
                    f"{timeout_s:g} s (it stays draining)",
                )
            await asyncio.sleep(0.05)
        if stop:
            assert self.stop_instance is not None
            await self.stop_instance(instance_id)
        return {
            "instance": instance_id,
            "migrated": self.moved_from[instance_id] - moved,
            "waited_s": time.monotonic() - began,
            "stopped": stop,
        }

    async def drain_endpoint(self, request: web.Request) -> web.Response:
        """``POST /v1/llumnix/drain {"instance": ..., "stop": true, "timeout_s": 600}``."""
        if not self._authorized(request):
            return error_response(401, "missing or wrong API key", "AuthenticationError")
        try:
            body = await request.json()
            iid = str(body["instance"])
            stop = bool(body.get("stop", True))
            timeout_s = float(body.get("timeout_s", 600.0))
        except (ValueError, KeyError, TypeError) as exc:
            return error_response(
                400, f"expected {{instance[, stop, timeout_s]}}: {exc}", "BadRequestError"
            )
        try:
            return web.json_response(await self.drain(iid, stop, timeout_s))
        except MigrationError as exc:
            return error_response(exc.status, str(exc), "DrainError")

    async def live_requests(self, request: web.Request) -> web.Response:
        """``GET /v1/llumnix/requests``: the migratable streams being relayed."""
        if not self._authorized(request):
            return error_response(401, "missing or wrong API key", "AuthenticationError")
        return web.json_response([live.snapshot() for live in self.live.values()])

    async def models(self, request: web.Request) -> web.Response:
        assert self._session is not None
        for iid, record in list(self.records.items()):
            if iid in self._down:
                continue
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                async with self._session.get(record.url + "/v1/models") as resp:
                    if resp.status == 200:
                        return web.json_response(await resp.json())
        return error_response(503, "no engine instance is up", "ServiceUnavailable")

    async def health(self, request: web.Request) -> web.Response:
        up = [i for i in self.records if i not in self._down]
        return web.json_response(
            {"instances": len(self.records), "up": len(up)}, status=200 if up else 503
        )

    def _statuses(self) -> list[tuple[str, InstanceStatus]]:
        return [
            (iid, s)
            for iid, s in itertools.chain.from_iterable(
                sch.view.statuses.items() for sch in self.schedulers.values()
            )
            if iid in self.records
        ]

    async def metrics(self, request: web.Request) -> web.Response:
        now = time.time()
        for iid, s in self._statuses():
            for field, value in (
                ("running", s.num_running),
                ("waiting", s.num_waiting),
                ("free_blocks", s.num_free_blocks),
                ("schedulable", int(s.schedulable)),
                ("report_age_seconds", now - s.timestamp if s.timestamp else -1.0),
                ("in_flight", self.scheduler_of(iid).ledger.pending(iid).num_requests),
            ):
                self.m_instance.labels(iid, field).set(value)
        return web.Response(
            body=generate_latest(self.metrics_registry), content_type="text/plain", charset="utf-8"
        )


def build_app(gateway: Gateway) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.on_startup.append(gateway.start)
    app.on_cleanup.append(gateway.close)
    routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
        ("POST", "/v1/completions", gateway.completions),
        ("POST", "/v1/chat/completions", gateway.chat_completions),
        ("GET", "/v1/models", gateway.models),
        ("GET", "/health", gateway.health),
        ("GET", "/metrics", gateway.metrics),
        ("POST", "/v1/llumnix/migrate", gateway.migrate_endpoint),
        ("GET", "/v1/llumnix/requests", gateway.live_requests),
        ("POST", "/v1/llumnix/drain", gateway.drain_endpoint),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    return app


async def serve(gateway: Gateway) -> web.AppRunner:
    """Starts the gateway's HTTP server (handlers are cancelled when their client leaves)."""
    runner = web.AppRunner(build_app(gateway), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, gateway.config.host, gateway.config.port)
    await site.start()
    return runner


@contextlib.contextmanager
def serve_in_thread(gateway: Gateway, start_timeout_s: float = 30.0) -> Iterator[str]:
    """Serves ``gateway`` from an event loop in a thread of its own (for scripts and tests
    that are not async); yields its base URL and stops it on exit."""
    ready, stop = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    async def main() -> None:
        try:
            runner = await serve(gateway)
        except BaseException as exc:
            failed.append(exc)
            ready.set()
            return
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await runner.cleanup()

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="llumnix-gateway")
    thread.start()
    try:
        if not ready.wait(start_timeout_s) or failed:
            raise RuntimeError(f"the gateway did not start: {failed[0] if failed else 'timeout'}")
        yield f"http://{gateway.config.host}:{gateway.config.port}"
    finally:
        stop.set()
        thread.join(30)
        if thread.is_alive():
            raise RuntimeError("the gateway did not stop in 30 s")
