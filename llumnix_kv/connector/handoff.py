"""The hand-off from a prefill instance to a decode instance, as plain data.

It travels in the request's transfer params (through the caller, e.g. an HTTP proxy), so every
field is JSON-safe: the transfer-engine descriptor is base64 text and the layout is
:func:`llumnix_kv.layout.layout_to_dict`'s output.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llumnix_kv._C import KvLayout
from llumnix_kv.errors import InvalidArgumentError
from llumnix_kv.layout import layout_from_dict

__all__ = ["PdHandoff"]


@dataclass(frozen=True)
class PdHandoff:
    """Where a finished prefill left a request's KV.

    Attributes:
        request_id: the request's id on the prefill instance (names it in the read notice).
        engine_name: the prefill worker's transfer-engine name.
        descriptor: the prefill worker's transfer-engine descriptor (``add_peer`` input).
        layout: the prefill worker's KV layout as plain data, at its own addresses.
        block_ids: the prefill's block table for the request (entry i holds tokens
            ``[i * block_tokens, (i + 1) * block_tokens)``).
        num_tokens: tokens whose KV the prefill computed (a prefix of the prompt).
        expires_at: wall-clock time (``time.time()``) at which the prefill frees the blocks
            if no read notice came (its hold starts later, so it frees them no earlier), or
            None when it did not say. A decode never reads them past it.
    """

    request_id: str
    engine_name: str
    descriptor: bytes
    layout: Mapping[str, Any]
    block_ids: tuple[int, ...]
    num_tokens: int
    expires_at: float | None = None

    def to_params(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "engine_name": self.engine_name,
            "descriptor": base64.b64encode(self.descriptor).decode("ascii"),
            "layout": dict(self.layout),
            "block_ids": list(self.block_ids),
            "num_tokens": self.num_tokens,
            "expires_at": self.expires_at,
        }

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> PdHandoff:
        try:
            return cls(
                request_id=str(params["request_id"]),
                engine_name=str(params["engine_name"]),
                descriptor=base64.b64decode(params["descriptor"], validate=True),
                layout=dict(params["layout"]),
                block_ids=tuple(int(b) for b in params["block_ids"]),
                num_tokens=int(params["num_tokens"]),
                expires_at=_optional_float(params.get("expires_at")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"not a PD hand-off: {exc!r}") from exc

    def remote_layout(self) -> KvLayout:
        """The prefill's layout at the prefill's addresses (the remote side of a READ)."""
        return layout_from_dict(dict(self.layout))


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
