"""Prefix tuning (Li & Liang 2021): every self-attention layer l attends to n learned key/value
positions before the real tokens, softmax(q [K_l; K]^T / sqrt(d)) [V_l; V].

The prefix table T (n x layers*2*token_dim, token_dim = kv_heads * head_dim) is learned
directly, or reparametrised (`prefix_projection`) as T = W2 tanh(W1 E + b1) + b2 from a
smaller table E (n x token_dim) through a hidden width h = encoder_hidden_size. peft saves T
(projection applied) as `prompt_embeddings`. `init_weights: zero` starts T (or W2, b2) at zero.
Run-time injection through transformers' cache: see kv_prefix.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftc.config.spec import at_least, one_of, param
from peftc.methods import register
from peftc.methods.common import flag
from peftc.methods.prompt.kv_prefix import PrefixEncoder
from peftc.methods.prompt.shared import PromptLearningMethod, PromptLearningSpec, PromptShapes
from peftc.planning.plan import Plan, PromptPlan


@dataclass
class PrefixTuningSpec(PromptLearningSpec):
    prefix_projection: bool = param(False, "Reparametrise the prefix through a two-layer tanh MLP.")
    encoder_hidden_size: int | None = param(
        None, "Hidden width of the projection MLP; null: the prefix token dim (kv_heads x head_dim).", at_least(1)
    )
    init_weights: str | None = param(
        None, "null: random N(0, 1) prefix; 'zero': start the prefix at zero.", one_of("zero")
    )


class PrefixTable(PrefixEncoder):
    """peft's PrefixEncoder: `embedding` (+ `transform` when projecting, outside inference_mode)."""

    def __init__(self, prompt: PromptPlan, base_model: nn.Module) -> None:
        super().__init__(prompt)
        opts = prompt.options
        width = self.num_layers * 2 * self.token_dim
        self.prefix_projection = bool(opts["prefix_projection"]) and not self.inference_mode
        if self.prefix_projection:
            hidden = opts["encoder_hidden_size"]
            self.embedding = nn.Embedding(self.num_virtual_tokens, self.token_dim)
            self.transform = nn.Sequential(nn.Linear(self.token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
            if opts["init_weights"] == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(self.num_virtual_tokens, width)
            if opts["init_weights"] == "zero":
                nn.init.zeros_(self.embedding.weight)

    def prefix_table(self) -> torch.Tensor:
        if self.prefix_projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prefix_table().detach()}

    def load_saved(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if self.prefix_projection:
            raise ValueError("a saved prefix has the projection applied; load it with inference_mode=true")
        self._copy_into(self.embedding.weight, tensors["prompt_embeddings"], "prompt_embeddings")


@register
class PrefixTuning(PromptLearningMethod):
    name = "prefix_tuning"
    peft_type = "PREFIX_TUNING"
    schema = PrefixTuningSpec
    encoder_class = PrefixTable
    uses_prefix = True

    def encoder_label(self, spec: PrefixTuningSpec) -> str:
        projected = spec.prefix_projection and not spec.inference_mode
        return "PrefixEncoder (projection)" if projected else "PrefixEncoder"

    def encoder_tensors(
        self, spec: PrefixTuningSpec, shapes: PromptShapes, total_tokens: int
    ) -> dict[str, tuple[int, ...]]:
        n, dim = spec.num_virtual_tokens, shapes.token_dim
        width = shapes.num_layers * 2 * dim
        if not spec.prefix_projection or spec.inference_mode:
            return {"embedding.weight": (n, width)}
        hidden = spec.encoder_hidden_size or dim
        return {
            "embedding.weight": (n, dim),
            "transform.0.weight": (hidden, dim),
            "transform.0.bias": (hidden,),
            "transform.2.weight": (width, hidden),
            "transform.2.bias": (width,),
        }

    def encoder_options(self, spec: PrefixTuningSpec, shapes: PromptShapes, run: Any) -> dict[str, Any]:
        return {
            "prefix_projection": spec.prefix_projection,
            "encoder_hidden_size": spec.encoder_hidden_size or shapes.token_dim,
            "init_weights": spec.init_weights,
        }

    def saved_prompt_tensors(self, prompt: PromptPlan) -> dict[str, tuple[int, ...]]:
        return {"prompt_embeddings": (prompt.num_virtual_tokens, prompt.num_layers * 2 * prompt.token_dim)}

    def method_config(self, spec: PrefixTuningSpec, plan: Plan) -> dict[str, Any]:
        return {
            "prefix_projection": spec.prefix_projection,
            "encoder_hidden_size": plan.prompt.options["encoder_hidden_size"],
            "init_weights": spec.init_weights,
        }

    def method_spec_fields(self, config: Mapping[str, Any]) -> dict[str, Any]:
        init = config.get("init_weights")
        return {
            "prefix_projection": flag(config, "prefix_projection", False),
            "encoder_hidden_size": config.get("encoder_hidden_size"),
            "init_weights": init if init == "zero" else None,
        }
