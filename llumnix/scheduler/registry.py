"""Name -> object registries shared by metrics, filters, selectors and policies.

Entries are registered lazily as ``(name, module_path, attr)`` and imported on first use, so a
registry can list built-ins without importing them. A name that is not registered but has the
form ``"package.module:Attr"`` is imported directly: the escape hatch for out-of-tree classes.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RegistryError(KeyError):
    """Raised when a name is neither registered nor an importable ``module:attr`` path."""


class Registry(Generic[T]):
    """Lazily-populated registry of factories (usually classes) of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._lazy: dict[str, tuple[str, str]] = {}
        self._loaded: dict[str, Callable[..., T]] = {}

    def register(self, name: str, module_path: str, attr: str) -> None:
        """Register ``module_path.attr`` under ``name`` without importing it."""
        if name in self._lazy or name in self._loaded:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._lazy[name] = (module_path, attr)

    def register_factory(self, name: str, factory: Callable[..., T]) -> None:
        """Register an already-imported factory under ``name``."""
        if name in self._lazy or name in self._loaded:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._loaded[name] = factory

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(set(self._lazy) | set(self._loaded))

    def get(self, name: str) -> Callable[..., T]:
        """Return the factory for ``name`` (importing it on first use)."""
        factory = self._loaded.get(name)
        if factory is not None:
            return factory
        if name in self._lazy:
            module_path, attr = self._lazy[name]
        elif ":" in name:
            module_path, attr = name.split(":", 1)
        else:
            raise RegistryError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}"
            )
        try:
            module = importlib.import_module(module_path)
            factory = getattr(module, attr)
        except (ImportError, AttributeError) as exc:
            raise RegistryError(f"cannot load {self.kind} {name!r}: {exc}") from exc
        self._loaded[name] = factory
        logger.debug("loaded %s %s from %s.%s", self.kind, name, module_path, attr)
        return factory

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        """Instantiate the factory registered as ``name``."""
        return self.get(name)(*args, **kwargs)
