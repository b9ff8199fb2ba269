"""Loading adapters back: ours and those the peft package saved.

The adapter_config.json is screened (fields that could carry code are refused, unknown ones
dropped with a warning) and becomes a spec, which is validated and planned against the live
base model. The safetensors header is checked against the plan before any tensor data is read
(and before any adapter memory is allocated): missing, unexpected or mis-shaped tensors are
errors by default (strict); `strict=False` loads what fits, records a `LoadReport` in
`model.load_reports[name]` and warns with the name of every tensor it could not use (a lenient
load is never silently wrong). Non-finite values and non-float tensors are always errors. The
method sees the tensors last (`Method.tensors_from_file`): what an older peft wrote is converted
as peft converts it (LoRA on MultiheadAttention before peft 0.22).
An adapter saved without a task type (`"task_type": null`) is the model as it is
(tasks/as_is.py): no head handling, the base model keeps its class.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc import methods, tasks
from peftc.config.spec import DataSpec, ModelSpec, RunSpec, TrainerSpec, check_adapter_name, spec_from_dict, validate
from peftc.errors import AdapterFileError, ConfigError
from peftc.files import adapter_files
from peftc.files.provenance import model_as_is_class, named_base, warn_if_other_base
from peftc.files.screening import screen
from peftc.files.tensorfile import FLOAT_DTYPES, TensorEntry, load_tensors
from peftc.methods.base import GatheredTensor
from peftc.planning import planner
from peftc.planning.graph import graph_of
from peftc.runtime.materialize import materialize
from peftc.runtime.model import PeftcModel


@dataclass(frozen=True)
class LoadReport:
    """What a lenient load could not use: tensors the plan needs that the file lacks (they keep
    the method's initial values), tensors the file has that the plan does not use, and tensors
    whose shape differs (skipped). Empty for every strict load."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()  # (name, in file, expected)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        parts = [
            f"{len(self.missing)} missing (e.g. {self.missing[0]})" if self.missing else "",
            f"{len(self.unexpected)} unexpected (e.g. {self.unexpected[0]})" if self.unexpected else "",
            f"{len(self.mismatched)} mis-shaped (e.g. {self.mismatched[0][0]} is {self.mismatched[0][1]}, "
            f"expected {self.mismatched[0][2]})"
            if self.mismatched
            else "",
        ]
        return ", ".join(p for p in parts if p) or "all tensors loaded"

    def details(self) -> str:
        """Every tensor the load could not use, by name: what a lenient load warns with."""
        parts = [
            f"missing (kept at their initial values): {', '.join(self.missing)}" if self.missing else "",
            f"ignored, not part of this adapter: {', '.join(self.unexpected)}" if self.unexpected else "",
            "ignored, wrong shape: " + ", ".join(f"{key} {found} != {wanted}" for key, found, wanted in self.mismatched)
            if self.mismatched
            else "",
        ]
        return "; ".join(p for p in parts if p) or "all tensors loaded"


def load_adapter(
    base_or_directory: nn.Module | str | os.PathLike[str],
    directory: str | os.PathLike[str] | None = None,
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
    strict: bool = True,
    task: str | None = None,
) -> PeftcModel:
    """Load an adapter directory onto a base model (or, given only a directory, onto the base
    model it names: peftc's saved plan if present, else `base_model_name_or_path`).

    Passing a PeftcModel adds the adapter beside the ones it has (not activated if others are).
    Nothing is changed unless the whole adapter loads. `strict=False` tolerates missing,
    unexpected and mis-shaped tensors, warns with their names and reports them in
    `model.load_reports[adapter_name]`. `task` only matters for an adapter saved without a task
    type that is rebuilt from a directory whose config does not name the model class: the task
    (e.g. "causal_lm") whose model class to build.
    """
    if directory is None:
        directory, base = base_or_directory, None
    else:
        base = base_or_directory
    check_adapter_name("adapter_name", adapter_name)
    if isinstance(base, PeftcModel) and adapter_name in base.plans:
        raise ConfigError("adapter_name", adapter_name, "an adapter with this name already exists", "pick another name")
    saved = read_saved(directory)
    model_spec = None
    if base is None:
        base, model_spec = _base_for(
            saved.directory, saved.config, saved.task, saved.model, saved.task_spec, as_task=task
        )
        base = _quantized_like_saved(saved.directory, base)
    live = base.base_model if isinstance(base, PeftcModel) else base
    if model_spec is None:
        warn_if_other_base(saved.config.get("base_model_name_or_path"), live, saved.source)
    run = RunSpec(
        peft=saved.peft,
        task=saved.task_spec,
        quant=_quant_spec(live),
        model=model_spec or _model_spec(live, saved.config),
        data=saved.data,
        trainer=TrainerSpec(),
        adapter_name=adapter_name,
    )
    plan = planner.plan(run, graph_of(live), strict_targets=False)
    report, tensors = saved.tensors_for(plan, strict=strict)
    previous = list(base.active_adapters) if isinstance(base, PeftcModel) else []
    model = materialize(plan, base, adapter_name=adapter_name, init=bool(report))
    fill(model, adapter_name, tensors)
    model.load_reports[adapter_name] = report
    for warning in plan.warnings:
        warnings.warn(f"{saved.source}: {warning}", UserWarning, stacklevel=2)
    if report:
        warnings.warn(
            f"{saved.weights}: loaded leniently ({report.summary()}); outputs may differ from the saved adapter's. "
            f"{report.details()}",
            UserWarning,
            stacklevel=2,
        )
    if previous:
        model.set_adapter(previous)
    if not is_trainable:
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
    return model


