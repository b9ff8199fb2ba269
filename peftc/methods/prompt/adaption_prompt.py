"""Adaption prompt (LLaMA-Adapter, Zhang et al. 2023): the top `adapter_layers` attention layers
also attend to `adapter_len` learned prompt tokens A, through a zero-initialised gate g:

  out = attn(x) + W_o( g * softmax(q K_A^T / sqrt(d)) V_A ),   K_A = W_k A,  V_A = W_v A

with q the layer's own (rotary-embedded) queries, the softmax in float32 over the prompt
tokens only, and grouped-query K_A / V_A repeated per query head. g = 0 at the start, so the
untrained adapter is an exact no-op. GPT-2 layouts take K_A, V_A from the fused c_attn and add
the result without an output projection (peft's definition).

Why an injectable method and not a prompt encoder: the prompt lives inside chosen attention
modules and needs their projections and queries, so it is a wrapper around each attention
module (an AdapterLayer), which brings peft's saved names (`<attn>.adaption_prompt`,
`<attn>.adaption_gate`), per-adapter lifecycle and disabling for free. It cannot be merged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftc.config.spec import SpecNode, at_least, param
from peftc.errors import PlanError
from peftc.methods import register
from peftc.methods.base import InjectableMethod, not_mergeable
from peftc.methods.common import integer
from peftc.methods.layer import AdapterLayer
from peftc.planning.graph import ModelGraph, ModuleInfo
from peftc.planning.plan import Plan, Site

# model_type -> (attention module name, layout); peft supports exactly these.
ATTENTION = {"llama": ("self_attn", "llama"), "mistral": ("self_attn", "llama"), "gpt2": ("attn", "gpt2")}


@dataclass
class AdaptionPromptSpec(SpecNode):
    adapter_len: int = param(10, "Learned prompt tokens per adapted attention layer.", at_least(1))
    adapter_layers: int = param(1, "Adapt the last N attention layers.", at_least(1))
    target_modules: str | None = param(
        None, "Name of the attention modules; null: self_attn (Llama, Mistral) or attn (GPT-2)."
    )


class AdaptionPromptLayer(AdapterLayer):
    adapter_containers = ("adaption_prompt", "adaption_gate")

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__(base_layer, kind)
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()

    def create_adapter(self, name: str, site: Site, init: bool) -> None:
        ref = next(self.base_layer.parameters())
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        # Drawn in the base dtype as peft draws it (the same numbers), then kept in float32 over a
        # half-precision base, as peft's autocast_adapter_dtype keeps its other adapters: the
        # optimizer's updates must not round away in bf16 (peft 0.21 leaves this one in bf16).
        master = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        prompt = torch.empty(site.tensors["adaption_prompt"], device=ref.device, dtype=dtype).normal_()
        self.adaption_prompt[name] = nn.Parameter(prompt.to(master))
        self.adaption_gate[name] = nn.Parameter(
            torch.zeros(site.tensors["adaption_gate"], device=ref.device, dtype=master)
        )

    def merge(self, names: Sequence[str] | None = None) -> list[str]:
        if names is None or any(n in self.site_options for n in names):
            raise not_mergeable("adaption_prompt")
        return []

    def merge_is_finite(self, names: Sequence[str]) -> bool:
        raise not_mergeable("adaption_prompt")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.base_layer(*args, **kwargs)
        active = [n for n in self.active_adapters if n in self.site_options]
        if self.disabled or not active:
            return output
        hidden = args[0] if args else kwargs["hidden_states"]
        attn_output, *rest = output
        for name in active:
            attn_output = attn_output + self.adapter_output(name, hidden, kwargs).to(attn_output.dtype)
        return (attn_output, *rest)

    def adapter_output(self, name: str, hidden: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
        opts = self.site_options[name]
        heads, kv_heads, head_dim = opts["num_heads"], opts["kv_heads"], opts["head_dim"]
        attn, prompt = self.base_layer, self.adaption_prompt[name].to(hidden.dtype)  # float32 over a bf16 base
        batch, length = hidden.shape[:2]
        if opts["layout"] == "gpt2":
            embed = attn.embed_dim
            _, keys, values = attn.c_attn(prompt).split(embed, dim=2)
            query = attn.c_attn(hidden).split(embed, dim=2)[0]
            query = query.view(batch, length, heads, head_dim).transpose(1, 2)
        else:
            keys, values = attn.k_proj(prompt), attn.v_proj(prompt)
            query = attn.q_proj(hidden).view(batch, length, heads, head_dim).transpose(1, 2)
            cos, sin = kwargs["position_embeddings"]
            query = query * cos.unsqueeze(1) + _rotate_half(query) * sin.unsqueeze(1)
        repeat = heads // kv_heads
        keys = _heads(keys, kv_heads, head_dim, batch).repeat_interleave(repeat, dim=1)
        values = _heads(values, kv_heads, head_dim, batch).repeat_interleave(repeat, dim=1)
        dtype = query.dtype
        scores = query @ keys.transpose(2, 3).to(dtype) / math.sqrt(head_dim)
        gate = self.adaption_gate[name].to(dtype)
        probs = gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        mixed = (probs @ values.to(dtype)).transpose(1, 2).reshape(batch, length, -1)
        return mixed if opts["layout"] == "gpt2" else attn.o_proj(mixed)


def _heads(states: torch.Tensor, heads: int, head_dim: int, batch: int) -> torch.Tensor:
    """(1, L, heads*head_dim) -> (batch, heads, L, head_dim)."""
    return states.view(1, -1, heads, head_dim).expand(batch, -1, -1, -1).transpose(1, 2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


@register
class AdaptionPrompt(InjectableMethod):
    name = "adaption_prompt"
    peft_type = "ADAPTION_PROMPT"
    schema = AdaptionPromptSpec
    layer_class = AdaptionPromptLayer
    supported_kinds = frozenset({"container"})
    default_targets = {model_type: (module,) for model_type, (module, _) in ATTENTION.items()}
    tensor_prefix = "adaption_"
    mergeable = False

    def target_request(self, spec: AdaptionPromptSpec) -> Any:
        from peftc.planning.targets import TargetRequest

        # peft names one attention module (matched as a dotted suffix), never a regex.
        targets = None if spec.target_modules is None else [spec.target_modules]
        return TargetRequest(target_modules=targets)

    def select_targets(
        self, spec: AdaptionPromptSpec, modules: Sequence[ModuleInfo], graph: ModelGraph
    ) -> list[ModuleInfo]:
        if spec.adapter_layers > len(modules):
            raise PlanError(
                "peft.adapter_layers",
                spec.adapter_layers,
                f"{graph.model_class} has {len(modules)} attention layers named '{modules[0].leaf_name}'",
                f"use at most {len(modules)}",
            )
        return list(modules)[-spec.adapter_layers :]

    def plan_site(self, spec: AdaptionPromptSpec, module: ModuleInfo, graph: ModelGraph) -> Site:
        facts = graph.facts
        layout = ATTENTION[graph.model_type][1]
        options = {
            "layout": layout,
            "num_heads": facts.num_attention_heads,
            "kv_heads": facts.num_key_value_heads or facts.num_attention_heads,
            "head_dim": facts.head_dim or facts.hidden_size // facts.num_attention_heads,
            "adapter_len": spec.adapter_len,
        }
        tensors = {"adaption_prompt": (1, spec.adapter_len, facts.hidden_size), "adaption_gate": (1,)}
        return Site(module.path, module.kind, module.class_name, None, None, tensors, options)

    def peft_config(self, spec: AdaptionPromptSpec, plan: Plan) -> dict[str, Any]:
        target = spec.target_modules or ATTENTION[plan.model.model_type][0]
        return {"target_modules": target, "adapter_len": spec.adapter_len, "adapter_layers": spec.adapter_layers}

    def spec_from_peft_config(self, config: Mapping[str, Any]) -> AdaptionPromptSpec:
        return AdaptionPromptSpec(
            adapter_len=integer(config, "adapter_len", 10),
            adapter_layers=integer(config, "adapter_layers", 1),
            target_modules=config.get("target_modules"),
        )
