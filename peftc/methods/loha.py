"""LoHa (LyCORIS): y = W x + dW x, dW = (alpha / r) * (W1a W1b) ⊙ (W2a W2b).

The Hadamard product of two rank-r products reaches rank r^2 with 2 r (in + out) parameters.
Default init: W1a, W1b, W2a Kaiming-uniform and W2b zero, an exact no-op; init_weights=false
makes all four random. See `lycoris.py` for dropout and merging.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from peftc.graph import ModuleInfo
from peftc.methods import register
from peftc.methods.lycoris import LycorisLayer, LycorisMethod, LycorisSpec
from peftc.spec import param


@dataclass
class LoHaSpec(LycorisSpec):
    init_weights: bool = param(True, "true: W2b starts at zero (no-op); false: all factors random (not a no-op).")


class LoHaLayer(LycorisLayer):
    adapter_containers = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def zero_initialised(self, suffix: str, init: Any) -> bool:
        return init is True and suffix == "hada_w2_b"

    def product(self, name: str) -> torch.Tensor:
        first = self.hada_w1_a[name] @ self.hada_w1_b[name]
        second = self.hada_w2_a[name] @ self.hada_w2_b[name]
        return first * second


@register
class LoHa(LycorisMethod):
    name = "loha"
    peft_type = "LOHA"
    schema = LoHaSpec
    layer_class = LoHaLayer
    tensor_prefix = "hada_"
    rank_dropout_scale = True  # peft's LoHa always rescales the kept rows

    def site_tensors(self, spec: LoHaSpec, module: ModuleInfo, r: int) -> tuple[dict[str, tuple[int, ...]], dict]:
        out_f, in_f = module.out_features, module.in_features
        tensors = {"hada_w1_a": (out_f, r), "hada_w1_b": (r, in_f), "hada_w2_a": (out_f, r), "hada_w2_b": (r, in_f)}
        return tensors, {}

    def spec_from_peft_config(self, config: Mapping[str, Any]) -> LoHaSpec:
        return LoHaSpec(**self.spec_kwargs(config), init_weights=bool(config.get("init_weights", True)))
