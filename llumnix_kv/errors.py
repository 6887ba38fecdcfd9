"""One exception hierarchy for the data plane.

Every error raised by ``llumnix_kv`` (native or Python) is a :class:`KvError`. Each class also
derives from the closest built-in exception, so ``except ValueError`` keeps working for callers
that do not know this package. The native core returns a status code; :func:`error_for_code`
maps it to a class here (codes are listed in ``csrc/include/llumnix_kv/status.h``).
"""

from __future__ import annotations


class KvError(Exception):
    """Base class of every llumnix_kv error."""


class InvalidArgumentError(KvError, ValueError):
    """A parameter is malformed (wrong type, shape, count or sign)."""


class InvalidLayoutError(KvError, ValueError):
    """A KV layout is self-inconsistent: overlapping strides, regions too small, dtype mismatch."""


class LayoutMismatchError(KvError, ValueError):
    """Two layouts describe different models (layers, K/V, head size or dtype differ)."""


class OutOfRangeError(KvError, IndexError):
    """An index (block id, token, head, layer, region) is outside its bounds."""


class UnsupportedError(KvError, NotImplementedError):
    """A valid request that this build or device cannot serve (e.g. CUDA not compiled in)."""


class DeviceError(KvError, RuntimeError):
    """The CUDA runtime reported an error."""


class KvTimeoutError(KvError, TimeoutError):
    """A wait passed its deadline."""


class CancelledError(KvError):
    """The operation was cancelled."""


class PeerLostError(KvError, ConnectionError):
    """The remote peer went away."""


class BadDescriptorError(KvError, ValueError):
    """A serialized descriptor or message could not be parsed."""


class UnregisteredMemoryError(KvError, ValueError):
    """Memory used in a transfer was not registered with the transfer engine."""


class CorruptionError(KvError):
    """Data failed an integrity check."""


class InternalError(KvError, RuntimeError):
    """A bug: an invariant of the core did not hold."""


class TierClosedError(KvError, RuntimeError):
    """An operation was called on a KV store tier after ``close()``."""


class TierUnavailableError(PeerLostError):
    """A remote KV store tier cannot be reached (connection refused, reset or lost)."""


# Index = llumnix_kv::Status::Code; 0 (OK) never raises.
_BY_CODE: tuple[type[KvError], ...] = (
    InternalError,
    InvalidArgumentError,
    InvalidLayoutError,
    LayoutMismatchError,
    OutOfRangeError,
    UnsupportedError,
    DeviceError,
    KvTimeoutError,
    CancelledError,
    PeerLostError,
    BadDescriptorError,
    UnregisteredMemoryError,
    CorruptionError,
    InternalError,
)


def error_for_code(code: int) -> type[KvError]:
    """The exception class for a native status code (unknown codes map to InternalError)."""
    if 0 < code < len(_BY_CODE):
        return _BY_CODE[code]
    return InternalError
