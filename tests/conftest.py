"""Central test configuration: CUDA tests are skipped where no device is usable."""

from __future__ import annotations

import pytest


def _cuda_devices() -> int:
    try:
        from llumnix_kv import _C
    except ImportError:
        return 0
    return _C.cuda_device_count()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_devices() > 0:
        return
    skip = pytest.mark.skip(reason="no usable CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