@dataclass(frozen=True)
class SavedAdapter:
    """An adapter directory read and checked up to its tensor data: the method's spec from the
    screened config, the task, and (from peftc's plan beside it) the model and data it was
    trained with; `model` is None for an adapter only `base_model_name_or_path` describes."""

    directory: Path
    config: dict[str, Any]  # adapter_config.json, screened
    peft: Any
    task: Any  # the Task of its task_type
    task_spec: Any
    model: ModelSpec | None
    data: DataSpec
    header: dict[str, TensorEntry]

    @property
    def source(self) -> str:
        return str(self.directory / adapter_files.CONFIG_NAME)

    @property
    def weights(self) -> Path:
        return self.directory / adapter_files.WEIGHTS_NAME

    def header_for(self, plan: Any) -> tuple[dict[str, TensorEntry], dict[str, GatheredTensor]]:
        """The file's declared tensors as `plan` names them: tensors the file holds in pieces of
        an older model layout (`Method.gathered_tensors`) stand in for their pieces."""
        gathered = methods.get(plan.method).gathered_tensors(plan, self.header, self.config)
        # Pieces of one dtype and shape only: other files keep their pieces as unexpected tensors
        # beside a missing one, a clean refusal (a non-float dtype is refused by name in compare).
        gathered = {
            name: tensor
            for name, tensor in gathered.items()
            if len({(self.header[s].dtype, self.header[s].shape) for s in tensor.sources}) == 1
            and self.header[tensor.sources[0]].shape == tensor.piece_shape
        }
        pieces = {source for tensor in gathered.values() for source in tensor.sources}
        header = {name: entry for name, entry in self.header.items() if name not in pieces}
        for name, tensor in gathered.items():
            header[name] = TensorEntry(self.header[tensor.sources[0]].dtype, tensor.shape, 0, 0)
        return _without_peft_artifacts(plan, header), gathered

    def tensors_for(self, plan: Any, *, strict: bool = True) -> tuple[LoadReport, dict[str, torch.Tensor]]:
        """The file's tensors that fit `plan` (all of them, or an error, when strict), as the
        method runs them (`Method.tensors_from_file`: an older peft's numbers converted)."""
        header, gathered = self.header_for(plan)
        report, usable = compare(self.weights, plan, header)
        if strict and report:
            raise _strict_error(self.weights, report)
        pieces = {name: gathered[name].sources if name in gathered else (name,) for name in usable}
        read = load_tensors(self.weights, [piece for names in pieces.values() for piece in names])
        _check_finite(self.weights, read)
        tensors = {name: read[name] for name in usable if name not in gathered}
        for name in gathered.keys() & set(usable):
            tensors[name] = gathered[name].build([read[piece] for piece in pieces[name]])
        return report, methods.get(plan.method).tensors_from_file(plan, tensors, self.config, self.directory)


