"""LoRA: y = W x + s * B A dropout(x), with s = lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA).

A (r x in) and B (out x r) are the only trainable tensors per site; B starts at zero, so the
untrained adapter is an exact no-op. Merging adds s * B A to W (transposed for GPT-2's Conv1D,
which stores W as (in, out)); for embeddings the update is (B A)^T applied as a lookup.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftc.errors import ConfigError
from peftc.graph import ModelGraph, ModuleInfo
from peftc.methods import register
from peftc.methods.base import AdapterLayer, Method, saves_embedding_weight
from peftc.methods.defaults import LORA_TARGETS
from peftc.plan import Plan, Site
from peftc.spec import (
    RunSpec,
    SpecNode,
    as_list,
    at_least,
    greater_than,
    in_range,
    mapping_of,
    param,
)

INIT_CHOICES = (True, False, "gaussian")


@dataclass
class LoraSpec(SpecNode):
    r: int = param(8, "Rank of the update B A.", at_least(1))
    lora_alpha: float = param(8, "Scale numerator: the update is multiplied by lora_alpha / r.", greater_than(0))
    lora_dropout: float = param(0.0, "Dropout on the adapter's input.", in_range(0.0, 1.0))
    target_modules: Any = param(
        None,
        "Modules to adapt: a list of names or dotted suffixes, a full-match regex string, 'all-linear', or null for the model type's default.",
    )
    exclude_modules: Any = param(None, "Modules never adapted: list of names/suffixes or a regex string.")
    layers_to_transform: Any = param(None, "Only adapt these layer indices (int or list).")
    layers_pattern: Any = param(
        None,
        "Name of the ModuleList holding the layers (e.g. 'layers', 'h'), used with layers_to_transform.",
    )
    use_rslora: bool = param(False, "Rank-stabilised scaling lora_alpha / sqrt(r).")
    init_lora_weights: Any = param(
        True,
        "true: A Kaiming-uniform, B zero (no-op); 'gaussian': A ~ N(0, 1/r), B zero; false: both random (not a no-op).",
    )
    rank_pattern: Any = param(
        None,
        "Per-module rank overrides {regex matched at the end of the module path: rank}, e.g. {q_proj: 16}.",
        mapping_of(int, "ranks"),
    )
    alpha_pattern: Any = param(
        None, "Per-module lora_alpha overrides {regex: alpha}.", mapping_of((int, float), "alphas")
    )
    modules_to_save: Any = param(None, "Extra modules trained in full and saved whole (e.g. a new head).")

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        if self.init_lora_weights not in INIT_CHOICES:
            raise ConfigError(
                f"{key}.init_lora_weights",
                self.init_lora_weights,
                "is not a supported initialisation",
                "use true, false or 'gaussian'",
            )
        for pattern, rank in (self.rank_pattern or {}).items():
            if not isinstance(rank, int) or rank < 1:
                raise ConfigError(f"{key}.rank_pattern.{pattern}", rank, "must be >= 1")
        for pattern, alpha in (self.alpha_pattern or {}).items():
            if not isinstance(alpha, (int, float)) or alpha <= 0:
                raise ConfigError(f"{key}.alpha_pattern.{pattern}", alpha, "alphas must be > 0")
        for name, patterns in (
            ("rank_pattern", self.rank_pattern or {}),
            ("alpha_pattern", self.alpha_pattern or {}),
        ):
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"{key}.{name}", pattern, f"is not a valid regex ({exc})") from exc


def pattern_value(path: str, patterns: Mapping[str, Any], default: Any) -> Any:
    """peft's rule: the first pattern p with re.match(rf'(.*\\.)?({p})$', path) wins."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


