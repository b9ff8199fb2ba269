"""The fast path of low-rank adapters on nn.Linear: y = x W^T + b + sum_i s_i (x A_i^T) B_i^T.

One autograd node per layer instead of the six (base linear, A, B, scale, add, dropout) a
module-by-module forward records, with no activation-sized temporaries:
- forward: the base GEMM, then each x A^T (N x r), then the low-rank product is accumulated
  into the base output in place (`addmm_`); B A is never formed;
- backward, bracketed rank-first: g B (N x r) once per adapter, dx = g W + sum (s g B) A
  accumulated in place, dA = (s g B)^T x, dB = s (x A^T)^T g (computed as (r x out) and
  transposed: the (r x N)(N x out) product is several times faster on CPU than (out x N)(N x r)).
Only x and the N x r products are kept for backward (the base linear keeps x anyway).

The same numbers as the module-by-module computation up to float rounding (the products are
summed in another order). Used when the layer is a plain nn.Linear without hooks, the
adapters apply no dropout (p = 0, or eval mode) and all tensors share the activations' dtype;
other cases take the general path.

Under autocast (Lightning's bf16-mixed / 16-mixed) the inputs are cast to the autocast dtype
first, outside the autograd node, and the node runs with autocast off: every product is then
the lower-precision GEMM autocast would have run for peft's module-by-module forward, while the
casts' backward hands float32 gradients to the float32 adapter weights (autocast inside the node
would cast its GEMMs but not the in-place accumulation, and mix dtypes).

Over a quantized layer (QLoRA) the quant backend gives the frozen product (`FrozenLinear`), and
QuantizedLowRankLinear adds the adapters into it in the dtype the layer returns: under autocast
with float32 activations (a float32 residual stream, QLoRA's usual preparation) the low-rank
update is added to the float32 output, never rounded to bfloat16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules import module as _module_state

if TYPE_CHECKING:
    from peftc.quant.base import FrozenLinear


class LowRankNode(torch.autograd.Function):
    """What the low-rank nodes share: apply(x, base, base_option, scalings, *factors), whose
    `_compute(x, base, base_option, scalings, factors)` gives (flat x, output, products)."""

    @classmethod
    def evaluate(cls, x, base, base_option, scalings, *factors):  # noqa: ANN001, ANN206 - apply's signature
        """The forward without a node, for when no gradient is recorded."""
        _, out, _ = cls._compute(x, base, base_option, scalings, factors)
        return out.view(*x.shape[:-1], out.shape[-1])


class LowRankLinear(LowRankNode):
    """apply(x, weight, bias, scalings, A_1, B_1, A_2, B_2, ...) -> y (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scalings, *factors):  # noqa: ANN001, ANN205 - autograd signature
        flat, out, products = LowRankLinear._compute(x, weight, bias, scalings, factors)
        ctx.scalings = scalings
        ctx.input_shape = x.shape
        ctx.save_for_backward(flat, weight, *factors, *products)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def _compute(x, weight, bias, scalings, factors):  # noqa: ANN001, ANN205
        flat = x.reshape(-1, x.shape[-1])
        out = torch.mm(flat, weight.t()) if bias is None else torch.addmm(bias, flat, weight.t())
        return flat, out, add_low_rank(out, flat, scalings, factors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # noqa: ANN001, ANN205
        return outside_autocast(LowRankLinear._backward, ctx, grad_output)

    @staticmethod
    def _backward(ctx, grad_output):  # noqa: ANN001, ANN205
        flat, weight, *rest = ctx.saved_tensors
        factors, products = factors_and_products(rest, len(ctx.scalings))
        needs = ctx.needs_input_grad
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        grad_x = torch.mm(grad, weight) if needs[0] else None
        grad_factors = low_rank_grads(grad, flat, grad_x, ctx.scalings, factors, products, needs[4:])
        grad_weight = torch.mm(grad.t(), flat) if needs[1] else None
        grad_bias = grad.sum(0) if needs[2] else None
        if grad_x is not None:
            grad_x = grad_x.view(ctx.input_shape)
        return grad_x, grad_weight, grad_bias, None, *grad_factors


def factors_and_products(
    saved: Sequence[torch.Tensor], count: int
) -> tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]:
    """A node's saved (A_1, B_1, ..., A_count, B_count, product_1, ..., product_count), split."""
    return saved[: 2 * count], saved[2 * count :]