def read_saved(directory: str | os.PathLike[str]) -> SavedAdapter:
    """Read an adapter directory (or hub id) without building anything."""
    directory = adapter_files.adapter_directory(directory)
    source = str(directory / adapter_files.CONFIG_NAME)
    raw = adapter_files.read_config(directory)
    method = methods.for_peft_type(raw["peft_type"], source)
    config = screen(raw, source, method.schema, method.legacy_fields)
    adapter_task = tasks.for_task_type(config.get("task_type"), source)
    _check_task_fits_method(method, adapter_task, source)
    header = adapter_files.read_tensor_header(directory)
    peft_spec = _peft_spec(method, config, source)
    saved_model, task_spec, data_spec = _saved_specs(directory, adapter_task)
    if saved_model is None:  # e.g. a peft-saved head's label count (shapes only)
        task_spec = adapter_task.spec_from_saved(task_spec, header)
    return SavedAdapter(directory, config, peft_spec, adapter_task, task_spec, saved_model, data_spec, header)


def plan_run(run: RunSpec, overrides: Sequence[str] = ()) -> Any:
    """The plan of a training run, or of one continuing a saved adapter (`continued_run`), whose
    file is then checked against the plan (header only, before any weight is read): a file
    that does not fit is refused before the base model loads."""
    if run.action != "train" or run.adapter is None:
        return planner.plan(run)
    continued, saved = _continuing(run, overrides)
    plan = planner.plan(continued, strict_targets=False)
    report, _ = compare(saved.weights, plan, saved.header_for(plan)[0])
    if report:
        raise _strict_error(saved.weights, report)
    return plan


def continued_run(run: RunSpec, overrides: Sequence[str] = ()) -> RunSpec:
    """A training run with `adapter=DIR` continues that adapter: the method and its settings,
    the base model and (for peftc's adapters) the quantization are the adapter's; the task, data
    and trainer are the run's (the CLI's defaults for task and data follow the adapter too).
    Any other run is returned as it is. One of the run's `overrides` that sets the method, the
    model or a saved quantization to something else than the adapter's would be ignored, so it
    is refused (an adapter peft saved records no quantization: `quant=` chooses one)."""
    if run.action != "train" or run.adapter is None:
        return run
    return _continuing(run, overrides)[0]


def _continuing(run: RunSpec, overrides: Sequence[str]) -> tuple[RunSpec, SavedAdapter]:
    """`continued_run`, with the saved adapter it read (its header checks the plan next)."""
    saved = read_saved(run.adapter)
    if saved.task.task_type is not None and type(run.task) is not saved.task.schema:
        raise ConfigError(
            "task",
            tasks.for_spec(run.task).name,
            f"the adapter in {run.adapter} was trained for task={saved.task.name}",
            "leave task= out: it follows the adapter",
        )
    model = saved.model or named_base(saved.directory, saved.config)
    quant = _saved_quant(saved.directory)
    kept = {"peft": saved.peft, "model": model, **({"quant": quant} if quant is not None else {})}
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        part, *path = key.split(".")
        if part in kept and not _same_setting(getattr(run, part), kept[part], path):
            raise ConfigError(
                key,
                value or None,
                f"differs from the adapter's, which a run continuing it (adapter={run.adapter}) keeps",
                f"leave {part} settings out, or train a new adapter without adapter=",
            )
    return run.replace(peft=saved.peft, model=model, quant=quant or run.quant), saved


def _same_setting(given: Any, saved: Any, path: Sequence[str]) -> bool:
    """Whether an override (`path` below a spec: `peft.r` -> ["r"]; `peft=lora` -> []) set what
    the saved spec has: the same value, or for a group choice the same kind of spec (a model
    choice must be the same model)."""
    if not path:
        return given == saved if isinstance(saved, ModelSpec) else type(given) is type(saved)
    missing = object()
    for name in path:
        given, saved = getattr(given, name, missing), getattr(saved, name, missing)
    return given is not missing and given == saved


def _saved_quant(directory: Path) -> Any:
    """The quant spec peftc's plan beside the adapter records, if its base was quantized."""
    from peftc import quant

    saved = adapter_files.read_plan(directory) or {}
    if not (saved.get("quantization") or {}).get("modules"):
        return None
    try:
        return quant.get(saved["quant"]).schema(**saved["spec"]["quant"])
    except (KeyError, TypeError) as exc:
        source = str(directory / adapter_files.PLAN_NAME)
        raise AdapterFileError(source, f"does not describe a quantization peftc understands ({exc})") from exc


def initial_tensors(plan: Any) -> dict[str, torch.Tensor]:
    """The saved adapter's tensors a continued run (`continued_run`) starts from, checked
    strictly against its plan."""
    _, tensors = read_saved(plan.spec.adapter).tensors_for(plan)
    return tensors


