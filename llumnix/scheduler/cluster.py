"""Cluster view: what the scheduler knows about each instance.

Static facts (:class:`InstanceInfo`) are registered once; dynamic load (:class:`InstanceStatus`)
arrives as reports that llumlets push to the meta store whenever an instance's load changes
(the simulator produces the same reports from its engine model). The scheduler and the
rescheduler read only this view.

Units: KV memory is counted in blocks of ``block_size`` tokens; times are seconds on the
clock of whoever produced the report.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Stage(enum.Enum):
    """Which phase of a request a policy places: PD-disaggregated stages or both at once."""

    PREFILL = "prefill"
    DECODE = "decode"
    NEUTRAL = "neutral"


@dataclass(frozen=True)
class InstanceInfo:
    """Static description of one engine instance."""

    instance_id: str
    """Unique id of the instance (one engine, possibly several GPUs)."""
    num_blocks: int
    """KV cache capacity in blocks."""
    block_size: int = 16
    """Tokens per KV block."""
    failure_domain: str = ""
    """Host, rack or zone label; instances sharing it can fail together."""
    max_batch_size: int = 256
    """Most sequences the engine runs in one batch."""


@dataclass(slots=True)
class InstanceStatus:
    """One load report of an instance. Block counts include the in-use blocks of every
    request on the instance (running, swapped-in by migration, or reserved for incoming
    migrations)."""

    instance_id: str
    """Instance the report describes."""
    timestamp: float = 0.0
    """When the report was produced (seconds)."""
    num_total_blocks: int = 0
    """KV capacity in blocks."""
    num_free_blocks: int = 0
    """Physically free blocks (not allocated, not reserved)."""
    num_running: int = 0
    """Requests in the running batch (decode batch size)."""
    num_waiting: int = 0
    """Requests queued in the engine's waiting queue."""
    running_tokens: int = 0
    """Tokens held in KV by the running batch (decode batch tokens)."""
    waiting_prefill_tokens: int = 0
    """Tokens still to prefill for queued requests; prefix-cache hits excluded."""
    hol_demand_blocks: int = 0
    """Blocks the head-of-line queued request needs to be admitted (0 when the queue is empty)."""
    waiting_demand_blocks: int = 0
    """Blocks all queued requests need to be admitted."""
    num_high_priority: int = 0
    """Requests with priority > 0 on the instance (running or queued)."""
    num_migrating_out: int = 0
    """Migrations currently leaving the instance."""
    num_migrating_in: int = 0
    """Migrations currently arriving at the instance."""
    schedulable: bool = True
    """False when the instance must not receive new work (unhealthy, starting, failed)."""
    draining: bool = False
    """True when the instance is being retired: everything on it should move off."""
    request_ids: frozenset[str] = frozenset()
    """Ids of requests the instance holds (running or queued); reconciles the in-flight ledger."""
    prefix_ids: frozenset[str] = frozenset()
    """Prefix hashes whose KV is cached on the instance."""
    metric_cache: dict[str, float] = field(default_factory=dict, compare=False, repr=False)
    """Memoised metric values of this report (metrics of an immutable report never change)."""

    @property
    def num_used_blocks(self) -> int:
        """Blocks allocated or reserved."""
        return self.num_total_blocks - self.num_free_blocks

    @property
    def num_requests(self) -> int:
        """Running plus queued requests."""
        return self.num_running + self.num_waiting


@dataclass(slots=True)
class DispatchRequest:
    """What the scheduler needs to know about a request to place it."""

    request_id: str
    """Unique id; the instance's reports name it once it has arrived."""
    prompt_tokens: int
    """Prompt length in tokens."""
    expected_output_tokens: int = 0
    """Predicted output length if known (0 = unknown); only used for projected KV usage."""
    priority: int = 0
    """0 = normal; larger = more important."""
    prefix_id: str | None = None
    """Hash of a shared prompt prefix, for cache-aware placement."""
    prefix_tokens: int = 0
    """Length of that prefix in tokens."""
    stage: Stage = Stage.NEUTRAL
    """Which phase is being placed."""
    excluded_domains: frozenset[str] = frozenset()
    """Failure domains this request must avoid (e.g. retry after a failure)."""


class ClusterView:
    """Latest status report and static info of every instance known to the scheduler."""

    def __init__(self) -> None:
        self.infos: dict[str, InstanceInfo] = {}
        self.statuses: dict[str, InstanceStatus] = {}
        self._list: list[InstanceStatus] | None = None

    def add_instance(self, info: InstanceInfo, status: InstanceStatus | None = None) -> None:
        """Register an instance; without a report it starts empty and schedulable."""
        self.infos[info.instance_id] = info
        if status is None:
            status = InstanceStatus(
                instance_id=info.instance_id,
                num_total_blocks=info.num_blocks,
                num_free_blocks=info.num_blocks,
            )
        self.statuses[info.instance_id] = status
        self._list = None

    def remove_instance(self, instance_id: str) -> None:
        """Forget an instance (terminated or lost)."""
        self.infos.pop(instance_id, None)
        self.statuses.pop(instance_id, None)
        self._list = None

    def update(self, status: InstanceStatus) -> None:
        """Replace an instance's report with a newer one."""
        if status.instance_id not in self.infos:
            raise KeyError(f"status for unknown instance {status.instance_id!r}")
        self.statuses[status.instance_id] = status
        self._list = None

    def status_list(self) -> list[InstanceStatus]:
        """All current reports in instance registration order (cached until the next change)."""
        if self._list is None:
            self._list = list(self.statuses.values())
        return self._list

    def __len__(self) -> int:
        return len(self.statuses)

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self.statuses