def add_low_rank(
    out: torch.Tensor, flat: torch.Tensor, scalings: Sequence[float], factors: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Add each s_i (x A_i^T) B_i^T into `out` in place (x A^T taken to out's dtype, where the B's
    are); returns the x A_i^T products (N x r), which backward needs."""
    products = []
    for index, scaling in enumerate(scalings):
        lora_a, lora_b = factors[2 * index], factors[2 * index + 1]
        product = torch.mm(flat, lora_a.t())
        out.addmm_(product.to(out.dtype), lora_b.t(), alpha=scaling)
        products.append(product)
    return products


def low_rank_grads(
    grad: torch.Tensor,
    flat: torch.Tensor,
    grad_x: torch.Tensor | None,
    scalings: Sequence[float],
    factors: Sequence[torch.Tensor],
    products: Sequence[torch.Tensor],
    needs: Sequence[bool],
) -> list[torch.Tensor | None]:
    """The adapters' backward for upstream `grad`, bracketed rank-first: adds each (s g B) A into
    `grad_x` in place (when given) and returns [dA_1, dB_1, ...] (None where `needs`, the
    factors' needs_input_grad, says no). g B is taken to x's dtype, where the A's are."""
    grad_factors: list[torch.Tensor | None] = []
    for index, scaling in enumerate(scalings):
        lora_a, lora_b = factors[2 * index], factors[2 * index + 1]
        need_a, need_b = needs[2 * index], needs[2 * index + 1]
        grad_a = grad_b = None
        if grad_x is not None or need_a:
            through_b = torch.mm(grad, lora_b).mul_(scaling).to(flat.dtype)  # (N, r)
            if grad_x is not None:
                grad_x.addmm_(through_b, lora_a)
            if need_a:
                grad_a = torch.mm(through_b.t(), flat)
        if need_b:
            grad_b = torch.mm(products[index].to(grad.dtype).t(), grad).mul_(scaling).t().contiguous()
        grad_factors += [grad_a, grad_b]
    return grad_factors


class RescaledLowRankLinear(torch.autograd.Function):
    """DoRA on nn.Linear: apply(x, weight, bias, s, A, B, rescale) -> rescale * (x W^T + s (x A^T) B^T) + b,
    with rescale = m / ||W + s B A|| per output (the detached norm is computed outside).

    Equal to peft's W x + b + (rescale - 1) W x + rescale s B A x up to float rounding, in one
    node: three GEMMs and one elementwise pass forward (peft: five passes over the output), and
    it keeps x, x A^T and the pre-rescale output for backward (peft: W x and B A x besides).
    Backward: d rescale = sum over tokens of g * (W x + s B A x), then LowRankLinear's backward
    for g * rescale."""

    @staticmethod
    def forward(ctx, x, weight, bias, scaling, lora_a, lora_b, rescale):  # noqa: ANN001, ANN205
        flat, product, unscaled, out = RescaledLowRankLinear._compute(x, weight, bias, scaling, lora_a, lora_b, rescale)
        ctx.scaling, ctx.input_shape = scaling, x.shape
        ctx.save_for_backward(flat, weight, lora_a, lora_b, rescale, product, unscaled)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def evaluate(x, weight, bias, scaling, lora_a, lora_b, rescale):  # noqa: ANN001, ANN205 - apply's signature
        """The forward without a node, for when no gradient is recorded."""
        *_, out = RescaledLowRankLinear._compute(x, weight, bias, scaling, lora_a, lora_b, rescale)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def _compute(x, weight, bias, scaling, lora_a, lora_b, rescale):  # noqa: ANN001, ANN205
        flat = x.reshape(-1, x.shape[-1])
        product = torch.mm(flat, lora_a.t())
        unscaled = torch.mm(flat, weight.t()).addmm_(product, lora_b.t(), alpha=scaling)
        out = unscaled * rescale if bias is None else torch.addcmul(bias, unscaled, rescale)
        return flat, product, unscaled, out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # noqa: ANN001, ANN205
        return outside_autocast(RescaledLowRankLinear._backward, ctx, grad_output)

    @staticmethod
    def _backward(ctx, grad_output):  # noqa: ANN001, ANN205
        flat, weight, lora_a, lora_b, rescale, product, unscaled = ctx.saved_tensors
        needs, scaling = ctx.needs_input_grad, ctx.scaling
        upstream = grad_output.reshape(-1, grad_output.shape[-1])
        grad_rescale = (upstream * unscaled).sum(0, dtype=torch.float32).to(rescale.dtype) if needs[6] else None
        grad = upstream * rescale  # d loss / d (W x + s B A x)
        through_b = torch.mm(grad, lora_b).mul_(scaling)  # (N, r)
        grad_x = None
        if needs[0]:
            grad_x = torch.mm(grad, weight).addmm_(through_b, lora_a).view(ctx.input_shape)
        grad_a = torch.mm(through_b.t(), flat) if needs[4] else None
        grad_b = torch.mm(product.t(), grad).mul_(scaling).t().contiguous() if needs[5] else None
        grad_weight = torch.mm(grad.t(), flat) if needs[1] else None
        grad_bias = upstream.sum(0) if needs[2] else None
        return grad_x, grad_weight, grad_bias, None, grad_a, grad_b, grad_rescale


class QuantizedLowRankLinear(LowRankNode):
    """Low-rank adapters on a quantized linear layer, whose frozen product the quant backend
    gives (`FrozenLinear`): apply(x, frozen, out_dtype, scalings, A_1, B_1, ...) -> y, with x and
    the A's in the product's compute dtype and the B's in `out_dtype`, the dtype the layer returns
    (its input's, as bitsandbytes' layer returns it).

    Forward: the quantized product, cast once to out_dtype, and each s (x A^T) B^T added into it
    there (under autocast with a float32 input, peft casts x for the adapter a second time, then
    passes over the output three more times: B's output scaled, cast, added). Backward: the
    layer's own input gradient (one dequantization, as bitsandbytes' backward), the adapters'
    added into it in place. Keeps x and the N x r products, as LowRankLinear."""

    @staticmethod
    def forward(ctx, x, frozen, out_dtype, scalings, *factors):  # noqa: ANN001, ANN205 - autograd signature
        flat, out, products = QuantizedLowRankLinear._compute(x, frozen, out_dtype, scalings, factors)
        ctx.frozen, ctx.scalings, ctx.input_shape = frozen, scalings, x.shape
        ctx.save_for_backward(flat, *factors, *products)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def _compute(x, frozen, out_dtype, scalings, factors):  # noqa: ANN001, ANN205
        flat = x.reshape(-1, x.shape[-1])
        out = frozen.forward(flat).to(out_dtype)
        return flat, out, add_low_rank(out, flat, scalings, factors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # noqa: ANN001, ANN205
        return outside_autocast(QuantizedLowRankLinear._backward, ctx, grad_output)

    @staticmethod
    def _backward(ctx, grad_output):  # noqa: ANN001, ANN205
        flat, *rest = ctx.saved_tensors
        factors, products = factors_and_products(rest, len(ctx.scalings))
        needs = ctx.needs_input_grad
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        grad_x = ctx.frozen.input_grad(grad.to(flat.dtype)) if needs[0] else None
        grad_factors = low_rank_grads(grad, flat, grad_x, ctx.scalings, factors, products, needs[4:])
        if grad_x is not None:
            grad_x = grad_x.view(ctx.input_shape)
        return grad_x, None, None, None, *grad_factors


def plain_linear(layer: nn.Module) -> bool:
    """Whether calling `layer` is exactly F.linear(x, weight, bias): an nn.Linear (not a
    subclass with its own forward) holding plain parameters (not a quantized tensor subclass,
    as torchao leaves in an nn.Linear), with no forward hooks, local or global."""
    return type(layer) is nn.Linear and type(layer.weight) is nn.Parameter and without_hooks(layer)


def without_hooks(layer: nn.Module) -> bool:
    """Whether calling `layer` runs its forward alone: no forward hooks, local or global."""
    return not (
        layer._forward_hooks
        or layer._forward_pre_hooks
        or _module_state._global_forward_hooks
        or _module_state._global_forward_pre_hooks
    )


def adapters_fusable(layer: nn.Module) -> bool:
    """Whether an adapter layer's adapters may run inside one node now: an enabled, unmerged
    linear layer with active adapters that apply no dropout (LoRA and AdaLoRA keep theirs in
    `lora_dropout`; in eval mode dropout is the identity)."""
    if layer.kind != "linear" or layer.disabled or layer.merged_adapters or not layer.active_adapters:
        return False
    return not layer.training or all(isinstance(layer.lora_dropout[n], nn.Identity) for n in layer.active_adapters)


def fusable(layer: nn.Module) -> bool:
    """Whether an adapter layer's forward may run as one node over a plain nn.Linear now."""
    return adapters_fusable(layer) and plain_linear(layer.base_layer)


def fused_linear(
    x: torch.Tensor, layer: nn.Linear, scalings: Sequence[float], factors: Sequence[torch.Tensor]
) -> torch.Tensor | None:
    """y = layer(x) + sum s_i B_i A_i x through LowRankLinear, or None when the dtypes differ
    outside autocast (the general path then casts as peft does)."""
    return _apply_fused(LowRankLinear, x, layer, tuple(scalings), factors)


def fused_rescaled_linear(
    x: torch.Tensor,
    layer: nn.Linear,
    scaling: float,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    rescale: torch.Tensor,
) -> torch.Tensor | None:
    """DoRA's y = rescale * (W x + s B A x) + b through RescaledLowRankLinear, or None (as above)."""
    return _apply_fused(RescaledLowRankLinear, x, layer, scaling, (lora_a, lora_b, rescale))


def fused_quantized_linear(
    x: torch.Tensor, frozen: FrozenLinear, scalings: Sequence[float], factors: Sequence[torch.Tensor]
) -> torch.Tensor | None:
    """y = layer(x) + sum s_i B_i A_i x over a quantized layer through QuantizedLowRankLinear, or
    None where peft would compute the adapters in another dtype than the layer's product: outside
    autocast every tensor must share the compute dtype; under autocast, that must be autocast's."""
    compute, autocast = frozen.compute_dtype, autocast_dtype(x.device)
    if x.device != frozen.device or (autocast or x.dtype) != compute:
        return None
    if autocast is None and any(t.dtype != compute for t in factors):
        return None
    out_dtype = x.dtype
    tensors = [t.to(compute if index % 2 == 0 else out_dtype) for index, t in enumerate(factors)]
    with torch.autocast(x.device.type, enabled=False):
        return run_node(QuantizedLowRankLinear, x.to(compute), frozen, out_dtype, tuple(scalings), *tensors)


def _apply_fused(
    node: type[torch.autograd.Function],
    x: torch.Tensor,
    layer: nn.Linear,
    constant: object,
    tensors: Sequence[torch.Tensor],
) -> torch.Tensor | None:
    """node.apply(x, weight, bias, constant, *tensors), all in one dtype: autocast's (cast here,
    outside the node, so the casts' backward returns float32 gradients), else the input's."""
    weight, bias = layer.weight, layer.bias
    if x.device != weight.device:
        return None
    dtype = autocast_dtype(x.device) if x.dtype != torch.float64 else None  # autocast leaves float64 alone
    if dtype is None:
        if weight.dtype != x.dtype or any(t.dtype != x.dtype for t in tensors):
            return None
        return run_node(node, x, weight, bias, constant, *tensors)
    x, weight = x.to(dtype), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    tensors = [t.to(dtype) for t in tensors]
    with torch.autocast(x.device.type, enabled=False):
        return run_node(node, x, weight, bias, constant, *tensors)


def run_node(node: type[torch.autograd.Function], *args: object) -> torch.Tensor:
    """node.apply(*args), or the node's `evaluate` where no gradient is recorded (validation,
    generation). Besides skipping the saved tensors, this keeps a compiled block in one graph:
    Dynamo fails to trace an autograd.Function whose non-tensor arguments precede *varargs under
    no_grad (torch 2.13: AttributeError inside the trace, the block then runs uncompiled)."""
    if torch.is_grad_enabled():
        return node.apply(*args)
    return node.evaluate(*args)


def outside_autocast(backward, ctx, grad_output):  # noqa: ANN001, ANN201 - autograd's types
    """Run a fused node's backward with autocast off: its saved tensors share one dtype already
    (cast before the node), and autocast would cast its GEMMs but not its in-place sums."""
    with autocast_off(grad_output.device):
        return backward(ctx, grad_output)


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off on `device` where it is on (nothing to switch elsewhere, e.g. on meta)."""
    if autocast_dtype(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes matrix products in on this device, or None outside autocast
    (and on devices autocast does not know, such as meta)."""
    kind = device.type
    if kind == "meta" or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)
