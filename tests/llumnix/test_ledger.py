from llumnix.scheduler import DispatchRequest, InFlightLedger, Scheduler, SchedulerConfig
from llumnix.scheduler.ledger import NO_PENDING

from .sched_views import make_status, make_view


def test_reconciled_by_request_id():
    led = InFlightLedger(ttl_s=5)
    led.add("a", DispatchRequest("r1", 160), 10, 160, now=0.0)
    led.add("a", DispatchRequest("r2", 320, priority=1), 20, 320, now=0.0)
    p = led.pending("a")
    assert (p.num_requests, p.blocks, p.prefill_tokens, p.num_high_priority) == (2, 30, 480, 1)
    led.reconcile(make_status("a", timestamp=0.1, request_ids=frozenset({"r1"})))
    p = led.pending("a")
    assert (p.num_requests, p.blocks, p.num_high_priority) == (1, 20, 1)
    led.reconcile(make_status("a", timestamp=0.2, request_ids=frozenset({"r2"})))
    assert led.pending("a") is NO_PENDING and len(led) == 0


def test_unreported_entries_expire_after_ttl():
    led = InFlightLedger(ttl_s=1.0)
    led.add("a", DispatchRequest("r1", 16), 1, 16, now=0.0)
    led.reconcile(make_status("a", timestamp=0.5))
    assert len(led) == 1
    led.reconcile(make_status("a", timestamp=1.5))
    assert len(led) == 0


def test_ledger_prevents_herding_on_a_burst():
    view = make_view(*(make_status(f"i{k}") for k in range(4)))
    sched = Scheduler(SchedulerConfig(policy="load_balance"), view)
    targets = [sched.dispatch(DispatchRequest(f"r{k}", 800), now=0.0) for k in range(8)]
    # without fresh reports, the ledger alone spreads the burst evenly
    assert sorted(targets) == ["i0", "i0", "i1", "i1", "i2", "i2", "i3", "i3"]


def test_discard_drops_one_entry_and_its_load():
    led = InFlightLedger(ttl_s=5)
    led.add("a", DispatchRequest("r1", 160), 10, 160, now=0.0)
    led.add("a", DispatchRequest("r2", 32), 2, 32, now=0.0)
    led.discard("a", "r1")
    led.discard("a", "unknown")
    led.discard("b", "r1")
    p = led.pending("a")
    assert (p.num_requests, p.blocks, p.prefill_tokens) == (1, 2, 32)
    led.discard("a", "r2")
    assert led.pending("a") is NO_PENDING and len(led) == 0
