"""The module imports everywhere and says what it was built with."""

from __future__ import annotations

import shutil

import llumnix_kv as kv
from llumnix_kv import _C, errors


def test_build_info_says_what_is_usable() -> None:
    info = kv.build_info()
    assert info["cuda_compiled"] == _C.cuda_compiled()
    assert info["cuda_devices"] == _C.cuda_device_count()
    if shutil.which("nvcc") or shutil.which("/usr/local/cuda/bin/nvcc"):
        assert info["cuda_compiled"], "nvcc is present, so the CUDA executors must be compiled in"
    if info["cuda_compiled"] and info["cuda_devices"] == 0:
        assert info["cuda"] == "CUDA compiled, no device"
    assert info["cpu_threads"] >= 1


def test_cuda_calls_without_device_raise_typed_errors() -> None:
    if _C.cuda_device_count() > 0:
        return
    try:
        _C.cuda_malloc(1024, 0)
    except errors.KvError as exc:
        assert isinstance(exc, errors.DeviceError | errors.UnsupportedError)
    else:
        raise AssertionError("cuda_malloc without a device must raise")


def test_status_codes_match_the_native_module() -> None:
    assert len(errors._BY_CODE) == _C.NUM_STATUS_CODES
