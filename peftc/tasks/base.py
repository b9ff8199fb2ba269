"""The task contract: which head to load, how examples become batches, the loss and the metrics.

A task never knows which PEFT method is in use: it calls the wrapped model like a transformers
model (prompt encoders and adapters do their work inside that call).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

    from peftc.spec import RunSpec, SpecNode


class Task:
    name: ClassVar[str]  # group option, e.g. "causal_lm"
    task_type: ClassVar[str]  # peft's TaskType, e.g. "CAUSAL_LM"
    schema: ClassVar[type[SpecNode]]
    auto_class_name: ClassVar[str]  # transformers Auto class of the model with this task's head
    head_modules: ClassVar[tuple[str, ...]] = ()  # heads kept trainable (peft's modules_to_save defaults)
    needs_encoder_decoder: ClassVar[bool | None] = None  # True: seq2seq only; False: decoder/encoder only
    primary_metric: ClassVar[str] = "val_loss"

    def config_overrides(self, spec: Any) -> dict[str, Any]:
        """transformers config fields this task needs (e.g. num_labels for a classifier)."""
        return {}

    def datasets(self, run: RunSpec, tokenizer: Any) -> tuple[Dataset, Dataset]:
        raise NotImplementedError

    def collate(self, examples: Sequence[Mapping[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def training_loss(self, model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def validation_stats(self, model: Any, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sums over the batch that `metrics` turns into numbers after the whole split is seen."""
        raise NotImplementedError

    def metrics(self, totals: Mapping[str, float]) -> dict[str, float]:
        raise NotImplementedError
