"""The task registry: each module here defines one task type and registers it with `@register`."""

from __future__ import annotations

from peftc.config.registry import Registry
from peftc.errors import AdapterFileError
from peftc.tasks.base import Task

REGISTRY: Registry[Task] = Registry("task", __name__)
register = REGISTRY.register
get = REGISTRY.get
for_spec = REGISTRY.for_spec
all_tasks = REGISTRY.all


def for_task_type(task_type: str | None, source: str = "adapter_config.json") -> Task:
    task = REGISTRY.find(lambda t: t.task_type == task_type)
    if task is None:
        known = sorted(t.task_type for t in all_tasks().values())
        raise AdapterFileError(source, f"task_type {task_type!r} is not supported", "supported: " + ", ".join(known))
    return task
