"""The registries of pluggable parts (methods, tasks, quantization backends).

Each part is a class in its own module (or subpackage) of a plug-in package; the module
registers it with the package's `register` decorator. The registries live here, at the bottom
of the pipeline, so that every stage finds a plug-in by name: a registry imports its package by
name on first use, and nothing above the plug-ins' own layer names a plug-in module.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from peftc.config.spec import register_schema
from peftc.errors import AdapterFileError, ConfigError, did_you_mean

if TYPE_CHECKING:
    from peftc.methods.base import Method
    from peftc.quant.base import QuantBackend
    from peftc.tasks.base import Task

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


METHODS: Registry[Method] = Registry("peft", "peftc.methods", skip=("base", "common", "defaults", "layer"))
TASKS: Registry[Task] = Registry("task", "peftc.tasks", skip=("base", "common", "data", "lm_loss"))
QUANT_BACKENDS: Registry[QuantBackend] = Registry("quant", "peftc.quant")


def import_registries() -> None:
    """Import every method, task and quantization module so their schemas are registered."""
    for registry in (METHODS, TASKS, QUANT_BACKENDS):
        registry.all()


def method_for_peft_type(peft_type: str, source: str = "adapter_config.json") -> Method:
    method = METHODS.find(lambda m: m.peft_type == peft_type)
    if method is None:
        known = sorted(m.peft_type for m in METHODS.all().values())
        hint = did_you_mean(str(peft_type), known) or "supported: " + ", ".join(known)
        raise AdapterFileError(source, f"peft_type {peft_type!r} is not supported by peftc", hint)
    return method


def task_for_task_type(task_type: str | None, source: str = "adapter_config.json") -> Task:
    """The task of an adapter file; a null task_type is the model as it is (tasks/as_is.py)."""
    task = TASKS.find(lambda t: t.task_type == task_type)
    if task is None:
        known = sorted(str(t.task_type).replace("None", "null") for t in TASKS.all().values())
        raise AdapterFileError(source, f"task_type {task_type!r} is not supported", "supported: " + ", ".join(known))
    return task
