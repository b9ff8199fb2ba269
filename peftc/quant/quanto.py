"""optimum-quanto weight quantization: Linear weights as int8 or packed int4 with float scales.

qint8: W ≈ data * scale, one scale per output row (symmetric). qint4: W ≈ (data - shift) * scale
per group of 128 input columns (fewer when 128 does not divide the row: 96, 64, then 32; one
group per row when in_features <= 128), two 4-bit codes per byte. Weights are frozen (`freeze`)
so the forward multiplies by the stored codes; activations stay in model.dtype. Outputs equal
x @ dequant(W)^T to float rounding.

On a CPU, peftc unpacks int4 codes with torch operations instead of quanto's C++ kernel, which
quanto compiles into its own package directory on first use (28-39 s on a 2-core machine, and only
with a compiler and a writable site-packages). The codes are identical and a layer's step takes
the same time: experiments/RESULTS.md, "quanto's int4 unpacking on a CPU".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from peftc.errors import ConfigError
from peftc.planning.memory import DTYPE_BYTES
from peftc.quant import register
from peftc.quant.base import FOUR_BIT_MERGE_REFUSAL, QuantBackend, QuantizedSpec, add_bytes, leaf_tensors, tensor_bytes

if TYPE_CHECKING:
    import torch
    from torch import nn

    from peftc.config.spec import RunSpec
    from peftc.planning.graph import ModuleInfo


@dataclass
class QuantoSpec(QuantizedSpec):
    """What both quanto widths share: float32 norms need a float32 model."""

    # What goes wrong in a 16-bit model when the unquantized layers are made float32.
    FLOAT32_MIX_FAILURE: ClassVar[str] = ""

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        super().cross_check(key, run)
        if self.float32_unquantized and run is not None and run.model.dtype != "float32":
            raise ConfigError(
                f"{key}.float32_unquantized",
                True,
                self.FLOAT32_MIX_FAILURE.format(dtype=run.model.dtype),
                f"set {key}.float32_unquantized=false (the shipped quanto_int4 default) or model.dtype=float32",
            )


@dataclass
class QuantoInt8Spec(QuantoSpec):
    """Weights as int8, one scale per output row."""

    FLOAT32_MIX_FAILURE: ClassVar[str] = (
        "quanto's int8 layers keep {dtype} outputs beside float32 norms, and attention then gets query, key "
        "and value of different dtypes (the first training step fails)"
    )


@dataclass
class QuantoInt4Spec(QuantoSpec):
    """Weights as packed int4 with a scale and a shift per group of up to 128 columns."""

    FLOAT32_MIX_FAILURE: ClassVar[str] = (
        "quanto's int4 {dtype} kernel rejects the float32 activations that float32 norms produce"
    )


def group_size(in_features: int) -> int | None:
    """quanto's rule for qint4 groups (None: one group per row)."""
    size = 128
    if in_features > size:
        while in_features % size != 0 and size > 32:
            size -= 32
        if in_features % size == 0:
            return size
    return None


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's packed layout read back: byte row r holds the codes of rows r, r + n, ... in its
    low bits first, for n packed rows (quanto's `pack_weights`)."""
    import torch

    rows, slots = packed.shape[0], 8 // bits
    codes = torch.empty((slots * rows, *packed.shape[1:]), dtype=torch.uint8, device=packed.device)
    for slot in range(slots):  # written in place: 3-5x faster than shifting copies and concatenating
        part = codes[slot * rows : (slot + 1) * rows]
        torch.bitwise_right_shift(packed, bits * slot, out=part).bitwise_and_((1 << bits) - 1)
    return codes


# The registration lives as long as this Library object does.
_cpu_unpack_library: torch.library.Library | None = None


def unpack_with_torch_on_cpu() -> None:
    """Make `quanto::unpack` on CPU tensors run `unpack_codes` (idempotent; other devices keep
    quanto's kernels)."""
    global _cpu_unpack_library
    if _cpu_unpack_library is not None:
        return
    import optimum.quanto  # noqa: F401  (defines quanto::unpack and registers its CPU kernel)
    import torch

    library = torch.library.Library("quanto", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        library.impl("unpack", unpack_codes, "CPU", allow_override=True)
    _cpu_unpack_library = library


class Quanto(QuantBackend):
    qtype: ClassVar[str]  # quanto's weight qtype name
    hf_weights: ClassVar[str]  # the same qtype under transformers' QuantoConfig name
    extra = "quant"
    packages = (("optimum.quanto", "optimum-quanto"),)
    library = "optimum.quanto"

    def quantize(self, spec: Any, model: nn.Module, paths: tuple[str, ...] = ()) -> nn.Module:
        from optimum.quanto import qtypes
        from optimum.quanto.nn import quantize_module

        from peftc.planning.graph import replace_module

        unpack_with_torch_on_cpu()
        for path in paths:
            layer = quantize_module(model.get_submodule(path), weights=qtypes[self.qtype])
            layer.freeze()
            layer.weight.requires_grad_(False)  # quanto's straight-through weights would get a .grad
            replace_module(model, path, layer)
        return model

    def on_load_config(self, spec: Any, model_dtype: str, skip: list[str]) -> Any:
        from transformers import QuantoConfig

        unpack_with_torch_on_cpu()
        # transformers builds the same quanto QLinear and freezes it as each weight is read:
        # measured bit-identical to `quantize` (codes, scales, shifts, logits) for int8 and int4.
        return QuantoConfig(weights=self.hf_weights, modules_to_not_convert=skip)

    def after_load(self, spec: Any, model_dtype: str, model: nn.Module, paths: tuple[str, ...]) -> None:
        import torch

        for path in paths:
            layer = model.get_submodule(path)
            # transformers sets these activation scales (unused: weights-only) as float32 CPU
            # tensors; quanto's own layers, as `quantize` makes them, hold them in the weight's
            # dtype on its device, where `.to(dtype)` and state_dict expect them.
            one = torch.ones((), dtype=layer.weight.dtype, device=layer.weight.device)
            layer.input_scale, layer.output_scale = one, one.clone()

    def _owns(self, module: nn.Module) -> bool:
        from optimum.quanto.nn import QLinear

        return isinstance(module, QLinear) and getattr(module.weight_qtype, "name", None) == self.qtype

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.weight.dequantize().float()

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        from torch import nn

        dtype = module.weight.dtype
        module.weight = nn.Parameter(weight.to(dtype), requires_grad=False)  # float again: not frozen
        module.freeze()
        module.weight.requires_grad_(False)

    def stored_bytes(self, module: nn.Module) -> dict[str, int]:
        return add_bytes(*(tensor_bytes(t) for t in leaf_tensors(module.weight)))


@register
class QuantoInt8(Quanto):
    name = "quanto_int8"
    schema = QuantoInt8Spec
    qtype = "qint8"
    hf_weights = "int8"
    storage = "int8"

    def weight_bytes(self, spec: Any, module: ModuleInfo, dtype: str) -> dict[str, int]:
        scales = module.out_features * DTYPE_BYTES[dtype]
        return add_bytes({"int8": module.out_features * module.in_features}, {dtype: scales})


@register
class QuantoInt4(Quanto):
    name = "quanto_int4"
    inference_mode = False  # its int4 matmul fails on inference tensors ("Cannot set version_counter")
    merge_policy = "refuse"
    merge_refusal = FOUR_BIT_MERGE_REFUSAL
    schema = QuantoInt4Spec
    qtype = "qint4"
    hf_weights = "int4"
    storage = "int4"

    def weight_bytes(self, spec: Any, module: ModuleInfo, dtype: str) -> dict[str, int]:
        count = module.out_features * module.in_features
        size = group_size(module.in_features)
        groups = count // size if size else module.out_features
        return add_bytes({"uint8": (count + 1) // 2}, {dtype: 2 * groups * DTYPE_BYTES[dtype]})  # scale + shift
