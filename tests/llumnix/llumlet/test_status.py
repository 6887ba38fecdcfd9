"""The status tracker follows a scheduler's events: queued requests and their cache hits,
steps that run them (prefill chunks, decodes, new blocks), preemptions, finishes."""

from __future__ import annotations

import pytest

from llumnix.llumlet import Scheduled, StatusTracker, to_instance_status

BS = 16


def test_queued_requests_count_their_uncomputed_prompt_and_block_demand() -> None:
    t = StatusTracker("i0", BS)
    t.add("a", 40)
    t.add("b", 100)
    t.matched("b", 32)  # two cached blocks
    s = t.snapshot(free_blocks=90, total_blocks=100)
    assert (s.num_waiting, s.num_running) == (2, 0)
    assert s.waiting_prefill_tokens == 40 + (100 - 32)
    assert s.hol_demand_blocks == 3  # a: ceil(40 / 16)
    assert s.waiting_demand_blocks == 3 + (7 - 2)
    assert (s.num_free_blocks, s.num_total_blocks, s.block_size) == (90, 100, BS)
    assert [r.request_id for r in s.requests] == ["a", "b"]


def test_steps_move_requests_to_running_and_count_decode_and_prefill() -> None:
    t = StatusTracker("i0", BS, role="decode")
    t.add("a", 40)
    t.add("b", 100)
    # Step 1: a is prefilled whole, b's first chunk of 60 tokens.
    t.step([Scheduled("a", 0, 40, new_blocks=3, resumed=True),
            Scheduled("b", 0, 60, new_blocks=4, resumed=True)], now=1.0)  # fmt: skip
    s = t.snapshot(0, 100)
    assert (s.num_running, s.num_waiting, s.running_tokens) == (2, 0, 100)
    assert (s.decode_batch_size, s.prefill_tokens, s.step_id) == (0, 100, 1)
    # Step 2: a decodes one token, b finishes its prompt.
    t.step([Scheduled("a", 40, 1, output_tokens=1),
            Scheduled("b", 60, 40, new_blocks=3)], now=1.05)  # fmt: skip
    s = t.snapshot(0, 100)
    assert (s.decode_batch_size, s.decode_tokens, s.prefill_tokens) == (1, 41, 40)
    assert s.step_seconds == pytest.approx(0.05)
    by_id = {r.request_id: r for r in s.requests}
    assert (by_id["a"].computed_tokens, by_id["a"].output_tokens, by_id["a"].blocks) == (41, 1, 3)
    assert (by_id["b"].computed_tokens, by_id["b"].blocks, by_id["b"].running) == (100, 7, True)
    assert s.role == "decode" and s.seq == 2


def test_preempted_request_waits_again_without_blocks_then_resumes_with_its_new_table() -> None:
    t = StatusTracker("i0", BS)
    t.add("a", 32)
    t.step([Scheduled("a", 0, 32, new_blocks=2, resumed=True)])
    t.step([], preempted=["a"])
    s = t.snapshot(10, 10)
    assert (s.num_running, s.num_waiting, s.num_preempted) == (0, 1, 1)
    assert s.requests[0].blocks == 0 and s.waiting_prefill_tokens == 32
    t.step([Scheduled("a", 0, 33, output_tokens=1, new_blocks=3, resumed=True)])
    s = t.snapshot(7, 10)
    assert s.num_running == 1 and s.requests[0].blocks == 3


def test_finished_or_aborted_requests_leave_and_draining_stops_new_work() -> None:
    t = StatusTracker("i0", BS)
    t.add("a", 10)
    t.add("b", 10)
    t.finish("a")
    t.finish("never-seen")
    t.draining = True
    s = t.snapshot(5, 5)
    assert [r.request_id for r in s.requests] == ["b"]
    assert s.draining and not s.schedulable and s.healthy
    view = to_instance_status(s)
    assert view.instance_id == "i0" and view.request_ids == frozenset({"b"})
    assert view.num_waiting == 1 and not view.schedulable and view.draining
    assert (view.num_free_blocks, view.num_total_blocks) == (5, 5)


def test_every_snapshot_is_a_new_report_of_one_incarnation() -> None:
    a, b = StatusTracker("i0", BS), StatusTracker("i0", BS)
    assert a.incarnation != b.incarnation
    assert [a.snapshot(1, 1).seq for _ in range(3)] == [1, 2, 3]


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="role"):
        StatusTracker("i0", BS, role="mixed")
    with pytest.raises(ValueError, match="block_size"):
        StatusTracker("i0", 0)
