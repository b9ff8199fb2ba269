"""HRA (Householder reflection adaptation): y = (W H) x + b with H a chain of r reflections,
H = (I - 2 u_1 u_1^T) (I - 2 u_2 u_2^T) ... (I - 2 u_r u_r^T), u_i the normalized columns of the
trainable `hra_u` (in_features x r; for Conv2d, in_channels * k * k over the flattened kernel).
With `apply_GS` the columns are Gram-Schmidt orthonormalized first (Q) and H = I - 2 Q Q^T.

As peft's HRALinear/HRAConv2d (0.21.2 and 0.22.0): the default init draws r/2 columns and repeats each once,
so the reflections cancel in pairs (H = I up to float32 rounding); an odd r cannot pair them, and
peft then warns and starts from a random H, which peftc refuses instead. Several active adapters
multiply their H in order.

A single adapter on a Linear never forms H: in the compact form H = I - U T U^T (U the unit
vectors, T an r x r triangle), x (W H)^T = x W^T - (x U) T^T (W U)^T is LoRA's update with A = U^T
and B = -(W U) T, run by LoRA's fused node. peft 0.21 formed H, then W H (an out x in x in
product), and backward the gradient of W H, a product the size of the base layer's own; peft 0.22
applies the compact H to the input.
Merging sets W <- W H; unmerging multiplies by the reflections in
reverse order (H^T = H^-1; the Gram-Schmidt H is its own inverse). Convolutions run with the base
layer's own settings (any kernel, stride, padding, padding_mode and dilation), which is what
peft 0.22's reflected, unfolded patches compute; grouped ones are refused at plan time (peft raises).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftc.config.spec import RunSpec, at_least, param
from peftc.errors import ConfigError, PlanError
from peftc.methods import register
from peftc.methods.base import InjectableMethod
from peftc.methods.common import (
    LayeredTargetsSpec,
    bias_param,
    flag,
    integer,
    target_fields,
    target_kwargs,
    trained_biases,
)
from peftc.methods.defaults import LORA_TARGETS
from peftc.methods.layer import AdapterLayer
from peftc.methods.lora.lowrank import autocast_dtype, autocast_off, fused_linear, plain_linear
from peftc.planning.graph import ModelGraph, ModuleInfo
from peftc.planning.plan import Plan, Site


@dataclass
class HRASpec(LayeredTargetsSpec):
    r: int = param(8, "Number of Householder reflections per layer (even, for the default init).", at_least(1))
    apply_GS: bool = param(False, "Gram-Schmidt orthonormalize the reflection vectors first: H = I - 2 Q Q^T.")
    init_weights: bool = param(
        True, "true: reflections in equal pairs, H = I (a no-op up to rounding); false: random (not a no-op)."
    )
    bias: str = bias_param("hra")

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        if self.init_weights and self.r % 2:
            raise ConfigError(
                f"{key}.r",
                self.r,
                "must be even with init_weights=true: the default init pairs reflections so that they cancel",
                f"use {key}.r={self.r + 1}, or {key}.init_weights=false for a random start (not a no-op)",
            )


def reflected_size(spec: HRASpec, module: ModuleInfo) -> int:
    """The length of each reflection vector: in_features, or in_channels * k[0] * k[1] for Conv2d."""
    if module.kind == "linear":
        size = module.in_features
    else:
        check_ungrouped_conv(module)
        size = module.in_features * math.prod(module.get("kernel_size"))
    if spec.apply_GS and spec.r > size:
        raise PlanError(
            "peft.r",
            spec.r,
            f"exceeds {size}, the reflected size of {module.path}: Gram-Schmidt runs out of directions (NaN)",
            f"use peft.r <= {size}, or peft.apply_GS=false",
        )
    return size


def check_ungrouped_conv(module: ModuleInfo) -> None:
    """Refuse a grouped Conv2d, as peft's HRAConv2d does: H spans in_channels * kernel inputs, a
    grouped weight only in_channels / groups of them."""
    if module.get("groups") != 1:
        raise PlanError(
            "peft.target_modules",
            module.leaf_name,
            f"matches {module.path}, a grouped Conv2d (groups={module.get('groups')}), which HRA cannot adapt (peft raises)",
            f"exclude it: peft.exclude_modules=[{module.leaf_name}]",
        )


# ---------------------------------------------------------------------------- the reflections
def chained_reflections(vectors: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """(I - 2 u_1 u_1^T) ... (I - 2 u_r u_r^T) over the normalized columns (reverse: H^T)."""
    units = vectors / vectors.norm(dim=0)
    product = torch.eye(vectors.shape[0], device=vectors.device, dtype=vectors.dtype)
    order = range(units.shape[1] - 1, -1, -1) if reverse else range(units.shape[1])
    for i in order:
        unit = units[:, i].view(-1, 1)
        product = product - 2 * product @ unit @ unit.t()  # peft's order of operations, for its rounding
    return product


def gram_schmidt_basis(vectors: torch.Tensor) -> torch.Tensor:
    """Q: the Gram-Schmidt orthonormalization of the columns (peft's order of operations)."""
    basis = [(vectors[:, 0] / vectors[:, 0].norm()).view(-1, 1)]
    for i in range(1, vectors.shape[1]):
        column = vectors[:, i].view(-1, 1)
        for unit in basis:
            column = column - (unit.t() @ column) * unit
        basis.append((column / column.norm()).view(-1, 1))
    return torch.cat(basis, dim=1)


def gram_schmidt_reflection(vectors: torch.Tensor) -> torch.Tensor:
    """I - 2 Q Q^T, Q the Gram-Schmidt orthonormalization of the columns (its own inverse)."""
    q = gram_schmidt_basis(vectors)
    return torch.eye(vectors.shape[0], device=vectors.device, dtype=vectors.dtype) - 2 * q @ q.t()


def compact_reflections(vectors: torch.Tensor, gram_schmidt: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, T) with H = I - U T U^T (the compact WY form of a product of reflections), U the
    unit vectors (in x r), T upper triangular (r x r). For the chain (I - 2 u_1 u_1^T) ...
    (I - 2 u_r u_r^T), T^-1 = I / 2 + the strict upper triangle of U^T U (induction on r: adding
    a reflection appends the column U^T u_new above a new diagonal 1/2); for Gram-Schmidt
    vectors, T = 2 I."""
    if gram_schmidt:
        return gram_schmidt_basis(vectors), 2 * torch.eye(vectors.shape[1], device=vectors.device, dtype=vectors.dtype)
    units = vectors / vectors.norm(dim=0)
    # The r x r algebra in float32 whatever the adapter's dtype and autocast say: it costs nothing,
    # and CPUs have no 16-bit triangular solve.
    with autocast_off(vectors.device):
        wide = units.float()
        eye = torch.eye(vectors.shape[1], device=vectors.device)
        inverse = torch.triu(wide.t() @ wide, diagonal=1) + eye / 2
        triangle = torch.linalg.solve_triangular(inverse, eye, upper=True)
    return units, triangle.to(vectors.dtype)


class HRALayer(AdapterLayer):
    adapter_containers = ("hra_u",)

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__(base_layer, kind)
        self.hra_u = nn.ParameterDict()

    def create_adapter(self, name: str, site: Site, init: bool) -> None:
        size, rank = site.tensors["hra_u"]
        device = self.base_layer.weight.device
        # An odd r (only from a loaded file: compiling refuses it) starts random, as in peft.
        if init and site.options["init"] and rank % 2 == 0:
            half = torch.empty(size, rank // 2, device=device)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            vectors = torch.repeat_interleave(half, 2, dim=1)  # equal neighbours: each pair cancels
        else:
            vectors = torch.empty(size, rank, device=device)
            nn.init.kaiming_uniform_(vectors, a=math.sqrt(5))
        self.hra_u[name] = nn.Parameter(vectors)

    def reflection(self, name: str, reverse: bool = False) -> torch.Tensor:
        vectors = self.hra_u[name]
        if self.site_options[name]["apply_GS"]:
            return gram_schmidt_reflection(vectors)
        return chained_reflections(vectors, reverse)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled or self.merged_adapters or not self.active_adapters:
            return super().forward(x, *args, **kwargs)
        if self.kind == "linear" and len(self.active_adapters) == 1 and plain_linear(self.base_layer):
            result = self._low_rank_forward(x, self.active_adapters[0])
            if result is not None:
                return result
        rotation = self.reflection(self.active_adapters[0])
        for name in self.active_adapters[1:]:
            rotation = rotation @ self.reflection(name)
        weight = self._rotated(self.base_layer.weight.to(rotation.dtype), rotation)
        bias = self.base_layer.bias
        bias = bias.to(rotation.dtype) if bias is not None else None
        inputs = x.to(rotation.dtype)
        if self.kind == "linear":
            return F.linear(inputs, weight, bias).to(x.dtype)
        return self.base_layer._conv_forward(inputs, weight, bias).to(x.dtype)

    def _low_rank_forward(self, x: torch.Tensor, name: str) -> torch.Tensor | None:
        """x (W H)^T + b without forming H or W H: with H = I - U T U^T, x H^T W^T = x W^T - (x U)
        T^T (W U)^T, LoRA's x W^T + (x A^T) B^T with A = U^T and B = -(W U) T, run by LoRA's
        fused node. Per step that is r-column products instead of forming H (r passes over an
        in x in matrix), W H (an out x in x in product) and the gradient of W H (a product the
        size of the base layer's own), and x and two N x r products kept for backward instead
        of W H. None where the node would not take these dtypes (the formed path casts as peft)."""
        vectors, weight = self.hra_u[name], self.base_layer.weight
        if autocast_dtype(x.device) is None and not x.dtype == weight.dtype == vectors.dtype:
            return None
        units, triangle = compact_reflections(vectors, self.site_options[name]["apply_GS"])
        lora_b = -(weight @ units) @ triangle
        return fused_linear(x, self.base_layer, (1.0,), (units.t(), lora_b))

    def _rotated(self, weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """W H over W's input dimension (a convolution's flattened in_channels x kernel)."""
        return (weight.reshape(weight.shape[0], -1) @ rotation).view(weight.shape)

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self._rotated(weight, self.reflection(name))

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self._rotated(weight, self.reflection(name, reverse=True))


@register
class HRA(InjectableMethod):
    name = "hra"
    peft_type = "HRA"
    schema = HRASpec
    layer_class = HRALayer
    supported_kinds = frozenset({"linear", "conv2d"})
    default_targets = LORA_TARGETS  # peft copies LoRA's table for HRA
    tensor_prefix = "hra_"

    def plan_site(self, spec: HRASpec, module: ModuleInfo, graph: ModelGraph) -> Site:
        tensors = {"hra_u": (reflected_size(spec, module), spec.r)}
        options = {"apply_GS": spec.apply_GS, "init": spec.init_weights}
        return Site.for_module(module, tensors, options)

    def plan_unfrozen(self, spec: HRASpec, graph: ModelGraph, sites: Sequence[Site]) -> dict[str, tuple[int, ...]]:
        return trained_biases(spec.bias, graph, sites)

    def peft_config(self, spec: HRASpec, plan: Plan) -> dict[str, Any]:
        return {
            **target_fields(spec, plan, LORA_TARGETS),
            "r": spec.r,
            "apply_GS": spec.apply_GS,
            "init_weights": spec.init_weights,
            "bias": spec.bias,
        }

    def spec_from_peft_config(self, config: Mapping[str, Any]) -> HRASpec:
        return HRASpec(
            **target_kwargs(config),
            r=integer(config, "r", 8),
            apply_GS=flag(config, "apply_GS", False),
            init_weights=flag(config, "init_weights", True),
            bias=config.get("bias") or "none",
        )
