"""The data loaders of a run: the training loader (its steps' batches tagged for the step loss,
step_loss.py; resumable, peftc.files.checkpoints) and the validation loader, whose sampler scores
each example once on any number of ranks; the collate function adds the method's batch inputs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from peftc import methods, tasks
from peftc.errors import DataError
from peftc.files.checkpoints import ResumableSampler, join_world
from peftc.training.step_loss import StepLoader

if TYPE_CHECKING:
    from peftc.planning.plan import Plan


class EvaluationSampler(DistributedSampler):
    """The validation split in its order, dealt out rank::world as Lightning's own sampler would,
    and padded as it pads (the first examples again), so that every rank runs as many batches:
    ranks of a sharded strategy gather each layer's parameters together in every forward.
    Unlike Lightning's, it says how many of a rank's examples are real
    (`examples_of_this_rank`); validation counts only those, so k ranks score each example
    once and give one process's metrics (Lightning's sampler counts the padding as well)."""

    def __init__(self, size: int) -> None:
        super().__init__(range(size), num_replicas=1, rank=0, shuffle=False)

    @property
    def examples_of_this_rank(self) -> int:
        join_world(self)
        return len(range(self.rank, len(self.dataset), self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        join_world(self)
        return super().__iter__()

    def __len__(self) -> int:
        join_world(self)
        return self.num_samples


def dataloaders(plan: Plan, tokenizer: Any) -> tuple[DataLoader, DataLoader | None]:
    run = plan.spec
    task = tasks.get(plan.task)
    train, val = task.datasets(run, tokenizer)

    pad_to = run.data.max_length if run.data.padding == "max_length" else None

    method = methods.get(plan.method)
    extras = method.batch_fields(run.peft)

    def collate(examples: list[Any]) -> dict[str, torch.Tensor]:
        batch = task.collate(examples, tokenizer, pad_to)
        batch.update(method_inputs(examples, extras))
        if method.kind == "prompt":
            # Blocks of packed examples carry each example's positions, which keep the examples
            # apart (lm_loss.next_token_loss). Every example of a block reads the same virtual
            # tokens, which transformers' packed-sequence mask cannot express: the block's mask
            # alone (examples see the earlier ones of their block; task.packing=false avoids it).
            batch.pop("position_ids", None)
        return batch

    # The sampler is a DistributedSampler seeded with run.seed that shards itself once the ranks
    # have joined (Lightning keeps it rather than shuffling its order again), so k processes
    # with batch b see the same examples per step as one with k*b. It also skips the batches a
    # resumed checkpoint had consumed. Creating an iterator must not draw from the
    # global RNG (dropout uses it), or a resumed run would see different dropout masks.
    train_loader = StepLoader(
        train,
        batch_size=run.data.batch_size,
        sampler=ResumableSampler(len(train), run.seed),
        collate_fn=collate,
        num_workers=run.data.num_workers,
        generator=torch.Generator().manual_seed(run.seed),
        batches_per_step=run.trainer.accumulate_grad_batches,
        loss_terms=task.loss_terms,
    )
    val_loader = (
        DataLoader(
            val,
            batch_size=run.data.eval_batch_size or run.data.batch_size,
            sampler=EvaluationSampler(len(val)),
            collate_fn=collate,
            num_workers=run.data.num_workers,
            generator=torch.Generator().manual_seed(run.seed),
        )
        if len(val)
        else None
    )
    return train_loader, val_loader


def method_inputs(examples: list[Any], extras: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Batch inputs the method reads from the examples (e.g. task_ids), range-checked."""
    batch = {}
    for key, spec in extras.items():
        values = [int(e.get(spec.field, spec.default)) for e in examples]
        bad = [v for v in values if v < 0 or (spec.limit is not None and v >= spec.limit)]
        if bad:
            raise DataError(
                f"data column {spec.field}",
                f"value {bad[0]} is out of range: {spec.key}={spec.limit} allows 0..{spec.limit - 1}",
                f"raise {spec.key} or fix the data",
            )
        batch[key] = torch.tensor(values, dtype=torch.long)
    return batch
