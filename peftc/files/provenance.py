"""Which base model an adapter was made for, and whether it is being loaded onto that one.

adapter_config.json names its base (`base_model_name_or_path`). Loading it onto another model
usually still "works" (the shapes fit for any model of the same architecture) and gives
meaningless outputs, so a different name is a warning naming both. Names that resolve to the
same place are the same base: a `pkg:` reference and the directory it stands for, two spellings
of one local directory, a hub id and its snapshot in the Hugging Face cache.

An adapter saved without a task type is rebuilt on its base model's own class (the model as it
is): peftc's saved plan names that class, else the `architectures` of the base's config.json.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from peftc.config.spec import ModelSpec, validate
from peftc.errors import AdapterFileError, ConfigError
from peftc.files import adapter_files
from peftc.planning.model_source import PACKAGE_SCHEME, package_directory


def base_name_of(model: nn.Module) -> str | None:
    """The name or path a transformers model was loaded from (None for a plain nn.Module)."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


def same_base(saved: str, live: str) -> bool:
    return saved == live or _resolved(saved) == _resolved(live) or _is_hub_snapshot(live, saved)


def warn_if_other_base(saved: str | None, model: nn.Module, source: str) -> None:
    """Warn when the adapter names a base model other than the one it is loaded onto."""
    live = base_name_of(model)
    if not saved or not live or same_base(str(saved), live):
        return
    warnings.warn(
        f"{source}: the adapter was made for base model {saved!r} but is being loaded onto {live!r}; "
        "its outputs are only meaningful on the base it was trained on",
        UserWarning,
        stacklevel=3,
    )


def _resolved(name: str) -> str:
    if name.startswith(PACKAGE_SCHEME):
        try:
            return package_directory(name)
        except ConfigError:
            return name  # an uninstalled package: compare the reference as written
    path = os.path.expanduser(name)
    return os.path.realpath(path) if os.path.exists(path) else name


def _is_hub_snapshot(path: str, hub_id: str) -> bool:
    """`.../models--org--name/snapshots/<rev>` is where huggingface_hub keeps `org/name`."""
    folder = "models--" + hub_id.replace("/", "--")
    return bool(re.search(rf"(^|[\\/]){re.escape(folder)}[\\/]snapshots[\\/]", path))


# ------------------------------------------------------------------- the base's model class
def named_base(directory: Path, config: dict[str, Any]) -> ModelSpec:
    """The model spec of `base_model_name_or_path` (adapters without a peftc plan)."""
    name = config.get("base_model_name_or_path")
    source = str(directory / adapter_files.CONFIG_NAME)
    if not name:
        raise AdapterFileError(
            source,
            "names no base model (base_model_name_or_path)",
            "pass the base model: load_adapter(base, directory)",
        )
    spec = ModelSpec(name=name, name_or_path=name, revision=config.get("revision"))
    try:
        validate(spec, "adapter_config")
    except ConfigError as exc:
        raise AdapterFileError(source, f"invalid value: {exc}") from exc
    return spec


def base_model_class(directory: str | os.PathLike[str]) -> tuple[str | None, str | None]:
    """(model_type, class name) of the adapter's base model: from peftc's saved plan, else the
    first `architectures` entry of the base's config.json; None where it does not say."""
    from peftc.planning import model_source

    directory = Path(directory)
    saved = (adapter_files.read_plan(directory) or {}).get("model")
    if isinstance(saved, list) and len(saved) == 2:
        return saved[0], saved[1]
    try:
        config = model_source.hf_config(named_base(directory, adapter_files.read_config(directory)))
    except ConfigError as exc:
        raise AdapterFileError(str(directory / adapter_files.CONFIG_NAME), f"its base model: {exc}") from exc
    architectures = getattr(config, "architectures", None) or [None]
    return getattr(config, "model_type", None), architectures[0]


def base_model_task(directory: str | os.PathLike[str]) -> Any:
    """The task whose head the adapter's base model class has (None when no task fits): what an
    adapter saved without a task type is evaluated or predicted with."""
    from peftc.tasks.as_is import task_of_model

    model_type, class_name = base_model_class(directory)
    return task_of_model(model_type, [class_name] if class_name else None)


def model_as_is_class(directory: Path, spec: ModelSpec, task_name: str | None = None) -> str:
    """For an adapter without a task: the Auto class that rebuilds its base model's own class
    (`task_name`'s, when the base's config does not name its class)."""
    from peftc import tasks
    from peftc.tasks.as_is import builds, task_of_model

    source = str(directory / adapter_files.CONFIG_NAME)
    model_type, class_name = base_model_class(directory)
    inferred = task_of_model(model_type, [class_name] if class_name else None)
    if task_name is not None:
        task = tasks.get(task_name)
        if inferred is not None and not builds(task, model_type, class_name):
            raise AdapterFileError(
                source,
                f"has no task type and its base model {spec.label!r} is a {class_name}, which has no {task.name} head",
                f"use task={inferred.name}",
            )
        return task.auto_class_name
    if inferred is None:
        raise AdapterFileError(
            source,
            f"has task_type null and peftc cannot tell which class its base model {spec.label!r} is "
            f"(its config names {class_name or 'no architecture'})",
            "pass the base model, load_adapter(base, directory), or the task (task=...)",
        )
    return inferred.auto_class_name
