"""LoHa (LyCORIS): y = W x + dW x, dW = (alpha / r) * (W1a W1b) ⊙ (W2a W2b).

The Hadamard product of two rank-r products reaches rank r^2 with 2 r (in + out) parameters.
For a convolution the products span (in / groups) * kernel columns; with use_effective_conv2d
each becomes the CP form T_i ×1 W_ia ×2 W_ib (core T_i: r x r x kernel). Default init: W1a,
W1b, W2a (and the cores) Kaiming-uniform and W2b zero, an exact no-op; init_weights=false makes
all random. See `lycoris.py` for dropout, convolutions and merging.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from peftc.config.spec import param
from peftc.methods import register
from peftc.methods.common import flag
from peftc.methods.lycoris.shared import (
    LycorisLayer,
    LycorisMethod,
    LycorisSpec,
    conv_geometry,
    core_shape,
    kernel_size,
)
from peftc.planning.graph import ModuleInfo


@dataclass
class LoHaSpec(LycorisSpec):
    init_weights: bool = param(True, "true: W2b starts at zero (no-op); false: all factors random (not a no-op).")


class LoHaLayer(LycorisLayer):
    adapter_containers = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def zero_initialised(self, suffix: str, init: Any) -> bool:
        return init is True and suffix == "hada_w2_b"

    def _factor(self, name: str, index: int) -> torch.Tensor:
        a, b = getattr(self, f"hada_w{index}_a")[name], getattr(self, f"hada_w{index}_b")[name]
        core = getattr(self, f"hada_t{index}")
        if name in core:  # CP form: out x in_g x kernel
            return torch.einsum("i j k l, j r, i p -> p r k l", core[name], b, a)
        return a @ b

    def factored_output(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        if name in self.hada_t1:
            return None
        a1, b1, a2, b2 = (getattr(self, f"hada_w{i}_{side}")[name] for i in (1, 2) for side in ("a", "b"))
        if not hadamard_is_cheaper_factored(a1.shape[1] * a2.shape[1], b1.shape[1], a1.shape[0]):
            return None
        return hadamard_linear(x.to(a1.dtype), a1, b1, a2, b2)

    def product(self, name: str) -> torch.Tensor:
        if name in self.hada_t1:
            return self._factor(name, 1) * self._factor(name, 2)
        factors = [getattr(self, f"hada_w{i}_{side}")[name] for i in (1, 2) for side in ("a", "b")]
        return HadamardOfProducts.apply(*factors)


def hadamard_is_cheaper_factored(rank_product: int, in_features: int, out_features: int) -> bool:
    """Whether `hadamard_linear` beats forming dW: per token it does r1 r2 (in + out)
    multiply-adds against in * out (and forming dW costs 2 r in out more per step)."""
    return rank_product * (in_features + out_features) < in_features * out_features


def hadamard_linear(
    x: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """x ((A1 B1) ⊙ (A2 B2))^T without the out x in product. Entry (o, i) of the Hadamard
    product is sum_{k,l} A1[o,k] A2[o,l] B1[k,i] B2[l,i]: a rank-(r1 r2) product of the
    row-wise Kronecker products of the A's (out x r1 r2) and of the B's columns (r1 r2 x in)."""
    rank_product = a1.shape[1] * a2.shape[1]
    inputs = (b1[:, None, :] * b2[None, :, :]).reshape(rank_product, -1)
    outputs = (a1[:, :, None] * a2[:, None, :]).reshape(-1, rank_product)
    return (x @ inputs.T) @ outputs.T


class HadamardOfProducts(torch.autograd.Function):
    """(A1 B1) ⊙ (A2 B2) that keeps only the four factors for backward and recomputes the two
    out x in products there: autograd would keep both products, two weight-sized tensors per
    adapted layer for the whole step."""

    @staticmethod
    def forward(ctx, a1, b1, a2, b2):  # noqa: ANN001, ANN205 - autograd signature
        ctx.save_for_backward(a1, b1, a2, b2)
        return (a1 @ b1) * (a2 @ b2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        a1, b1, a2, b2 = ctx.saved_tensors
        grad_first = grad * (a2 @ b2)
        grad_a1, grad_b1 = grad_first @ b1.T, a1.T @ grad_first
        del grad_first
        grad_second = grad * (a1 @ b1)
        return grad_a1, grad_b1, grad_second @ b2.T, a2.T @ grad_second


@register
class LoHa(LycorisMethod):
    name = "loha"
    peft_type = "LOHA"
    schema = LoHaSpec
    layer_class = LoHaLayer
    tensor_prefix = "hada_"
    rank_dropout_scale = True  # peft's LoHa always rescales the kept rows

    def site_tensors(self, spec: LoHaSpec, module: ModuleInfo, r: int) -> tuple[dict[str, tuple[int, ...]], dict]:
        out_f = module.out_features
        in_g, kernel, effective = conv_geometry(spec, module)
        tensors: dict[str, tuple[int, ...]] = {}
        for index in (1, 2):
            if effective:
                tensors[f"hada_w{index}_a"] = (r, out_f)
                tensors[f"hada_w{index}_b"] = (r, in_g)
                tensors[f"hada_t{index}"] = core_shape(r, kernel)
            else:
                tensors[f"hada_w{index}_a"] = (out_f, r)
                tensors[f"hada_w{index}_b"] = (r, in_g * kernel_size(kernel))
        return tensors, {}

    def spec_from_peft_config(self, config: Mapping[str, Any]) -> LoHaSpec:
        return LoHaSpec(**self.spec_kwargs(config), init_weights=flag(config, "init_weights", True))
