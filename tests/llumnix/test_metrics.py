import math

import pytest

from llumnix.scheduler import DispatchRequest
from llumnix.scheduler.ledger import NO_PENDING, PendingLoad
from llumnix.scheduler.metrics import (
    DecodeBatchSize,
    DecodeTokens,
    Freeness,
    KvUsage,
    MigrationFreeness,
    NumRequests,
    PrefillTokens,
    PrefixHitTokens,
    QueueSize,
)

from .sched_views import make_status


def test_freeness_is_free_blocks_over_batch_size():
    s = make_status("a", num_free_blocks=60, num_running=4)
    assert Freeness().evaluate(s, NO_PENDING) == pytest.approx(15.0)


def test_freeness_idle_instance_divides_by_one():
    assert Freeness().evaluate(make_status("a"), NO_PENDING) == 100.0


def test_queued_demand_all_vs_head_of_line():
    s = make_status(
        "a", num_free_blocks=60, num_running=2, num_waiting=2,
        hol_demand_blocks=30, waiting_demand_blocks=50,
    )  # fmt: skip
    # the queued requests whose demand counts are in the batch too (Llumnix's remaining_steps):
    # dispatch counts both queued requests, rescheduling the head of line
    assert Freeness("all").evaluate(s, NO_PENDING) == pytest.approx((60 - 50) / 4)
    assert MigrationFreeness().evaluate(s, NO_PENDING) == pytest.approx((60 - 30) / 3)


def test_a_queue_or_a_burst_of_dispatches_divides_freeness():
    # same free blocks per running request, but "a" has 4 requests queued or in flight: it
    # must not look as free as "b" (else a burst herds onto it)
    a = make_status("a", num_free_blocks=80, num_running=2, num_waiting=2, waiting_demand_blocks=0)
    b = make_status("b", num_free_blocks=80, num_running=2)
    m = Freeness()
    assert m.evaluate(a, NO_PENDING) == pytest.approx(20)
    assert m.evaluate(b, NO_PENDING) == pytest.approx(40)
    assert m.evaluate(b, PendingLoad(num_requests=2, blocks=0)) == pytest.approx(20)
    idle = make_status("c", num_free_blocks=80)
    assert m.evaluate(idle, PendingLoad(num_requests=1, blocks=10)) == pytest.approx(70)
    assert m.evaluate(idle, PendingLoad(num_requests=2, blocks=10)) == pytest.approx(35)


def test_blocked_head_of_line_makes_freeness_negative():
    s = make_status("a", num_free_blocks=10, num_running=5, num_waiting=1, hol_demand_blocks=40)
    assert MigrationFreeness().evaluate(s, NO_PENDING) < 0


def test_under_overload_more_queued_requests_never_look_freer():
    # Both short of blocks; "a" shares a larger deficit among more requests. The paper's
    # free / B would rank "a" (-100 / 10 = -10) above "b" (-50 / 2 = -25).
    a = make_status("a", num_free_blocks=0, num_running=5, num_waiting=5, waiting_demand_blocks=100)
    b = make_status("b", num_free_blocks=0, num_running=1, num_waiting=1, waiting_demand_blocks=50)
    m = Freeness()
    assert m.evaluate(a, NO_PENDING) < m.evaluate(b, NO_PENDING) < 0
    # Monotonic in the request count on both sides of zero.
    for free in (80, 0, -40):
        s = make_status("c", num_free_blocks=free + 40, num_waiting=1, waiting_demand_blocks=40)
        values = [m.evaluate(s, PendingLoad(num_requests=k, blocks=0)) for k in range(6)]
        assert values == sorted(values, reverse=True), (free, values)


def test_high_priority_headroom_and_draining():
    hp = make_status("a", num_free_blocks=80, num_running=2, num_high_priority=1)
    plain = make_status("b", num_free_blocks=80, num_running=2)
    m = Freeness("all", high_priority_headroom_blocks=50)
    assert m.evaluate(hp, NO_PENDING) == pytest.approx((80 - 50) / 2)
    assert m.evaluate(plain, NO_PENDING) == pytest.approx(40)
    assert Freeness().evaluate(make_status("c", draining=True), NO_PENDING) == -math.inf


def test_pending_load_counts_and_bypasses_cache():
    s = make_status("a", num_free_blocks=60, num_running=3)
    m = Freeness()
    assert m.evaluate(s, NO_PENDING) == pytest.approx(20)
    p = PendingLoad(num_requests=1, blocks=30, prefill_tokens=400)
    assert m.evaluate(s, p) == pytest.approx(30 / 4)
    assert PrefillTokens().evaluate(s, p) == 400
    assert QueueSize().evaluate(s, p) == 1
    assert NumRequests().evaluate(s, p) == 4
    # the memoised request-independent value is unchanged
    assert s.metric_cache[m.key] == pytest.approx(20)


def test_work_metrics():
    s = make_status(
        "a", num_free_blocks=40, num_running=3, num_waiting=2, running_tokens=900,
        waiting_prefill_tokens=700, waiting_demand_blocks=20,
    )  # fmt: skip
    assert DecodeBatchSize().evaluate(s, NO_PENDING) == 3
    assert DecodeTokens().evaluate(s, NO_PENDING) == 900
    assert PrefillTokens().evaluate(s, NO_PENDING) == 700
    assert KvUsage().evaluate(s, NO_PENDING) == pytest.approx((60 + 20) / 100)
    assert NumRequests().evaluate(s, NO_PENDING) == 5


def test_prefix_hit_tokens_depends_on_request():
    s = make_status("a", prefix_ids=frozenset({"sys"}))
    hit = DispatchRequest("r", 500, prefix_id="sys", prefix_tokens=300)
    miss = DispatchRequest("r2", 500, prefix_id="other", prefix_tokens=300)
    m = PrefixHitTokens()
    assert m.evaluate(s, NO_PENDING, hit) == 300
    assert m.evaluate(s, NO_PENDING, miss) == 0
    assert m.evaluate(s, NO_PENDING, None) == 0
