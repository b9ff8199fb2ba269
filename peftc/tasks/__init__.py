"""The task plug-ins: each module here defines one task type and registers it with `@register`."""

from __future__ import annotations

from peftc.config.registry import TASKS as REGISTRY
from peftc.config.registry import task_for_task_type as for_task_type

register = REGISTRY.register
get = REGISTRY.get
for_spec = REGISTRY.for_spec
all_tasks = REGISTRY.all

__all__ = ["REGISTRY", "all_tasks", "for_spec", "for_task_type", "get", "register"]
