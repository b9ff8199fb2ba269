"""Plan -> live model. Executes the plan; decides nothing the plan did not already decide.

Loads (and quantizes) the base model, freezes it, wraps every planned site in the method's
adapter layer, attaches the prompt encoder and the modules_to_save copies, and checks that the
trainable-parameter count is exactly the plan's. Injection is transactional: every wrapper is
built before the model is touched, and a failure undoes what was added.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftc import quant, tasks
from peftc.errors import PlanError
from peftc.planning import model_source
from peftc.quant.prepare import prepare_for_training
from peftc.runtime.model import PeftcModel

if TYPE_CHECKING:
    from peftc.config.spec import TrainerSpec
    from peftc.planning.plan import Plan

# Lightning strategies that train in this one process on one device.
SINGLE_DEVICE_STRATEGIES = ("auto", "single_device")


def materialize(
    plan: Plan,
    base_model: nn.Module | None = None,
    *,
    adapter_name: str | None = None,
    init: bool = True,
) -> PeftcModel:
    """A PeftcModel with the plan's adapter injected under `adapter_name` and activated."""
    name = adapter_name or plan.adapter_name
    check_fits_in_memory(plan, loading_base=base_model is None)
    if isinstance(base_model, PeftcModel):
        model = base_model
        model.add_adapter(name, plan, init=init)
    else:
        model = PeftcModel(base_model if base_model is not None else load_base_model(plan))
        trainable = [p for p in model.base_model.parameters() if p.requires_grad]
        model.base_model.requires_grad_(False)
        try:
            model.add_adapter(name, plan, init=init)
        except BaseException:
            for param in trainable:  # a failed injection leaves the caller's model exactly as it was
                param.requires_grad_(True)
            raise
    model.set_adapter(name)
    _check_counts(model, plan, name)
    return model


def physical_memory() -> int | None:
    """Bytes of RAM on this machine (None where the OS does not say)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(plan: Plan, *, loading_base: bool) -> None:
    """Refuse, before allocating anything, weights that cannot fit in the memory they go to (e.g.
    peft.r=1000000000): otherwise the allocation kills the process or swaps it to a halt. A base
    loaded onto the training GPU (load_device) is held against that GPU's memory, not the host's."""
    need = plan.memory.adapter_weights + (plan.memory.base_weights if loading_base else 0)
    device = load_device(plan.spec.trainer) if loading_base else "cpu"
    have, where = device_memory(device)
    if have is not None and need > have:
        raise PlanError(
            "peft",
            plan.method,
            f"the weights need {need / 2**30:,.1f} GiB ({plan.trainable_params:,} adapter parameters), "
            f"more than {where}'s {have / 2**30:,.1f} GiB of memory",
            "lower peft.r or target fewer modules; dry_run=true shows the plan",
        )


def device_memory(device: str) -> tuple[int | None, str]:
    """(bytes of memory, its name in a message) of "cpu" (this machine's RAM) or "cuda:N"."""
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        return torch.cuda.get_device_properties(index).total_memory, f"GPU {index}"
    return physical_memory(), "this machine"


def load_base_model(plan: Plan) -> nn.Module:
    """The base model the plan was made for: built or loaded, quantized, ready to wrap.

    A loaded checkpoint is quantized while transformers reads it, where the backend gives a
    transformers quantization config (every shipped backend does: the whole unquantized model
    never sits in memory, QLoRA's point); one saved quantized is read as it is stored; a
    config-built model is quantized after it is built."""
    run = plan.spec
    task = tasks.get(plan.task)
    overrides = task.config_overrides(run.task)
    quantized = plan.quantization.modules if plan.quantization is not None else ()
    backend = quant.for_spec(run.quant) if quantized else None
    stored = backend is not None and plan.quantization.from_checkpoint
    on_load = None
    if backend is not None and not run.model.is_config_built and not stored:
        on_load = backend.on_load_config(run.quant, run.model.dtype, _kept_unquantized(plan, task, overrides))
    base = model_source.build_model(
        run.model, task.auto_class_name, overrides, device=load_device(run.trainer), quantization_config=on_load
    )
    if on_load is not None or stored:
        _check_quantized_as_planned(base, backend, quantized)
        backend.after_load(run.quant, run.model.dtype, base, quantized)
    elif backend is not None:
        base = backend.quantize(run.quant, base, quantized).eval()  # new layers start in train mode
    return prepare_for_training(base, run.quant, run.trainer)


def load_device(trainer: TrainerSpec) -> str:
    """Where the base is loaded: the one CUDA device a single-device run trains on, else "cpu".

    Loaded there, transformers quantizes each weight on the device as its shard is read (bnb
    int8 weights quantized on the CPU cannot move to a GPU afterwards) and the host never holds
    the whole model. Several devices or nodes, and multi-process strategies (ddp, fsdp,
    deepspeed, even on one GPU), stay on the CPU for Lightning to place: the model is built
    before Lightning starts the other processes, so every rank would load onto the same GPU, and
    FSDP shards an unsharded model it is handed on the host."""
    from peftc.planning.compat import accelerator_here

    if trainer.strategy not in SINGLE_DEVICE_STRATEGIES or trainer.num_nodes != 1:
        return "cpu"
    if accelerator_here(trainer.accelerator) != "cuda":  # also: no GPU here for a plan made on one
        return "cpu"
    index = single_cuda_index(trainer.devices)
    return "cpu" if index is None else f"cuda:{index}"


def single_cuda_index(devices: Any) -> int | None:
    """The CUDA device id a Lightning `devices` value selects when it selects exactly one
    (Lightning's reading: 1 or "1" is a count, the first GPU; [3] or "3," are ids), else None
    ("auto" and -1 take every visible GPU)."""
    if isinstance(devices, int):
        return 0 if devices == 1 else None
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            ids = [part.strip() for part in text.split(",") if part.strip()]
            return int(ids[0]) if len(ids) == 1 else None
        return 0 if text == "1" else None
    ids = list(devices)
    return int(ids[0]) if len(ids) == 1 else None


def _kept_unquantized(plan: Plan, task: Any, overrides: dict[str, Any]) -> list[str]:
    """Every module transformers' quantizers would convert (Linear, GPT-2's Conv1D) that the plan
    keeps unquantized, by full path."""
    from peftc.planning.graph import meta_graph

    graph = meta_graph(plan.spec.model, task.auto_class_name, overrides)
    planned = set(plan.quantization.modules)
    return [m.path for m in graph.modules if m.path and m.kind in ("linear", "conv1d_hf") and m.path not in planned]


def _check_quantized_as_planned(base: nn.Module, backend: Any, planned: tuple[str, ...]) -> None:
    """transformers decided which modules to convert from our skip list: they must be the plan's."""
    done = {path for path, module in base.named_modules() if backend.owns(module)}
    if done != set(planned):
        extra, missing = sorted(done - set(planned)), sorted(set(planned) - done)
        raise PlanError(
            "quant",
            backend.name,
            f"internal error (peftc's, please report it): loading quantized {len(done)} modules where the plan has "
            f"{len(planned)} (unplanned: {extra[:3]}, not quantized: {missing[:3]})",
            "quantize after loading meanwhile: load the model yourself and pass it to peftc.materialize",
        )


def _check_counts(model: PeftcModel, plan: Plan, name: str) -> None:
    """The plan is the single source of truth: the materialized count must equal it exactly."""
    trainable = model.trainable_parameters()
    if len(model.active_adapters) == 1 and trainable != plan.trainable_params:
        raise RuntimeError(
            f"internal error: adapter {name!r} has {trainable:,} trainable parameters but the plan promised {plan.trainable_params:,}"
        )
