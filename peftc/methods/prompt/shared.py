"""What the prompt-learning methods share: the common schema fields, the shapes every prompt
encoder derives from the model config, and the Method side that plans, builds, saves and loads
a prompt encoder (prompt tuning, P-tuning, prefix tuning, multitask prompt tuning).

Shapes follow peft's `_prepare_prompt_learning_config`, read from the model's ModelFacts:
  virtual tokens  token_dim = hidden size, heads = attention heads, layers = hidden layers
  prefixes        token_dim = kv_heads * head_dim and heads = kv_heads (grouped-query models
                  cache fewer heads), layers = the layers whose self-attention receives the
                  prefix (the decoder's, for encoder-decoders)
  num_transformer_submodules = 2 for SEQ_2_SEQ_LM (peft allocates twice the virtual tokens), else 1
The user never types these; the plan shows them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from peftc.config.spec import SpecNode, as_list, at_least, param
from peftc.errors import PlanError
from peftc.methods.base import PromptMethod
from peftc.methods.common import flag, integer
from peftc.planning.plan import PromptPlan

if TYPE_CHECKING:
    from torch import nn

    from peftc.config.spec import RunSpec
    from peftc.methods.prompt.encoder import PromptEncoder
    from peftc.planning.graph import ModelGraph
    from peftc.planning.plan import Plan
    from peftc.tasks.base import Task


@dataclass
class PromptLearningSpec(SpecNode):
    num_virtual_tokens: int = param(8, "Virtual tokens (or prefix positions) the prompt adds.", at_least(1))
    inference_mode: bool = param(
        False,
        "Keep only the saved prompt (the encoder's output) as a fixed table, as peft does for a loaded "
        "adapter: P-tuning's MLP/LSTM and the prefix projection are not built. load_adapter sets it.",
    )
    modules_to_save: Any = param(None, "Extra modules trained in full and saved whole (e.g. a new head).")


@dataclass(frozen=True)
class PromptShapes:
    token_dim: int
    num_layers: int
    num_attention_heads: int
    head_dim: int
    num_transformer_submodules: int


def prompt_shapes(graph: ModelGraph, task: Task, *, prefix: bool) -> PromptShapes:
    """Every prompt-encoder shape, from the model config (see the module docstring)."""
    facts = graph.facts
    missing = [
        name
        for name, value in (
            ("hidden size", facts.hidden_size),
            ("number of layers", facts.num_layers),
            ("number of attention heads", facts.num_attention_heads),
        )
        if not value
    ]
    if missing:
        raise PlanError(
            "model",
            graph.model_class,
            f"its config does not give the {' / '.join(missing)} a prompt encoder is sized from",
            "use a transformers model whose config has hidden_size, num_hidden_layers and num_attention_heads",
        )
    submodules = 2 if task.task_type == "SEQ_2_SEQ_LM" else 1
    head_dim = facts.head_dim or facts.hidden_size // facts.num_attention_heads
    if not prefix:
        return PromptShapes(facts.hidden_size, facts.num_layers, facts.num_attention_heads, head_dim, submodules)
    if not graph.takes_cache:
        # peft refuses these at the first forward; passed anyway, the prefix would be dropped
        # (ModernBERT: training changes nothing) or break the attention mask (DeBERTa-v2).
        raise PlanError(
            "peft",
            "prefix_tuning",
            f"{graph.model_class} takes no cache (past keys and values), which is where prefix tuning puts its prefix",
            "use peft=prompt_tuning or peft=p_tuning (virtual tokens in the input embeddings)",
        )
    kv_heads = facts.num_key_value_heads or facts.num_attention_heads
    layers = facts.num_decoder_layers if facts.is_encoder_decoder and facts.num_decoder_layers else facts.num_layers
    return PromptShapes(kv_heads * head_dim, layers, kv_heads, head_dim, submodules)


class PromptLearningMethod(PromptMethod):
    """peft's prompt-learning family (prompt, p-, prefix and multitask prompt tuning): virtual
    tokens from an encoder whose shapes derive from the model config; subclasses give the
    encoder and its tensors."""

    uses_prefix: ClassVar[bool] = False  # key/value prefixes instead of virtual-token embeddings
    encoder_class: ClassVar[type[PromptEncoder]]

    # ------------------------------------------------------------------ subclass hooks
    def encoder_tensors(self, spec: Any, shapes: PromptShapes, total_tokens: int) -> dict[str, tuple[int, ...]]:
        """The encoder's parameters (peft's in-memory names) and shapes."""
        raise NotImplementedError

    def encoder_label(self, spec: Any) -> str:
        return self.encoder_class.__name__

    def encoder_options(self, spec: Any, shapes: PromptShapes, run: RunSpec) -> dict[str, Any]:
        """Method settings the encoder needs at build time (init choice, hidden sizes, ...)."""
        return {}

    def method_config(self, spec: Any, plan: Plan) -> dict[str, Any]:
        """adapter_config.json fields of this method beyond the common prompt-learning ones."""
        return {}

    def method_spec_fields(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Our schema's method fields from a peft adapter_config.json."""
        return {}

    # --------------------------------------------------------------------------- planning
    def plan_prompt(self, spec: Any, graph: ModelGraph, task: Task, run: RunSpec) -> PromptPlan:
        shapes = prompt_shapes(graph, task, prefix=self.uses_prefix)
        total = spec.num_virtual_tokens * shapes.num_transformer_submodules
        options = {
            "task_type": task.task_type,
            "is_encoder_decoder": graph.facts.is_encoder_decoder,
            "head_dim": shapes.head_dim,
            "inference_mode": spec.inference_mode,
            **self.encoder_options(spec, shapes, run),
        }
        return PromptPlan(
            encoder=self.encoder_label(spec),
            num_virtual_tokens=spec.num_virtual_tokens,
            token_dim=shapes.token_dim,
            num_layers=shapes.num_layers,
            num_attention_heads=shapes.num_attention_heads,
            num_transformer_submodules=shapes.num_transformer_submodules,
            tensors=self.encoder_tensors(spec, shapes, total),
            options=options,
            injection=self.injection(spec, shapes, graph),
            prefix_kv=self.uses_prefix,
        )

    def injection(self, spec: Any, shapes: PromptShapes, graph: ModelGraph) -> str:
        """One line for the plan: where the prompt enters the model."""
        n = spec.num_virtual_tokens
        if self.uses_prefix:
            where = (
                "decoder self-attention (EncoderDecoderCache)"
                if graph.facts.is_encoder_decoder
                else "self-attention (DynamicCache)"
            )
            return (
                f"{n} key/value positions x {shapes.num_layers} layers x {shapes.num_attention_heads} heads x "
                f"{shapes.head_dim} dims into every {where}; attention mask extended, positions shifted by {n}"
            )
        side = "the encoder's input embeddings" if graph.facts.is_encoder_decoder else "the input embeddings"
        return f"{n} virtual-token embeddings of width {shapes.token_dim} prepended to {side}; attention mask extended"

    def check_run(self, spec: Any, run: RunSpec, graph: ModelGraph) -> None:
        limit = graph.facts.max_positions
        needed = run.data.max_length + spec.num_virtual_tokens
        # Virtual tokens occupy positions; prefixes shift the real tokens' positions by as many.
        # Models with relative positions (T5) have no such limit (max_positions is None).
        if limit and needed > limit:
            self._too_long(spec, run, graph, limit)

    def _too_long(self, spec: Any, run: RunSpec, graph: ModelGraph, limit: int) -> None:
        n, length = spec.num_virtual_tokens, run.data.max_length
        raise PlanError(
            "peft.num_virtual_tokens",
            n,
            f"{n} virtual tokens + data.max_length={length} need {n + length} positions, but {graph.model_class} "
            f"has {limit} (max_position_embeddings)",
            _what_fits(n, length, limit),
        )

    # ----------------------------------------------------------------------- materializing
    def saved_prompt_tensors(self, prompt: PromptPlan) -> dict[str, tuple[int, ...]]:
        return {"prompt_embeddings": (prompt.num_virtual_tokens * prompt.num_transformer_submodules, prompt.token_dim)}

    def create_prompt_encoder(self, prompt: PromptPlan, spec: Any, base_model: nn.Module) -> nn.Module:
        encoder = self.encoder_class(prompt, base_model)
        device = _device_of(base_model)
        return encoder.to(device) if device is not None else encoder

    def prompt_tensors(self, encoder: nn.Module) -> dict[str, torch.Tensor]:
        return encoder.saved_tensors()

    def load_prompt_tensors(self, encoder: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        encoder.load_saved(tensors)

    # ------------------------------------------------------------------------------- files
    def peft_config(self, spec: Any, plan: Plan) -> dict[str, Any]:
        prompt = plan.prompt
        return {
            "num_virtual_tokens": prompt.num_virtual_tokens,
            "token_dim": prompt.token_dim,
            "num_transformer_submodules": prompt.num_transformer_submodules,
            "num_attention_heads": prompt.num_attention_heads,
            "num_layers": prompt.num_layers,
            "modules_to_save": as_list(spec.modules_to_save),
            **self.method_config(spec, plan),
        }

    def spec_from_peft_config(self, config: Mapping[str, Any]) -> SpecNode:
        return self.schema(
            num_virtual_tokens=integer(config, "num_virtual_tokens", 8),
            # peft writes inference_mode=true on save: a loaded prompt is the saved table
            inference_mode=flag(config, "inference_mode", True),
            modules_to_save=config.get("modules_to_save"),
            **self.method_spec_fields(config),
        )


def _device_of(module: nn.Module) -> torch.device | None:
    first = next(module.parameters(), None)
    return None if first is None or first.device.type == "meta" else first.device


def _what_fits(virtual_tokens: int, max_length: int, limit: int) -> str:
    """What to change so that virtual tokens + data.max_length fit `limit` positions: either
    number alone where it can (a suggestion never goes below one token)."""
    ways = []
    if limit - max_length >= 1:
        ways.append(f"use at most {limit - max_length} virtual tokens")
    if limit - virtual_tokens >= 1:
        ways.append(f"lower data.max_length to at most {limit - virtual_tokens}")
    return (
        " or ".join(ways) or f"use fewer than {limit} virtual tokens and lower data.max_length to fit {limit} positions"
    )
