"""Schema fields and helpers shared by the injectable methods (no method registers here).

`TargetsSpec` holds what every injectable method has (which modules to adapt, which to keep
whole); `LayeredTargetsSpec` adds the layer filter of the methods whose peft config has one.
The helpers map these fields to and from peft's adapter_config.json.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftc.config.spec import SpecNode, as_list, one_of, param
from peftc.errors import AdapterFileError, ConfigError
from peftc.methods.defaults import Targets, targets_for

if TYPE_CHECKING:
    from peftc.planning.graph import ModelGraph
    from peftc.planning.plan import Plan, Site


@dataclass
class TargetsSpec(SpecNode):
    target_modules: Any = param(
        None,
        "Modules to adapt: a list of names or dotted suffixes, a full-match regex string, 'all-linear', or null for the model type's default.",
    )
    exclude_modules: Any = param(None, "Modules never adapted: list of names/suffixes or a regex string.")
    modules_to_save: Any = param(None, "Extra modules trained in full and saved whole (e.g. a new head).")


@dataclass
class LayeredTargetsSpec(TargetsSpec):
    layers_to_transform: Any = param(None, "Only adapt these layer indices (int or list).")
    layers_pattern: Any = param(
        None,
        "Name of the ModuleList holding the layers (e.g. 'layers', 'h'), used with layers_to_transform.",
    )


def bias_param(method: str) -> Any:
    """peft's `bias` setting of a method: which base biases train (and are saved) beside it."""
    return param(
        "none",
        f"Base biases trained with the adapter: 'none', 'all' (every bias of the model), '{method}_only' "
        "(biases of adapted modules).",
        one_of("none", "all", f"{method}_only"),
    )


def trained_biases(mode: str, graph: ModelGraph, sites: Sequence[Site]) -> dict[str, tuple[int, ...]]:
    """The base biases peft's `bias` setting trains (and saves) beside an adapter: 'none'; 'all'
    (every bias of the model); '<method>_only' (e.g. 'lora_only', 'oft_only': the adapted
    modules' biases)."""
    if mode == "none":
        return {}
    adapted = {s.module_path for s in sites}
    return {
        f"{module.path}.bias" if module.path else "bias": shape
        for module in graph.modules
        if mode == "all" or module.path in adapted
        for pname, shape in module.params
        if pname == "bias"
    }


def pattern_value(path: str, patterns: Mapping[str, Any], default: Any) -> Any:
    """peft's rule: the first pattern p with re.match(rf'(.*\\.)?({p})$', path) wins."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def check_patterns(key: str, rank_pattern: Mapping[str, Any] | None, alpha_pattern: Mapping[str, Any] | None) -> None:
    """Per-module rank/alpha overrides: valid regexes, ranks >= 1, alphas > 0."""
    for pattern, rank in (rank_pattern or {}).items():
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ConfigError(f"{key}.rank_pattern.{pattern}", rank, "ranks must be integers >= 1")
    for pattern, alpha in (alpha_pattern or {}).items():
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
            raise ConfigError(f"{key}.alpha_pattern.{pattern}", alpha, "alphas must be > 0")
    for name, patterns in (("rank_pattern", rank_pattern or {}), ("alpha_pattern", alpha_pattern or {})):
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{key}.{name}", pattern, f"is not a valid regex ({exc})") from exc


def flag(config: Mapping[str, Any], key: str, default: bool) -> bool:
    """A true/false field of adapter_config.json. peft reads any value by its truth, so a string
    written by hand ("false") would switch the feature on; such a value is refused instead.
    Absent is `default`; null is false and 0/1 are read as peft reads them."""
    value = config.get(key, default)
    if value is None or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise AdapterFileError(
        "adapter_config.json", f"{key}={value!r} is not true or false", f"write {key}: true or {key}: false (JSON)"
    )


def integer(config: Mapping[str, Any], key: str, default: int) -> int:
    """A whole-number field of adapter_config.json (r, init_r, num_virtual_tokens, ...). Absent or
    null is `default` and 8.0 reads as 8; a fraction, a string or a boolean is refused, where int()
    would read r: 8.5 as 8 and r: true as 1 (peft itself fails on them)."""
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise AdapterFileError(
            "adapter_config.json", f"{key}={value!r} is not a whole number", f"write e.g. {key}: {default} (JSON)"
        )
    return int(value)


def real(config: Mapping[str, Any], key: str, default: float) -> float:
    """A number field of adapter_config.json (dropouts, alphas, eps, ...). Absent or null is
    `default` (peft 0.2 wrote lora_dropout: null); a string or a boolean is refused, where float()
    would read "0.1" and true as numbers. Ranges and finiteness are the spec's checks."""
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdapterFileError(
            "adapter_config.json", f"{key}={value!r} is not a number", f"write e.g. {key}: {default} (JSON)"
        )
    return value


