"""The gateway's stream bookkeeping for live migration (llumnix.gateway.migration), on the
events vLLM 0.32 sends: what the client sees of a stream continued elsewhere (one id, chat
chunks rebuilt from completion chunks, usage counting each token once, token ids only when
asked), the continuation request, the stage prompts, and which requests can move."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from llumnix.gateway.migration import LiveRequest, sse_lines, stage_prompt, why_not_migratable


def completion_chunk(
    ids: list[int],
    text: str = "",
    finish: str | None = None,
    prompt: list[int] | None = None,
    cid: str = "cmpl-a",
) -> dict[str, Any]:
    return {
        "id": cid, "object": "text_completion", "created": 111, "model": "m",
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                     "stop_reason": None, "prompt_token_ids": prompt, "token_ids": ids}],
    }  # fmt: skip


def usage_chunk(prompt: int, completion: int, cid: str = "cmpl-a") -> dict[str, Any]:
    return {"id": cid, "object": "text_completion", "created": 111, "model": "m", "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}}  # fmt: skip


def test_a_completion_continued_elsewhere_reads_as_one_stream() -> None:
    body = {"model": "m", "prompt": "hi", "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    live = LiveRequest("llx-1", body, chat=False, instance="i0")
    first = live.absorb(completion_chunk([7], "a", prompt=[1, 2, 3]))
    assert first is not None and first["choices"][0]["text"] == "a"
    assert "token_ids" not in first["choices"][0], "token ids the client did not ask for"
    assert "prompt_token_ids" not in first["choices"][0]
    live.absorb(completion_chunk([8, 9], "bc"))
    assert live.prompt_ids == [1, 2, 3] and live.output_ids == [7, 8, 9]
    cont = live.continuation()
    assert cont["prompt"] == [1, 2, 3, 7, 8, 9] and cont["max_tokens"] == 3
    assert cont["stream"] and cont["return_token_ids"]
    assert cont["stream_options"] == {"include_usage": True}
    live.begin_segment("i1")
    # The destination's events: another id, its prompt is the original prompt + output.
    out = live.absorb(completion_chunk([10], "d", prompt=[1, 2, 3, 7, 8, 9], cid="cmpl-b"))
    assert out is not None and out["id"] == "cmpl-a" and out["created"] == 111
    assert out["choices"][0]["text"] == "d" and "prompt_token_ids" not in out["choices"][0]
    out = live.absorb(completion_chunk([11, 12], "ef", finish="length", cid="cmpl-b"))
    assert out is not None and out["choices"][0]["finish_reason"] == "length" and live.finished
    out = live.absorb(usage_chunk(6, 3, cid="cmpl-b"))
    assert out is not None
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    assert live.output_ids == [7, 8, 9, 10, 11, 12]


def test_a_chat_stream_continued_elsewhere_gets_chat_chunks() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "return_token_ids": True}  # fmt: skip
    live = LiveRequest("llx-2", body, chat=True, instance="i0")
    role = {"id": "chatcmpl-a", "object": "chat.completion.chunk", "created": 5, "model": "m",
            "prompt_token_ids": [4, 5],
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                         "finish_reason": None}]}  # fmt: skip
    out = live.absorb(role)
    assert out is not None and out["prompt_token_ids"] == [4, 5], "asked for: kept"
    tok = {"id": "chatcmpl-a", "object": "chat.completion.chunk", "created": 5, "model": "m",
           "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None,
                        "token_ids": [9]}]}  # fmt: skip
    live.absorb(tok)
    assert live.prompt_ids == [4, 5] and live.output_ids == [9]
    cont = live.continuation()
    assert cont["prompt"] == [4, 5, 9] and cont["max_tokens"] is None  # the engine's limit
    assert "messages" not in cont
    live.begin_segment("i1")
    out = live.absorb(completion_chunk([10], "y", finish="stop", cid="cmpl-z"))
    assert out == {
        "id": "chatcmpl-a", "created": 5, "model": "m", "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "y"}, "logprobs": None,
                     "finish_reason": "stop", "token_ids": [10]}],
    }  # fmt: skip


def test_the_continuation_carries_the_sampling_and_the_rest_of_the_budget() -> None:
    body = {"model": "m", "prompt": [1, 2], "max_tokens": 10, "min_tokens": 4, "seed": 7,
            "temperature": 0.5, "top_p": 0.9, "ignore_eos": True, "stream": True,
            "priority": 2, "cache_salt": "s"}  # fmt: skip
    live = LiveRequest("llx-3", body, chat=False, instance="i0", prompt_ids=[1, 2])
    live.output_ids = [5, 6, 7, 8, 9]
    cont = live.continuation()
    assert cont["max_tokens"] == 5 and cont["min_tokens"] == 0
    for key in ("seed", "temperature", "top_p", "ignore_eos", "priority", "cache_salt"):
        assert cont[key] == body[key]
    assert "stream_options" not in cont
    # /v1/completions' default budget is 16 tokens.
    live = LiveRequest("llx-4", {"prompt": [1], "stream": True}, False, "i0", prompt_ids=[1])
    live.output_ids = [3] * 6
    assert live.continuation()["max_tokens"] == 10


def test_stage_prompts_end_one_token_past_the_last_full_block_with_written_kv() -> None:
    live = LiveRequest("llx-5", {}, False, "i0", prompt_ids=list(range(40)))
    assert stage_prompt(live, 32) == list(range(33))  # 40 tokens: KV of 39, one full block
    live = LiveRequest("llx-6", {}, False, "i0", prompt_ids=list(range(32)))
    assert stage_prompt(live, 32) is None  # the 32nd token has no KV yet
    live.output_ids = [99]
    assert stage_prompt(live, 32) == [*range(32), 99]


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"stream": False}, "not streamed"),
        ({"n": 2}, "n > 1"),
        ({"logprobs": 1}, "logprobs"),
        ({"stop": ["\n"]}, "stop strings"),
        ({"response_format": {"type": "json_object"}}, "structured output"),
        ({"presence_penalty": 0.5}, "penalties"),
        ({"repetition_penalty": 1.1}, "penalties"),
        ({"echo": True}, "echo"),
        ({"kv_transfer_params": {"x": 1}}, "its own kv_transfer_params"),
        ({"prompt": [[1, 2], [3]]}, "batched prompts"),
    ],
)
def test_what_cannot_migrate_says_why(extra: dict[str, Any], reason: str) -> None:
    body = {"model": "m", "prompt": [1, 2], "stream": True, **extra}
    assert why_not_migratable(body, chat=False) == reason


def test_plain_greedy_and_seeded_streams_can_migrate() -> None:
    for extra in ({}, {"seed": 3, "temperature": 0.8}, {"stop_token_ids": [2]},
                  {"presence_penalty": 0.0, "repetition_penalty": 1.0}):  # fmt: skip
        assert why_not_migratable({"prompt": [1], "stream": True, **extra}, chat=False) is None
    assert why_not_migratable({"messages": [], "stream": True}, chat=True) is None


def test_event_lines_of_any_length_are_read_whole_and_a_partial_last_one_is_dropped() -> None:
    big = b"data: " + b"7," * 300_000  # a first event of a very long prompt: 600 KB
    body = big + b"\n\ndata: [DONE]\n\ndata: {partial"

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 4096):
            yield body[i : i + 4096]

    async def read() -> list[bytes]:
        return [line async for line in sse_lines(chunks())]

    assert asyncio.run(read()) == [big, b"", b"data: [DONE]", b""]
