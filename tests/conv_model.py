"""Tiny convolutional models for the conv sites: TinyConvNet (Conv3d, Conv2d, 1x1 Conv2d, grouped
Conv2d, Conv1d, Linear) and PaddedConvNet (convolutions that pad other than with zeros), and how to
plan an adapter for a model that no config group describes."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftc import quant, tasks
from peftc.config.spec import DataSpec, ModelSpec, RunSpec, TrainerSpec, validate
from peftc.planning import planner
from peftc.planning.graph import graph_of
from peftc.planning.plan import Plan


class TinyConvNet(nn.Module):
    """(N, 4, 6, 6) images -> (N, 5) scores. Accepts `input_ids=` so peft's wrappers can call it."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.volume = nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1))
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.seq = nn.Conv1d(8, 6, 3, padding=1, stride=2)
        self.head = nn.Linear(6, 5)
        torch.random.set_rng_state(generator_state)

    def forward(self, input_ids: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        h = F.relu(self.volume(input_ids.unsqueeze(2)).squeeze(2))
        h = F.relu(self.conv(h))
        h = F.relu(self.pointwise(h))
        h = self.grouped(h)
        h = F.relu(self.seq(h.flatten(2)))
        return self.head(h.mean(-1))


class PaddedConvNet(nn.Module):
    """(N, 4, 6, 6) images -> (N, 4, 24): convolutions whose padding is not zeros, where an update
    convolved with zero padding differs from the merged weight at the borders. `circular` also has
    a non-square kernel, a stride and a dilation that differ per axis."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.reflect = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
        self.circular = nn.Conv2d(6, 6, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1), padding_mode="circular")
        self.replicate = nn.Conv1d(6, 4, 3, padding=1, padding_mode="replicate")
        torch.random.set_rng_state(generator_state)

    def forward(self, input_ids: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        h = F.relu(self.reflect(input_ids))
        h = F.relu(self.circular(h))  # (N, 6, 6, 4)
        return self.replicate(h.flatten(2))


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, 6, 6, generator=torch.Generator().manual_seed(seed))


def plan_for(model: nn.Module, peft_spec: Any) -> Plan:
    """Plan a LoRA spec onto a live custom model (what load_adapter does for any base)."""
    validate(peft_spec, "peft")
    run = RunSpec(
        peft=peft_spec,
        task=tasks.get("causal_lm").schema(),
        quant=quant.get("none").schema(),
        model=ModelSpec(name="tiny_conv", name_or_path="tiny_conv"),
        data=DataSpec(),
        trainer=TrainerSpec(),
    )
    return planner.plan(run, graph_of(model))
