"""A registry of pluggable parts (methods, tasks, quantization backends).

Each part is a class in its own module of a package; the module registers it with the
package's `register` decorator, and modules are imported on first use, so adding a part is
one file (plus its YAML) and nothing else names it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from peftc.config.spec import register_schema
from peftc.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, group: str, package: str, skip: tuple[str, ...] = ("base",)) -> None:
        self.group = group
        self.package = package
        self.skip = skip
        self._items: dict[str, T] = {}
        self._discovered = False

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: instantiate the part and register its schema as schema/<group>/<name>."""
        self._items[cls.name] = cls()
        register_schema(self.group, cls.name, cls.schema)
        return cls

    def get(self, name: str) -> T:
        items = self.all()
        if name not in items:
            hint = did_you_mean(name, items) or "available: " + ", ".join(sorted(items))
            raise ConfigError(self.group, name, f"no such {self.group} option", hint)
        return items[name]

    def for_spec(self, spec: Any) -> T:
        """The part whose schema produced this spec node."""
        for item in self.all().values():
            if type(spec) is item.schema:
                return item
        raise ConfigError(
            self.group,
            type(spec).__name__,
            f"is not a registered {self.group} schema",
            f"select one with {self.group}=<name>",
        )

    def find(self, predicate: Callable[[T], bool]) -> T | None:
        return next((item for item in self.all().values() if predicate(item)), None)

    def all(self) -> dict[str, T]:
        self._discover()
        return dict(self._items)

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        module = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(module.__path__):
            if info.name not in self.skip and not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")
