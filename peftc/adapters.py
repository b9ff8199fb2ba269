"""Loading adapters back: ours and those the peft package saved.

The adapter_config.json becomes a spec (only the fields we model are read), the spec is planned
against the live base model, the file's tensors are checked against the plan (strict: missing,
unexpected or mis-shaped tensors and non-finite values are errors), then injected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc import io, methods, planner, tasks
from peftc.errors import AdapterFileError
from peftc.graph import graph_of
from peftc.materializer import materialize
from peftc.model import PeftcModel
from peftc.spec import DataSpec, ModelSpec, RunSpec, TrainerSpec, check_adapter_name


def load_adapter(
    base_or_directory: nn.Module | str | os.PathLike[str],
    directory: str | os.PathLike[str] | None = None,
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> PeftcModel:
    """Load an adapter directory onto a base model (or, given only a directory, onto the base
    model it names: peftc's saved plan if present, else `base_model_name_or_path`).

    Passing a PeftcModel adds the adapter beside the ones it has (not activated if others are).
    """
    if directory is None:
        directory, base = base_or_directory, None
    else:
        base = base_or_directory
    check_adapter_name("adapter_name", adapter_name)
    directory = Path(directory)
    config = io.read_config(directory)
    source = str(directory / io.CONFIG_NAME)
    method = methods.for_peft_type(config["peft_type"], source)
    task = tasks.for_task_type(config.get("task_type"), source)
    saved_model, task_spec = _saved_specs(directory, task)
    tensors = io.read_tensors(directory)
    if saved_model is None:
        task_spec = task.spec_from_saved(task_spec, tensors)  # e.g. a peft-saved head's label count
    model_spec = None
    if base is None:
        base, model_spec = _base_for(directory, config, task, saved_model, task_spec)
        base = _quantized_like_saved(directory, base)
    live = base.base_model if isinstance(base, PeftcModel) else base
    run = RunSpec(
        peft=method.spec_from_peft_config(config),
        task=task_spec,
        quant=_quant_spec(live),
        model=model_spec or _model_spec(live, config),
        data=DataSpec(),
        trainer=TrainerSpec(),
        adapter_name=adapter_name,
    )
    plan = planner.plan(run, graph_of(live), strict_targets=False)
    tensors = _without_peft_artifacts(plan, tensors)
    _check_tensors(directory, plan, tensors)
    previous = list(base.active_adapters) if isinstance(base, PeftcModel) else []
    model = materialize(plan, base, adapter_name=adapter_name, init=False)
    fill(model, adapter_name, tensors)
    if previous:
        model.set_adapter(previous)
    if not is_trainable:
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
    return model


def fill(model: PeftcModel, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors (peft names) into the live adapter."""
    plan = model.plan_of(name)
    method = methods.get(plan.method)
    # Prompt tensors are encoder outputs, not parameters: the encoder loads them itself.
    prompt_names = set(method.saved_prompt_tensors(plan.prompt)) if plan.prompt is not None else set()
    own = {k: t for k, t in io.adapter_tensors(model, name).items() if k not in prompt_names}
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(tensors[key].to(dtype=target.dtype, device=target.device))
    if prompt_names:
        method.load_prompt_tensors(model.prompt_encoders[name], {k: tensors[k] for k in prompt_names})


def _without_peft_artifacts(plan: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the extra copies peft writes with bias='all' for modules_to_save.

    peft collects every '*.bias' of the model for bias='all', including the wrapper's inner
    `<module>.original_module.bias` (the untrained original) and `<module>.modules_to_save.bias`
    (the same tensor as the saved `<module>.bias`); neither carries information of its own.
    """
    if not plan.unfrozen or not plan.modules_to_save:
        return tensors
    inner = tuple(
        f"{io.MODEL_PREFIX}{m.path}.{part}."
        for m in plan.modules_to_save
        for part in ("original_module", "modules_to_save")
    )
    return {k: v for k, v in tensors.items() if not k.startswith(inner)}


def _check_tensors(directory: Path, plan: Any, tensors: dict[str, torch.Tensor]) -> None:
    path = str(directory / io.WEIGHTS_NAME)
    expected = io.saved_layout(plan)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise AdapterFileError(
            path,
            f"{len(missing)} tensors the adapter config implies are missing, e.g. {missing[0]}",
            "the file is incomplete or belongs to another config",
        )
    if unexpected:
        raise AdapterFileError(
            path,
            f"{len(unexpected)} tensors do not belong to this adapter, e.g. {unexpected[0]}",
            "the file and adapter_config.json do not match",
        )
    for key, (shape, _) in expected.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise AdapterFileError(
                path,
                f"{key} has shape {tuple(tensors[key].shape)}, expected {tuple(shape)}",
                "the adapter was made for a different base model or config",
            )
        if tensors[key].is_floating_point() and not torch.isfinite(tensors[key]).all():
            raise AdapterFileError(
                path,
                f"{key} contains NaN or Inf values",
                "the adapter is broken; retrain or restore it",
            )


def _saved_specs(directory: Path, task: Any) -> tuple[ModelSpec | None, Any]:
    """The model and task specs from peftc's plan beside the adapter, when there is one."""
    saved = (io.read_plan(directory) or {}).get("spec", {})
    try:
        model = ModelSpec(**saved["model"]) if isinstance(saved.get("model"), dict) else None
        task_spec = task.schema(**saved["task"]) if isinstance(saved.get("task"), dict) else task.schema()
    except TypeError as exc:
        raise AdapterFileError(
            str(directory / io.PLAN_NAME),
            f"does not describe a model/task peftc understands ({exc})",
        ) from exc
    return model, task_spec


def _base_for(
    directory: Path, config: dict[str, Any], task: Any, spec: ModelSpec | None, task_spec: Any
) -> tuple[nn.Module, ModelSpec]:
    """The base model the adapter names, built with the task's head, and the spec it came from."""
    from peftc import loading

    if spec is None:
        name = config.get("base_model_name_or_path")
        if not name:
            raise AdapterFileError(
                str(directory / io.CONFIG_NAME),
                "names no base model (base_model_name_or_path)",
                "pass the base model: peftc.load_adapter(base_model, directory)",
            )
        spec = ModelSpec(name=name, name_or_path=name, revision=config.get("revision"))
    return loading.build_model(spec, task.auto_class_name, task.config_overrides(task_spec)), spec


def _model_spec(model: nn.Module, config: dict[str, Any]) -> ModelSpec:
    hf = getattr(model, "config", None)
    name = (
        getattr(model, "name_or_path", None)
        or getattr(hf, "_name_or_path", None)
        or config.get("base_model_name_or_path")
        or type(model).__name__
    )
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return ModelSpec(
        name=str(name),
        name_or_path=str(name),
        model_type=getattr(hf, "model_type", None),
        dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "float32",
    )


def _quant_spec(model: nn.Module) -> Any:
    """How the live base is quantized (the backend of its quantized layers; every other Linear
    listed in skip_modules so that planning reproduces exactly the live layout)."""
    from peftc import quant
    from peftc.graph import _walk  # the walk graph_of does: through adapter wrappers, not into them
    from peftc.quant.base import backend_of

    owned: dict[str, Any] = {}
    plain: list[str] = []
    for path, module in _walk(model):
        backend = backend_of(module)
        if backend is not None:
            owned.setdefault(backend.name, (backend, module))
        elif isinstance(module, nn.Linear) and path:
            plain.append(path)
    if not owned:
        return quant.get("none").schema()
    if len(owned) > 1:
        raise AdapterFileError(
            "base model", f"mixes layers of several quantization backends ({', '.join(sorted(owned))})"
        )
    backend, layer = next(iter(owned.values()))
    return backend.spec_of(layer, tuple(plain))


def _quantized_like_saved(directory: Path, base: nn.Module) -> nn.Module:
    """Quantize a rebuilt base the way the saved plan's base was (same backend, same modules)."""
    from peftc import quant
    from peftc.quant.prepare import upcast_unquantized

    saved = io.read_plan(directory) or {}
    layout = saved.get("quantization") or {}
    if not layout.get("modules"):
        return base
    source = str(directory / io.PLAN_NAME)
    try:
        backend = quant.get(saved["quant"])
        spec = backend.schema(**saved["spec"]["quant"])
    except (KeyError, TypeError) as exc:
        raise AdapterFileError(source, f"does not describe a quantization peftc understands ({exc})") from exc
    backend.check_available()
    base = backend.quantize(spec, base, tuple(layout["modules"]))
    if getattr(spec, "float32_unquantized", False):
        upcast_unquantized(base)
    return base.requires_grad_(False)
