"""Sequence classification: one label per text; cross-entropy over the head's logits.

The head (`classifier` for encoders, `score` for decoder models) is new for a pretrained
backbone, so it is trained in full and saved with the adapter (peft adds both names to
modules_to_save for SEQ_CLS). Metrics: accuracy and macro-F1 over the label set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from peftc.config.spec import RunSpec, SpecNode, param
from peftc.errors import ConfigError
from peftc.tasks import register
from peftc.tasks.base import Task
from peftc.tasks.common import (
    batches,
    check_labels,
    classification_metrics,
    classification_stats,
    encoded_batch,
    label_config,
    label_index,
    label_problem,
    labels_for_count,
    sorted_labels,
    to_device,
    token_fields,
    tokenize,
)
from peftc.tasks.head_loss import sequence_classification_loss

# peft 0.22 trains these for sequence and token classification (CLASSIFIER_MODULE_NAMES): DistilBERT's
# pre_classifier is initialised at random beside its classifier, so it is a head too.
HEADS = ("classifier", "score", "pre_classifier")


class LabelledTask(Task):
    """What the classification tasks share: a `labels` setting that sizes the head (written into
    the model config), read back from a saved head's rows, and accuracy / macro-F1 over it."""

    head_modules = HEADS
    label_field: ClassVar[str] = "label"  # the field holding a row's label (token_cls: its tags)

    def config_overrides(self, spec: Any) -> dict[str, Any]:
        # unset labels (an action on a saved adapter with task= given) ask nothing of the head
        return {} if spec.labels is None else label_config(spec.labels)

    def with_data_settings(self, run: RunSpec) -> Any:
        if run.task.labels is not None:
            return run.task
        from peftc.tasks.data import declared_labels, load_splits

        # A dataset's ClassLabel names, in its order, as transformers' run_glue uses them; else the
        # training split's distinct labels.
        labels = declared_labels(run.data, self.label_field)
        if labels is None:
            train, _ = load_splits(run.data, self.data_fields(run), seed=run.seed, lists=self.list_fields)
            labels = self.labels_in(train)
        if len(labels) < 2:
            raise ConfigError(
                "task.labels",
                None,
                f"is unset and the training data has {len(labels)} distinct label(s) {labels}",
                "a classifier needs at least two: check data.columns, or set task.labels=[...]",
            )
        if fractional_numbers(labels):
            # STS-B-style scores: one class per distinct score would train a classifier on noise
            shown = ", ".join(labels[:3]) + (", ..." if len(labels) > 3 else "")
            raise ConfigError(
                "task.labels",
                None,
                f"is unset and the training labels are fractional numbers ({shown}: {len(labels)} distinct), "
                "which look like regression scores; classification takes one class per distinct label and "
                "regression is not supported",
                "bin the scores into classes, or set task.labels=[...] if these are class names",
            )
        return run.task.replace(labels=labels)

    def labels_in(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """The distinct labels of these rows, sorted (numerically when they are all numbers)."""
        return sorted_labels({str(row["label"]) for row in rows})

    def spec_from_saved(self, spec: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
        count = head_rows(tensors, HEADS)
        return spec if count is None else spec.replace(labels=labels_for_count(spec.labels, count))

    def metrics(self, totals: Mapping[str, float]) -> dict[str, float]:
        return classification_metrics(totals, sum(1 for key in totals if key.startswith("tp_")))


@dataclass
class SeqClsSpec(SpecNode):
    labels: list[str] | None = param(
        None,
        "The label set, in class-index order; data labels are names from it (or indices 0..n-1). "
        "null: the distinct labels of the training split, sorted.",
    )

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        if self.labels is not None:
            check_labels(f"{key}.labels", self.labels)


@register
class SeqCls(LabelledTask):
    name = "seq_cls"
    task_type = "SEQ_CLS"
    schema = SeqClsSpec
    auto_class_name = "AutoModelForSequenceClassification"
    primary_metric = "val_accuracy"
    fields = ("text", "label")
    input_fields = ("text",)

    # Sentence pairs (GLUE's MRPC/QNLI/MNLI, STS-style): data.columns.text_pair names the second
    # text; the two are encoded as one pair (the tokenizer's separator and segment ids), as run_glue does.
    def data_fields(self, run: RunSpec) -> tuple[str, ...]:
        return ("text", "text_pair", "label") if _pairs(run) else self.fields

    def prediction_fields(self, run: RunSpec) -> tuple[str, ...]:
        return ("text", "text_pair") if _pairs(run) else self.input_fields

    def sample_inputs(self, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [{k: row[k] for k in ("text", "text_pair") if k in row} for row in rows]

    def check_row(self, row: Mapping[str, Any], spec: SeqClsSpec) -> str | None:
        return label_problem(row["label"], spec.labels, "task.labels")

    def encode(self, rows: Sequence[Mapping[str, Any]], run: RunSpec, tokenizer: Any) -> list[dict[str, Any]]:
        examples = []
        for row in rows:
            example = token_fields(tokenize(tokenizer, row["text"], run, text_pair=row.get("text_pair")))
            if "label" in row:
                example["label"] = label_index(row["label"], run.task.labels)
            examples.append(example)
        return examples

    def collate(
        self, examples: Sequence[Mapping[str, Any]], tokenizer: Any, pad_to: int | None = None
    ) -> dict[str, torch.Tensor]:
        batch = encoded_batch(examples, tokenizer, pad_to)
        if "label" in examples[0]:
            batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return batch

    def training_loss(self, model: Any, batch: Mapping[str, torch.Tensor], spec: Any = None) -> torch.Tensor:
        """The classifier's loss (by config.problem_type) in float32: transformers' own averages
        bf16 logits in bf16 under bf16-true."""
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return sequence_classification_loss(logits, batch["labels"], model.config)

    def validation_stats(
        self, model: Any, batch: Mapping[str, torch.Tensor], spec: Any = None
    ) -> dict[str, torch.Tensor]:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return classification_stats(logits.argmax(-1), batch["labels"], logits.shape[-1])

    @torch.no_grad()
    def predict(self, model: Any, rows: Sequence[Mapping[str, Any]], tokenizer: Any, run: RunSpec) -> list[dict]:
        labels = run.task.labels
        inputs = self.sample_inputs(rows)
        out = []
        for chunk in batches(self.encode(inputs, run, tokenizer), run.data.batch_size):
            probs = model(**to_device(self.collate(chunk, tokenizer), model)).logits.float().softmax(-1)
            for row_probs in probs.tolist():
                best = max(range(len(row_probs)), key=row_probs.__getitem__)
                out.append({"label": labels[best], "scores": dict(zip(labels, row_probs))})
        return [{**r, **p} for r, p in zip(inputs, out)]


def _pairs(run: RunSpec) -> bool:
    return "text_pair" in (run.data.columns or {})


def fractional_numbers(labels: Sequence[str]) -> bool:
    """Whether every label is a number and some are not whole (3.8, not 3 or 3.0)."""
    try:
        values = [float(label) for label in labels]
    except ValueError:
        return False
    return any(not value.is_integer() for value in values)


def head_rows(tensors: Mapping[str, torch.Tensor], heads: Sequence[str]) -> int | None:
    """Output size of a saved classification head (`...<head>.weight` rows), if one was saved."""
    from peftc.planning.layout import MODEL_PREFIX, PROMPT_MODEL_PREFIX

    for head in heads:
        for prefix in (MODEL_PREFIX, PROMPT_MODEL_PREFIX):  # prompt methods save heads one level up
            weight = tensors.get(f"{prefix}{head}.weight")
            if weight is not None:
                return int(weight.shape[0])
    return None
