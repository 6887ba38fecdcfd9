import pytest

from llumnix.rescheduler import RESCHEDULE_POLICIES
from llumnix.scheduler.filters import FILTERS
from llumnix.scheduler.metrics import METRICS, Freeness
from llumnix.scheduler.policies import DISPATCH_POLICIES, RoundRobin
from llumnix.scheduler.registry import Registry, RegistryError
from llumnix.scheduler.selectors import SELECTORS


def test_builtins_are_registered():
    assert {"round_robin", "infaas++", "load_balance", "priority", "cache_aware", "flood"} <= set(
        DISPATCH_POLICIES.names()
    )
    assert {"load_balance", "defragmentation", "drain", "priority_headroom"} <= set(
        RESCHEDULE_POLICIES.names()
    )
    assert "freeness" in METRICS.names()
    assert {"schedulable", "staleness", "metric_threshold", "failure_domain"} <= set(
        FILTERS.names()
    )
    assert SELECTORS.names() == ["lexicographic"]


def test_lazy_lookup_and_module_path_escape_hatch():
    assert isinstance(DISPATCH_POLICIES.create("round_robin"), RoundRobin)
    m = METRICS.create("llumnix.scheduler.metrics:Freeness", queued="head")
    assert isinstance(m, Freeness) and m.queued == "head"


def test_unknown_and_duplicate_names_fail():
    reg: Registry[object] = Registry("thing")
    reg.register("a", "llumnix.scheduler.metrics", "Freeness")
    with pytest.raises(ValueError):
        reg.register("a", "x", "y")
    with pytest.raises(RegistryError):
        reg.get("nope")
    with pytest.raises(RegistryError):
        reg.get("llumnix.scheduler.metrics:NoSuchClass")
