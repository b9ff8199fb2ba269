"""One optimizer step's loss is the mean over all of the step's loss terms (tokens for a token
loss, examples otherwise), however the step is split into micro-batches
(trainer.accumulate_grad_batches) and processes (DDP): what the HF Trainer (`num_items_in_batch`,
`average_tokens_across_devices`) and torchtune do.

Averaging each micro-batch's own mean instead weighs a token of a short batch above a token of a
long one: with prompt/response or chat data, whose trained tokens per batch vary several-fold,
`batch_size=2 accumulate_grad_batches=4` would not train as `batch_size=8` does.

The training loader reads each step's batches ahead and tags every batch with its own count and
the step's (`StepLoader`); `step_weight` turns the tags into the factor that rescales the batch's
mean loss. Lightning divides every micro-batch's loss by accumulate_grad_batches and DDP averages
the ranks' gradients, so the factor multiplies both back: terms x batches per step x ranks /
the step's terms over all ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from peftc.files.checkpoints import ResumableLoader

BATCH_TERMS = "peftc_loss_terms"  # this batch's loss terms
STEP_TERMS = "peftc_step_loss_terms"  # the terms of every batch of its optimizer step, on this rank


class StepLoader(ResumableLoader):
    """The training loader. Batches are grouped as Lightning groups them into optimizer steps:
    `batches_per_step` in a row from the start of the epoch (a resumed epoch starts at a step
    boundary), the last step of an epoch taking what is left."""

    def __init__(self, *args: Any, batches_per_step: int, loss_terms: Callable[[Mapping], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches_per_step = batches_per_step
        self.loss_terms = loss_terms

    def __iter__(self) -> Iterator[dict[str, Any]]:
        step: list[dict[str, Any]] = []
        for batch in super().__iter__():
            step.append(batch)
            if len(step) == self.batches_per_step:
                yield from self._tagged(step)
                step = []
        yield from self._tagged(step)

    def _tagged(self, step: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        counts = [int(self.loss_terms(batch)) for batch in step]
        total = torch.tensor(sum(counts), dtype=torch.long)
        for batch, count in zip(step, counts, strict=True):
            yield {**batch, BATCH_TERMS: torch.tensor(count, dtype=torch.long), STEP_TERMS: total}


def take_step_terms(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Remove the StepLoader's tags from a batch (the model must not see them); None for a batch
    from another loader, whose mean loss is used as it is."""
    if BATCH_TERMS not in batch:
        return None
    return batch.pop(BATCH_TERMS), batch.pop(STEP_TERMS)


def step_weight(terms: torch.Tensor, step_terms: torch.Tensor, trainer: Any) -> torch.Tensor:
    """The factor on a micro-batch's mean loss that makes the step's gradient the mean over every
    term of the step, on every rank (one small all-reduce per micro-batch when there are several)."""
    world = trainer.world_size
    if world > 1:
        step_terms = trainer.strategy.reduce(step_terms.double(), reduce_op="sum")
    scale = trainer.accumulate_grad_batches * world
    return (terms.double() * scale / step_terms.double().clamp_min(1)).float()
