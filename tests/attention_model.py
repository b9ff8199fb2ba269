"""A tiny model around nn.MultiheadAttention for LoRA's attention sites (in_proj and out_proj)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

WIDTH = 8


class TinyAttention(nn.Module):
    """(N, T, WIDTH) features -> (N, 5) scores. Accepts `input_ids=` so peft's wrappers can call it."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.attn = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.head = nn.Linear(WIDTH, 5)
        torch.random.set_rng_state(generator_state)

    def forward(self, input_ids: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        attended, _ = self.attn(input_ids, input_ids, input_ids)
        return self.head(attended.mean(1))


def sequences(batch: int = 3, length: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, length, WIDTH, generator=torch.Generator().manual_seed(seed))
