"""bitsandbytes 4-bit (QLoRA): Linear weights stored as 4-bit codes, one absmax per 64 weights.

W ≈ code[q] * absmax[block] with q a 4-bit index into the NormalFloat4 (`bnb_nf4`) or FP4
(`bnb_fp4`) table, packed two per byte. Double quantization stores the absmax values themselves
as 8-bit blocks of 256 (plus one float32 offset and a 256-entry table per layer). The product
runs in `compute_dtype` on the dequantized weight, so outputs equal x @ dequant(W)^T exactly in
float32 compute. The layer is bitsandbytes' `Linear4bit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from peftc.config.spec import one_of, param
from peftc.planning.model_source import bitsandbytes_bits
from peftc.quant import register
from peftc.quant.base import (
    FOUR_BIT_MERGE_REFUSAL,
    FrozenLinear,
    QuantBackend,
    QuantizedSpec,
    add_bytes,
    tensor_bytes,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from peftc.planning.graph import ModuleInfo

BLOCKSIZE = 64  # bitsandbytes' default 4-bit block (weights per absmax)
NESTED_BLOCKSIZE = 256  # double quantization: absmax values per 8-bit block


@dataclass
class Bnb4bitSpec(QuantizedSpec):
    double_quant: bool = param(True, "Quantize the per-block absmax values too (saves ~0.37 bit per weight).")
    compute_dtype: str | None = param(
        None,
        "Dtype of the matmul on the dequantized weight; null: model.dtype.",
        one_of("float32", "bfloat16", "float16"),
    )


@dataclass
class BnbFp4Spec(Bnb4bitSpec):
    """Same fields; the option fixes the 4-bit code to FP4."""


class Bnb4bit(QuantBackend):
    quant_type: ClassVar[str]  # the 4-bit code table: "nf4" or "fp4"
    merge_policy = "refuse"
    merge_refusal = FOUR_BIT_MERGE_REFUSAL
    extra = "quant"
    packages = (("bitsandbytes", "bitsandbytes"),)
    library = "bitsandbytes"

    def weight_bytes(self, spec: Bnb4bitSpec, module: ModuleInfo, dtype: str) -> dict[str, int]:
        count = module.out_features * module.in_features
        blocks = math.ceil(count / BLOCKSIZE)
        sizes = {"uint8": (count + 1) // 2, "float32": 16 * 4}  # packed codes; the 16-entry code table
        if spec.double_quant:
            nested = math.ceil(blocks / NESTED_BLOCKSIZE)
            sizes["uint8"] += blocks  # absmax as 8-bit codes
            sizes["float32"] += nested * 4 + 256 * 4 + 4  # their absmax, their table, the offset
        else:
            sizes["float32"] += blocks * 4
        return sizes

    def quantize(self, spec: Bnb4bitSpec, model: nn.Module, paths: tuple[str, ...] = ()) -> nn.Module:
        import bitsandbytes as bnb
        import torch
        from torch import nn

        from peftc.planning.graph import replace_module

        for path in paths:
            old = model.get_submodule(path)
            compute = getattr(torch, spec.compute_dtype) if spec.compute_dtype else old.weight.dtype
            layer = bnb.nn.Linear4bit(
                old.in_features,
                old.out_features,
                bias=old.bias is not None,
                compute_dtype=compute,
                compress_statistics=spec.double_quant,
                quant_type=self.quant_type,
                device="meta",
            )
            layer.weight = bnb.nn.Params4bit(
                old.weight.data,
                requires_grad=False,
                blocksize=BLOCKSIZE,
                compress_statistics=spec.double_quant,
                quant_type=self.quant_type,
            )
            if old.bias is not None:
                layer.bias = nn.Parameter(old.bias.data, requires_grad=False)
            # On AVX512-BF16 CPUs bitsandbytes repacks the weight in place the first time an
            # eval-mode forward runs (an inference-only layout): outputs then change by ~5e-3
            # and the next training step fails. Validation runs in eval mode, so keep one layout.
            layer.support_avx512bf16_for_cpu = False
            replace_module(model, path, layer.to(old.weight.device))  # .to() quantizes
        return model

    def on_load_config(self, spec: Bnb4bitSpec, model_dtype: str, skip: list[str]) -> Any:
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_compute_dtype=getattr(torch, spec.compute_dtype or model_dtype),
            bnb_4bit_use_double_quant=spec.double_quant,
            llm_int8_skip_modules=skip,  # transformers' name for "keep these unquantized", 4-bit too
        )

    def after_load(self, spec: Bnb4bitSpec, model_dtype: str, model: nn.Module, paths: tuple[str, ...]) -> None:
        import torch

        for path in paths:
            layer = model.get_submodule(path)
            layer.support_avx512bf16_for_cpu = False  # see quantize
            # a checkpoint saved quantized brings its own compute dtype; the spec's is the run's
            layer.compute_dtype = getattr(torch, spec.compute_dtype or model_dtype)

    def stores(self, stored: dict[str, Any]) -> bool:
        return bitsandbytes_bits(stored) == 4 and _code_of(stored) == self.quant_type

    def checkpoint_spec(self, spec: Bnb4bitSpec, stored: dict[str, Any]) -> Bnb4bitSpec:
        return replace(spec, double_quant=bool(stored.get("bnb_4bit_use_double_quant", False)))

    def _owns(self, module: nn.Module) -> bool:
        import bitsandbytes as bnb

        return isinstance(module, bnb.nn.Linear4bit) and module.weight.quant_type == self.quant_type

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        import bitsandbytes.functional as F

        return F.dequantize_4bit(module.weight.data, module.weight.quant_state).float()

    def frozen_linear(self, module: nn.Module) -> FrozenLinear | None:
        """bitsandbytes' own training product: the 4-bit GEMM forward (`matmul_4bit` without grad)
        and, backward, g times the weight dequantized once (what its MatMul4Bit does); None for
        a subclass, a layer without a compute dtype or quant state yet, a trainable bias (peft's
        bias="all": the product is frozen), or bitsandbytes' CPU inference packing."""
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
        import torch

        weight, bias, compute = module.weight, module.bias, module.compute_dtype
        state = getattr(weight, "quant_state", None)
        if type(module) is not bnb.nn.Linear4bit or compute is None or state is None:
            return None
        if bias is not None and bias.requires_grad:
            return None
        if getattr(state, "packing_format_for_cpu", False):
            return None
        bias = bias.to(compute) if bias is not None else None  # the layer's forward casts it the same way

        def forward(x: torch.Tensor) -> torch.Tensor:
            return bnb.matmul_4bit(x, weight.t(), bias=bias, quant_state=state)

        def input_grad(grad: torch.Tensor) -> torch.Tensor:
            return torch.mm(grad, F.dequantize_4bit(weight.data, state).to(grad.dtype))

        return FrozenLinear(compute, weight.device, forward, input_grad)

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        old = module.weight
        module.weight = bnb.nn.Params4bit(
            weight.to(old.quant_state.dtype).cpu(),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
        ).to(old.device)

    def spec_of(self, module: nn.Module, skip_modules: tuple[str, ...]) -> Bnb4bitSpec:
        weight = module.weight
        return self.schema(
            skip_modules=list(skip_modules),
            double_quant=bool(weight.compress_statistics),
            compute_dtype=str(module.compute_dtype).replace("torch.", "") if module.compute_dtype else None,
        )

    def stored_bytes(self, module: nn.Module) -> dict[str, int]:
        state = module.weight.quant_state
        parts: list[Any] = [module.weight.data, state.absmax, state.code]
        if state.nested:
            parts += [state.state2.absmax, state.state2.code, state.offset.float().reshape(1)]
        return add_bytes(*(tensor_bytes(p) for p in parts))


def _code_of(stored: dict[str, Any]) -> str:
    """The 4-bit code a transformers BitsAndBytesConfig names (its default: fp4)."""
    return str(stored.get("bnb_4bit_quant_type") or "fp4")


@register
class BnbNf4(Bnb4bit):
    name = "bnb_nf4"
    schema = Bnb4bitSpec
    storage = quant_type = "nf4"


@register
class BnbFp4(Bnb4bit):
    name = "bnb_fp4"
    schema = BnbFp4Spec
    storage = quant_type = "fp4"
