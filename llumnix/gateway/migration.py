"""Live migration of a streamed request between engine instances, coordinated by the gateway,
on unmodified vLLM.

The gateway owns the client's stream, so it coordinates: it relays the source's SSE events
token by token (upstream requests carry ``return_token_ids``), knows every token the client
has seen, and can continue the request anywhere as ``prompt + output so far``. The KV moves
ahead of the switch through the PD pull path the LlumnixConnector already has, so the
destination's *prefix cache* receives it:

1. **Stage k** (the source keeps decoding): the tokens known so far are cut to the largest
   block-aligned prefix whose KV the source has written, ``T[:kB+1]``. The source runs it as a
   one-token request with ``do_remote_decode`` (a prefix-cache hit on its own running
   request's blocks; it recomputes one token) and hands off the blocks (held until read); the
   destination runs the same prompt with that hand-off, reads only the blocks beyond its own
   prefix hit, and keeps them cached when the one-token request ends.
2. Stages repeat while more than ``last_stage_blocks`` full blocks were added since the last
   one (at most ``max_stages``).
3. **Cut** (downtime starts): right after the next token event from the source, the gateway
   stops relaying it and closes the source's stream (vLLM aborts it; its blocks go back to
   the source's prefix cache). ``O`` = the output tokens the client has seen.
4. **Resume**: the destination gets ``/v1/completions`` with ``prompt = P + O``, the remaining
   ``max_tokens`` and ``min_tokens``, the same sampling parameters; it hits its prefix cache
   for every copied block and recomputes the tail (≤ ``last_stage_blocks`` blocks plus the
   tokens decoded during the last stage).
5. **Commit** = the destination's first token reaches the client. Its events are spliced at
   the token boundary: the original ``id``/``created``, ``usage`` counting each token once
   (``prompt_tokens = len(P)``), chat chunks rebuilt from completion chunks.

Rollback: a failed stage (or the request finishing on the source) ends the migration with the
source still serving, nothing changed; a destination that fails before its first token is
replaced by the source itself (its prefix cache still holds the request's blocks; at worst it
recomputes). A source (or committed destination) that dies mid-stream is the same resume on
another instance: the request continues by recompute. The source's stage blocks are held by
its connector until the destination's read notice or the hold's deadline, so nothing is freed
while a reader may read it; the destination's cache being evicted between stages only
enlarges the recomputed tail.

Only greedy sampling is token-identical across a move: a seeded request's RNG restarts on the
destination (its seed is kept, so a migrated run repeats itself, but not the unmigrated one).
Not migratable (relayed as plain streams): non-streamed requests, ``n > 1``, ``echo``,
logprobs, stop strings (the source holds back text at the cut), structured outputs, tools,
penalties (they count output tokens the destination would see as prompt).
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

# Sampling parameters a continuation carries over as they are.
CARRIED = (
    "model", "temperature", "top_p", "top_k", "min_p", "seed", "ignore_eos", "stop_token_ids",
    "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
    "priority", "cache_salt", "user",
)  # fmt: skip
# Parameters whose non-default values make a request not migratable, with why.
_BLOCKERS = {
    "echo": "echo",
    "logprobs": "logprobs",
    "top_logprobs": "logprobs",
    "prompt_logprobs": "logprobs",
    "stop": "stop strings",
    "response_format": "structured output",
    "structured_outputs": "structured output",
    "guided_json": "structured output",
    "guided_regex": "structured output",
    "guided_choice": "structured output",
    "guided_grammar": "structured output",
    "tools": "tools",
    "presence_penalty": "penalties",
    "frequency_penalty": "penalties",
    "best_of": "best_of",
    "kv_transfer_params": "its own kv_transfer_params",
}
_DEFAULTS: dict[str, Any] = {"repetition_penalty": 1.0}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's /v1/completions default


def why_not_migratable(body: dict[str, Any], chat: bool) -> str | None:
    """None when the request can be migrated, else the reason."""
    if not body.get("stream"):
        return "not streamed"
    if body.get("n", 1) not in (1, None):
        return "n > 1"
    for key, reason in _BLOCKERS.items():
        if body.get(key) not in (None, False, 0, [], ""):
            return reason
    for key, default in _DEFAULTS.items():
        if body.get(key, default) != default:
            return "penalties"
    prompt = body.get("prompt")
    if not chat and isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return "batched prompts"
    return None


class MigrationError(Exception):
    """A migration that cannot start: ``status`` is the HTTP status the gateway answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Outcome(enum.Enum):
    DONE = "done"  # the destination serves the request
    ROLLED_BACK = "rolled_back"  # a step failed; the source serves it
    CANCELLED = "cancelled"  # the request ended (or the client left) before the cut
    FAILED = "failed"  # source and destination both failed


