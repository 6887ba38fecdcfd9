"""Store tiers by name, imported on first use.

Built-ins are registered as ``(name, module_path, class_name)`` without importing them (the
redis tier needs the ``redis`` client only when it is used). A name that is not registered but
has the form ``"package.module:ClassName"`` is imported directly: the escape hatch for
out-of-tree tiers. ``create_tier`` accepts the tier's config dataclass or a dict of its fields.
"""

from __future__ import annotations

import dataclasses
import importlib
import threading
from typing import Any

from llumnix_kv.errors import InvalidArgumentError
from llumnix_kv.store.base import StoreTier

__all__ = ["create_tier", "register_tier", "tier_class", "tier_names"]

_lock = threading.Lock()
_lazy: dict[str, tuple[str, str]] = {}
_loaded: dict[str, type[StoreTier]] = {}


def register_tier(name: str, module_path: str, class_name: str) -> None:
    """Register ``module_path.class_name`` (a StoreTier subclass) as ``name``, lazily."""
    with _lock:
        if name in _lazy:
            raise InvalidArgumentError(f"store tier {name!r} is already registered")
        _lazy[name] = (module_path, class_name)


def tier_names() -> list[str]:
    """Registered tier names, sorted."""
    with _lock:
        return sorted(_lazy)


def tier_class(name: str) -> type[StoreTier]:
    """The class of tier ``name``, importing its module on first use."""
    with _lock:
        cls = _loaded.get(name)
        if cls is not None:
            return cls
        target = _lazy.get(name)
    if target is None:
        if ":" not in name:
            raise InvalidArgumentError(
                f"unknown store tier {name!r}; registered: {', '.join(tier_names())}"
            )
        module_path, class_name = name.split(":", 1)
    else:
        module_path, class_name = target
    try:
        cls = getattr(importlib.import_module(module_path), class_name)
    except (ImportError, AttributeError) as exc:
        raise InvalidArgumentError(f"cannot load store tier {name!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, StoreTier)):
        raise InvalidArgumentError(f"{module_path}.{class_name} is not a StoreTier")
    with _lock:
        _loaded[name] = cls
    return cls


def create_tier(name: str, config: Any) -> StoreTier:
    """A new tier ``name`` built from its config dataclass, or from a dict of its fields."""
    cls = tier_class(name)
    if isinstance(config, dict):
        config_class: Any = getattr(cls, "config_class", None)
        if not (isinstance(config_class, type) and dataclasses.is_dataclass(config_class)):
            raise InvalidArgumentError(f"store tier {name!r} takes no dict config")
        try:
            config = config_class(**config)
        except TypeError as exc:
            raise InvalidArgumentError(f"bad config for store tier {name!r}: {exc}") from exc
    return cls(config)  # type: ignore[call-arg]


register_tier("cpu", "llumnix_kv.store.cpu", "CpuTier")
register_tier("disk", "llumnix_kv.store.disk", "DiskTier")
register_tier("redis", "llumnix_kv.store.redis", "RedisTier")
