"""Rescheduler: periodic migration planning (load balance, de-fragmentation, drain,
priority headroom) and autoscaling decisions."""

from llumnix.rescheduler.autoscale import AutoscaleConfig, Autoscaler
from llumnix.rescheduler.loop import Rescheduler, ReschedulerConfig, ReschedulerLoop
from llumnix.rescheduler.pairs import (
    MigrationPair,
    MigrationRule,
    ReschedulePlan,
    ScaleAction,
    ScaleDecision,
)
from llumnix.rescheduler.policies import RESCHEDULE_POLICIES, ReschedulePolicy

__all__ = [
    "RESCHEDULE_POLICIES",
    "AutoscaleConfig",
    "Autoscaler",
    "MigrationPair",
    "MigrationRule",
    "ReschedulePlan",
    "ReschedulePolicy",
    "Rescheduler",
    "ReschedulerConfig",
    "ReschedulerLoop",
    "ScaleAction",
    "ScaleDecision",
]
