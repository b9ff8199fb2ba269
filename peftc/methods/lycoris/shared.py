"""What the LyCORIS methods (LoHa, LoKr) share: y = W x + dW x with dW = (alpha / r) * P, where
P is a method-specific product of small factors (LoHa: a Hadamard product of two low-rank
products; LoKr: a Kronecker product), reshaped to W's shape. On a Linear the layer computes
dW x from the factors without forming dW where that is cheaper (`factored_output`: always for
LoKr, for LoHa while r^2 (in + out) < in * out): forming dW costs an out x in product per step
and a second GEMM of the base's size per token. Otherwise it materializes dW and applies it with
F.linear, or the base convolution's own _conv_forward (its stride, padding, padding_mode,
dilation and groups, as peft 0.22). For convolutions the factors span (in / groups) * kernel
columns, or, with `use_effective_conv2d` and a kernel larger than 1, a CP form: a small
r x r x kernel core between an output and an input factor.

Training-only regularisers, as in peft: `module_dropout` skips the whole adapter for a step
with probability p; `rank_dropout` zeroes each output row of dW with probability p (LoHa
rescales the kept rows by 1 / their mean, LoKr only with `rank_dropout_scale`); from the
factors, the same mask multiplies the outputs of dW x. Merging adds
dW to W; unmerging subtracts it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftc.config.spec import RunSpec, at_least, greater_than, in_range, mapping_of, param
from peftc.errors import ConfigError
from peftc.methods.base import InjectableMethod
from peftc.methods.common import (
    LayeredTargetsSpec,
    check_patterns,
    flag,
    integer,
    number,
    pattern_value,
    real,
    target_fields,
    target_kwargs,
)
from peftc.methods.defaults import LORA_TARGETS
from peftc.methods.layer import AdapterLayer
from peftc.planning.graph import ModelGraph, ModuleInfo
from peftc.planning.plan import Plan, Site


@dataclass
class LycorisSpec(LayeredTargetsSpec):
    r: int = param(8, "Rank of the factors.", at_least(1))
    alpha: float = param(8, "Scale numerator: the update is multiplied by alpha / r.", greater_than(0))
    rank_dropout: float = param(
        0.0, "Training only: drop each output row of the update with this probability.", in_range(0.0, 1.0)
    )
    module_dropout: float = param(
        0.0, "Training only: skip the whole adapter for a step with this probability.", in_range(0.0, 1.0)
    )
    rank_pattern: Any = param(
        None,
        "Per-module rank overrides {regex matched at the end of the module path: rank}, e.g. {q_proj: 16}.",
        mapping_of(int, "ranks"),
    )
    alpha_pattern: Any = param(None, "Per-module alpha overrides {regex: alpha}.", mapping_of((int, float), "alphas"))
    use_effective_conv2d: bool = param(
        False, "Convolutions with a kernel > 1: factor through an r x r x kernel core (CP form, FedPara)."
    )

    init_choices: ClassVar[tuple[Any, ...]] = (True, False)

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        init = getattr(self, "init_weights", True)
        if init not in self.init_choices or (isinstance(init, int) and not isinstance(init, bool)):
            raise ConfigError(
                f"{key}.init_weights",
                init,
                "is not a supported initialisation",
                "use " + ", ".join(repr(c) for c in self.init_choices),
            )
        check_patterns(key, self.rank_pattern, self.alpha_pattern)


class LycorisLayer(AdapterLayer):
    """Creates each planned tensor as a Parameter in the ParameterDict of the same name and adds
    dW x to the base output. Subclasses give `product(name)` and the initialisation rule."""

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__(base_layer, kind)
        for attr in self.adapter_containers:
            setattr(self, attr, nn.ParameterDict())

    def zero_initialised(self, suffix: str, init: Any) -> bool:
        """Whether this tensor starts at zero under the configured init (the rest: Kaiming-uniform)."""
        raise NotImplementedError

    def product(self, name: str) -> torch.Tensor:
        """The unscaled update P, shaped like the base weight."""
        raise NotImplementedError

    def create_adapter(self, name: str, site: Site, init: bool) -> None:
        device = self.base_layer.weight.device
        for suffix, shape in site.tensors.items():
            tensor = torch.empty(shape, device=device)
            if init and self.zero_initialised(suffix, site.options["init"]):
                nn.init.zeros_(tensor)
            else:
                nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
            getattr(self, suffix)[name] = nn.Parameter(tensor)

    def factored_output(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """x P^T for a Linear, computed from the factors without forming P; None where forming P
        is cheaper or the adapter's form has no such path."""
        return None

    def delta_weight(self, name: str) -> torch.Tensor:
        product = self.product(name)
        if self.kind != "linear":  # conv factors span (in / groups) * kernel columns
            product = product.reshape(self.base_layer.weight.shape)  # (a quantized Linear's is packed)
        return product * self.site_options[name]["scaling"]

    def adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        options = self.site_options[name]
        # peft draws the module-dropout number on every training step, also with module_dropout=0:
        # drawing it likewise keeps the rank-dropout masks after it on peft's random stream. At 0
        # the number is not read (peft skips the adapter only if it draws exactly 0.0, p = 2^-24):
        # reading it (.item()) would break a compiled block's graph at every LyCORIS layer.
        if self.training:
            draw = torch.rand(1)
            if options["module_dropout"] > 0 and draw.item() <= options["module_dropout"]:
                return result
        if self.kind == "linear":
            update = self.factored_output(name, x)
            if update is not None:  # dropping rows of dW is dropping those outputs of dW x
                update = update * options["scaling"]
                if self.training and options["rank_dropout"] > 0:
                    update = update * self._row_mask(options, update.shape[-1], update)
                return result + update  # rounded once, in AdapterLayer.forward
        delta = self.delta_weight(name)
        if self.training and options["rank_dropout"] > 0:
            mask = self._row_mask(options, delta.shape[0], delta)
            delta = delta * mask.view(-1, *[1] * (delta.dim() - 1))
        x = x.to(delta.dtype)
        if self.kind == "linear":
            return result + F.linear(x, delta)
        return result + self.base_layer._conv_forward(x, delta, None)

    @staticmethod
    def _row_mask(options: Mapping[str, Any], rows: int, like: torch.Tensor) -> torch.Tensor:
        """Which of dW's `rows` (output features) rank dropout keeps, as peft draws them."""
        keep = (torch.rand(rows, device=like.device) > options["rank_dropout"]).to(like.dtype)
        if options["rank_dropout_scale"]:
            keep = keep / keep.mean().clamp_min(1e-12)  # all rows dropped: the update is zero anyway
        return keep


