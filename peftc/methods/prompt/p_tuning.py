"""P-tuning (Liu et al. 2021): the prompt is an encoder's output, P = f(E_v) for a learned table
E_v (n x d), prepended to the input embeddings like prompt tuning.

  MLP:  f(E) = W3 relu(W2 relu(W1 E + b1) + b2) + b3        (d -> h -> h -> d; exactly 3 layers)
  LSTM: f(E) = W2 relu(W1 BiLSTM(E) + b1) + b2              (BiLSTM of encoder_num_layers, 2h -> 2h -> d)

with h = encoder_hidden_size (default: the token dim). peft saves only the output P as
`prompt_embeddings`, so a loaded adapter (inference_mode) holds just that table.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftc.config.spec import RunSpec, at_least, in_range, one_of, param
from peftc.methods import register
from peftc.methods.common import integer, real
from peftc.methods.prompt.encoder import VirtualTokenEncoder
from peftc.methods.prompt.shared import PromptLearningMethod, PromptLearningSpec, PromptShapes
from peftc.planning.plan import Plan, PromptPlan

MLP_LAYERS = 2  # peft's default encoder_num_layers; the MLP ignores any other value (with a warning)


@dataclass
class PTuningSpec(PromptLearningSpec):
    encoder_reparameterization_type: str = param(
        "MLP", "The prompt encoder: an MLP or a bidirectional LSTM + MLP.", one_of("MLP", "LSTM")
    )
    encoder_hidden_size: int | None = param(
        None, "Hidden width h of the encoder; null: the model's hidden size.", at_least(1)
    )
    encoder_num_layers: int = param(MLP_LAYERS, "LSTM layers (the MLP always has 3 linear layers).", at_least(1))
    encoder_dropout: float = param(0.0, "Dropout between LSTM layers.", in_range(0.0, 1.0))

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        if self.encoder_reparameterization_type == "MLP" and self.encoder_num_layers != MLP_LAYERS:
            warnings.warn(
                f"{key}.encoder_num_layers={self.encoder_num_layers} is ignored: the MLP encoder has exactly 3 linear layers",
                stacklevel=2,
            )


def encoder_shapes(kind: str, dim: int, hidden: int, layers: int) -> dict[str, tuple[int, ...]]:
    """Parameters of the encoder head, in peft's names (`lstm_head`, `mlp_head.<i>`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    if kind == "LSTM":
        for layer in range(layers):
            width = dim if layer == 0 else 2 * hidden
            for suffix in ("", "_reverse"):
                shapes[f"lstm_head.weight_ih_l{layer}{suffix}"] = (4 * hidden, width)
                shapes[f"lstm_head.weight_hh_l{layer}{suffix}"] = (4 * hidden, hidden)
                shapes[f"lstm_head.bias_ih_l{layer}{suffix}"] = (4 * hidden,)
                shapes[f"lstm_head.bias_hh_l{layer}{suffix}"] = (4 * hidden,)
        linears = [(2 * hidden, 2 * hidden), (2 * hidden, dim)]
    else:
        linears = [(dim, hidden), (hidden, hidden), (hidden, dim)]
    for i, (fan_in, fan_out) in enumerate(linears):
        shapes[f"mlp_head.{2 * i}.weight"] = (fan_out, fan_in)
        shapes[f"mlp_head.{2 * i}.bias"] = (fan_out,)
    return shapes


class PromptEncoderMLP(VirtualTokenEncoder):
    """peft's PromptEncoder: `embedding` plus `mlp_head` (and `lstm_head`) unless inference_mode."""

    def __init__(self, prompt: PromptPlan, base_model: nn.Module) -> None:
        super().__init__(prompt)
        opts = prompt.options
        self.encoder_type = opts["encoder_type"]
        self.embedding = nn.Embedding(self.total_tokens, self.token_dim)
        if self.inference_mode:
            return
        dim, hidden = self.token_dim, opts["encoder_hidden_size"]
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(
                input_size=dim,
                hidden_size=hidden,
                num_layers=opts["encoder_num_layers"],
                dropout=opts["encoder_dropout"],
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)
            )

    def table(self) -> torch.Tensor:
        """The prompt P (total_tokens, d): the encoder applied to the whole virtual sequence."""
        embeds = self.embedding.weight.unsqueeze(0)
        if self.inference_mode:
            return embeds[0]
        if self.encoder_type == "LSTM":
            embeds = self.lstm_head(embeds)[0]
        return self.mlp_head(embeds)[0]

    def prompt_embeddings(self, batch: int, task_ids: torch.Tensor | None) -> torch.Tensor:
        return self.table().unsqueeze(0).expand(batch, -1, -1)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.table().detach()}

    def load_saved(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if not self.inference_mode:
            raise ValueError("a saved P-tuning prompt is the encoder output; load it with inference_mode=true")
        self._copy_into(self.embedding.weight, tensors["prompt_embeddings"], "prompt_embeddings")


@register
class PTuning(PromptLearningMethod):
    name = "p_tuning"
    peft_type = "P_TUNING"
    schema = PTuningSpec
    encoder_class = PromptEncoderMLP

    def encoder_label(self, spec: PTuningSpec) -> str:
        if spec.inference_mode:
            return "PromptEncoder (saved prompt only)"
        return f"PromptEncoder ({spec.encoder_reparameterization_type})"

    def encoder_tensors(self, spec: PTuningSpec, shapes: PromptShapes, total_tokens: int) -> dict[str, tuple[int, ...]]:
        tensors: dict[str, tuple[int, ...]] = {"embedding.weight": (total_tokens, shapes.token_dim)}
        if not spec.inference_mode:
            hidden = spec.encoder_hidden_size or shapes.token_dim
            kind = spec.encoder_reparameterization_type
            tensors.update(encoder_shapes(kind, shapes.token_dim, hidden, spec.encoder_num_layers))
        return tensors

    def encoder_options(self, spec: PTuningSpec, shapes: PromptShapes, run: RunSpec) -> dict[str, Any]:
        return {
            "encoder_type": spec.encoder_reparameterization_type,
            "encoder_hidden_size": spec.encoder_hidden_size or shapes.token_dim,
            "encoder_num_layers": spec.encoder_num_layers,
            "encoder_dropout": spec.encoder_dropout,
        }

    def method_config(self, spec: PTuningSpec, plan: Plan) -> dict[str, Any]:
        return {
            "encoder_reparameterization_type": spec.encoder_reparameterization_type,
            "encoder_hidden_size": plan.prompt.options["encoder_hidden_size"],
            "encoder_num_layers": spec.encoder_num_layers,
            "encoder_dropout": spec.encoder_dropout,
        }

    def method_spec_fields(self, config: Mapping[str, Any]) -> dict[str, Any]:
        kind = str(config.get("encoder_reparameterization_type") or "MLP")
        return {
            "encoder_reparameterization_type": kind if kind in ("MLP", "LSTM") else "MLP",
            "encoder_hidden_size": config.get("encoder_hidden_size"),
            "encoder_num_layers": integer(config, "encoder_num_layers", MLP_LAYERS),
            "encoder_dropout": real(config, "encoder_dropout", 0.0),
        }
