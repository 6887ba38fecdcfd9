"""Loads, before the native module, the UCX libraries of the libucx wheel when _C was built
against them (the build writes _build_config.py): _C names them by soname only, and an older
system UCX with the same soname must not stand in for them. A module built against a system
UCX gets that one, untouched."""

import contextlib

try:
    from llumnix_kv._build_config import UCX_FROM_WHEEL
except ImportError:  # a module built outside the package build: trust the wheel if present
    UCX_FROM_WHEEL = True

if UCX_FROM_WHEEL:
    with contextlib.suppress(ImportError):
        import libucx

        libucx.load_library()
