"""Loads, before the native module, the UCX libraries of the libucx wheel that it is built
against: _C names them by soname only, and an older system UCX with the same soname must not
stand in for them. Without the wheel (a build against a system UCX) this does nothing."""

import contextlib

with contextlib.suppress(ImportError):
    import libucx

    libucx.load_library()
