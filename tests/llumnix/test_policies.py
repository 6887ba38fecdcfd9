from llumnix.scheduler import DispatchRequest, Scheduler, SchedulerConfig
from llumnix.scheduler.ledger import NO_PENDING
from llumnix.scheduler.policies import DISPATCH_POLICIES

from .sched_views import make_status, make_view


def pick(policy: str, view, r=None, **kw) -> str | None:
    p = DISPATCH_POLICIES.create(policy, **kw)
    return p.select(r or DispatchRequest("r", 160), view, {}, 0.0)


def test_round_robin_cycles_and_skips_unschedulable():
    view = make_view(make_status("a"), make_status("b", schedulable=False), make_status("c"))
    p = DISPATCH_POLICIES.create("round_robin")
    got = [p.select(DispatchRequest(f"r{k}", 16), view, {}, 0.0) for k in range(4)]
    assert got == ["a", "c", "a", "c"]


def test_infaas_picks_lowest_projected_memory():
    view = make_view(
        make_status("a", num_free_blocks=30),
        make_status("b", num_free_blocks=60, num_waiting=1, waiting_demand_blocks=40),
        make_status("c", num_free_blocks=50),
    )
    assert pick("infaas++", view) == "c"


def test_queue_size_balance():
    view = make_view(make_status("a", num_waiting=2), make_status("b", num_waiting=1))
    assert pick("queue_size", view) == "b"


def test_load_balance_prefers_freeness_not_memory():
    # b has less free memory but far fewer running requests: more room per request
    view = make_view(
        make_status("a", num_free_blocks=60, num_running=20),
        make_status("b", num_free_blocks=40, num_running=2),
    )
    assert pick("load_balance", view) == "b"
    assert pick("infaas++", view) == "a"


def test_load_balance_prefers_instances_where_the_prompt_fits():
    view = make_view(
        make_status("a", num_free_blocks=20, num_running=1),
        make_status("b", num_free_blocks=70, num_running=10),
    )
    long_prompt = DispatchRequest("r", 16 * 50)
    assert pick("load_balance", view, long_prompt) == "b"
    assert pick("load_balance", view, long_prompt, prefer_fit=False) == "a"


def test_priority_headroom_steers_normal_requests_away():
    view = make_view(
        make_status("a", num_free_blocks=80, num_running=2, num_high_priority=1),
        make_status("b", num_free_blocks=60, num_running=2),
    )
    assert pick("priority", view, headroom_blocks=50) == "b"
    assert pick("load_balance", view) == "a"


def test_cache_aware_prefers_hits_among_free_enough():
    view = make_view(
        make_status("a", num_free_blocks=90),
        make_status("b", num_free_blocks=60, prefix_ids=frozenset({"sys"})),
        make_status("c", num_free_blocks=5, num_running=4, prefix_ids=frozenset({"sys"})),
    )
    r = DispatchRequest("r", 500, prefix_id="sys", prefix_tokens=400)
    assert pick("cache_aware", view, r) == "b"
    assert pick("cache_aware", view, DispatchRequest("r", 500)) == "a"


def test_flood_and_no_eligible_instance():
    view = make_view(make_status("a", draining=True), make_status("b"), make_status("c"))
    assert pick("flood", view) == "b"
    dead = make_view(make_status("a", schedulable=False))
    for name in ("round_robin", "infaas++", "load_balance", "flood"):
        assert pick(name, dead) is None


def test_scheduler_records_dispatch_in_ledger():
    view = make_view(make_status("a"), make_status("b"))
    sched = Scheduler(SchedulerConfig(policy="load_balance"), view)
    target = sched.dispatch(DispatchRequest("r1", 320), now=0.0)
    assert target == "a"
    assert sched.ledger.pending("a").blocks == 20
    sched.on_status(make_status("a", timestamp=0.1, request_ids=frozenset({"r1"})))
    assert sched.ledger.pending("a") is NO_PENDING


def test_priority_gathers_high_priority_where_normal_requests_do_not_go():
    view = make_view(
        make_status("hp", num_free_blocks=80, num_running=2, num_high_priority=1),
        make_status("busy", num_free_blocks=60, num_running=3),
    )
    normal = DispatchRequest("n", 160)
    high = DispatchRequest("h", 160, priority=1)
    assert pick("priority", view, normal, headroom_blocks=50) == "busy"
    assert pick("priority", view, high, headroom_blocks=50) == "hp"
    assert pick("priority", view, high, headroom_blocks=50, colocate_high=False) == "busy"
