"""The quantization contract: how the frozen base is stored, what it costs, how it is applied.

The planner asks a backend which modules it quantizes and how many bytes each one takes once
quantized; the materializer asks it to quantize exactly the planned modules of the loaded model
before adapters are injected; adapter layers ask it to read a quantized weight back as float32
(and to write a merged one), and for the layer's frozen product as two functions (`FrozenLinear`)
to run inside their fused nodes, so that methods never see a backend's storage format. Backends are
imported lazily: nothing here imports bitsandbytes, optimum-quanto or torchao until a plan uses
them, and `owns` answers False without importing a library that is not loaded yet.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from peftc.config.spec import SpecNode, param
from peftc.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from peftc.config.spec import RunSpec
    from peftc.planning.graph import ModuleInfo

EXTRA_HINT = "install the quantization extra: pip install 'peftc[quant]'"
FOUR_BIT_MERGE_REFUSAL = (
    "requantizing a 4-bit weight rounds away much of the adapter's update (measured: 15-20% of its effect "
    "on the logits; README: Quantization)"
)


@dataclass
class QuantizedSpec(SpecNode):
    """Fields every quantizing backend shares: what stays unquantized, and k-bit training prep."""

    skip_modules: Any = param(
        None,
        "Linear modules kept in model.dtype: names/dotted suffixes or a full-match regex; null: the output head. "
        "Task heads and modules_to_save are never quantized.",
    )
    float32_unquantized: bool = param(
        True,
        "Prepare for k-bit training (peft's rule): when model.dtype is 16-bit, keep every weight left "
        "unquantized (norms, embeddings, output head, biases) in float32.",
    )
    input_grads: bool = param(
        True,
        "Prepare for k-bit training: make the input embeddings' output require grad, so adapters below "
        "frozen (checkpointed) blocks receive gradients.",
    )

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        skip = self.skip_modules
        if skip is not None and not isinstance(skip, (str, list, tuple)):
            raise ConfigError(f"{key}.skip_modules", skip, "must be a list of module names or a regex string")


@dataclass(frozen=True)
class FrozenLinear:
    """A quantized linear layer's frozen product, for an adapter's fused node: `forward(x)` is
    x W^T + b for a 2-D x in `compute_dtype`, called without grad, and `input_grad(g)` is g W, the
    gradient w.r.t. x (g in `compute_dtype`). Both give what the layer's own forward and backward
    compute, before the layer casts its output back to its input's dtype."""

    compute_dtype: torch.dtype
    device: torch.device
    forward: Callable[[torch.Tensor], torch.Tensor]
    input_grad: Callable[[torch.Tensor], torch.Tensor]


