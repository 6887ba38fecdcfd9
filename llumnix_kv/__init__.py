"""llumnix_kv: the KV-cache data plane of Llumnix.

Describe any engine's paged KV cache as a :class:`KvLayout` (see :mod:`llumnix_kv.layout`),
plan the copy of a request's tokens between two layouts (:func:`plan_copy`) and run the plan on
the CPU or with CUDA (:func:`execute`).
"""

from __future__ import annotations

from llumnix_kv import _preload  # noqa: F401  (first: the UCX libraries _C links against)

try:
    from llumnix_kv import _C
except ImportError as exc:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        "llumnix_kv's native module _C is missing or does not load on this machine "
        f"({exc}). Build it with `pip install -e .` (or `pip install .`) from the source tree."
    ) from exc

from llumnix_kv import errors, layout
from llumnix_kv._C import CopyPlan, KvLayout, MemoryRegion
from llumnix_kv.copy import CopyMode, execute, gather, plan_copy, scatter
from llumnix_kv.errors import KvError

__version__ = "0.1.0"

__all__ = [
    "CopyMode",
    "CopyPlan",
    "KvError",
    "KvLayout",
    "MemoryRegion",
    "build_info",
    "errors",
    "execute",
    "gather",
    "layout",
    "plan_copy",
    "scatter",
]

if len(errors._BY_CODE) != _C.NUM_STATUS_CODES:  # pragma: no cover - a build/source mismatch
    raise ImportError("llumnix_kv._C and llumnix_kv.errors disagree on the status codes")


def build_info() -> dict[str, object]:
    """What the native module was compiled with and what is usable on this machine now."""
    cuda_compiled = _C.cuda_compiled()
    devices = _C.cuda_device_count()
    if not cuda_compiled:
        cuda = "CUDA not compiled"
    elif devices == 0:
        cuda = "CUDA compiled, no device"
    else:
        cuda = f"CUDA compiled, {devices} device(s)"
    return {
        "version": __version__,
        "cuda": cuda,
        "cuda_compiled": cuda_compiled,
        "cuda_build": _C.cuda_build_info(),
        "cuda_devices": devices,
        "ucx_compiled": _C.ucx_compiled(),
        "ucx_build": _C.ucx_build_info(),
        "cpu_threads": _C.cpu_threads(),
    }
