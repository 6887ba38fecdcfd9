"""Live migration of a running request between simulated instances: multi-stage pre-copy.

Stage 0 copies the request's whole KV while it keeps decoding on the source; each further
stage copies the tokens produced during the previous one. Once fewer than
``migration_final_stage_tokens`` remain (or after ``migration_max_stages``), the request is
suspended at the source's next step boundary and the last stage copies the remainder plus a
commit handshake: that last stage is the downtime. The destination reserves blocks before
every stage; when it cannot, the migration aborts and the request simply stays. A request
that finishes or is preempted on the source meanwhile aborts its migration too.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from llumnix.sim.engine import ReqState, SimInstance, SimRequest

logger = logging.getLogger(__name__)


class JobState(enum.Enum):
    """Phase of a migration."""

    PRECOPY = 0
    SUSPEND_PENDING = 1
    FINAL = 2
    DONE = 3
    ABORTED = 4


@dataclass(eq=False)
class MigrationJob:
    """One request's migration from ``src`` to ``dst``."""

    req: SimRequest
    """The request being moved."""
    src: SimInstance
    """Source instance."""
    dst: SimInstance
    """Destination instance."""
    started_s: float
    """When the first stage began."""
    reason: str = ""
    """Policy that asked for it."""
    copied_tokens: int = 0
    """Tokens whose KV has been copied (or is being copied by the current stage)."""
    reserved: int = 0
    """Blocks reserved on the destination."""
    stage: int = 0
    """Stages started."""
    state: JobState = JobState.PRECOPY
    """Phase."""
    suspended_s: float = 0.0
    """When the request was suspended (start of the downtime)."""
    downtime_s: float = 0.0
    """Suspension to commit (set on commit)."""

    def _reserve(self, tokens: int) -> bool:
        need = -(-tokens // self.dst.bs) - self.reserved
        if need <= 0:
            return True
        if need > self.dst.free_blocks:
            return False
        self.dst.free_blocks -= need
        self.dst.reserved_blocks += need
        self.reserved += need
        return True

    def begin(self) -> float | None:
        """Reserve and start stage 0; returns its duration, or None if it cannot start."""
        r = self.req
        if r.state is not ReqState.RUNNING or r.migration is not None or r.instance is not self.src:
            return None
        # the destination llumlet refuses a request that would leave its own batch without a
        # block to grow into (it would only trade a migration for a preemption)
        dst = self.dst
        if dst.free_blocks - -(-r.ctx // dst.bs) < len(dst.running) + dst.waiting_blocks + 1:
            return None
        if not self._reserve(r.ctx):
            return None
        r.migration = self
        self.src.migrating_out += 1
        self.dst.migrating_in += 1
        self.copied_tokens = r.ctx
        self.stage = 1
        p = self.src.profile
        return p.migration_stage_overhead_ms * 1e-3 + p.copy_s(r.ctx)

    def stage_done(self) -> float | None:
        """A pre-copy stage finished: start another (returns its duration) or ask for the
        suspension (returns None; the caller suspends at the source's step boundary)."""
        r = self.req
        p = self.src.profile
        delta = r.ctx - self.copied_tokens
        if delta < p.migration_final_stage_tokens or self.stage >= p.migration_max_stages:
            self.state = JobState.SUSPEND_PENDING
            return None
        if not self._reserve(r.ctx):
            self.abort("destination out of blocks")
            return None
        self.copied_tokens = r.ctx
        self.stage += 1
        return p.migration_stage_overhead_ms * 1e-3 + p.copy_s(delta)

    def suspend(self, now: float) -> float | None:
        """Take the request out of the source's batch and start the final stage; returns the
        downtime, or None if the destination cannot hold it (aborted, request resumes)."""
        r = self.req
        if not self._reserve(r.ctx + 1):
            self.abort("destination out of blocks")
            return None
        self.src.remove_running(r)
        self.src.suspended.add(r)
        r.state = ReqState.SUSPENDED
        self.state = JobState.FINAL
        self.suspended_s = now
        p = self.src.profile
        delta = r.ctx - self.copied_tokens
        self.copied_tokens = r.ctx
        return p.migration_commit_overhead_ms * 1e-3 + p.copy_s(delta)

    def commit(self, now: float) -> None:
        """Hand the request to the destination."""
        r = self.req
        self.downtime_s = now - self.suspended_s
        src, dst = self.src, self.dst
        src.suspended.discard(r)
        src.free_blocks += r.blocks
        src._forget(r)
        src.migrating_out -= 1
        dst.migrating_in -= 1
        dst.reserved_blocks -= self.reserved
        r.blocks = self.reserved
        r.migration = None
        r.num_migrations += 1
        dst.ids.add(r.request_id)
        dst.num_high_priority += r.trace.priority > 0
        dst.add_running(r)
        self.state = JobState.DONE

    def abort(self, why: str) -> None:
        """Release the destination's reservation; the request stays where it is."""
        if self.state in (JobState.DONE, JobState.ABORTED):
            return
        r = self.req
        if self.state is JobState.FINAL:
            raise RuntimeError("cannot abort a migration in its final stage")
        self.dst.free_blocks += self.reserved
        self.dst.reserved_blocks -= self.reserved
        self.reserved = 0
        self.src.migrating_out -= 1
        self.dst.migrating_in -= 1
        r.migration = None
        self.state = JobState.ABORTED
        logger.debug("migration of %s aborted: %s", r.request_id, why)
