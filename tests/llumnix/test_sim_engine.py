import dataclasses

import pytest

from llumnix.sim.engine import ReqState, SimInstance, SimRequest
from llumnix.sim.migration import JobState, MigrationJob
from llumnix.sim.profile import EngineProfile, load_profile
from llumnix.sim.traces import TraceRequest

SMALL = EngineProfile(name="small", num_blocks=10, block_size=4, max_batched_tokens=64)


def req(rid: str, prompt: int, out: int, t: float = 0.0) -> SimRequest:
    return SimRequest(TraceRequest(rid, t, prompt, out))


def run_until_idle(inst: SimInstance, now: float = 0.0, limit: int = 10_000) -> float:
    for _ in range(limit):
        dur = inst.start_step(now)
        if dur is None:
            return now
        now += dur
        inst.finish_step(now)
        inst.check_invariants()
    raise AssertionError("instance did not go idle")


def test_default_profile_matches_paper_capacity():
    p = load_profile()
    assert 14_000 <= p.capacity_tokens <= 16_000  # "an A10 holds about 15k tokens"
    assert p.kv_bytes_per_token == 2 * 32 * 4096 * 2
    assert p.decode_s(1, 100) < p.decode_s(32, 8000)


def test_default_decode_step_grows_with_batch_and_context():
    """vLLM-2023 model: a decode step costs weight reads plus per-sequence work plus KV reads,
    so a request decoding alone is much faster than one sharing a loaded instance."""
    p = load_profile()
    lone = p.decode_s(1, 500)
    assert p.decode_s(20, 500) > 1.5 * lone  # per-sequence work, same KV
    assert p.decode_s(1, 12_000) > 1.5 * lone  # KV reads, same batch
    assert p.decode_s(20, 12_000) > 2.4 * lone  # a loaded step (the priority claim's room)
    assert p.decode_s(1, 0) > 0.9 * p.decode_base_ms * 1e-3  # weight reads dominate alone


def test_lone_request_decodes_faster_than_in_a_loaded_batch():
    p = load_profile()
    alone = SimInstance("a", p)
    r = req("r", 500, 50)
    alone.enqueue(r)
    run_until_idle(alone)
    loaded = SimInstance("b", p)
    s = req("s", 500, 50)
    for k in range(19):
        loaded.enqueue(req(f"o{k}", 500, 400))
    loaded.enqueue(s)
    now = 0.0
    while s.state is not ReqState.FINISHED:
        now += loaded.start_step(now) or 0.0
        loaded.finish_step(now)
    assert r.finish_s is not None and r.first_token_s is not None
    assert s.finish_s is not None and s.first_token_s is not None
    per_token_alone = (r.finish_s - r.first_token_s) / 49
    per_token_loaded = (s.finish_s - s.first_token_s) / 49
    assert per_token_loaded > 1.4 * per_token_alone


def test_partial_profile_file_takes_the_shipped_values(tmp_path):
    shipped = load_profile()
    path = tmp_path / "p.json"
    path.write_text('{"name": "mine", "num_blocks": 500}')
    mine = load_profile(path)
    assert mine.num_blocks == 500
    same = dataclasses.replace(mine, name=shipped.name, num_blocks=shipped.num_blocks)
    assert same == shipped


def test_profile_file_round_trip(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"name": "x", "num_blocks": 100, "decode_base_ms": 10.0}')
    p = load_profile(str(path))
    assert (p.name, p.num_blocks, p.decode_base_ms) == ("x", 100, 10.0)
    path.write_text('{"bogus": 1}')
    with pytest.raises(ValueError):
        load_profile(str(path))


def test_prefill_then_decode_token_accounting():
    inst = SimInstance("i", SMALL)
    r = req("a", 6, 4)
    inst.enqueue(r)
    now = run_until_idle(inst)
    assert r.state is ReqState.FINISHED and r.generated == 4
    assert r.first_token_s is not None and r.finish_s == now
    assert inst.stats.prefill_steps == 1 and inst.stats.decode_steps == 3
    assert inst.free_blocks == SMALL.num_blocks


def test_fcfs_head_of_line_blocks_queue():
    inst = SimInstance("i", SMALL)
    big, small = req("big", 36, 2), req("small", 4, 2)
    hog = req("hog", 8, 50)
    inst.enqueue(hog)
    inst.finish_step(inst.start_step(0.0) or 0.0)
    inst.enqueue(big)  # needs 9 blocks, only 8 free
    inst.enqueue(small)
    inst.start_step(0.1)
    assert [r.request_id for r in inst.waiting] == ["big", "small"]  # small waits behind big
    assert inst.status(0.1).hol_demand_blocks == 9


