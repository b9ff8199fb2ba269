"""torchao int8 weight-only quantization: Linear weights as int8 with one float32 scale per row.

W ≈ (qdata - zero_point) * scale per output row (torchao's `Int8WeightOnlyConfig`). The module
stays a plain `nn.Linear` whose weight is a torchao tensor subclass; activations stay in
model.dtype, so outputs equal x @ dequant(W)^T to float rounding. torchao's int4 weight-only
formats need CUDA (or the unreleased mslk package) in torchao 0.18, so only int8 is offered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftc.quant import register
from peftc.quant.base import QuantBackend, QuantizedSpec, add_bytes, leaf_tensors, tensor_bytes

if TYPE_CHECKING:
    import torch
    from torch import nn

    from peftc.planning.graph import ModuleInfo


@dataclass
class TorchaoInt8Spec(QuantizedSpec):
    """Weights as int8 with a float32 scale and an int8 zero point per output row."""


@register
class TorchaoInt8(QuantBackend):
    name = "torchao_int8"
    schema = TorchaoInt8Spec
    extra = "quant"
    packages = (("torchao", "torchao"),)
    library = "torchao"
    storage = "int8"

    def weight_bytes(self, spec: Any, module: ModuleInfo, dtype: str) -> dict[str, int]:
        rows = module.out_features
        return {"int8": rows * module.in_features + rows, "float32": rows * 4}  # data + zero points; scales

    def quantize(self, spec: Any, model: nn.Module, paths: tuple[str, ...] = ()) -> nn.Module:
        wanted = set(paths)
        _quantize(model, lambda module, fqn: fqn in wanted)
        return model

    def on_load_config(self, spec: Any, model_dtype: str, skip: list[str]) -> Any:
        from transformers import TorchAoConfig

        # transformers runs torchao's quantize_ with this same config on each Linear as its
        # weight is read: measured bit-identical to `quantize` (qdata, scales, logits).
        return TorchAoConfig(_weight_config(), modules_to_not_convert=skip)

    def _owns(self, module: nn.Module) -> bool:
        from torch import nn
        from torchao.utils import TorchAOBaseTensor

        return isinstance(module, nn.Linear) and isinstance(module.weight, TorchAOBaseTensor)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.weight.dequantize().float()

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        from torch import nn

        module.weight = nn.Parameter(weight.to(module.weight.dtype), requires_grad=False)
        _quantize(module, None)

    def stored_bytes(self, module: nn.Module) -> dict[str, int]:
        return add_bytes(*(tensor_bytes(t) for t in leaf_tensors(module.weight)))


def _weight_config() -> Any:
    """The one torchao config both paths use (after building and while loading)."""
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _quantize(model: nn.Module, filter_fn: Any) -> None:
    from torchao.quantization import quantize_

    quantize_(model, _weight_config(), filter_fn=filter_fn)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is not None:
            weight.requires_grad_(False)
