"""Target resolution: which modules of the graph a method adapts.

peft's semantics (a list entry is an exact path or a dotted suffix; a string is a full-match
regex; 'all-linear' is every Linear/Conv1D but the output head; exclude_modules wins;
layers_to_transform picks transformer blocks; 'dummy-target-modules' adapts nothing so that only
modules_to_save train), but stricter: every list entry must match
something, every matched module must be a kind the method can wrap, and requested layer
indices must exist. Each refusal names the key and suggests names from the real graph.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftc.errors import ConfigError, PlanError, did_you_mean
from peftc.planning.graph import LINEAR_KINDS, ModelGraph, ModuleInfo, layer_index

if TYPE_CHECKING:
    from peftc.methods.base import Method


@dataclass(frozen=True)
class TargetRequest:
    """What a method asks the planner to resolve, and which config keys to blame."""

    target_modules: Any  # None (model-type default) | "all-linear" | regex str | list of names
    exclude_modules: Any = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    key: str = "peft.target_modules"
    # The method adapts something besides modules (LoRA's target_parameters): then an empty
    # list, or null on a model type without defaults, means "no module" instead of an error.
    modules_optional: bool = False


# peft's spelling (DUMMY_TARGET_MODULES) for "no adapter layers": train only modules_to_save,
# e.g. a classification head alone. Written as is in adapter_config.json, so peft loads it too.
NO_TARGETS = "dummy-target-modules"

KIND_NAMES = {
    "linear": "Linear",
    "conv1d_hf": "Conv1D (GPT-2)",
    "embedding": "Embedding",
    "conv1d": "Conv1d",
    "conv2d": "Conv2d",
    "conv3d": "Conv3d",
    "mha": "MultiheadAttention",
    "norm": "LayerNorm/RMSNorm",
}


def resolve_targets(
    request: TargetRequest,
    method: Method,
    graph: ModelGraph,
    *,
    protected: Iterable[str] = (),
    strict: bool = True,
) -> list[ModuleInfo]:
    """The modules to adapt, in graph order; raises PlanError when the request cannot be met."""
    key = request.key
    targets = request.target_modules
    _check_names_type(key, targets)
    _check_names_type("peft.exclude_modules", request.exclude_modules)
    if targets == NO_TARGETS:
        return _no_targets(key, protected)
    if request.modules_optional and (targets == [] or targets == ()):
        return []
    # peft adapts whichever of a model type's default names the model has (Mixtral in
    # transformers 5 has no `w2`; a Falcon layout lacks one of the norms); a name the user wrote
    # that matches nothing is refused.
    from_default = targets is None
    if targets is None:
        targets = method.default_target_modules(graph.model_type)
        if not targets and request.modules_optional:
            return []
        if not targets:
            raise PlanError(
                key,
                None,
                f"{method.name} has no default target modules for model_type '{graph.model_type}'",
                f"set {key}=[...]; adaptable here: {_adaptable_names(method, graph)}",
            )
    candidates = [m for m in graph.modules if m.path]
    if isinstance(targets, str) and targets.lower() == "all-linear":
        matched = [m for m in candidates if m.kind in LINEAR_KINDS and m.path != graph.output_embedding]
        if not matched:
            raise PlanError(key, targets, f"{graph.model_class} has no Linear or Conv1D modules")
    elif isinstance(targets, str):
        matched = _regex_matches(key, targets, candidates)
        if not matched:
            problem = f"the regex matches no module path of {graph.model_class}"
            raise PlanError(key, targets, problem, _unmatched_string_hint(key, targets, method, graph))
    else:
        matched = _list_matches(key, list(targets), candidates, graph, strict=strict and not from_default)
    if isinstance(targets, str) and (request.layers_to_transform is not None or request.layers_pattern is not None):
        raise ConfigError(
            "peft.layers_to_transform",
            request.layers_to_transform,
            "only works with a list of target_modules (peft's rule)",
            "list the module names instead of a regex/'all-linear'",
        )
    _check_kinds(key, method, matched, graph)
    selected = matched
    if request.exclude_modules is not None:
        excluded = _excluded(request.exclude_modules, candidates, strict=strict)
        selected = [m for m in selected if m.path not in excluded]
    blocked = tuple(protected)
    selected = [m for m in selected if not any(m.path == p or m.path.startswith(p + ".") for p in blocked)]
    selected = _filter_layers(request, selected, candidates)
    if not selected:
        raise PlanError(
            key,
            _shown(targets),
            "no module is left to adapt after exclude_modules / layers_to_transform / modules_to_save",
        )
    return selected


def _check_names_type(key: str, value: object) -> None:
    """null, a string (regex or 'all-linear') or a list of strings; anything else is a mistake."""
    if value is None or isinstance(value, str):
        return
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return
    raise ConfigError(
        key,
        _shown(value),
        "must be a list of module names, a regex string, 'all-linear' or null",
        "e.g. [q_proj, v_proj]",
    )


def _no_targets(key: str, protected: Iterable[str]) -> list[ModuleInfo]:
    """peft's 'dummy-target-modules': adapt nothing; only modules_to_save (e.g. the head) train."""
    if not list(protected):
        raise PlanError(
            key,
            NO_TARGETS,
            "adapts no module, and there is no task head or peft.modules_to_save to train instead",
            "name modules to adapt, or list modules to train in full in peft.modules_to_save",
        )
    return []


def _shown(targets: object) -> object:
    return list(targets) if isinstance(targets, tuple) else targets


def _regex_matches(key: str, pattern: str, candidates: Sequence[ModuleInfo]) -> list[ModuleInfo]:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(key, pattern, f"is not a valid regular expression ({exc})") from exc
    return [m for m in candidates if compiled.fullmatch(m.path)]


