"""What the rescheduler emits: migration pairs and scaling decisions."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class MigrationRule(enum.Enum):
    """Which requests the source llumlet picks for a pair.

    SHORTEST is the cheap default for load balance (least KV to copy); LONGEST frees the most
    blocks per migration (de-fragmentation); LOW_PRIORITY moves normal-priority requests off
    instances that keep headroom for high-priority ones; ALL empties the instance, queued
    requests included (drain, failover)."""

    SHORTEST = "shortest"
    LONGEST = "longest"
    LAST_ADMITTED = "last_admitted"
    LOW_PRIORITY = "low_priority"
    ALL = "all"


@dataclass(frozen=True)
class MigrationPair:
    """Move ``num_requests`` requests chosen by ``rule`` from ``src`` to ``dst``."""

    src: str
    """Source instance id."""
    dst: str
    """Destination instance id."""
    rule: MigrationRule
    """How the source picks the requests."""
    num_requests: int = 1
    """How many requests to move."""
    reason: str = ""
    """Name of the policy that proposed the pair (for logs and statistics)."""


class ScaleAction(enum.Enum):
    """Autoscaling direction."""

    OUT = "out"
    IN = "in"


@dataclass(frozen=True)
class ScaleDecision:
    """Add ``count`` instances (OUT) or retire the listed instances (IN: drain, then stop)."""

    action: ScaleAction
    """Direction."""
    count: int = 1
    """Instances to add or retire."""
    instance_ids: tuple[str, ...] = ()
    """For IN: which instances to drain."""


@dataclass
class ReschedulePlan:
    """One rescheduling cycle's output."""

    pairs: list[MigrationPair] = field(default_factory=list)
    """Conflict-free migration pairs within the concurrency caps."""
    scale: ScaleDecision | None = None
    """Autoscaling decision, if any."""
