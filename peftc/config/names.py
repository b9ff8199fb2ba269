"""What an adapter name may not be, beyond its spelling (`spec.check_adapter_name`).

Names become key segments inside the model (`...q_proj.lora_A.<name>.weight`) and folder names
on disk. A name equal to a module path segment ('mlp', 'self_attn') or to a method's tensor
prefix ('lora') makes key-based tools confuse adapter and module: peft#3584 silently dropped
such keys from saved files, peft#2699 missed them on load. peftc refuses those names up front.
"""

from __future__ import annotations

from collections.abc import Iterable

from peftc.errors import ConfigError, PlanError

# Attribute names peftc's wrappers use for their own children.
INTERNAL_NAMES = frozenset({"base_layer", "base_model", "modules_to_save", "original_module", "prompt_encoders"})


def reserved_names() -> frozenset[str]:
    """Method tensor prefixes ('lora'), adapter containers ('lora_A', ...) and peftc internals."""
    from peftc.config.registry import METHODS

    names = set(INTERNAL_NAMES)
    for method in METHODS.all().values():
        if method.kind != "injectable":
            continue  # a prompt encoder lives under prompt_encoders, not beside model modules
        if method.tensor_prefix:
            names.add(method.tensor_prefix.rstrip("_"))
        names.update(method.layer_class.adapter_containers)
    return frozenset(names)


def check_adapter_name_fits(key: str, name: str, module_paths: Iterable[str]) -> None:
    """Refuse a name that clashes with a reserved word or with a module of this model."""
    if name in reserved_names():
        raise ConfigError(
            key,
            name,
            "is reserved (a method's tensor prefix or a name peftc uses inside adapter layers)",
            "pick a name such as 'default' or 'task_a'",
        )
    clash = next((path for path in module_paths if name in path.split(".")), None)
    if clash is not None:
        raise PlanError(
            key,
            name,
            f"is also a module name in this model ({clash})",
            "adapter names become key segments next to module names; pick one the model does not use",
        )


def check_unique(key: str, names: Iterable[str]) -> list[str]:
    """The names as a list, refusing duplicates."""
    listed = list(names)
    duplicates = sorted({n for n in listed if listed.count(n) > 1})
    if duplicates:
        raise ConfigError(key, listed, f"names {duplicates[0]!r} more than once", "list each adapter once")
    return listed
