"""The task contract: which head to load, how examples become batches, the loss and the metrics.

A task never knows which PEFT method is in use: it calls the wrapped model like a transformers
model (prompt encoders and adapters do their work inside that call).

Data flow: `datasets` reads rows carrying the task's `fields` (built-in dataset or the user's
file, each row checked by `check_row`, whose problems name the file and row), `encode` turns
rows into token lists, `collate` pads them into a batch. Training calls `training_loss`;
validation sums `validation_stats` over every batch of the split and `metrics` turns the sums
into numbers (so a metric is exact however the split is batched). `predict` runs the model on
raw rows (only `input_fields` needed) and returns one JSON-ready dict per row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

    from peftc.config.spec import RunSpec, SpecNode


class Task:
    name: ClassVar[str]  # group option, e.g. "causal_lm"
    task_type: ClassVar[str]  # peft's TaskType, e.g. "CAUSAL_LM"
    schema: ClassVar[type[SpecNode]]
    auto_class_name: ClassVar[str]  # transformers Auto class of the model with this task's head
    head_modules: ClassVar[tuple[str, ...]] = ()  # heads kept trainable (peft's modules_to_save defaults)
    needs_encoder_decoder: ClassVar[bool | None] = None  # True: seq2seq only; False: decoder/encoder only
    primary_metric: ClassVar[str] = "val_loss"
    fields: ClassVar[tuple[str, ...]] = ()  # what a data row carries (data.columns maps file columns to these)
    input_fields: ClassVar[tuple[str, ...]] = ()  # what prediction needs (the rest are targets)
    list_fields: ClassVar[tuple[str, ...]] = ()  # fields whose cells may be lists or objects (the rest hold text)
    loss_in_chunks: ClassVar[bool] = False  # the loss never holds all logits at once (the memory estimate)
    generates_text: ClassVar[bool] = False  # predictions carry "generated" text (shown before/after training)

    def config_overrides(self, spec: Any) -> dict[str, Any]:
        """transformers config fields this task needs (e.g. num_labels for a classifier)."""
        return {}

    def with_data_settings(self, run: RunSpec) -> Any:
        """The task spec with what the user left unset taken from the training data (e.g. the
        label set); planned before the model graph, whose head it may size."""
        return run.task

    def spec_from_saved(self, spec: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
        """The task spec that fits a saved adapter's tensors (e.g. a head's label count) when
        no peftc plan was saved beside it (adapters the peft package wrote)."""
        return spec

    def data_fields(self, run: RunSpec) -> tuple[str, ...]:
        """The fields a data row of this run carries (`fields`, unless the data format says otherwise)."""
        return self.fields

    def optional_fields(self, run: RunSpec) -> dict[str, Any]:
        """Fields a row may carry besides `data_fields` ({name: default when absent}), in training
        and prediction rows alike (a conversation's tools); none by default."""
        return {}

    def prediction_fields(self, run: RunSpec) -> tuple[str, ...]:
        """The fields a row to predict on gives (`input`, `input_file`): `input_fields`, unless
        the data format says otherwise."""
        return self.input_fields

    def prediction_row(self, row: Mapping[str, Any], run: RunSpec, where: str) -> dict[str, Any]:
        """A row to predict on as `predict` takes it (e.g. a plain text made a conversation)."""
        return dict(row)

    def check_row(self, row: Mapping[str, Any], spec: Any) -> str | None:
        """What is wrong with one data row for this task (None: nothing)."""
        return None

    def read_rows(self, run: RunSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The run's (train, validation) rows as this task reads them, before `check_row` and
        `encode` (the before/after samples are made from the validation rows)."""
        from peftc.tasks.data import load_splits

        optional = {**method_fields(run), **self.optional_fields(run)}
        return load_splits(run.data, self.data_fields(run), seed=run.seed, optional=optional, lists=self.list_fields)

    def datasets(self, run: RunSpec, tokenizer: Any) -> tuple[Dataset, Dataset]:
        from peftc.tasks.data import load_splits

        extra = method_fields(run)
        train_rows, val_rows = load_splits(
            run.data,
            self.data_fields(run),
            seed=run.seed,
            check=lambda row: self.check_row(row, run.task),
            optional=extra,
            lists=self.list_fields,
        )
        return tuple(carry_fields(rows, self.encode(rows, run, tokenizer), extra) for rows in (train_rows, val_rows))

    def encode(self, rows: Sequence[Mapping[str, Any]], run: RunSpec, tokenizer: Any) -> list[dict[str, Any]]:
        """Rows -> examples (token id lists and targets) ready for `collate`, one per row (a task
        that merges rows, like packed language modelling, overrides `datasets`)."""
        raise NotImplementedError

    def collate(
        self, examples: Sequence[Mapping[str, Any]], tokenizer: Any, pad_to: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Pad examples into a batch: to the longest example, or to `pad_to` (data.padding=max_length)."""
        raise NotImplementedError

    def training_loss(self, model: Any, batch: Mapping[str, torch.Tensor], spec: Any = None) -> torch.Tensor:
        """The loss to minimise; `spec` is this task's settings (None: the schema's defaults).
        By default the model's own loss for its head (transformers computes it from `labels`, in
        the logits' dtype: a task whose training may run in bf16 computes it in float32, as
        head_loss.py does for the classification and span heads)."""
        return model(**batch).loss

    def loss_terms(self, batch: Mapping[str, torch.Tensor]) -> int:
        """How many terms `training_loss` averages over in a collated batch: its examples, or the
        counted tokens of a token-level loss. Training weighs each batch of an optimizer step by
        it (peftc/training/step_loss.py), so a step's loss is the mean over all of its terms."""
        return int(next(iter(batch.values())).shape[0])

    def validation_stats(
        self, model: Any, batch: Mapping[str, torch.Tensor], spec: Any = None
    ) -> dict[str, torch.Tensor]:
        """Sums over the batch that `metrics` turns into numbers after the whole split is seen."""
        raise NotImplementedError

    def generation_stats(
        self, model: Any, batch: Mapping[str, torch.Tensor], spec: Any, tokenizer: Any
    ) -> dict[str, torch.Tensor]:
        """More sums for `metrics` from what the model generates for a validation batch (a task
        scored on generated text; none by default)."""
        return {}

    def metrics(self, totals: Mapping[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def sample_inputs(self, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Prediction inputs made from data rows (training shows predictions for a few)."""
        return [{field: row[field] for field in self.input_fields} for row in rows]

    def predict(self, model: Any, rows: Sequence[Mapping[str, Any]], tokenizer: Any, run: RunSpec) -> list[dict]:
        """One JSON-ready prediction per row (rows need only `input_fields`)."""
        raise NotImplementedError


def method_fields(run: RunSpec) -> dict[str, Any]:
    """Per-example fields the PEFT method reads from the data ({field: default}, e.g. the task_id
    of multitask prompt tuning). Tasks load them as optional fields and keep them on each example;
    training turns them into batch inputs. A task needs no knowledge of the method for this."""
    from peftc import methods

    return {f.field: f.default for f in methods.for_spec(run.peft).batch_fields(run.peft).values()}


def carry_fields(
    rows: Sequence[Mapping[str, Any]], examples: list[dict[str, Any]], fields: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Copy the method fields of each row onto its example (one example per row)."""
    for row, example in zip(rows, examples, strict=True):
        example.update({field: row.get(field, default) for field, default in fields.items()})
    return examples


def shared_fields(rows: Sequence[Mapping[str, Any]], fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The method fields of rows merged into one example (e.g. a packed block): all rows must agree."""
    from peftc.errors import DataError

    merged = {}
    for field, default in fields.items():
        values = {row.get(field, default) for row in rows}
        if len(values) > 1:
            raise DataError(
                where,
                f"packing would put rows with different {field} values {sorted(values)} into one block",
                "set task.packing=false (one example per row)",
            )
        merged[field] = values.pop() if values else default
    return merged