def fill(model: PeftcModel, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors (peft names) into the live adapter; names absent from `tensors` keep
    their current values (a lenient load)."""
    plan = model.plan_of(name)
    method = methods.get(plan.method)
    # Prompt tensors are encoder outputs, not parameters: the encoder loads them itself.
    prompt_names = set(plan.prompt.saved) if plan.prompt is not None else set()
    own = {k: t for k, t in adapter_files.adapter_tensors(model, name).items() if k not in prompt_names}
    with torch.no_grad():
        for key, target in own.items():
            if key in tensors:
                target.copy_(tensors[key].to(dtype=target.dtype, device=target.device))
    present = {k: tensors[k] for k in prompt_names if k in tensors}
    if present:
        method.load_prompt_tensors(model.prompt_encoders[name], present)


def compare(path: Path, plan: Any, header: dict[str, TensorEntry]) -> tuple[LoadReport, list[str]]:
    """The file's declared tensors against the plan's layout: a report of what does not fit,
    and the names that can be loaded. Non-float tensors are refused here (no report can help)."""
    expected = adapter_files.saved_layout(plan)
    for key in sorted(set(expected) & set(header)):
        if header[key].dtype not in FLOAT_DTYPES:
            raise AdapterFileError(
                str(path),
                f"{key} has dtype {header[key].dtype}; adapter tensors are floating point",
                "the file was not written by a PEFT tool, or is corrupt",
            )
    mismatched = tuple(
        (key, header[key].shape, tuple(expected[key][0]))
        for key in sorted(set(expected) & set(header))
        if header[key].shape != tuple(expected[key][0])
    )
    report = LoadReport(
        missing=tuple(sorted(set(expected) - set(header) - _base_weight_copies(plan))),
        unexpected=tuple(sorted(set(header) - set(expected))),
        mismatched=mismatched,
    )
    bad = {m[0] for m in mismatched}
    return report, [k for k in expected if k in header and k not in bad]


def _base_weight_copies(plan: Any) -> set[str]:
    """The targeted embeddings' base weights peft saves beside the adapter: from peft 0.7 on, and
    not with save_embedding_layers=False. A file without one leaves the base's own weight in
    place, as peft does (peft 0.6 wrote LoRA on embed_tokens without it)."""
    prefix = adapter_files.model_prefix(plan)
    return {f"{prefix}{site.path}.base_layer.weight" for site in plan.sites if site.save_base_weight}


def _strict_error(path: Path, report: LoadReport) -> AdapterFileError:
    if report.missing:
        return AdapterFileError(
            str(path),
            f"{len(report.missing)} tensors the adapter config implies are missing, e.g. {report.missing[0]}",
            "the file is incomplete or belongs to another config (strict=False loads it anyway)",
        )
    if report.unexpected:
        return AdapterFileError(
            str(path),
            f"{len(report.unexpected)} tensors do not belong to this adapter, e.g. {report.unexpected[0]}",
            "the file and adapter_config.json do not match (strict=False ignores them)",
        )
    key, found, wanted = report.mismatched[0]
    return AdapterFileError(
        str(path),
        f"{key} has shape {found}, expected {wanted}",
        "the adapter was made for a different base model or config",
    )


def _without_peft_artifacts(plan: Any, tensors: dict[str, Any]) -> dict[str, Any]:
    """Drop the extra copies peft writes with bias='all' for modules_to_save.

    peft collects every '*.bias' of the model for bias='all', including the wrapper's inner
    `<module>.original_module.bias` (the untrained original) and `<module>.modules_to_save.bias`
    (the same tensor as the saved `<module>.bias`); neither carries information of its own.
    """
    if not plan.unfrozen or not plan.modules_to_save:
        return tensors
    inner = tuple(
        f"{adapter_files.MODEL_PREFIX}{m.path}.{part}."
        for m in plan.modules_to_save
        for part in ("original_module", "modules_to_save")
    )
    return {k: v for k, v in tensors.items() if not k.startswith(inner)}


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterFileError(
                str(path), f"{key} contains NaN or Inf values", "the adapter is broken; retrain or restore it"
            )


def _peft_spec(method: Any, config: dict[str, Any], source: str) -> Any:
    """The method's spec from the screened config, with every field check applied."""
    try:
        spec = method.spec_from_peft_config(config)
        validate(spec, "adapter_config", cross=False)
    except ConfigError as exc:
        raise AdapterFileError(source, f"invalid value: {exc}") from exc
    except AdapterFileError as exc:  # a method's refusal names the file; here it has its path
        if exc.path != adapter_files.CONFIG_NAME:
            raise
        raise AdapterFileError(source, exc.problem, exc.hint) from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise AdapterFileError(source, f"a field has the wrong type ({exc})") from exc
    return spec


def _saved_specs(directory: Path, task: Any) -> tuple[ModelSpec | None, Any, DataSpec]:
    """The model, task and data specs from peftc's plan beside the adapter, when there is one
    (the data settings, e.g. max_length, are what predictions with the adapter should use)."""
    from peftc.files.screening import refuse_code

    source = str(directory / adapter_files.PLAN_NAME)
    saved = (adapter_files.read_plan(directory) or {}).get("spec", {})
    refuse_code(saved, source)
    try:
        model = spec_from_dict(ModelSpec, saved["model"]) if isinstance(saved.get("model"), dict) else None
        task_spec = spec_from_dict(task.schema, saved["task"]) if isinstance(saved.get("task"), dict) else task.schema()
        data = spec_from_dict(DataSpec, saved.get("data") or {})
        if model is not None:
            validate(model, "spec.model")
        validate(task_spec, "spec.task", cross=False)
        validate(data, "spec.data", cross=False)
    except ConfigError as exc:
        raise AdapterFileError(source, f"invalid value: {exc}") from exc
    except TypeError as exc:
        raise AdapterFileError(source, f"does not describe a model/task peftc understands ({exc})") from exc
    return model, task_spec, data


def _base_for(
    directory: Path,
    config: dict[str, Any],
    task: Any,
    spec: ModelSpec | None,
    task_spec: Any,
    *,
    as_task: str | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """The base model the adapter names, built with the task's head, and the spec it came from."""
    from peftc.planning import model_source

    spec = spec or named_base(directory, config)
    auto_class_name = model_as_is_class(directory, spec, as_task) if task.task_type is None else task.auto_class_name
    return model_source.build_model(spec, auto_class_name, task.config_overrides(task_spec)), spec


def _check_task_fits_method(method: Any, task: Any, source: str) -> None:
    """Prompt methods need a task: peft's task-less PeftModel never calls the prompt encoder."""
    if task.task_type is None and method.kind == "prompt":
        raise AdapterFileError(
            source,
            f"is a {method.peft_type} adapter with task_type null, which peft itself runs without its prompt",
            "set task_type in adapter_config.json to the task it was trained for, e.g. CAUSAL_LM",
        )


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
    from peftc.planning.graph import _walk  # the walk graph_of does: through adapter wrappers, not into them
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


def _settled(base: nn.Module) -> nn.Module:
    """A base read from a checkpoint saved quantized, with no peftc plan to say how it was trained
    (an adapter peft saved): its layers keep their settings and get peftc's load-time ones (e.g.
    no bitsandbytes CPU inference repacking, which changes 4-bit outputs by ~5e-3)."""
    from peftc.quant.base import backend_of

    owned: dict[Any, list[str]] = {}
    for path, module in base.named_modules():
        backend = backend_of(module)
        if backend is not None:
            owned.setdefault(backend, []).append(path)
    for backend, paths in owned.items():
        spec = backend.spec_of(base.get_submodule(paths[0]), ())
        backend.after_load(spec, str(base.dtype).replace("torch.", ""), base, tuple(paths))
    return base


def _quantized_like_saved(directory: Path, base: nn.Module) -> nn.Module:
    """Quantize a rebuilt base the way the saved plan's base was (same backend, same modules)."""
    from peftc import quant
    from peftc.quant.prepare import upcast_unquantized

    spec = _saved_quant(directory)
    if spec is None:
        return _settled(base)
    backend = quant.for_spec(spec)
    backend.check_available()
    saved = adapter_files.read_plan(directory)
    paths = tuple(saved["quantization"]["modules"])
    if all(backend.owns(base.get_submodule(path)) for path in paths):  # a checkpoint saved quantized: read as stored
        backend.after_load(spec, saved["spec"]["model"]["dtype"], base, paths)
    else:
        base = backend.quantize(spec, base, paths)
    if getattr(spec, "float32_unquantized", False):
        upcast_unquantized(base)
    return base.requires_grad_(False)
