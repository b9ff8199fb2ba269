"""LoRA on raw parameters (peft's `target_parameters` and its `ParamWrapper`): weights that no
nn.Linear holds, above all the stacked expert weights of mixture-of-experts layers (Mixtral,
Qwen-MoE, gpt-oss: one (experts, out, in) tensor per projection).

A 2-D parameter (out, in) gets A (r, in) and B (out, r): W' = W + s B A. A stack of E experts gets
A (r*E, in) and B (out, r*E); expert e uses A viewed as (E, r, in) at e and B viewed as (out, r, E)
at e (peft's reshapes: A's rows come in expert blocks, B's columns interleaved), and its update
lands in W[e]. A stack is (E, out, in), or (E, in, out) when the module holding it says
`is_transposed` (gpt-oss). The forward calls the module with W' in W's place
(torch.func.functional_call: peft's parametrization without changing the module); merging adds
s B A to W.

peft wraps the module holding the parameter, once per targeted parameter, nested when several of
one module's parameters are targeted (the first registered innermost), and saves each at its
wrapper's path: `experts.lora_A.weight` for the outermost, `experts.base_layer.lora_A.weight` for
the next. A site's path is that wrapper path, so saved names and the live module tree are peft's.
peft refuses dropout, DoRA and lora_bias here (the update is a weight; there is no input to drop
out), so does peftc, when the config is checked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call

from peftc.errors import ConfigError, PlanError, did_you_mean
from peftc.methods.common import pattern_value
from peftc.methods.layer import AdapterLayer
from peftc.methods.lora.init import reset_default
from peftc.planning.plan import ParameterTarget, Site

if TYPE_CHECKING:
    from peftc.planning.graph import ModelGraph, ModuleInfo

KEY = "peft.target_parameters"
KIND = "parameter"
PLAIN_INITS = (True, False, "gaussian", "nora")  # the inits peftc implements on raw parameters


def check_spec(spec: Any, key: str = "peft") -> None:
    """What the setting must look like, and the options peft refuses beside it."""
    names = spec.target_parameters
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
        shown = list(names) if isinstance(names, tuple) else names
        raise ConfigError(
            KEY, shown, "must be a non-empty list of parameter names", f"e.g. {KEY}=[experts.gate_up_proj]"
        )
    refused = {
        "lora_dropout": (spec.lora_dropout, spec.lora_dropout != 0, "0"),
        "use_dora": (spec.use_dora, spec.use_dora, "false"),
        "lora_bias": (spec.lora_bias, spec.lora_bias, "false"),
    }
    for field, (value, is_set, fix) in refused.items():
        if is_set:
            raise ConfigError(
                f"{key}.{field}", value, f"does not work with {KEY} (peft refuses it)", f"set {key}.{field}={fix}"
            )
    if spec.init_lora_weights not in PLAIN_INITS:
        raise ConfigError(
            f"{key}.init_lora_weights",
            spec.init_lora_weights,
            f"with {KEY} peftc implements only true, false, gaussian and nora",
            "use one of them",
        )


def parameter_sites(spec: Any, graph: ModelGraph, module_sites: Sequence[Site]) -> tuple[Site, ...]:
    """One site per targeted parameter, outermost wrapper first (the order injection needs)."""
    if not spec.target_parameters:
        return ()
    wanted = list(spec.target_parameters)
    matched = _matches(wanted, graph)
    adapted = {s.path for s in module_sites}
    sites = []
    for module, names in matched:
        if module.path in adapted:
            raise PlanError(
                KEY,
                f"{module.path}.{names[0]}",
                f"{module.path} is also a LoRA target module; peft wraps a module one way",
                "exclude it from peft.target_modules (peft.target_modules=[] adapts parameters only)",
            )
        for depth, name in enumerate(reversed(names)):
            sites.append(_site(spec, module, name, depth))
    return tuple(sorted(sites, key=lambda s: s.path.count(".base_layer")))


def _matches(wanted: list[str], graph: ModelGraph) -> list[tuple[ModuleInfo, list[str]]]:
    """peft's rule: `<module>.<parameter>` equals an entry or ends with '.' + entry."""
    found: list[tuple[ModuleInfo, list[str]]] = []
    used: set[str] = set()
    for module in graph.modules:
        names = []
        for name, _ in module.params:
            full = f"{module.path}.{name}" if module.path else name
            hits = [w for w in wanted if full == w or full.endswith("." + w)]
            if hits:
                names.append(name)
                used.update(hits)
        if names and not module.path:
            raise PlanError(
                KEY,
                names[0],
                f"is a parameter of {graph.model_class} itself; peft adapts parameters of submodules only",
            )
        if names:
            found.append((module, names))
    missing = [w for w in wanted if w not in used]
    if missing:
        raise PlanError(
            KEY, missing[0], f"no parameter named {missing[0]!r} in {graph.model_class}", _hint(missing[0], graph)
        )
    return found


def _hint(entry: str, graph: ModelGraph) -> str:
    """A module's name given for its parameter names the parameter; else the closest names."""
    module = next((m for m in graph.modules if m.path and (m.path == entry or m.path.endswith("." + entry))), None)
    if module is not None and module.params:
        return f"{entry} is a module; name its parameter, e.g. {entry}.{module.params[0][0]}"
    short = {f"{m.leaf_name}.{n}" for m in graph.modules if m.path for n, _ in m.params}
    return did_you_mean(entry, short) or f"e.g. {sorted(short)[:3]}"


