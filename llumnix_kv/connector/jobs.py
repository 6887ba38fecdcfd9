"""Per-request KV jobs and their states."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from llumnix_kv.connector.handoff import PdHandoff
from llumnix_kv.transfer import Batch

__all__ = ["JobState", "LoadJob", "SendHold"]


class JobState(enum.Enum):
    PENDING = "pending"  # known, not submitted
    RUNNING = "running"  # a batch is in flight
    DONE = "done"  # every byte landed
    FAILED = "failed"  # the transfer failed, timed out or could not start


@dataclass
class LoadJob:
    """Pull tokens ``[tokens[0], tokens[1])`` of a request from a peer into local blocks.

    ``local_blocks`` is the request's whole local block table (entry i holds tokens
    ``[i * block_tokens, (i + 1) * block_tokens)``); the blocks overlapping the token range
    are the ones the load writes and the ones reported when it fails. An empty range loads
    nothing and only tells the peer it may free its blocks.
    """

    request_id: str
    handoff: PdHandoff
    local_blocks: list[int]
    tokens: tuple[int, int]
    deadline: float  # time.monotonic() seconds
    state: JobState = JobState.PENDING
    batch: Batch | None = None
    error: str = ""
    started: float = field(default_factory=time.monotonic)

    def written_blocks(self, block_tokens: int) -> list[int]:
        """Local blocks the load writes (and which hold garbage if it fails)."""
        begin, end = self.tokens
        if end <= begin:
            return []
        first, last = begin // block_tokens, (end - 1) // block_tokens
        return self.local_blocks[first : last + 1]


@dataclass
class SendHold:
    """Blocks a peer reads from this instance, held until its read notice or ``deadline``."""

    request_id: str
    deadline: float  # time.monotonic() seconds