class QuantBackend:
    name: ClassVar[str]
    schema: ClassVar[type[SpecNode]]
    extra: ClassVar[str | None] = None  # pip extra that installs the backend
    packages: ClassVar[tuple[tuple[str, str], ...]] = ()  # (import name, pip name) it needs
    storage: ClassVar[str] = ""  # what a quantized weight is stored as, e.g. "nf4", "int8"
    # What merging an adapter into a quantized layer does: "requantize" (dequantize, add the
    # update in float32, quantize again: lossy, warned) or "refuse".
    merge_policy: ClassVar[str] = "requantize"
    merge_refusal: ClassVar[str] = ""  # why, when merge_policy is "refuse"
    notes: ClassVar[tuple[str, ...]] = ()  # facts about the numerics shown with the plan
    # Whether validation may run under torch.inference_mode (Lightning's default) rather than no_grad.
    inference_mode: ClassVar[bool] = True

    # --------------------------------------------------------------------------- planning
    def check_available(self) -> None:
        """Raise ConfigError naming the extra to install when the backend is missing."""
        missing = [pip for module, pip in self.packages if not _installed(module)]
        if missing:
            raise ConfigError(
                "quant",
                self.name,
                f"needs {', '.join(missing)}, which is not installed",
                EXTRA_HINT if self.extra == "quant" else f"pip install {' '.join(missing)}",
            )

    def quantizes(self, module: ModuleInfo) -> bool:
        """Whether this backend can store this module quantized (plain Linear layers by default)."""
        return module.kind == "linear"

    def weight_bytes(self, spec: Any, module: ModuleInfo, dtype: str) -> dict[str, int]:
        """Bytes of one quantized weight (data and scales), by stored dtype; the bias keeps `dtype`."""
        raise NotImplementedError

    # ---------------------------------------------------------------------- materializing
    def quantize(self, spec: Any, model: nn.Module, paths: tuple[str, ...] = ()) -> nn.Module:
        """Quantize exactly the modules at `paths` of a loaded model, in place."""
        return model

    def on_load_config(self, spec: Any, model_dtype: str, skip: list[str]) -> Any | None:
        """transformers' quantization config that quantizes while loading a checkpoint (every
        weight-bearing module but `skip`), so that the whole model never exists unquantized in
        memory; None: this backend quantizes after loading (`quantize`)."""
        return None

    def after_load(self, spec: Any, model_dtype: str, model: nn.Module, paths: tuple[str, ...]) -> None:
        """Settings `quantize` gives its layers, applied to layers that transformers quantized or
        read quantized from a checkpoint."""

    # ------------------------------------------------------------ checkpoints saved quantized
    def stores(self, stored: dict[str, Any]) -> bool:
        """Whether a checkpoint whose config.json has this `quantization_config` holds this
        backend's layers (transformers then reads them as stored: nothing is quantized again)."""
        return False

    def checkpoint_spec(self, spec: Any, stored: dict[str, Any]) -> SpecNode:
        """`spec` with the fields a checkpoint that `stores` fixes (how its weights are stored)
        taken from its `quantization_config`; run settings (compute dtype, threshold) stay the spec's."""
        return spec

    # ------------------------------------------------------------------ live quantized layers
    library: ClassVar[str] = ""  # top-level module whose presence in sys.modules `owns` needs

    def owns(self, module: nn.Module) -> bool:
        """Whether a live module is a layer this backend quantized."""
        return bool(self.library) and self.library in sys.modules and self._owns(module)

    def _owns(self, module: nn.Module) -> bool:
        return False

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """The layer's weight as a float32 tensor (out, in)."""
        raise NotImplementedError

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        """Store a new float weight (out, in) in the layer, quantized like the old one."""
        raise NotImplementedError

    def frozen_linear(self, module: nn.Module) -> FrozenLinear | None:
        """The layer's frozen product for a fused adapter node, or None where this backend (or
        this layer's state) offers none: the adapter then calls the layer."""
        return None

    def snapshot(self, module: nn.Module) -> Any:
        """What `restore` needs to put the layer's stored weight back exactly (taken before a merge;
        `requantize` installs a new weight object, so keeping the old one is enough)."""
        return module.weight

    def restore(self, module: nn.Module, snapshot: Any) -> None:
        module.weight = snapshot

    def spec_of(self, module: nn.Module, skip_modules: tuple[str, ...]) -> SpecNode:
        """A spec describing how a live layer was quantized (for adapters loaded onto it)."""
        return self.schema(skip_modules=list(skip_modules))

    def stored_bytes(self, module: nn.Module) -> dict[str, int]:
        """Bytes a live quantized layer's weight occupies, by stored dtype (what weight_bytes predicts)."""
        raise NotImplementedError


def _installed(module: str) -> bool:
    """Whether a module can be imported, without importing it (its parent package at most)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


def backend_of(module: nn.Module) -> QuantBackend | None:
    """The backend that quantized this live layer, or None for a plain layer."""
    from peftc.config.registry import QUANT_BACKENDS

    for backend in QUANT_BACKENDS.all().values():
        if backend.owns(module):
            return backend
    return None


def dequantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model` with every quantized layer replaced by an nn.Linear holding its weight dequantized
    to `dtype`, and transformers' record of the quantization dropped, so that `save_pretrained`
    writes a plain model (a checkpoint saved quantized has no other weights)."""
    from torch import nn

    from peftc.planning.graph import replace_module

    for path, layer in list(model.named_modules()):
        backend = backend_of(layer)
        if backend is None:
            continue
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight = nn.Parameter(backend.dequantize(layer).to(dtype), requires_grad=False)
        if layer.bias is not None:
            plain.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
        replace_module(model, path, plain)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model


def tensor_bytes(*tensors: torch.Tensor | None) -> dict[str, int]:
    """Bytes of plain tensors by dtype name (helper for stored_bytes)."""
    sizes: dict[str, int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        name = str(tensor.dtype).replace("torch.", "")
        sizes[name] = sizes.get(name, 0) + tensor.numel() * tensor.element_size()
    return sizes


def add_bytes(*parts: dict[str, int]) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in parts:
        for dtype, size in part.items():
            total[dtype] = total.get(dtype, 0) + size
    return total


def leaf_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold a (possibly nested) tensor subclass's data: quanto's and
    torchao's quantized weights are wrapper tensors whose storage lives in inner tensors."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is None:
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [leaf for name in names for leaf in leaf_tensors(getattr(tensor, name))]
