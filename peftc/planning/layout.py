"""The saved layout of a plan: every tensor the adapter file will hold, under peft's names, and
the file's exact size, known before anything is built (the planner reports it, files/ writes it).

Tensor names follow peft's saved format: `base_model.model.<module path>.<tensor suffix>` with
the adapter name removed (`...q_proj.lora_A.weight`), modules_to_save under the wrapped
module's own name, prompt encoders as `prompt_embeddings`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peftc.planning.plan import Plan, Site

PEFT_COMPAT_VERSION = "0.22.0"  # the peft release whose file layout and config fields we write
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PLAN_NAME = "peftc_plan.json"
MODEL_PREFIX = "base_model.model."
# Prompt-learning PeftModels hold the transformers model directly as `base_model` (no tuner
# wrapper), so peft saves their modules_to_save (e.g. a classifier head) one level up.
PROMPT_MODEL_PREFIX = "base_model."
# peft keeps a method's model-level tensors on its tuner model (VeRA's `base_model.vera_A`).
SHARED_PREFIX = "base_model."
_ST_DTYPES = {
    "float32": ("F32", 4),
    "bfloat16": ("BF16", 2),
    "float16": ("F16", 2),
    "float64": ("F64", 8),
}
ADAPTER_DTYPE = "float32"


def numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def base_weight_shape(site: Site) -> tuple[int, ...]:
    """Shape of the wrapped layer's weight (Linear stores (out, in); Conv1D and Embedding (in, out))."""
    if site.kind in ("embedding", "conv1d_hf"):
        return (site.in_features, site.out_features)
    return (site.out_features, site.in_features)


# ------------------------------------------------------------------------------- file layout
def saved_layout(plan: Plan) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor the adapter file will hold: saved name -> (shape, dtype)."""
    layout: dict[str, tuple[tuple[int, ...], str]] = {}
    MODEL_PREFIX = model_prefix(plan)  # noqa: N806 (shadows the module constant on purpose)
    for site in plan.sites:
        for suffix, shape in site.tensors.items():
            layout[f"{MODEL_PREFIX}{site.path}.{suffix}"] = (tuple(shape), ADAPTER_DTYPE)
        if site.save_base_weight:
            layout[f"{MODEL_PREFIX}{site.path}.base_layer.weight"] = (base_weight_shape(site), plan.model.dtype)
    for module in plan.modules_to_save:
        for name, shape in module.tensors.items():
            layout[f"{MODEL_PREFIX}{module.path}.{name}"] = (tuple(shape), plan.model.dtype)
    for name, shape in plan.unfrozen.items():
        layout[f"{MODEL_PREFIX}{unfrozen_saved_name(plan, name)}"] = (tuple(shape), plan.model.dtype)
    for shared in plan.shared:
        if shared.saved:
            layout[SHARED_PREFIX + shared.name] = (tuple(shared.shape), ADAPTER_DTYPE)
    if plan.prompt is not None:
        for name, shape in plan.prompt.saved.items():
            layout[name] = (tuple(shape), ADAPTER_DTYPE)
    return layout


def model_prefix(plan: Plan) -> str:
    """Where peft saves tensors of base-model modules for this plan's method."""
    return PROMPT_MODEL_PREFIX if plan.prompt is not None else MODEL_PREFIX


def unfrozen_saved_name(plan: Plan, name: str) -> str:
    """peft saves a trained base parameter of an adapted module under its (innermost) wrapper's
    `base_layer`."""
    module, _, pname = name.rpartition(".")
    wrappers = [s.path for s in plan.sites if s.module_path == module]
    return f"{max(wrappers, key=len)}.base_layer.{pname}" if wrappers else name


def safetensors_size(layout: Mapping[str, tuple[tuple[int, ...], str]]) -> int:
    """Exact byte size of a safetensors file with these tensors (format metadata included)."""
    entries = sorted(layout.items(), key=lambda kv: (-_ST_DTYPES[kv[1][1]][1], kv[0]))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, dtype) in entries:
        code, size = _ST_DTYPES[dtype]
        count = 1
        for dim in shape:
            count *= dim
        header[name] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [offset, offset + count * size],
        }
        offset += count * size
    text = json.dumps(header, separators=(",", ":"))
    padded = len(text) + (-len(text)) % 8
    return 8 + padded + offset


# ------------------------------------------------------------------------------------ saving


def adapter_config(plan: Plan, method_fields: Mapping[str, Any]) -> dict[str, Any]:
    """adapter_config.json for a plan: peft's common fields, then the method's own (resolved by
    the method against the plan's sites). The planner stores it in the plan; save writes it."""
    return {
        "peft_type": plan.peft_type,
        "task_type": plan.task_type,
        "base_model_name_or_path": plan.model.name_or_path or plan.model.name,
        "revision": plan.spec.model.revision,
        "inference_mode": True,
        "auto_mapping": None,
        "peft_version": PEFT_COMPAT_VERSION,
        **method_fields,
    }


def config_to_write(config: Mapping[str, Any]) -> dict[str, Any]:
    """The plan's adapter_config as written to disk: a base shipped inside peftc (`pkg:...`) is
    named by its directory on this machine, so that the peft package can load the base too. The
    plan keeps the portable name (plans must not depend on where peftc is installed)."""
    from peftc.planning.model_source import PACKAGE_SCHEME, package_directory

    base = config.get("base_model_name_or_path")
    if isinstance(base, str) and base.startswith(PACKAGE_SCHEME):
        return {**config, "base_model_name_or_path": package_directory(base)}
    return dict(config)
