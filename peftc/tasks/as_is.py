"""The model as it is: the task of adapters saved without a task type.

peft writes `"task_type": null` when an adapter was made with `get_peft_model(model, config)`
and no task (common in peft's docs and on the Hub); peft then loads it through its base
`PeftModel`, which calls the model unchanged. peftc does the same: no head is added or kept
trainable, the base model is whatever class it is. This task only loads and saves adapters;
training, evaluation and prediction need a real task, which `task_of_model` infers from the
base model's class where it can (a LlamaForCausalLM is causal_lm).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from peftc.config.spec import SpecNode
from peftc.tasks import REGISTRY, register
from peftc.tasks.base import Task

NAME = "as_is"


@dataclass
class AsIsSpec(SpecNode):
    """No settings: the model is called as it is."""


@register
class AsIs(Task):
    name = NAME
    task_type = None  # type: ignore[assignment]  # peft's task_type null
    schema = AsIsSpec
    auto_class_name = "AutoModel"  # only a fallback: a rebuilt base takes the class its config names


def builds(task: Task, model_type: str | None, class_name: str) -> bool:
    """Whether the task's transformers Auto class builds `class_name` for this model type."""
    import transformers

    mapping = getattr(getattr(transformers, task.auto_class_name, None), "_model_mapping", None)
    names = getattr(mapping, "_model_mapping", {}).get(model_type)
    return class_name in ((names,) if isinstance(names, str) else tuple(names or ()))


def task_of_model(model_type: str | None, architectures: Sequence[str] | None) -> Task | None:
    """The task whose Auto class builds exactly this model class (the first of the config's
    `architectures`), or None when no task's head fits it."""
    if not model_type or not architectures:
        return None
    return next(
        (t for t in REGISTRY.all().values() if t.task_type is not None and builds(t, model_type, architectures[0])),
        None,
    )


def model_task_of(config: Any) -> Task | None:
    """`task_of_model` for a transformers config (None for a model without one)."""
    return task_of_model(getattr(config, "model_type", None), getattr(config, "architectures", None))
