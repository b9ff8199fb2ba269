"""Injection: one planned adapter added to a live model, transactionally (all sites or none)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from peftc.config.registry import METHODS
from peftc.errors import PlanError
from peftc.methods.layer import AdapterLayer, ModulesToSaveWrapper
from peftc.planning.graph import replace_module

if TYPE_CHECKING:
    from peftc.methods.base import Method
    from peftc.planning.graph import ModelGraph, ModuleInfo
    from peftc.planning.plan import Plan, Site
    from peftc.runtime.model import PeftcModel


def inject(model: PeftcModel, plan: Plan, name: str, *, init: bool = True) -> None:
    """Add one adapter to the model exactly as planned, or leave the model unchanged."""
    from peftc.config.names import check_adapter_name_fits
    from peftc.planning.graph import graph_of

    method = METHODS.get(plan.method)
    base = model.base_model
    graph = graph_of(base)
    check_adapter_name_fits("adapter_name", name, (m.path for m in graph.modules))
    for site in plan.sites:
        if site.kind == "parameter":
            _check_parameter_fits(site, graph, plan)
        else:
            _check_site_fits(site, graph.module(site.module_path), plan)
    shared = shared_holder(method, plan, base)
    new_layers: dict[str, AdapterLayer] = {}
    extended: list[AdapterLayer] = []
    new_wrappers: dict[str, ModulesToSaveWrapper] = {}
    extended_wrappers: list[ModulesToSaveWrapper] = []
    try:
        for site in plan.sites:
            current = _pending_module(base, site.path, new_layers)
            layer_type = method.layer_type(site)
            if isinstance(current, AdapterLayer):
                if not isinstance(current, layer_type):
                    raise PlanError(
                        "peft",
                        plan.method,
                        f"{site.path} already carries a {type(current).__name__} adapter",
                        "one method per module: delete the other adapter first",
                    )
                _attach(current, name, shared)
                current.add_adapter(name, site, init=init)
                extended.append(current)
            else:
                layer = layer_type(current, site.kind)
                _attach(layer, name, shared)
                layer.add_adapter(name, site, init=init)
                new_layers[site.path] = layer
        _share_between_sites(base, plan, name, new_layers)
        for saved in plan.modules_to_save:  # a module that follows another comes after it
            current = base.get_submodule(saved.path)
            follows = None
            if saved.follows is not None:
                owner = new_wrappers.get(saved.follows) or base.get_submodule(saved.follows)
                follows = owner.modules_to_save[name]
            if isinstance(current, ModulesToSaveWrapper):
                current.add_adapter(name, follows)
                extended_wrappers.append(current)
            else:
                wrapper = ModulesToSaveWrapper(current)
                wrapper.add_adapter(name, follows)
                new_wrappers[saved.path] = wrapper
        encoder = method.create_prompt_encoder(plan.prompt, plan.spec.peft, base) if plan.prompt is not None else None
    except BaseException:
        for layer in extended:
            layer.delete_adapter(name)
        for wrapper in extended_wrappers:
            wrapper.delete_adapter(name)
        raise
    for path, layer in new_layers.items():
        replace_module(base, path, layer)
    for path, wrapper in new_wrappers.items():
        replace_module(base, path, wrapper)
    if encoder is not None:
        model.prompt_encoders[name] = encoder
    if shared is not None:
        model.shared_tensors[name] = shared


def _attach(layer: AdapterLayer, name: str, shared: nn.Module | None) -> None:
    if shared is not None:
        layer.attach_shared(name, shared)


def shared_holder(method: Method, plan: Plan, base: nn.Module) -> nn.Module | None:
    """The plan's shared tensors, created once, as non-persistent buffers of one module (the
    adapter files save them, at peft's names; checkpoints of the model need not)."""
    if not plan.shared:
        return None
    holder = nn.Module()
    reference = next((p for p in base.parameters() if p.device.type != "meta"), None)
    for tensor_name, tensor in method.create_shared(plan.spec.peft, plan.shared).items():
        device = reference.device if reference is not None else tensor.device
        holder.register_buffer(tensor_name, tensor.to(device), persistent=False)
    return holder


def _share_between_sites(base: nn.Module, plan: Plan, name: str, new_layers: dict[str, AdapterLayer]) -> None:
    """Hand a site planned to share another site's tensors the layer that holds them."""
    for site in plan.sites:
        if site.shares_with is not None:
            layer = _pending_module(base, site.path, new_layers)
            layer.share_adapter(name, _pending_module(base, site.shares_with, new_layers))


def _pending_module(base: nn.Module, path: str, new_layers: dict[str, AdapterLayer]) -> nn.Module:
    """The module at `path` as it will be once the layers made so far replace theirs: a wrapper
    planned inside another (peft nests one per targeted parameter, `experts.base_layer`) wraps
    what the outer one wraps."""
    module = base
    walked = ""
    for part in path.split("."):
        walked = f"{walked}.{part}" if walked else part
        module = new_layers[walked] if walked in new_layers else module.get_submodule(part)
    return module


def _check_parameter_fits(site: Site, graph: ModelGraph, plan: Plan) -> None:
    module_path, name, planned = site.parameter.module, site.parameter.name, site.parameter.shape
    module = graph.module(module_path)
    shape = dict(module.params).get(name) if module is not None else None
    if shape is None or tuple(shape) != planned:
        found = f"is {tuple(shape)} here" if shape is not None else "is missing here"
        raise PlanError(
            "model",
            plan.model.name,
            f"the plan adapts the parameter {module_path}.{name} of shape {planned}, which {found}",
            "the adapter was made for a different base model",
        )


def _check_site_fits(site: object, module: ModuleInfo | None, plan: Plan) -> None:
    if module is None:
        raise PlanError(
            "model",
            plan.model.name,
            f"the plan adapts {site.path}, which this model does not have",
            "plan against this model (peftc.compile with the same model) or load the matching base",
        )
    if (module.kind, module.in_features, module.out_features) != (
        site.kind,
        site.in_features,
        site.out_features,
    ):
        raise PlanError(
            "model",
            plan.model.name,
            f"{site.path} is {module.class_name} {module.in_features}→{module.out_features} here but {site.module_class} {site.in_features}→{site.out_features} in the plan",
            "the adapter was made for a different base model",
        )
