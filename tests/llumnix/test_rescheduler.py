import pytest

from llumnix.rescheduler import (
    AutoscaleConfig,
    Autoscaler,
    MigrationRule,
    Rescheduler,
    ReschedulerConfig,
    ScaleAction,
)
from llumnix.rescheduler.policies import Defragmentation, Drain, LoadBalance, PriorityHeadroom

from .sched_views import make_status, make_view


def test_load_balance_pairs_least_free_with_freest():
    view = make_view(
        make_status("a", num_free_blocks=10, num_running=5),  # freeness 2
        make_status("b", num_free_blocks=90, num_running=3),  # 30
        make_status("c", num_free_blocks=30, num_running=3),  # 10
        make_status("d", num_free_blocks=95, num_running=1),  # 95
    )
    pairs = LoadBalance(gap=10, src_below=20).propose(view, 0)
    assert [(p.src, p.dst) for p in pairs] == [("a", "d"), ("c", "b")]
    assert all(p.rule is MigrationRule.SHORTEST for p in pairs)


def test_load_balance_quiet_when_balanced_or_light():
    balanced = make_view(
        make_status("a", num_free_blocks=10, num_running=5),
        make_status("b", num_free_blocks=20, num_running=5),
    )
    assert LoadBalance(gap=10, src_below=20).propose(balanced, 0) == []
    light = make_view(
        make_status("a", num_free_blocks=60, num_running=2),
        make_status("b", num_free_blocks=100, num_running=2),
    )
    assert LoadBalance(gap=10, src_below=20).propose(light, 0) == []


def test_defragmentation_frees_room_for_blocked_head_of_line():
    view = make_view(
        make_status("a", num_free_blocks=10, num_running=3, num_waiting=1, hol_demand_blocks=40),
        make_status("b", num_free_blocks=80, num_running=2),
        make_status("c", num_free_blocks=90, num_running=1, num_waiting=1, hol_demand_blocks=5),
    )
    pairs = Defragmentation().propose(view, 0)
    assert [(p.src, p.dst, p.rule) for p in pairs] == [("a", "b", MigrationRule.LONGEST)]


def test_drain_moves_everything_off_over_several_destinations():
    view = make_view(
        make_status("a", num_free_blocks=40, num_running=3, num_waiting=1, draining=True),
        make_status("b", num_free_blocks=80, num_running=2),
        make_status("c", num_free_blocks=90, num_running=1),
    )
    pairs = Drain(per_cycle=3).propose(view, 0)
    assert len(pairs) == 3 and {p.src for p in pairs} == {"a"}
    assert {p.dst for p in pairs} == {"b", "c"}
    assert all(p.rule is MigrationRule.ALL for p in pairs)


def test_priority_headroom_moves_normal_requests_away():
    view = make_view(
        make_status("a", num_free_blocks=50, num_running=4, num_high_priority=1),
        make_status("b", num_free_blocks=90, num_running=1),
        make_status("c", num_free_blocks=95, num_running=1, num_high_priority=1),
    )
    pairs = PriorityHeadroom(headroom_blocks=40, src_below=20).propose(view, 0)
    assert [(p.src, p.dst, p.rule) for p in pairs] == [("a", "b", MigrationRule.LOW_PRIORITY)]


def test_plan_is_conflict_free_and_capped():
    view = make_view(
        make_status("a", num_free_blocks=5, num_running=5, num_waiting=1, hol_demand_blocks=30),
        make_status("b", num_free_blocks=8, num_running=4),
        make_status("c", num_free_blocks=9, num_running=4, num_migrating_out=1),
        make_status("d", num_free_blocks=95, num_running=1),
        make_status("e", num_free_blocks=90, num_running=1),
        make_status("f", num_free_blocks=10, num_running=2, draining=True),
    )
    cfg = ReschedulerConfig(max_out_per_instance=1, max_in_per_instance=1, max_drain_out=2)
    plan = Rescheduler(cfg).plan(view, 0.0)
    srcs = [p.src for p in plan.pairs]
    dsts = [p.dst for p in plan.pairs]
    assert not set(srcs) & set(dsts)
    assert "c" not in srcs  # already at its outgoing cap
    for iid in set(dsts):
        assert sum(p.num_requests for p in plan.pairs if p.dst == iid) <= 1
    # drain runs first and claims the freest destinations
    assert plan.pairs[0].src == "f" and plan.pairs[0].reason == "drain"