def number(value: float) -> float | int:
    """peft writes integral values as ints; keep the file byte-compatible."""
    return int(value) if float(value).is_integer() else value


def jsonable(value: Any) -> Any:
    """A str-or-sequence config value as peft writes it (tuples become lists)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return value


def target_fields(spec: TargetsSpec, plan: Plan, defaults: Mapping[str, Targets]) -> dict[str, Any]:
    """The target-selection fields of adapter_config.json. A null target_modules is written as
    the model type's default entries, so peft selects the same modules without knowing ours."""
    targets = spec.target_modules
    if targets is None:
        targets = targets_for(defaults, plan.model.model_type)
    fields = {
        "target_modules": jsonable(targets),
        "exclude_modules": jsonable(spec.exclude_modules),
        "modules_to_save": as_list(spec.modules_to_save),
    }
    if isinstance(spec, LayeredTargetsSpec):
        fields["layers_to_transform"] = jsonable(spec.layers_to_transform)
        fields["layers_pattern"] = jsonable(spec.layers_pattern)
    return fields


def target_kwargs(config: Mapping[str, Any], layered: bool = True) -> dict[str, Any]:
    """The target-selection fields of a spec, read from a peft adapter_config.json."""
    kwargs = {
        "target_modules": config.get("target_modules"),
        "exclude_modules": config.get("exclude_modules"),
        "modules_to_save": config.get("modules_to_save"),
    }
    if layered:
        kwargs["layers_to_transform"] = config.get("layers_to_transform")
        kwargs["layers_pattern"] = config.get("layers_pattern")
    return kwargs


# peft's LoraConfig fields (AdaLoraConfig inherits them) of LoRA features peftc does not
# implement: an adapter_config.json that uses one would load with the wrong numbers.
UNIMPLEMENTED_LORA_FIELDS = (
    "layer_replication",
    "use_qalora",
    "alora_invocation_tokens",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
    "megatron_config",
)


def refuse_unimplemented(config: Mapping[str, Any], fields: Sequence[str], method: str) -> None:
    """Refuse an adapter_config.json that sets (to anything but peft's falsy default) a field
    whose feature peftc does not implement for this method, naming the fields."""
    used = {key: config[key] for key in fields if config.get(key)}
    if used:
        raise AdapterFileError(
            "adapter_config.json",
            f"uses {method} features peftc does not implement: {used}",
            "load it with the peft package",
        )


def written_before_peft_0_22(config: Mapping[str, Any], source: str = "adapter_config.json") -> bool:
    """Whether an adapter_config.json comes from a peft before 0.22, read as peft 0.22 reads
    `peft_version` (PeftConfig.from_pretrained, LoraModel._remap_adapter_state_dict_for_load):
    absent means peft < 0.18 (which wrote none); null is filled with the loading peft's own
    version; a '@<commit>' suffix is dropped; a dev version counts as 0.22 from 0.21.1.dev on,
    because peft's main branch carried 0.21.x dev versions after the 0.22 changes."""
    from packaging.version import InvalidVersion, Version

    if "peft_version" not in config:
        return True
    written = config["peft_version"]
    if written is None:
        return False
    try:
        version = Version(written.partition("@")[0])
    except (AttributeError, InvalidVersion):
        raise AdapterFileError(
            source,
            f"peft_version={written!r} is not a version",
            "peft writes e.g. '0.22.0' or '0.21.1.dev0@<commit>'; fix it, or remove it for an adapter of peft < 0.18",
        ) from None
    release = Version(version.base_version)
    return release < Version("0.21.1") or (not version.is_devrelease and release < Version("0.22.0"))
