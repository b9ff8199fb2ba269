"""bitsandbytes LLM.int8(): Linear weights stored as int8 with one float32 scale per output row.

W ≈ CB * SCB[:, None] / 127 (CB int8, SCB = max |W| of each row). The layer is bitsandbytes'
`Linear8bitLt(has_fp16_weights=False)`. On CPU, bitsandbytes runs a training-mode forward as a
float matmul on the dequantized weight (outputs equal x @ dequant(W)^T to float rounding), but an
eval-mode forward casts activations to float16 and quantizes them row-wise to int8 for an
int8 x int8 matmul (with `threshold: 0`, the default, no outlier columns are kept in 16-bit):
eval outputs deviate by that activation rounding too (about 1% of the output's scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftc.config.spec import at_least, param
from peftc.planning.model_source import bitsandbytes_bits
from peftc.quant import register
from peftc.quant.base import QuantBackend, QuantizedSpec, add_bytes, tensor_bytes

if TYPE_CHECKING:
    import torch
    from torch import nn

    from peftc.planning.graph import ModuleInfo


@dataclass
class BnbInt8Spec(QuantizedSpec):
    threshold: float = param(
        0.0,
        "LLM.int8() outlier threshold: activation columns above it run in 16-bit (0: all int8, the CPU path measured here).",
        at_least(0.0),
    )


@register
class BnbInt8(QuantBackend):
    name = "bnb_int8"
    schema = BnbInt8Spec
    extra = "quant"
    packages = (("bitsandbytes", "bitsandbytes"),)
    library = "bitsandbytes"
    storage = "int8"
    notes = (
        "bnb_int8 on CPU: training steps multiply by the dequantized weight; eval (validation) casts activations "
        "to float16 and quantizes them to int8 (int8 x int8 matmul, ~1% output error)",
    )

    def weight_bytes(self, spec: BnbInt8Spec, module: ModuleInfo, dtype: str) -> dict[str, int]:
        return {"int8": module.out_features * module.in_features, "float32": module.out_features * 4}

    def quantize(self, spec: BnbInt8Spec, model: nn.Module, paths: tuple[str, ...] = ()) -> nn.Module:
        import bitsandbytes as bnb
        from torch import nn

        from peftc.planning.graph import replace_module

        for path in paths:
            old = model.get_submodule(path)
            layer = bnb.nn.Linear8bitLt(
                old.in_features,
                old.out_features,
                bias=old.bias is not None,
                has_fp16_weights=False,
                threshold=spec.threshold,
                device="meta",
            )
            layer.weight = bnb.nn.Int8Params(old.weight.data, requires_grad=False, has_fp16_weights=False)
            if old.bias is not None:
                layer.bias = nn.Parameter(old.bias.data, requires_grad=False)
            replace_module(model, path, layer.to(old.weight.device))  # .to() quantizes
        return model

    def on_load_config(self, spec: BnbInt8Spec, model_dtype: str, skip: list[str]) -> Any:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_8bit=True,
            llm_int8_threshold=spec.threshold,
            llm_int8_has_fp16_weight=False,
            llm_int8_skip_modules=skip,
        )

    def after_load(self, spec: BnbInt8Spec, model_dtype: str, model: nn.Module, paths: tuple[str, ...]) -> None:
        for path in paths:  # a checkpoint saved quantized brings its own threshold; the spec's is the run's
            state = model.get_submodule(path).state
            state.threshold = spec.threshold
            state.use_pool = spec.threshold > 0.0  # what Linear8bitLt's constructor sets with it

    def stores(self, stored: dict[str, Any]) -> bool:
        return bitsandbytes_bits(stored) == 8

    def _owns(self, module: nn.Module) -> bool:
        import bitsandbytes as bnb

        return isinstance(module, bnb.nn.Linear8bitLt)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        data, scales = _int8_parts(module)
        return data.float() * scales.float().unsqueeze(1).mul(1.0 / 127.0)  # bitsandbytes' own rounding

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        device = module.weight.device
        module.weight = bnb.nn.Int8Params(weight.float().cpu(), requires_grad=False, has_fp16_weights=False).to(device)
        module.state.reset_grads()  # drops the CB/SCB the layer cached from the old weight
        module.state.CB = module.state.SCB = None

    def snapshot(self, module: nn.Module) -> Any:
        # bitsandbytes keeps the int8 data and scales on the weight or, after a forward, on the state
        weight, state = module.weight, module.state
        return weight, weight.CB, weight.SCB, state.CB, state.SCB

    def restore(self, module: nn.Module, snapshot: Any) -> None:
        weight, weight_cb, weight_scb, state_cb, state_scb = snapshot
        module.weight = weight
        weight.CB, weight.SCB = weight_cb, weight_scb
        module.state.reset_grads()
        module.state.CB, module.state.SCB = state_cb, state_scb

    def spec_of(self, module: nn.Module, skip_modules: tuple[str, ...]) -> BnbInt8Spec:
        return BnbInt8Spec(skip_modules=list(skip_modules), threshold=float(module.state.threshold))

    def stored_bytes(self, module: nn.Module) -> dict[str, int]:
        data, scales = _int8_parts(module)
        return add_bytes(tensor_bytes(data), tensor_bytes(scales))


def _int8_parts(module: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, per-row scales); bitsandbytes moves them from the weight to the layer state
    on the first forward pass."""
    weight = module.weight
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    return weight.data, scales