class LycorisMethod(InjectableMethod):
    """Planning and files of a LyCORIS method; subclasses give `site_tensors` and their fields."""

    supported_kinds = frozenset({"linear", "conv1d", "conv2d"})
    default_targets = LORA_TARGETS  # peft copies LoRA's table for LoHa and LoKr
    rank_dropout_scale: ClassVar[bool] = True
    wraps_quantized = True  # base(x) + F.linear(x, delta); merges add delta_weight

    def site_tensors(self, spec: Any, module: ModuleInfo, r: int) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
        """Planned tensors and extra options of one site."""
        raise NotImplementedError

    def plan_site(self, spec: Any, module: ModuleInfo, graph: ModelGraph) -> Site:
        r = pattern_value(module.path, spec.rank_pattern or {}, spec.r)
        alpha = pattern_value(module.path, spec.alpha_pattern or {}, spec.alpha)
        tensors, extra = self.site_tensors(spec, module, r)
        options = {
            "r": r,
            "alpha": alpha,
            "scaling": alpha / r,
            "rank_dropout": spec.rank_dropout,
            "module_dropout": spec.module_dropout,
            "rank_dropout_scale": getattr(spec, "rank_dropout_scale", self.rank_dropout_scale),
            "init": spec.init_weights,
            **extra,
        }
        return Site.for_module(module, tensors, options)

    def peft_config(self, spec: Any, plan: Plan) -> dict[str, Any]:
        return {
            **target_fields(spec, plan, self.default_targets),
            "r": spec.r,
            "alpha": number(spec.alpha),
            "rank_dropout": spec.rank_dropout,
            "module_dropout": spec.module_dropout,
            "use_effective_conv2d": spec.use_effective_conv2d,
            "init_weights": spec.init_weights,
            "rank_pattern": dict(spec.rank_pattern or {}),
            "alpha_pattern": {p: number(v) for p, v in (spec.alpha_pattern or {}).items()},
        }

    def spec_kwargs(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The shared fields of a spec, read from a peft adapter_config.json."""
        return {
            **target_kwargs(config),
            "r": integer(config, "r", 8),
            "alpha": real(config, "alpha", 8),
            "rank_dropout": real(config, "rank_dropout", 0.0),
            "module_dropout": real(config, "module_dropout", 0.0),
            "rank_pattern": dict(config.get("rank_pattern") or {}),
            "alpha_pattern": dict(config.get("alpha_pattern") or {}),
            "use_effective_conv2d": flag(config, "use_effective_conv2d", False),
        }


def conv_geometry(spec: Any, module: ModuleInfo) -> tuple[int, tuple[int, ...], bool]:
    """(input channels per group, kernel, whether the CP form applies) of a conv site;
    (in_features, (), False) for a Linear."""
    if module.kind == "linear":
        return module.in_features, (), False
    kernel = tuple(module.get("kernel_size"))
    effective = spec.use_effective_conv2d and any(k != 1 for k in kernel)
    return module.in_features // module.get("groups", 1), kernel, effective


def core_shape(r: int, kernel: tuple[int, ...]) -> tuple[int, ...]:
    """The CP core: r x r x kernel (a Conv1d kernel k is stored as k x 1, as peft does)."""
    return (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)


def kernel_size(kernel: tuple[int, ...]) -> int:
    return math.prod(kernel) if kernel else 1
