"""Causal language modelling: next-token cross-entropy; metrics are loss and perplexity."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peftc.data import load_splits
from peftc.errors import DataError
from peftc.spec import RunSpec, SpecNode, param
from peftc.tasks import register
from peftc.tasks.base import Task

IGNORE_INDEX = -100


@dataclass
class CausalLmSpec(SpecNode):
    packing: bool = param(
        True,
        "Concatenate documents (separated by EOS) and cut into blocks of data.max_length; false: one padded example per document.",
    )


@register
class CausalLm(Task):
    name = "causal_lm"
    task_type = "CAUSAL_LM"
    schema = CausalLmSpec
    auto_class_name = "AutoModelForCausalLM"
    needs_encoder_decoder = False
    primary_metric = "val_perplexity"

    def datasets(self, run: RunSpec, tokenizer: Any) -> tuple[list, list]:
        train_rows, val_rows = load_splits(run.data, ["text"], seed=run.seed)
        return tuple(
            self._examples(rows, run, tokenizer, split)
            for rows, split in ((train_rows, "train"), (val_rows, "validation"))
        )

    def _examples(
        self, rows: Sequence[Mapping[str, Any]], run: RunSpec, tokenizer: Any, split: str
    ) -> list[dict[str, list[int]]]:
        if not rows:
            return []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        encoded = [tokenizer(str(r["text"]), add_special_tokens=False)["input_ids"] + eos for r in rows]
        length = run.data.max_length
        if not run.task.packing:
            return [{"input_ids": ids[:length]} for ids in encoded]
        stream = [token for ids in encoded for token in ids]
        blocks = [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]
        if not blocks:
            raise DataError(
                f"data ({split})",
                f"{len(stream)} tokens cannot fill one block of data.max_length={length}",
                "lower data.max_length or add text",
            )
        return [{"input_ids": block} for block in blocks]

    def collate(self, examples: Sequence[Mapping[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            ids = torch.tensor(example["input_ids"], dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def training_loss(self, model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def validation_stats(self, model: Any, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss = model(**batch).loss
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        return {"loss_sum": loss.detach() * tokens, "tokens": tokens}

    def metrics(self, totals: Mapping[str, float]) -> dict[str, float]:
        if not totals.get("tokens"):
            return {}
        loss = totals["loss_sum"] / totals["tokens"]
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}
