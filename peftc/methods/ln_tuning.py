"""LN tuning: every targeted normalization layer runs as a trained full copy of itself,
y = norm'(x), where norm' starts as an exact copy of norm (weight, and bias where it has one).

As peft's LNTuningLayer (0.21.2 and 0.22.0): one copy per adapter, saved as `<layer>.ln_tuning_layers.weight`
(and `.bias`); only one adapter runs or merges at a time (two active adapters are refused);
merging puts the copy's values in the base layer and unmerging puts the originals back, exactly.
peftc's differences: the copy trains in float32 (peftc's adapter dtype; peft keeps the base dtype)
and hands the rest of the model the input's dtype; safe_merge refuses a non-finite copy (peft
ignores safe_merge here); only normalization layers are targeted (peft copies any module).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftc.errors import ConfigError, MergeError, PlanError
from peftc.methods import register
from peftc.methods.base import InjectableMethod
from peftc.methods.common import TargetsSpec, target_fields, target_kwargs
from peftc.methods.layer import AdapterLayer
from peftc.planning.graph import ModelGraph, ModuleInfo
from peftc.planning.plan import Plan, Site

CONTAINER = "ln_tuning_layers"

# peft 0.22.0's TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING, less llava: its entry also
# copies the projector, the embeddings and the head in full, and peftc copies only norms.
LN_TUNING_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("input_layernorm", "post_attention_layernorm", "norm"),
    "bloom": ("input_layernorm", "post_attention_layernorm", "ln_f"),
    "t5": ("layer_norm", "final_layer_norm"),
    "mt5": ("layer_norm", "final_layer_norm"),
    "bart": ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"),
    "gpt2": ("ln_1", "ln_2", "ln_f"),
    "blip-2": ("layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"),
    "gptj": ("ln_1", "ln_f"),
    "falcon": ("input_layernorm", "post_attention_layernorm", "ln_f"),
    "mistral": ("input_layernorm", "post_attention_layernorm", "norm"),
    "phi": ("input_layernorm", "final_layernorm"),
    "gemma": ("input_layernorm", "post_attention_layernorm", "norm"),
    "gemma2": (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        "norm",
    ),
    "gemma3_text": (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        "norm",
    ),
    "qwen2": ("post_attention_layernorm",),
    "qwen3": ("post_attention_layernorm",),
}


@dataclass
class LNTuningSpec(TargetsSpec):
    """peft's LNTuningConfig has only the target fields: the copies have nothing to configure."""


class LNTuningLayer(AdapterLayer):
    adapter_containers = (CONTAINER,)

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__(base_layer, kind)
        self.ln_tuning_layers = nn.ModuleDict()

    def create_adapter(self, name: str, site: Site, init: bool) -> None:
        tuned = copy.deepcopy(self.base_layer).float()
        with torch.no_grad():  # while another adapter is merged, the base holds its values, not the originals
            for pname, param in tuned.named_parameters():
                if pname in self._premerge:
                    param.copy_(self._premerge[pname])
        self.ln_tuning_layers[name] = tuned

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled or self.merged_adapters or not self.active_adapters:
            return super().forward(x, *args, **kwargs)
        if len(self.active_adapters) > 1:
            raise ConfigError(
                "adapter_names",
                list(self.active_adapters),
                "LN tuning runs one adapter at a time (as peft)",
                "set_adapter(<one name>)",
            )
        return self.ln_tuning_layers[self.active_adapters[0]](x, *args, **kwargs).to(x.dtype)

    def check_mergeable(self, names: Sequence[str]) -> None:
        if len(names) > 1:
            raise MergeError(f"LN tuning merges one adapter at a time (as peft), not {list(names)}; name one")

    def merge_targets(self, names: Sequence[str]) -> tuple[str, ...]:
        return ()  # merge_one keeps the originals itself: a copy's values replace them, no arithmetic undoes that

    @torch.no_grad()
    def merge_one(self, name: str) -> float:
        if self.merged_adapters:
            warnings.warn(f"Already merged with {set(self.merged_adapters)}. Unmerging first.", stacklevel=3)
            self.unmerge()
        tuned = dict(self.ln_tuning_layers[name].named_parameters())
        for pname, param in self.base_layer.named_parameters():
            self._premerge.setdefault(pname, param.data)  # AdapterLayer.unmerge puts these back
            param.data = tuned[pname].data.to(param.dtype, copy=True)
        return 0.0

    @torch.no_grad()
    def merge_is_finite(self, names: Sequence[str]) -> bool:
        return all(
            bool(torch.isfinite(param).all())
            for name in names
            if name in self.ln_tuning_layers and name not in self.merged_adapters
            for param in self.ln_tuning_layers[name].parameters()
        )


@register
class LNTuning(InjectableMethod):
    name = "ln_tuning"
    peft_type = "LN_TUNING"
    schema = LNTuningSpec
    layer_class = LNTuningLayer
    supported_kinds = frozenset({"norm"})
    default_targets = LN_TUNING_TARGETS
    tensor_prefix = "ln_tuning_"

    def plan_site(self, spec: LNTuningSpec, module: ModuleInfo, graph: ModelGraph) -> Site:
        if not module.params:
            raise PlanError(
                "peft.target_modules",
                module.leaf_name,
                f"matches {module.path} ({module.class_name}), which has no parameters to tune",
                "target normalization layers with a weight (elementwise_affine=True)",
            )
        tensors = {f"{CONTAINER}.{pname}": shape for pname, shape in module.params}
        return Site.for_module(module, tensors)

    def peft_config(self, spec: LNTuningSpec, plan: Plan) -> dict[str, Any]:
        return target_fields(spec, plan, LN_TUNING_TARGETS)

    def spec_from_peft_config(self, config: Mapping[str, Any]) -> LNTuningSpec:
        return LNTuningSpec(**target_kwargs(config, layered=False))
