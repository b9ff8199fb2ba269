"""A tiny mixture-of-experts model for LoRA's `target_parameters`: expert weights stored as raw
3-D parameters (transformers' fused Mixtral/Qwen-MoE layout (experts, out, in), and gpt-oss's
(experts, in, out) flagged `is_transposed`), a raw 2-D parameter, and Linear layers."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN, INNER, EXPERTS = 8, 6, 3


class FusedExperts(nn.Module):
    """Every token through every expert (SwiGLU), mixed by routing weights: gate_up_proj then down_proj."""

    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.is_transposed = transposed
        gate_up, down = (HIDDEN, 2 * INNER), (INNER, HIDDEN)
        if not transposed:
            gate_up, down = gate_up[::-1], down[::-1]
        self.gate_up_proj = nn.Parameter(torch.randn(EXPERTS, *gate_up) / 3)
        self.down_proj = nn.Parameter(torch.randn(EXPERTS, *down) / 3)

    def forward(self, hidden: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        equation = "nh,ehi->nei" if self.is_transposed else "nh,eih->nei"
        gate, up = torch.einsum(equation, hidden, self.gate_up_proj).chunk(2, dim=-1)
        equation = "nei,eih->neh" if self.is_transposed else "nei,ehi->neh"
        out = torch.einsum(equation, F.silu(gate) * up, self.down_proj)
        return (out * routing.unsqueeze(-1)).sum(1)


class Mixer(nn.Module):
    """A raw 2-D (out, in) weight applied by hand (no nn.Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(HIDDEN, HIDDEN) / 3)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.weight.T


class TinyMoE(nn.Module):
    """(N, HIDDEN) features -> (N, 5) scores. Accepts `input_ids=` so peft's wrappers can call it."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.router = nn.Linear(HIDDEN, EXPERTS)
        self.experts = FusedExperts()
        self.shared = FusedExperts(transposed=True)
        self.mixer = Mixer()
        self.head = nn.Linear(HIDDEN, 5)
        torch.random.set_rng_state(generator_state)

    def forward(self, input_ids: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        routing = self.router(input_ids).softmax(-1)
        hidden = input_ids + self.experts(input_ids, routing) + self.shared(input_ids, routing)
        return self.head(torch.tanh(self.mixer(hidden)))


def features(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, HIDDEN, generator=torch.Generator().manual_seed(seed))