def test_preemption_victim_is_the_latest_arrival_not_the_latest_to_join():
    inst = SimInstance("i", SMALL)  # 10 blocks x 4 tokens
    old, new = req("old", 8, 30, t=0.0), req("new", 8, 30, t=1.0)
    inst.enqueue(new)
    inst.finish_step(inst.start_step(1.0) or 1.0)
    inst.enqueue(old)  # e.g. re-admitted after a preemption or joined by migration
    now = run_until_idle(inst, 2.0)
    assert old.num_preemptions == 0 and new.num_preemptions >= 1
    assert old.finish_s is not None and new.finish_s is not None and now == new.finish_s


def test_preemption_by_recompute_of_most_recent_request():
    inst = SimInstance("i", SMALL)  # 10 blocks x 4 tokens
    a, b = req("a", 16, 20), req("b", 16, 20)
    inst.enqueue(a)
    inst.enqueue(b)
    now = run_until_idle(inst)
    assert a.num_preemptions == 0 and b.num_preemptions >= 1
    assert b.preemption_loss_s > 0
    assert a.finish_s is not None and b.finish_s is not None and b.finish_s > a.finish_s
    assert a.generated == b.generated == 20
    assert inst.stats.preemptions == b.num_preemptions and now == b.finish_s


def _running_request(src: SimInstance, prompt: int, out: int) -> SimRequest:
    r = req("m", prompt, out)
    src.enqueue(r)
    now = 0.0
    while r.state is not ReqState.RUNNING:
        now += src.start_step(now) or 0.0
        src.finish_step(now)
    return r


def test_migration_pre_copy_and_downtime_is_last_stage():
    prof = load_profile()
    src, dst = SimInstance("s", prof), SimInstance("d", prof)
    r = _running_request(src, 4000, 500)
    job = MigrationJob(r, src, dst, 0.0)
    first = job.begin()
    assert first is not None and first > 0.2  # 4000 tokens x 512 KiB at 8 GB/s
    assert dst.free_blocks == prof.num_blocks - 250 and src.migrating_out == dst.migrating_in == 1
    now = 0.0
    stage_end = first
    while job.state is JobState.PRECOPY:  # decode on, copying what was produced meanwhile
        while now < stage_end:
            now += src.start_step(now) or 0.0
            src.finish_step(now)
        nxt = job.stage_done()
        stage_end = now + (nxt or 0.0)
    ctx_before = r.ctx
    downtime = job.suspend(now)
    assert downtime is not None and downtime < 0.05
    job.commit(now + downtime)
    assert r.instance is dst and r.ctx == ctx_before and r.state is ReqState.RUNNING
    assert src.free_blocks == prof.num_blocks and src.migrating_out == 0
    src.check_invariants()
    dst.check_invariants()
    run_until_idle(dst, now + downtime)
    assert r.generated == 500


def test_migration_aborts_when_destination_is_full():
    prof = dataclasses.replace(load_profile(), num_blocks=300)
    src, dst = SimInstance("s", prof), SimInstance("d", prof)
    r = _running_request(src, 4000, 100)
    dst.free_blocks = 100  # someone else holds the rest
    assert MigrationJob(r, src, dst, 0.0).begin() is None
    assert dst.free_blocks == 100 and r.migration is None and src.migrating_out == 0


def test_priority_queue_puts_high_priority_ahead_of_normal():
    inst = SimInstance("i", SMALL, priority_queue=True)
    n1, n2 = req("n1", 4, 2), req("n2", 4, 2)
    h1 = SimRequest(TraceRequest("h1", 0.0, 4, 2, priority=1))
    h2 = SimRequest(TraceRequest("h2", 0.0, 4, 2, priority=1))
    for r in (n1, h1, n2, h2):
        inst.enqueue(r)
    assert [r.request_id for r in inst.waiting] == ["h1", "h2", "n1", "n2"]
    assert inst.status(0.0).num_high_priority == 2


def test_requests_in_the_prefill_step_are_reported_as_running():
    """vLLM moves a request to its running queue when it schedules its prefill: a report sent
    while the prefill step runs counts it as running, not as queued and not as absent."""
    inst = SimInstance("i", SMALL)
    inst.enqueue(req("a", 8, 3))
    inst.enqueue(req("b", 8, 3))
    assert inst.status(0.0).num_running == 0 and inst.status(0.0).num_waiting == 2
    dur = inst.start_step(0.0)
    assert dur is not None
    mid = inst.status(0.0)
    assert (mid.num_running, mid.num_waiting) == (2, 0)
    assert mid.num_free_blocks == 10 - 2 * 2
    inst.finish_step(dur)
    after = inst.status(dur)
    assert (after.num_running, after.num_waiting) == (2, 0)
