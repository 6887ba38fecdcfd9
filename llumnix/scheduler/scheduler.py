"""The dispatcher: cluster view + in-flight ledger + a dispatch policy.

The same object serves the gateway in production and the simulator: it consumes instance
status reports (:meth:`Scheduler.on_status`) and answers placement queries
(:meth:`Scheduler.dispatch`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from llumnix.scheduler.cluster import ClusterView, DispatchRequest, InstanceInfo, InstanceStatus
from llumnix.scheduler.ledger import InFlightLedger
from llumnix.scheduler.metrics import blocks_for
from llumnix.scheduler.policies import DISPATCH_POLICIES, DispatchPolicy

logger = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    """Dispatcher configuration."""

    policy: str = "load_balance"
    """Registered dispatch policy name, or ``"package.module:Class"``."""
    policy_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the policy's constructor."""
    ledger_ttl_s: float = 5.0
    """Forget an in-flight dispatch the target never reports after this long."""


class Scheduler:
    """Places requests on instances using the latest reports plus in-flight dispatches."""

    def __init__(self, config: SchedulerConfig | None = None, view: ClusterView | None = None):
        self.config = config or SchedulerConfig()
        self.view = view if view is not None else ClusterView()
        self.ledger = InFlightLedger(self.config.ledger_ttl_s)
        self.policy: DispatchPolicy = DISPATCH_POLICIES.create(
            self.config.policy, **self.config.policy_kwargs
        )

    def add_instance(self, info: InstanceInfo, status: InstanceStatus | None = None) -> None:
        """Make an instance known (it becomes eligible once its report says schedulable)."""
        self.view.add_instance(info, status)

    def remove_instance(self, instance_id: str) -> None:
        """Forget an instance and what was dispatched to it."""
        self.view.remove_instance(instance_id)
        self.ledger.drop_instance(instance_id)

    def on_status(self, status: InstanceStatus) -> None:
        """Take a new report and settle the in-flight dispatches it accounts for."""
        self.view.update(status)
        self.ledger.reconcile(status)

    def dispatch(self, r: DispatchRequest, now: float) -> str | None:
        """Choose an instance for ``r`` and record the dispatch; None if none is eligible."""
        target = self.policy.select(r, self.view, self.ledger.pending_map(), now)
        if target is None:
            logger.debug("no eligible instance for %s", r.request_id)
            return None
        info = self.view.infos[target]
        hit = r.prefix_tokens if r.prefix_id in self.view.statuses[target].prefix_ids else 0
        self.ledger.add(
            target,
            r,
            blocks_for(r.prompt_tokens, info.block_size),
            max(0, r.prompt_tokens - hit),
            now,
        )
        return target
