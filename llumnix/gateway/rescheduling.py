"""The rescheduler in the gateway: its migration pairs become live migrations of the streams
the gateway relays (:mod:`llumnix.gateway.migration`), and ``drain`` retires an instance.

Every ``interval_s`` the :class:`~llumnix.rescheduler.Rescheduler` plans over the gateway's
view of its neutral instances (the llumlets' reports; an instance known to be down is left
out, its streams are resumed elsewhere by the relay instead), with the migrations this
gateway has in flight as each instance's ``num_migrating_out``/``in``, so the per-instance
caps hold. A pair names a source, a destination and a rule; the source's relayed streams are
picked by the rule (shortest context first, longest, the last admitted, normal priority
first, or all) among those not being migrated, not moved in the last ``cooldown_s`` (no
ping-pong) and moved fewer than ``max_per_request`` times. A stream with no output yet moves
without pre-copy (its prompt is recomputed on the destination, which has room).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Protocol

from llumnix.gateway.migration import LiveRequest, MigrationError
from llumnix.rescheduler import MigrationPair, MigrationRule, Rescheduler, ReschedulerConfig
from llumnix.scheduler import ClusterView, Scheduler

logger = logging.getLogger(__name__)


@dataclass
class ReschedulingConfig:
    interval_s: float = 0.2
    policies: tuple[str, ...] = ("drain", "defragmentation", "priority_headroom", "load_balance")
    max_out_per_instance: int = 1
    max_in_per_instance: int = 1
    max_drain_out: int = 4
    cooldown_s: float = 5.0
    """A stream is not moved again this soon after a migration."""
    max_per_request: int = 2


def _order(rule: MigrationRule, streams: list[LiveRequest]) -> list[LiveRequest]:
    if rule is MigrationRule.SHORTEST:
        return sorted(streams, key=lambda s: len(s.tokens))
    if rule is MigrationRule.LONGEST:
        return sorted(streams, key=lambda s: -len(s.tokens))
    if rule is MigrationRule.LAST_ADMITTED:
        return sorted(streams, key=lambda s: -s.admitted_at)
    if rule is MigrationRule.LOW_PRIORITY:
        return sorted(streams, key=lambda s: (s.priority > 0, len(s.tokens)))
    return list(streams)


class Host(Protocol):
    """What the rescheduler needs of the gateway."""

    schedulers: dict[str, Scheduler]
    live: dict[str, LiveRequest]

    def is_down(self, instance_id: str) -> bool: ...

    async def migrate(
        self, request_id: str, destination: str, max_stages: int | None = None
    ) -> dict[str, Any]: ...


class GatewayRescheduler:
    """Turns rescheduling pairs into live migrations (one asyncio task per migration)."""

    def __init__(self, gateway: Host, config: ReschedulingConfig | None = None) -> None:
        self.gateway = gateway
        self.config = cfg = config or ReschedulingConfig()
        self.rescheduler = Rescheduler(
            ReschedulerConfig(
                policies=list(cfg.policies),
                interval_s=cfg.interval_s,
                max_out_per_instance=cfg.max_out_per_instance,
                max_in_per_instance=cfg.max_in_per_instance,
                max_drain_out=cfg.max_drain_out,
            )
        )
        self.out: Counter[str] = Counter()
        self.into: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_moved: dict[str, float] = {}
        self.cycles = 0

    def view(self) -> ClusterView:
        """The neutral instances not known to be down, with this gateway's migrations."""
        src = self.gateway.schedulers["neutral"].view
        view = ClusterView()
        for iid, status in src.statuses.items():
            if self.gateway.is_down(iid) or iid not in src.infos:
                continue
            view.add_instance(
                src.infos[iid],
                replace(status, num_migrating_out=self.out[iid], num_migrating_in=self.into[iid],
                        metric_cache={}),
            )  # fmt: skip
        return view

    def cycle(self) -> list[MigrationPair]:
        """One planning cycle; starts the migrations; returns the pairs that got any."""
        self.cycles += 1
        now = time.monotonic()
        plan = self.rescheduler.plan(self.view(), time.time())
        started = []
        for pair in plan.pairs:
            streams = [
                s
                for s in self.gateway.live.values()
                if s.instance == pair.src
                and s.migration is None
                and not s.finished
                and s.prompt_ids is not None
                and s.migrations < self.config.max_per_request
                and now - self._last_moved.get(s.request_id, -1e9) >= self.config.cooldown_s
            ]
            chosen = _order(pair.rule, streams)[: pair.num_requests]
            for s in chosen:
                self._start(s, pair)
            if chosen:
                started.append(pair)
        return started

    def _start(self, live: LiveRequest, pair: MigrationPair) -> None:
        self.out[pair.src] += 1
        self.into[pair.dst] += 1
        self._last_moved[live.request_id] = time.monotonic()
        stages = 0 if not live.output_ids else None
        task = asyncio.create_task(self._migrate(live.request_id, pair, stages))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _migrate(self, request_id: str, pair: MigrationPair, stages: int | None) -> None:
        try:
            summary = await self.gateway.migrate(request_id, pair.dst, stages)
            logger.info("%s: %s %s -> %s: %s", pair.reason, request_id, pair.src, pair.dst,
                        summary["state"])  # fmt: skip
        except MigrationError as exc:
            logger.info("%s: %s not moved: %s", pair.reason, request_id, exc)
        except Exception:  # a failed migration must not stop rescheduling
            logger.exception("migration of %s failed", request_id)
        finally:
            self.out[pair.src] -= 1
            self.into[pair.dst] -= 1
            self._last_moved[request_id] = time.monotonic()

    async def run(self) -> None:
        while True:
            began = time.monotonic()
            try:
                self.cycle()
            except Exception:  # keep rescheduling; a bad cycle must not stop the loop
                logger.exception("rescheduling cycle failed")
            for rid in [r for r in self._last_moved if r not in self.gateway.live]:
                del self._last_moved[rid]
            await asyncio.sleep(max(0.0, self.config.interval_s - (time.monotonic() - began)))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