@dataclass
class Migration:
    """One migration's progress, as the gateway reports it."""

    source: str
    destination: str
    max_stages: int = 3
    started: float = field(default_factory=time.monotonic)
    state: str = "pending"  # pending, copying, committing, then an Outcome value
    stages: int = 0
    copied_tokens: int = 0
    downtime_s: float | None = None
    cut_token_at: float = 0.0
    """When the client got the source's last token."""
    cut_after_tokens: int | None = None
    """Output tokens the client had from the source at the cut."""
    reason: str = ""
    cut: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by the coordinator: the relay switches to the destination after its next event."""
    resumed: bool = False
    """The stream was continued on another instance since the cut (or a failure)."""
    result: asyncio.Future[Outcome] | None = None

    def summary(self, request_id: str) -> dict[str, Any]:
        return {
            "request_id": request_id,
            "source": self.source,
            "destination": self.destination,
            "state": self.state,
            "stages": self.stages,
            "copied_tokens": self.copied_tokens,
            "downtime_s": self.downtime_s,
            "cut_after_tokens": self.cut_after_tokens,
            "total_s": time.monotonic() - self.started,
            "reason": self.reason,
        }


@dataclass
class LiveRequest:
    """A migratable stream the gateway relays: what the client has seen so far."""

    request_id: str
    body: dict[str, Any]
    chat: bool
    instance: str
    prompt_ids: list[int] | None = None
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False  # a finish_reason (or an error) was relayed
    chunk_id: str = ""
    created: int = 0
    model: str = ""
    segment: int = 0  # 0 on the first instance, +1 per resume
    segment_base: int = 0  # output tokens the client had when this segment began
    last_token_at: float = 0.0
    migration: Migration | None = None
    migrations: int = 0
    admitted_at: float = field(default_factory=time.monotonic)

    @property
    def priority(self) -> int:
        p = self.body.get("priority", 0)
        return p if isinstance(p, int) else 0

    @property
    def wants_token_ids(self) -> bool:
        return bool(self.body.get("return_token_ids"))

    @property
    def tokens(self) -> list[int]:
        return [*(self.prompt_ids or []), *self.output_ids]

    def max_tokens(self) -> int | None:
        if self.chat:
            n = self.body.get("max_completion_tokens") or self.body.get("max_tokens")
            return int(n) if n is not None else None
        n = self.body.get("max_tokens")
        return COMPLETIONS_DEFAULT_MAX_TOKENS if n is None else int(n)

    def upstream_body(self) -> dict[str, Any]:
        """The first instance's request: the client's, with the token ids returned."""
        return {**self.body, "return_token_ids": True}

    def continuation(self) -> dict[str, Any]:
        """The request that continues this one elsewhere: ``/v1/completions`` with the prompt
        and every token the client has seen as its prompt, the rest of its budget."""
        assert self.prompt_ids is not None
        body = {k: self.body[k] for k in CARRIED if k in self.body}
        seen = len(self.output_ids)
        limit = self.max_tokens()
        body.update(
            prompt=self.tokens,
            stream=True,
            return_token_ids=True,
            max_tokens=None if limit is None else max(1, limit - seen),
        )
        if self.body.get("min_tokens"):
            body["min_tokens"] = max(0, int(self.body["min_tokens"]) - seen)
        options = self.body.get("stream_options") or {}
        if options.get("include_usage"):
            body["stream_options"] = {"include_usage": True}
        return body

    def absorb(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """Takes one upstream event; returns what the client gets (None: nothing)."""
        if "error" in chunk:
            self.finished = True
            return chunk
        first_segment = self.segment == 0
        if first_segment and not self.chunk_id:
            self.chunk_id = str(chunk.get("id", ""))
            self.created = int(chunk.get("created", 0) or 0)
            self.model = str(chunk.get("model", ""))
        choices = chunk.get("choices") or []
        got = False
        for c in choices:
            ids = c.get("token_ids") or []
            if first_segment and self.prompt_ids is None and c.get("prompt_token_ids"):
                self.prompt_ids = list(c["prompt_token_ids"])
            self.output_ids += ids
            got = got or bool(ids)
            if c.get("finish_reason"):
                self.finished = True
            if not self.wants_token_ids:
                c.pop("token_ids", None)
            if not first_segment or not self.wants_token_ids:
                c.pop("prompt_token_ids", None)
        if first_segment and self.prompt_ids is None and chunk.get("prompt_token_ids"):
            self.prompt_ids = list(chunk["prompt_token_ids"])  # chat: on the first chunk
        if got:
            self.last_token_at = time.monotonic()
        if first_segment:
            if not self.wants_token_ids:
                chunk.pop("prompt_token_ids", None)
            return chunk
        return self._spliced(chunk, choices)

    def _spliced(self, chunk: dict[str, Any], choices: list[dict[str, Any]]) -> dict[str, Any]:
        """A continuation's event as the original stream's next event."""
        usage = chunk.get("usage")
        if usage:
            p = len(self.prompt_ids or [])
            done = self.segment_base + int(usage.get("completion_tokens", 0) or 0)
            usage = {**usage, "prompt_tokens": p, "completion_tokens": done,
                     "total_tokens": p + done}  # fmt: skip
        out: dict[str, Any] = {"id": self.chunk_id, "created": self.created, "model": self.model}
        if not self.chat:
            out.update(object="text_completion", choices=choices)
        else:
            out.update(
                object="chat.completion.chunk",
                choices=[
                    {
                        "index": c.get("index", 0),
                        "delta": {"content": c.get("text", "")},
                        "logprobs": None,
                        "finish_reason": c.get("finish_reason"),
                        **({"token_ids": c["token_ids"]} if "token_ids" in c else {}),
                    }
                    for c in choices
                ],
            )
        if usage:
            out["usage"] = usage
        return out

    def begin_segment(self, instance: str) -> None:
        self.instance = instance
        self.segment += 1
        self.segment_base = len(self.output_ids)

    def snapshot(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "instance": self.instance,
            "prompt_tokens": len(self.prompt_ids or []),
            "output_tokens": len(self.output_ids),
            "migrating": self.migration is not None,
            "migrations": self.migrations,
        }


def stage_prompt(live: LiveRequest, block_size: int) -> list[int] | None:
    """The next stage's prompt ``T[:kB+1]``: the largest block-aligned prefix whose KV the
    source has certainly written (every known token but the last sampled one), plus the token
    after it; None when not one full block is known."""
    tokens = live.tokens
    k = (len(tokens) - 1) // block_size
    if k <= 0:
        return None
    return tokens[: k * block_size + 1]


async def sse_lines(content: AsyncIterator[bytes] | Any) -> AsyncIterator[bytes]:
    """The complete lines of an upstream body, without their newline, however long (a first
    event carries the prompt's token ids: hundreds of KiB for a long prompt, more than
    aiohttp's line reader takes). A last line without its newline is dropped."""
    chunks = content.iter_any() if hasattr(content, "iter_any") else content
    buf = bytearray()
    async for data in chunks:
        buf += data
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            yield bytes(buf[start:end])
            start = end + 1
        del buf[:start]


def sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