class LoraLayer(AdapterLayer):
    adapter_containers = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__(base_layer, kind)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def create_adapter(self, name: str, site: Site, init: bool) -> None:
        opts = site.options
        r = opts["r"]
        device = self.base_layer.weight.device
        self.scaling[name] = opts["scaling"]
        self.lora_dropout[name] = nn.Dropout(opts["dropout"]) if opts["dropout"] > 0 else nn.Identity()
        if self.kind == "embedding":
            a = nn.Parameter(torch.randn(r, site.in_features, device=device))
            b = nn.Parameter(torch.randn(site.out_features, r, device=device))
            if init and opts["init"] is not False:
                nn.init.zeros_(a)
                nn.init.normal_(b)
            self.lora_embedding_A[name], self.lora_embedding_B[name] = a, b
            return
        a = nn.Linear(site.in_features, r, bias=False, device=device)
        b = nn.Linear(r, site.out_features, bias=False, device=device)
        if init and opts["init"] is not False:
            if opts["init"] == "gaussian":
                nn.init.normal_(a.weight, std=1 / r)
            else:
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.scaling.pop(name, None)
        if name in self.lora_dropout:
            del self.lora_dropout[name]

    def adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        scaling = self.scaling[name]
        if self.kind == "embedding":
            base = self.base_layer
            after_a = F.embedding(
                x,
                self.lora_embedding_A[name].T,
                base.padding_idx,
                base.max_norm,
                base.norm_type,
                base.scale_grad_by_freq,
                base.sparse,
            )
            return result + (after_a @ self.lora_embedding_B[name].T * scaling).to(result.dtype)
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(lora_a.weight.dtype))
        return result + (lora_b(lora_a(x)) * scaling).to(result.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        scaling = self.scaling[name]
        if self.kind == "embedding":
            return (self.lora_embedding_B[name].float() @ self.lora_embedding_A[name].float()).T * scaling
        delta = self.lora_B[name].weight.float() @ self.lora_A[name].weight.float() * scaling
        return delta.T if self.kind == "conv1d_hf" else delta


@register
class Lora(Method):
    name = "lora"
    peft_type = "LORA"
    schema = LoraSpec
    layer_class = LoraLayer
    supported_kinds = frozenset({"linear", "conv1d_hf", "embedding"})
    default_targets = LORA_TARGETS
    tensor_prefix = "lora_"

    def plan_site(self, spec: LoraSpec, module: ModuleInfo, graph: ModelGraph) -> Site:
        r = pattern_value(module.path, spec.rank_pattern or {}, spec.r)
        alpha = pattern_value(module.path, spec.alpha_pattern or {}, spec.lora_alpha)
        scaling = alpha / math.sqrt(r) if spec.use_rslora else alpha / r
        in_f, out_f = module.in_features, module.out_features
        if module.kind == "embedding":
            tensors = {"lora_embedding_A": (r, in_f), "lora_embedding_B": (out_f, r)}
        else:
            tensors = {"lora_A.weight": (r, in_f), "lora_B.weight": (out_f, r)}
        options = {
            "r": r,
            "alpha": alpha,
            "scaling": scaling,
            "dropout": spec.lora_dropout,
            "init": spec.init_lora_weights,
        }
        if saves_embedding_weight(spec.target_modules, module, graph):
            options["save_base_weight"] = True
        return Site(module.path, module.kind, module.class_name, in_f, out_f, tensors, options)

    def peft_config(self, spec: LoraSpec, plan: Plan) -> dict[str, Any]:
        rank_pattern = {p: v for p, v in (spec.rank_pattern or {}).items()}
        alpha_pattern = {p: _number(v) for p, v in (spec.alpha_pattern or {}).items()}
        return {
            "r": spec.r,
            "lora_alpha": _number(spec.lora_alpha),
            "lora_dropout": spec.lora_dropout,
            "target_modules": _jsonable_targets(spec.target_modules, plan),
            "exclude_modules": _jsonable_targets(spec.exclude_modules, None),
            "layers_to_transform": spec.layers_to_transform
            if not isinstance(spec.layers_to_transform, tuple)
            else list(spec.layers_to_transform),
            "layers_pattern": spec.layers_pattern
            if not isinstance(spec.layers_pattern, tuple)
            else list(spec.layers_pattern),
            "use_rslora": spec.use_rslora,
            "init_lora_weights": spec.init_lora_weights,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "fan_in_fan_out": any(s.kind == "conv1d_hf" for s in plan.sites),
            "bias": "none",
            "lora_bias": False,
            "use_dora": False,
            "modules_to_save": as_list(spec.modules_to_save),
        }

    def spec_from_peft_config(self, config: Mapping[str, Any]) -> LoraSpec:
        unsupported = {k: config.get(k) for k in ("use_dora", "lora_bias") if config.get(k)}
        if config.get("bias", "none") != "none":
            unsupported["bias"] = config["bias"]
        if unsupported:
            from peftc.errors import AdapterFileError

            raise AdapterFileError("adapter_config.json", f"LoRA options not supported yet: {unsupported}")
        init = config.get("init_lora_weights", True)
        return LoraSpec(
            r=int(config.get("r", 8)),
            lora_alpha=config.get("lora_alpha", 8),
            lora_dropout=float(config.get("lora_dropout", 0.0) or 0.0),
            target_modules=config.get("target_modules"),
            exclude_modules=config.get("exclude_modules"),
            layers_to_transform=config.get("layers_to_transform"),
            layers_pattern=config.get("layers_pattern"),
            use_rslora=bool(config.get("use_rslora", False)),
            init_lora_weights=init if init in INIT_CHOICES else True,
            rank_pattern=dict(config.get("rank_pattern") or {}),
            alpha_pattern=dict(config.get("alpha_pattern") or {}),
            modules_to_save=config.get("modules_to_save"),
        )


def _number(value: float) -> float | int:
    """peft writes integral alphas as ints; keep the file byte-compatible."""
    return int(value) if float(value).is_integer() else value


def _jsonable_targets(targets: Any, plan: Plan | None) -> Any:
    """peft writes target_modules as a list (or a regex string); null becomes the resolved names."""
    if targets is None and plan is not None:
        return sorted({s.path.rsplit(".", 1)[-1] for s in plan.sites})
    if isinstance(targets, (list, tuple)):
        return list(targets)
    return targets
