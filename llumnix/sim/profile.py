"""Engine profiles: KV capacity, step-latency model and migration costs of one instance.

A profile is a JSON file whose keys are the fields of :class:`EngineProfile` plus ``name`` and
``source`` (where the numbers come from); a missing key takes the field's default (the
shipped default profile's value). The shipped default, ``profiles/llama7b_a10.json``,
documents its derivation.

Step latency (milliseconds), fitted per step kind:

- prefill of sequences with lengths ``l_i``:
  ``prefill_base_ms + prefill_per_token_ms * sum(l_i) + prefill_per_token_sq_ms * sum(l_i^2)``
- decode of a batch of ``B`` sequences holding ``T`` tokens of KV:
  ``decode_base_ms + decode_per_seq_ms * B + decode_per_token_ms * T``
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_PROFILE = "llama7b_a10"


@dataclass(frozen=True)
class EngineProfile:
    """Performance model of one engine instance."""

    name: str = "custom"
    """Label used in reports."""
    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int = 936
    """KV capacity in blocks."""
    kv_bytes_per_token: int = 524288
    """KV bytes of one token over all layers (what migration copies)."""
    max_num_seqs: int = 256
    """Most sequences in a batch."""
    max_batched_tokens: int = 4096
    """Most prompt tokens prefilled in one step (a single longer prompt still runs alone)."""
    prefill_base_ms: float = 15.0
    """Fixed cost of a prefill step."""
    prefill_per_token_ms: float = 0.2
    """Cost per prefilled token."""
    prefill_per_token_sq_ms: float = 4.4e-6
    """Cost per squared sequence length (attention)."""
    decode_base_ms: float = 28.0
    """Fixed cost of a decode step (weight reads)."""
    decode_per_seq_ms: float = 0.9
    """Cost per sequence in the decode batch."""
    decode_per_token_ms: float = 0.0025
    """Cost per token of KV read by a decode step."""
    migration_bandwidth_bytes_per_s: float = 8.0e9
    """Effective KV copy bandwidth between instances."""
    migration_stage_overhead_ms: float = 5.0
    """Fixed cost of each pre-copy stage (RPC, plan, launch)."""
    migration_commit_overhead_ms: float = 20.0
    """Fixed cost of the final stage's suspend/commit handshake (part of the downtime)."""
    migration_max_stages: int = 6
    """Pre-copy stages before the final stage is forced."""
    migration_final_stage_tokens: int = 16
    """Go to the final (suspended) stage once fewer new tokens than this remain to copy."""

    def prefill_s(self, total_tokens: int, sum_sq_tokens: float) -> float:
        """Seconds for a prefill step."""
        return (
            self.prefill_base_ms
            + self.prefill_per_token_ms * total_tokens
            + self.prefill_per_token_sq_ms * sum_sq_tokens
        ) * 1e-3

    def decode_s(self, batch_size: int, batch_tokens: int) -> float:
        """Seconds for a decode step."""
        return (
            self.decode_base_ms
            + self.decode_per_seq_ms * batch_size
            + self.decode_per_token_ms * batch_tokens
        ) * 1e-3

    def copy_s(self, tokens: int) -> float:
        """Seconds to copy the KV of ``tokens`` tokens between instances."""
        return tokens * self.kv_bytes_per_token / self.migration_bandwidth_bytes_per_s

    @property
    def capacity_tokens(self) -> int:
        """KV capacity in tokens."""
        return self.num_blocks * self.block_size


def load_profile(path_or_name: str | Path = DEFAULT_PROFILE) -> EngineProfile:
    """Load a profile from a JSON file path or the name of a shipped profile."""
    p = Path(path_or_name)
    if p.suffix == ".json" or p.exists():
        text = p.read_text()
    else:
        text = (resources.files("llumnix.sim") / "profiles" / f"{path_or_name}.json").read_text()
    raw = json.loads(text)
    names = {f.name for f in dataclasses.fields(EngineProfile)}
    unknown = set(raw) - names - {"source"}
    if unknown:
        raise ValueError(f"unknown profile keys: {sorted(unknown)}")
    return EngineProfile(**{k: v for k, v in raw.items() if k in names})
