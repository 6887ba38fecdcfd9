import pytest

from llumnix.scheduler import DispatchRequest, InstanceInfo
from llumnix.scheduler.filters import FailureDomain, Fits, MetricThreshold, Schedulable, Staleness
from llumnix.scheduler.ledger import NO_PENDING, PendingLoad
from llumnix.scheduler.selectors import Lexicographic

from .sched_views import make_status

INFO = InstanceInfo("a", 100, 16, "rack1")


def test_schedulable_excludes_unhealthy_and_draining():
    f = Schedulable()
    assert f.keep(make_status("a"), INFO, NO_PENDING, None, 0)
    assert not f.keep(make_status("a", schedulable=False), INFO, NO_PENDING, None, 0)
    assert not f.keep(make_status("a", draining=True), INFO, NO_PENDING, None, 0)


def test_staleness():
    f = Staleness(max_age_s=2.0)
    assert f.keep(make_status("a", timestamp=9.0), INFO, NO_PENDING, None, 10.0)
    assert not f.keep(make_status("a", timestamp=7.0), INFO, NO_PENDING, None, 10.0)


def test_metric_threshold():
    f = MetricThreshold("freeness", ">=", 20)
    assert f.keep(make_status("a", num_free_blocks=50, num_running=2), INFO, NO_PENDING, None, 0)
    assert not f.keep(
        make_status("a", num_free_blocks=30, num_running=2), INFO, NO_PENDING, None, 0
    )
    with pytest.raises(ValueError):
        MetricThreshold("freeness", "==", 1)


def test_failure_domain_config_and_request():
    s = make_status("a")
    assert not FailureDomain({"rack1"}).keep(s, INFO, NO_PENDING, None, 0)
    r = DispatchRequest("r", 10, excluded_domains=frozenset({"rack1"}))
    assert not FailureDomain().keep(s, INFO, NO_PENDING, r, 0)
    assert FailureDomain({"rack2"}).keep(s, INFO, NO_PENDING, DispatchRequest("r", 10), 0)


def test_fits_counts_queue_and_in_flight():
    s = make_status("a", num_free_blocks=40, waiting_demand_blocks=10)
    r = DispatchRequest("r", 16 * 30)
    assert Fits().keep(s, INFO, NO_PENDING, r, 0)
    assert not Fits().keep(s, INFO, PendingLoad(1, 1, 16), r, 0)


def test_lexicographic_orders_and_breaks_ties():
    a = make_status("a", num_free_blocks=60, num_running=5, num_waiting=1)
    b = make_status("b", num_free_blocks=60, num_running=6)
    c = make_status("c", num_free_blocks=20, num_running=1, num_waiting=1)
    cands = [(a, NO_PENDING), (b, NO_PENDING), (c, NO_PENDING)]
    assert Lexicographic(["freeness"]).select(cands, None) is a  # tie keeps order
    assert Lexicographic(["freeness", "queue_size"]).select(cands, None) is b
    assert Lexicographic(["num_requests"]).select(cands, None) is c
    assert Lexicographic(["freeness"]).select([], None) is None


def test_random_top_k_stays_within_the_best_k():
    statuses = [make_status(f"i{k}", num_free_blocks=100 - 10 * k) for k in range(6)]
    sel = Lexicographic(["freeness"], top_k=2, seed=1)
    picks = {sel.select([(s, NO_PENDING) for s in statuses], None).instance_id for _ in range(200)}
    assert picks == {"i0", "i1"}
