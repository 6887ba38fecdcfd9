"""Dispatch policy framework: cluster view, metrics, filters, selectors, policies."""

from llumnix.scheduler.cluster import (
    ClusterView,
    DispatchRequest,
    InstanceInfo,
    InstanceStatus,
    Stage,
)
from llumnix.scheduler.ledger import InFlightLedger, PendingLoad
from llumnix.scheduler.policies import DISPATCH_POLICIES, DispatchPolicy
from llumnix.scheduler.scheduler import Scheduler, SchedulerConfig

__all__ = [
    "DISPATCH_POLICIES",
    "ClusterView",
    "DispatchPolicy",
    "DispatchRequest",
    "InFlightLedger",
    "InstanceInfo",
    "InstanceStatus",
    "PendingLoad",
    "Scheduler",
    "SchedulerConfig",
    "Stage",
]
