"""(IA)^3: learned vectors rescale activations. y = (W x) * l for most layers (l scales the
OUTPUT features, e.g. attention k/v), y = W (x * l) for feed-forward layers (l scales the INPUT
of the feed-forward down projection).

One vector `ia3_l` per site: shape (out, 1), or (1, in) for feed-forward layers, or
(1, channels, 1, 1[, 1]) for Conv2d/Conv3d; it starts at ones, an exact no-op. Merging scales
W's rows (and the bias) or W's columns (transposed for GPT-2's Conv1D, which stores W as
(in, out); repeated per group for grouped convolutions); unmerging divides them back.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftc.config.spec import RunSpec, param
from peftc.errors import ConfigError, PlanError
from peftc.methods import register
from peftc.methods.base import InjectableMethod
from peftc.methods.common import TargetsSpec, flag, jsonable, target_fields, target_kwargs
from peftc.methods.defaults import IA3_FEEDFORWARD, IA3_TARGETS
from peftc.methods.layer import AdapterLayer
from peftc.planning.graph import ModelGraph, ModuleInfo
from peftc.planning.plan import Plan, Site


@dataclass
class IA3Spec(TargetsSpec):
    feedforward_modules: Any = param(
        None,
        "Targets whose INPUT is scaled (a list of name suffixes or a full-match regex); null: the model type's default (Llama: down_proj).",
    )
    init_ia3_weights: bool = param(True, "true: vectors start at ones (no-op); false: random normal (not a no-op).")

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        feedforward, targets = self.feedforward_modules, self.target_modules
        if isinstance(feedforward, str):
            try:
                re.compile(feedforward)
            except re.error as exc:
                raise ConfigError(f"{key}.feedforward_modules", feedforward, f"is not a valid regex ({exc})") from exc
        # peft's rule, checked only when both are lists: feed-forward modules are a subset of the targets.
        if isinstance(feedforward, (list, tuple)) and isinstance(targets, (list, tuple)):
            extra = sorted(set(feedforward) - set(targets))
            if extra:
                raise ConfigError(
                    f"{key}.feedforward_modules",
                    list(feedforward),
                    f"{extra} are not in {key}.target_modules",
                    "feed-forward modules must be a subset of the targets",
                )


def feedforward_entries(spec: IA3Spec, model_type: str) -> Any:
    """The feed-forward selection: the spec's, or the model type's default (None if unknown)."""
    if spec.feedforward_modules is not None:
        return spec.feedforward_modules
    default = IA3_FEEDFORWARD.get(model_type)
    return list(default) if default is not None else None


def is_feedforward(path: str, entries: str | Sequence[str]) -> bool:
    """peft's rule: a string is a full-match regex; list entries match as plain suffixes."""
    if isinstance(entries, str):
        return re.fullmatch(entries, path) is not None
    return any(path.endswith(entry) for entry in entries)


