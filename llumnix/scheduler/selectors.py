"""Selectors: pick one instance among the candidates that passed the filters."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

from llumnix.scheduler.cluster import DispatchRequest, InstanceStatus
from llumnix.scheduler.ledger import PendingLoad
from llumnix.scheduler.metrics import METRICS, Metric
from llumnix.scheduler.registry import Registry

logger = logging.getLogger(__name__)

Candidate = tuple[InstanceStatus, PendingLoad]


class Selector:
    """Base class."""

    name: str = "selector"

    def select(
        self, candidates: Sequence[Candidate], r: DispatchRequest | None
    ) -> InstanceStatus | None:
        raise NotImplementedError


class Lexicographic(Selector):
    """Best instance by a list of metrics compared lexicographically (first metric decides,
    later ones break ties); with ``top_k > 1``, a uniformly random one of the ``top_k`` best,
    which spreads simultaneous decisions of independent schedulers. Ties keep candidate
    order."""

    name = "lexicographic"

    def __init__(
        self, metrics: Sequence[str | Metric], top_k: int = 1, seed: int | None = 0
    ) -> None:
        if not metrics:
            raise ValueError("need at least one metric")
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        self.metrics = [METRICS.create(m) if isinstance(m, str) else m for m in metrics]
        self.signs = [-1.0 if m.higher_is_better else 1.0 for m in self.metrics]
        self.top_k = top_k
        self._rng = random.Random(seed)

    def sort_key(self, s: InstanceStatus, p: PendingLoad, r: DispatchRequest | None) -> tuple:
        """Ascending key: smaller is better."""
        return tuple(
            sign * m.evaluate(s, p, r) for sign, m in zip(self.signs, self.metrics, strict=True)
        )

    def select(
        self, candidates: Sequence[Candidate], r: DispatchRequest | None
    ) -> InstanceStatus | None:
        if not candidates:
            return None
        if self.top_k == 1 and len(self.metrics) == 1:
            m = self.metrics[0]
            sign = self.signs[0]
            best, best_v = None, 0.0
            for s, p in candidates:
                v = sign * m.evaluate(s, p, r)
                if best is None or v < best_v:
                    best, best_v = s, v
            return best
        keyed = [(self.sort_key(s, p, r), i) for i, (s, p) in enumerate(candidates)]
        if self.top_k == 1:
            return candidates[min(keyed)[1]][0]
        keyed.sort()
        k = min(self.top_k, len(keyed))
        return candidates[keyed[self._rng.randrange(k)][1]][0]


SELECTORS: Registry[Selector] = Registry("selector")
SELECTORS.register("lexicographic", __name__, "Lexicographic")