def _entry_matches(entry: str, candidates: Sequence[ModuleInfo]) -> list[ModuleInfo]:
    suffix = "." + entry
    return [m for m in candidates if m.path == entry or m.path.endswith(suffix)]


def _list_matches(
    key: str,
    entries: list[str],
    candidates: Sequence[ModuleInfo],
    graph: ModelGraph,
    *,
    strict: bool,
) -> list[ModuleInfo]:
    if not entries:
        raise ConfigError(
            key,
            [],
            "is empty",
            "name at least one module, or use null for the model type's default",
        )
    hits: dict[str, ModuleInfo] = {}
    for entry in entries:
        if not isinstance(entry, str):
            raise ConfigError(key, entry, "entries must be module names (strings)")
        found = _entry_matches(entry, candidates)
        if not found and strict:
            names = graph.leaf_names() | {m.path for m in candidates}
            hint = did_you_mean(entry, names) or f"module names here include {_sample(graph)}"
            raise PlanError(key, entry, f"no module named {entry!r} in {graph.model_class}", hint)
        for module in found:
            hits[module.path] = module
    if not hits:
        raise PlanError(
            key,
            entries,
            f"none of these names is a module of {graph.model_class}",
            f"module names here include {_sample(graph)}",
        )
    order = {m.path: i for i, m in enumerate(candidates)}
    return sorted(hits.values(), key=lambda m: order[m.path])


def _check_kinds(key: str, method: Method, matched: Sequence[ModuleInfo], graph: ModelGraph) -> None:
    for module in matched:
        if module.kind not in method.supported_kinds:
            inner = [
                m.path[len(module.path) + 1 :]
                for m in graph.subtree(module.path)
                if m.kind in method.supported_kinds and m.path != module.path
            ]
            hint = f"{method.name} adapts {_kinds(method)}"
            if inner:
                hint += f"; inside it: {', '.join(sorted(set(p.rsplit('.', 1)[-1] for p in inner)))}"
            raise PlanError(
                key,
                module.leaf_name,
                f"matches {module.path} ({module.class_name}), which {method.name} cannot adapt",
                hint,
            )


def _excluded(exclude: object, candidates: Sequence[ModuleInfo], *, strict: bool) -> set[str]:
    key = "peft.exclude_modules"
    if isinstance(exclude, str):
        return {m.path for m in _regex_matches(key, exclude, candidates)}
    paths: set[str] = set()
    for entry in exclude:  # type: ignore[union-attr]
        found = _entry_matches(entry, candidates)
        if not found and strict:
            hint = did_you_mean(entry, {m.leaf_name for m in candidates} | {m.path for m in candidates})
            raise PlanError(key, entry, "matches no module, so it excludes nothing", hint)
        paths.update(m.path for m in found)
    return paths


def _filter_layers(
    request: TargetRequest, selected: list[ModuleInfo], candidates: Sequence[ModuleInfo]
) -> list[ModuleInfo]:
    layers, pattern = request.layers_to_transform, request.layers_pattern
    if layers is None:
        if pattern is not None:
            raise ConfigError(
                "peft.layers_pattern",
                list(pattern),
                "needs peft.layers_to_transform",
                "set the layer indices to adapt, e.g. peft.layers_to_transform=[0,1]",
            )
        return selected
    if pattern is not None:
        segments = {part for m in candidates for part in m.path.split(".")}
        for name in pattern:
            if name not in segments:
                raise PlanError(
                    "peft.layers_pattern",
                    name,
                    "is not a module name in this model",
                    did_you_mean(name, segments),
                )
    available = {layer_index(m.path, pattern) for m in selected} - {None}
    missing = sorted(set(layers) - available)
    if missing:
        shown = f"{min(available)}-{max(available)}" if available else "none"
        raise PlanError(
            "peft.layers_to_transform",
            missing if len(missing) > 1 else missing[0],
            f"no such layer among the targeted modules (layers {shown})",
        )
    wanted = set(layers)
    return [m for m in selected if layer_index(m.path, pattern) in wanted]


def _kinds(method: Method) -> str:
    return ", ".join(KIND_NAMES.get(k, k) for k in sorted(method.supported_kinds))


def _adaptable_names(method: Method, graph: ModelGraph) -> str:
    names = sorted(
        {m.leaf_name for m in graph.modules if m.kind in method.supported_kinds and m.path != graph.output_embedding}
    )
    return ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")


def _unmatched_string_hint(key: str, targets: str, method: Method, graph: ModelGraph) -> str:
    """A string that matches nothing: if it reads as module names (`q_proj`, or peft's and axolotl's
    comma string `q_proj,v_proj`), how to give names; else example paths for the regex."""
    names = [name.strip() for name in targets.split(",")]
    if all(re.fullmatch(r"[A-Za-z0-9_.]+", name) for name in names):
        as_regex = f" (or the regex '.*{names[0]}')" if len(names) == 1 else ""
        return (
            "a string is one regex matched against whole module paths, as in peft; "
            f"for module names write {key}=[{','.join(names)}]{as_regex}"
        )
    return f"e.g. {_example_paths(method, graph)}"


def _example_paths(method: Method, graph: ModelGraph) -> str:
    paths = [m.path for m in graph.modules if m.kind in method.supported_kinds][:3]
    return ", ".join(paths)


def _sample(graph: ModelGraph) -> str:
    names = sorted({m.leaf_name for m in graph.modules if m.path and not m.leaf_name.isdigit()})
    return ", ".join(names[:15]) + (" ..." if len(names) > 15 else "")
