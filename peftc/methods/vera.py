"""VeRA (vector-based random matrix adaptation): y = W x + b + lambda_b * (B (lambda_d * (A x))).

A (r x max_in) and B (max_out x r) are frozen random projections shared by every adapted layer
(model-level shared tensors, Plan.shared), sized by the largest targeted in/out features; each
layer uses the slices A[:, :in] and B[:out, :]. Only the vectors train: `vera_lambda_d` (r) and
`vera_lambda_b` (out), starting at d_initial and zero (a no-op), or random d and ones with
init_weights=false.

As peft's VeraModel (0.21.2 and 0.22.0): A then B are drawn by one CPU generator seeded with
projection_prng_key, each kaiming-uniform (bound sqrt(6 / fan_in)); save_projection=true writes
them once, as `base_model.vera_A` / `base_model.vera_B`, and false leaves them out (loading draws
them again from the key). Linear and GPT-2's Conv1D (peft sets fan_in_fan_out from the layer
itself). Merging adds (lambda_b B)(lambda_d A) to W, transposed for Conv1D.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftc.config.spec import RunSpec, at_least, in_range, param
from peftc.errors import ConfigError
from peftc.methods import register
from peftc.methods.base import InjectableMethod
from peftc.methods.common import (
    LayeredTargetsSpec,
    bias_param,
    flag,
    integer,
    real,
    target_fields,
    target_kwargs,
    trained_biases,
)
from peftc.methods.defaults import LORA_TARGETS
from peftc.methods.layer import AdapterLayer
from peftc.planning.graph import ModelGraph, ModuleInfo
from peftc.planning.plan import Plan, SharedTensor, Site

# peft's VeRA table is LoRA's but for phi, whose fc1/fc2 it leaves out.
VERA_TARGETS: dict[str, tuple[str, ...]] = {**LORA_TARGETS, "phi": ("q_proj", "v_proj")}


@dataclass
class VeraSpec(LayeredTargetsSpec):
    r: int = param(256, "Rank of the shared random projections A (r x in) and B (out x r).", at_least(1))
    projection_prng_key: int = param(0, "Seed of the generator that draws A and B (same for every adapter).")
    save_projection: bool = param(
        True, "true: A and B are saved with the adapter; false: they are drawn again from the key when loading."
    )
    vera_dropout: float = param(0.0, "Dropout on the adapter's input.", in_range(0.0, 1.0))
    d_initial: float = param(0.1, "Initial value of every lambda_d entry (with init_weights=true).")
    bias: str = bias_param("vera")
    init_weights: bool = param(
        True, "true: lambda_b = 0, lambda_d = d_initial (a no-op); false: lambda_b = 1, lambda_d random (not a no-op)."
    )

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        if self.exclude_modules is not None:  # VeraConfig (0.21, 0.22) has no such field: peft would adapt them
            raise ConfigError(
                f"{key}.exclude_modules",
                self.exclude_modules,
                "is not a VeRA option in peft",
                f"list the modules to adapt in {key}.target_modules instead",
            )
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise ConfigError(f"{key}.projection_prng_key", self.projection_prng_key, "must be an integer", "e.g. 0")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """peft's _kaiming_init: uniform in +-sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraLayer(AdapterLayer):
    # vera_dropout holds no tensors; listed so that deleting an adapter drops its dropout too.
    adapter_containers = ("vera_lambda_b", "vera_lambda_d", "vera_dropout")

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__(base_layer, kind)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()

    def create_adapter(self, name: str, site: Site, init: bool) -> None:
        options = site.options
        device = self.base_layer.weight.device
        lambda_b = torch.ones(site.tensors["vera_lambda_b"], device=device)
        lambda_d = torch.randn(site.tensors["vera_lambda_d"], device=device)  # peft's draw, in its order
        if init and options["init"]:
            lambda_b.zero_()
            lambda_d.fill_(options["d_initial"])
        self.vera_lambda_b[name] = nn.Parameter(lambda_b)
        self.vera_lambda_d[name] = nn.Parameter(lambda_d)
        self.vera_dropout[name] = nn.Dropout(site.dropout) if site.dropout > 0 else nn.Identity()

    def projections(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices of the shared A (r x in) and B (out x r)."""
        features_in, features_out = self.site_options[name]["features"]
        projection_a = self.shared_tensor(name, "vera_A")[:, :features_in]
        projection_b = self.shared_tensor(name, "vera_B")[:features_out, :]
        return projection_a.to(device), projection_b.to(device)

    def adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        projection_a, projection_b = self.projections(name, x.device)
        inputs = self.vera_dropout[name](x.to(lambda_d.dtype))
        update = lambda_b * F.linear(lambda_d * F.linear(inputs, projection_a), projection_b)
        return (result + update).to(result.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        lambda_b = self.vera_lambda_b[name].float().unsqueeze(-1)
        lambda_d = self.vera_lambda_d[name].float().unsqueeze(-1)
        projection_a, projection_b = self.projections(name, lambda_b.device)
        delta = (lambda_b * projection_b.float()) @ (lambda_d * projection_a.float())
        return delta.T if self.kind == "conv1d_hf" else delta


@register
class Vera(InjectableMethod):
    name = "vera"
    peft_type = "VERA"
    schema = VeraSpec
    layer_class = VeraLayer
    supported_kinds = frozenset({"linear", "conv1d_hf"})
    default_targets = VERA_TARGETS
    tensor_prefix = "vera_"  # vera_lambda_*, and peft's per-layer references to vera_A/vera_B

    def plan_site(self, spec: VeraSpec, module: ModuleInfo, graph: ModelGraph) -> Site:
        tensors = {"vera_lambda_b": (module.out_features,), "vera_lambda_d": (spec.r,)}
        options = {
            "init": spec.init_weights,
            "d_initial": spec.d_initial,
            "features": (module.in_features, module.out_features),  # its slice of A and B
        }
        return Site.for_module(module, tensors, options, dropout=spec.vera_dropout)

    def plan_shared(self, spec: VeraSpec, graph: ModelGraph, sites: Sequence[Site]) -> tuple[SharedTensor, ...]:
        largest_in = max(site.in_features for site in sites)
        largest_out = max(site.out_features for site in sites)
        # named by the spec fields that set them: adapters beside each other must agree (peft's rule)
        options = {"projection_prng_key": spec.projection_prng_key, "save_projection": spec.save_projection}
        return (
            SharedTensor("vera_A", (spec.r, largest_in), spec.save_projection, options),
            SharedTensor("vera_B", (largest_out, spec.r), spec.save_projection, options),
        )

    def create_shared(self, spec: VeraSpec, shared: Sequence[SharedTensor]) -> dict[str, torch.Tensor]:
        generator = torch.Generator(device="cpu").manual_seed(shared[0].options["projection_prng_key"])
        return {tensor.name: kaiming_uniform(tensor.shape, generator) for tensor in shared}  # A, then B

    def plan_unfrozen(self, spec: VeraSpec, graph: ModelGraph, sites: Sequence[Site]) -> dict[str, tuple[int, ...]]:
        return trained_biases(spec.bias, graph, sites)

    def peft_config(self, spec: VeraSpec, plan: Plan) -> dict[str, Any]:
        fields = target_fields(spec, plan, VERA_TARGETS)
        del fields["exclude_modules"]  # not a VeraConfig field
        return {
            **fields,
            "r": spec.r,
            "projection_prng_key": spec.projection_prng_key,
            "save_projection": spec.save_projection,
            "vera_dropout": spec.vera_dropout,
            "d_initial": spec.d_initial,
            "fan_in_fan_out": any(site.kind == "conv1d_hf" for site in plan.sites),
            "bias": spec.bias,
            "init_weights": spec.init_weights,
        }

    def spec_from_peft_config(self, config: Mapping[str, Any]) -> VeraSpec:
        kwargs = target_kwargs(config)
        kwargs["exclude_modules"] = None
        return VeraSpec(
            **kwargs,
            r=integer(config, "r", 256),
            projection_prng_key=integer(config, "projection_prng_key", 0),
            save_projection=flag(config, "save_projection", True),
            vera_dropout=real(config, "vera_dropout", 0.0),
            d_initial=real(config, "d_initial", 0.1),
            bias=config.get("bias") or "none",
            init_weights=flag(config, "init_weights", True),
        )