class IA3Layer(AdapterLayer):
    adapter_containers = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__(base_layer, kind)
        self.ia3_l = nn.ParameterDict()

    def create_adapter(self, name: str, site: Site, init: bool) -> None:
        vector = torch.randn(site.tensors["ia3_l"], device=self.base_layer.weight.device)
        if init and site.options["init"]:
            vector.fill_(1.0)
        self.ia3_l[name] = nn.Parameter(vector)

    def _feedforward(self, name: str) -> bool:
        return self.site_options[name]["feedforward"]

    def _activation_factor(self, name: str) -> torch.Tensor:
        """The vector shaped to broadcast over activations (features last, or channels second)."""
        vector = self.ia3_l[name]
        return vector.flatten() if self.kind in ("linear", "conv1d_hf") else vector

    def adapter_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if not self._feedforward(name):
            return x
        factor = self._activation_factor(name)
        return (x.to(factor.dtype) * factor).to(x.dtype)

    def adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if self._feedforward(name):
            return result
        return (result * self._activation_factor(name)).to(result.dtype)

    def _weight_factor(self, name: str) -> torch.Tensor:
        """The vector shaped to broadcast over the stored weight: (out, in), (in, out) for Conv1D,
        (out, in / groups, *kernel) for convolutions."""
        vector = self.ia3_l[name].float()
        if self.kind == "conv1d_hf":
            return vector.T
        if self.kind == "linear":
            return vector
        if not self._feedforward(name):
            return vector.transpose(0, 1)  # (out, 1, 1, ...): one factor per output channel
        base = self.base_layer
        if base.groups == 1:
            return vector
        per_group = base.in_channels // base.groups
        grouped = vector.reshape(base.groups, 1, per_group, *vector.shape[2:])
        grouped = grouped.expand(base.groups, base.out_channels // base.groups, per_group, *vector.shape[2:])
        return grouped.reshape(base.out_channels, per_group, *vector.shape[2:])

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight * self._weight_factor(name)

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight / _safe_divisor(self._weight_factor(name))

    def merge_targets(self, names: Sequence[str]) -> tuple[str, ...]:
        scales_bias = getattr(self.base_layer, "bias", None) is not None and not all(
            self._feedforward(n) for n in names
        )
        return ("weight", "bias") if scales_bias else ("weight",)

    @torch.no_grad()
    def merge_one(self, name: str) -> None:
        super().merge_one(name)
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None and not self._feedforward(name):
            bias.data = (bias.data.float() * self.ia3_l[name].float().flatten()).to(bias.dtype)

    @torch.no_grad()
    def unmerge_one(self, name: str) -> None:
        super().unmerge_one(name)
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None and not self._feedforward(name):
            bias.data = (bias.data.float() / _safe_divisor(self.ia3_l[name].float().flatten())).to(bias.dtype)


def _safe_divisor(vector: torch.Tensor) -> torch.Tensor:
    """Divide exactly, except by zero: a zero entry erased what it scaled (peft adds 1e-8 everywhere)."""
    if bool((vector == 0).any()):
        warnings.warn("Unmerge result can be inaccurate for (IA)^3: a scaling vector has zero entries.", stacklevel=3)
        return torch.where(vector == 0, torch.full_like(vector, 1e-8), vector)
    return vector


@register
class IA3(InjectableMethod):
    name = "ia3"
    peft_type = "IA3"
    schema = IA3Spec
    layer_class = IA3Layer
    supported_kinds = frozenset({"linear", "conv1d_hf", "conv2d", "conv3d"})
    default_targets = IA3_TARGETS
    tensor_prefix = "ia3_"
    wraps_quantized = True  # base(x * l) or base(x) * l; merges scale the weight via merged_weight

    def check_run(self, spec: IA3Spec, run: RunSpec, graph: ModelGraph) -> None:
        if feedforward_entries(spec, graph.model_type) is None:
            raise PlanError(
                "peft.feedforward_modules",
                None,
                f"ia3 has no default feed-forward modules for model_type '{graph.model_type}'",
                "set peft.feedforward_modules=[...] (the targets whose input is scaled; [] for none)",
            )

    def plan_site(self, spec: IA3Spec, module: ModuleInfo, graph: ModelGraph) -> Site:
        feedforward = is_feedforward(module.path, feedforward_entries(spec, graph.model_type))
        if module.kind in ("linear", "conv1d_hf"):
            shape = (1, module.in_features) if feedforward else (module.out_features, 1)
        else:
            channels = module.in_features if feedforward else module.out_features
            shape = (1, channels) + (1,) * len(module.get("kernel_size"))
        options = {"feedforward": feedforward, "init": spec.init_ia3_weights}
        return Site.for_module(module, {"ia3_l": shape}, options)

    def peft_config(self, spec: IA3Spec, plan: Plan) -> dict[str, Any]:
        fields = target_fields(spec, plan, IA3_TARGETS)
        return {
            **fields,
            "feedforward_modules": _feedforward_field(spec, plan, fields["target_modules"]),
            "fan_in_fan_out": any(s.kind == "conv1d_hf" for s in plan.sites),
            "init_ia3_weights": spec.init_ia3_weights,
        }

    def spec_from_peft_config(self, config: Mapping[str, Any]) -> IA3Spec:
        return IA3Spec(
            **target_kwargs(config, layered=False),
            feedforward_modules=config.get("feedforward_modules"),
            init_ia3_weights=flag(config, "init_ia3_weights", True),
        )


def _feedforward_field(spec: IA3Spec, plan: Plan, targets: Any) -> Any:
    """feedforward_modules as written: peft refuses a list that is not a subset of a list of
    targets, which a model-type default can be (targets [q_proj], default [down_proj]); then the
    feed-forward sites are written as an exact regex instead."""
    entries = jsonable(feedforward_entries(spec, plan.model.model_type))
    if spec.feedforward_modules is not None or not isinstance(targets, list) or set(entries) <= set(targets):
        return entries
    paths = [site.path for site in plan.sites if site.options["feedforward"]]
    return "|".join(re.escape(path) for path in paths) if paths else []