def test_autoscaler_band_cooldown_and_victim():
    cfg = AutoscaleConfig(scale_out_below=10, scale_in_above=60, min_instances=1, cooldown_s=5)
    busy = make_view(
        make_status("a", num_free_blocks=10, num_running=5),
        make_status("b", num_free_blocks=20, num_running=5),
    )
    auto = Autoscaler(cfg)
    d = auto.decide(busy, 0.0)
    assert d is not None and d.action is ScaleAction.OUT
    assert auto.decide(busy, 1.0) is None  # cooldown
    idle = make_view(
        make_status("a", num_free_blocks=90, num_running=2),
        make_status("b", num_free_blocks=95, num_running=1),
    )
    d = auto.decide(idle, 10.0)
    assert d is not None and d.action is ScaleAction.IN and d.instance_ids == ("b",)
    single = make_view(make_status("a"))
    assert Autoscaler(cfg).decide(single, 0.0) is None  # at min_instances


def test_autoscaler_pools_freeness_so_an_idle_instance_is_no_surplus():
    cfg = AutoscaleConfig(scale_out_below=10, scale_in_above=60, min_instances=1, cooldown_s=5)
    # two busy instances and a fresh idle one: mean per-instance freeness would be
    # (4 + 4 + 936) / 3 > 60 (scale in); pooled it is (40 + 40 + 936) / 21 < 60
    view = make_view(
        make_status("a", num_total_blocks=936, num_free_blocks=40, num_running=10),
        make_status("b", num_total_blocks=936, num_free_blocks=40, num_running=10),
        make_status("c", num_total_blocks=936, num_free_blocks=936, num_running=0),
    )
    auto = Autoscaler(cfg)
    assert auto.average(view.status_list()) == pytest.approx(1016 / 21)
    assert auto.decide(view, 0.0) is None


def test_autoscaler_on_projected_free_memory():
    cfg = AutoscaleConfig(scale_out_below=0.1, scale_in_above=0.5, metric="kv_free_fraction")
    full = make_view(
        make_status("a", num_total_blocks=100, num_free_blocks=10, waiting_demand_blocks=5),
        make_status("b", num_total_blocks=100, num_free_blocks=20, num_running=3),
    )
    auto = Autoscaler(cfg)
    assert auto.average(full.status_list()) == pytest.approx(0.125)
    assert auto.decide(full, 0.0) is None  # inside the band
    full.update(make_status("b", num_total_blocks=100, num_free_blocks=5, num_running=3))
    d = auto.decide(full, 0.0)
    assert d is not None and d.action is ScaleAction.OUT
    with pytest.raises(ValueError):
        Autoscaler(AutoscaleConfig(metric="kv_usage"))


def test_load_balance_with_headroom_moves_only_normal_requests():
    view = make_view(
        make_status("hp", num_free_blocks=60, num_running=3, num_high_priority=1),
        make_status("hp_only", num_free_blocks=70, num_running=2, num_high_priority=2),
        make_status("free", num_free_blocks=95, num_running=1),
    )
    pairs = LoadBalance(gap=5, src_below=40, high_priority_headroom_blocks=50).propose(view, 0)
    assert [(p.src, p.dst, p.rule) for p in pairs] == [("hp", "free", MigrationRule.LOW_PRIORITY)]


def test_loop_runs_cycles_on_its_thread_until_stopped():
    import threading

    from llumnix.rescheduler import ReschedulerLoop

    view = make_view(
        make_status("a", num_free_blocks=10, num_running=5),
        make_status("b", num_free_blocks=95, num_running=1),
    )
    plans = []
    two = threading.Event()

    def on_plan(plan):
        plans.append(plan)
        if len(plans) >= 2:
            two.set()

    loop = ReschedulerLoop(Rescheduler(ReschedulerConfig(interval_s=0.01)), lambda: view, on_plan)
    loop.start()
    assert two.wait(5.0)
    loop.stop()
    assert loop.cycles >= 2 and [(p.src, p.dst) for p in plans[0].pairs] == [("a", "b")]


def test_autoscaler_pooled_freeness_counts_queued_requests_in_the_batch():
    # queued requests add their demand to the usage and themselves to the batch, as in
    # Llumnix's remaining_steps load: (100 - 20 + 200) / (4 + 2 + 4)
    cfg = AutoscaleConfig(scale_out_below=10, scale_in_above=60)
    view = make_view(
        make_status(
            "a", num_free_blocks=100, num_running=4, num_waiting=2, waiting_demand_blocks=20
        ),
        make_status("b", num_free_blocks=200, num_running=4),
    )
    assert Autoscaler(cfg).average(view.status_list()) == pytest.approx(280 / 10)