def _site(spec: Any, module: ModuleInfo, name: str, depth: int) -> Site:
    shape = dict(module.params)[name]
    full = f"{module.path}.{name}"
    if len(shape) not in (2, 3):
        raise PlanError(
            KEY, full, f"is {len(shape)}-D {tuple(shape)}; peft adapts 2-D and 3-D (expert) parameters only"
        )
    in_first = len(shape) == 3 and bool(module.get("is_transposed", False))
    experts = shape[0] if len(shape) == 3 else 1
    if len(shape) == 2:
        out_features, in_features = shape
    else:
        out_features, in_features = (shape[2], shape[1]) if in_first else (shape[1], shape[2])
    r = pattern_value(full, spec.rank_pattern or {}, spec.r)  # peft matches patterns on the parameter's name
    alpha = pattern_value(full, spec.alpha_pattern or {}, spec.lora_alpha)
    options = {
        "r": r,
        "alpha": alpha,
        "scaling": alpha / math.sqrt(r) if spec.use_rslora else alpha / r,
        "init": spec.init_lora_weights,
        "experts": experts,
        "in_first": in_first,
    }
    tensors = {"lora_A.weight": (r * experts, in_features), "lora_B.weight": (out_features, r * experts)}
    path = module.path + ".base_layer" * depth
    target = ParameterTarget(module.path, name, tuple(shape))
    return Site(path, KIND, module.class_name, in_features, out_features, tensors, options, parameter=target)


def is_parameter_site(site: Site) -> bool:
    return site.kind == KIND


class ParamLoraLayer(AdapterLayer):
    """LoRA on one parameter of the wrapped module (which may itself be a ParamLoraLayer)."""

    adapter_containers = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__(base_layer, kind)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.parameter_name = ""
        self.num_experts = 1
        self.in_first = False

    def add_adapter(self, name: str, site: Site, *, init: bool = True) -> None:
        self._check_same_parameter(site.parameter)  # before anything is recorded
        super().add_adapter(name, site, init=init)

    def create_adapter(self, name: str, site: Site, init: bool) -> None:
        opts = site.options
        self.parameter_name, self.num_experts, self.in_first = site.parameter.name, opts["experts"], opts["in_first"]
        self.scaling[name] = opts["scaling"]
        rank = opts["r"] * self.num_experts
        device = self._weight().device
        if device.type == "meta":
            from peftc.methods.lora.layer import meta_linear

            a, b = meta_linear(site.in_features, rank, bias=False), meta_linear(rank, site.out_features, bias=False)
        else:  # drawn on the CPU like peft's, then moved beside the parameter
            a, b = nn.Linear(site.in_features, rank, bias=False), nn.Linear(rank, site.out_features, bias=False)
            if init and opts["init"] is not False:
                reset_default(a, b, opts["init"], opts["r"])
            a, b = a.to(device), b.to(device)
        self.lora_A[name], self.lora_B[name] = a, b

    def _check_same_parameter(self, target: ParameterTarget) -> None:
        if self.parameter_name and target.name != self.parameter_name:
            raise PlanError(
                KEY,
                f"{target.module}.{target.name}",
                f"this wrapper of {target.module} adapts {self.parameter_name!r}; every adapter of a model "
                "must target the same parameters (peft)",
                "give this adapter the same target_parameters as the others",
            )

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.scaling.pop(name, None)

    # ------------------------------------------------------------------------ the weight
    def _holder(self) -> nn.Module:
        """The model's own module that holds the parameter (below any nested wrappers)."""
        module = self.base_layer
        while isinstance(module, ParamLoraLayer):
            module = module.base_layer
        return module

    def _weight(self) -> nn.Parameter:
        return getattr(self._holder(), self.parameter_name)

    def merge_targets(self, names: Sequence[str]) -> tuple[str, ...]:
        return (self.parameter_name,)

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs, rhs), per expert, with lhs @ rhs = B_e A_e in the parameter's layout."""
        weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
        a = weight_a.reshape(self.num_experts, -1, weight_a.shape[-1])  # (E, r, in)
        b = weight_b.reshape(weight_b.shape[0], -1, self.num_experts).permute(2, 0, 1)  # (E, out, r)
        return (a.transpose(-2, -1), b.transpose(-2, -1)) if self.in_first else (b, a)

    def delta_weight(self, name: str) -> torch.Tensor:
        lhs, rhs = self._factors(name)
        delta = lhs.float() @ rhs.float() * self.scaling[name]
        return delta.reshape(self._weight().shape)

    def _adapted_weight(self, names: Sequence[str]) -> torch.Tensor:
        weight = self._weight()
        if len(names) == 1 and self.num_experts > 1:
            # peft folds one adapter into the stack with one baddbmm, in the parameter's dtype
            lhs, rhs = self._factors(names[0])
            with torch.autocast(device_type=weight.device.type, enabled=False):
                return torch.baddbmm(weight, lhs.to(weight.dtype), rhs.to(weight.dtype), alpha=self.scaling[names[0]])
        delta = sum(self.delta_weight(name) for name in names)
        return weight + delta.to(weight.dtype)

    def _name_in_base(self) -> str:
        """The parameter's name as seen from base_layer (through nested wrappers)."""
        parts, module = [self.parameter_name], self.base_layer
        while isinstance(module, ParamLoraLayer):
            parts.insert(0, "base_layer")
            module = module.base_layer
        return ".".join(parts)

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or self.merged_adapters or not self.active_adapters:
            return super().forward(x, *args, **kwargs)
        weight = self._adapted_weight(self.active_adapters)
        return functional_call(self.base_layer, {self._name_in_base(): weight}, (x, *args), kwargs)

    def extra_repr(self) -> str:
        return f"parameter={self.parameter_name!r}, {super().extra_repr()}"
