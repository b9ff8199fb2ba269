"""Token classification (tagging): one label per word; cross-entropy at each word's first token.

A row is a list of words and a list of tags of the same length (lists, or strings split on
whitespace, so a CSV cell works). The words are joined with spaces and tokenized once; the
tokenizer's character offsets tell which token starts which word. Only those first tokens carry
a label (the others and special tokens are ignored, -100), as transformers' examples do.
Metrics over labelled tokens: accuracy and macro-F1 over the tag set. The head (`classifier`,
or `score` for some decoders) is trained in full and saved, as peft does for TOKEN_CLS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peftc.config.spec import RunSpec, SpecNode, param
from peftc.errors import ConfigError
from peftc.tasks import register
from peftc.tasks.common import (
    IGNORE_INDEX,
    batches,
    check_labels,
    classification_stats,
    encoded_batch,
    label_index,
    label_problem,
    pad,
    sorted_labels,
    to_device,
    token_fields,
    tokenize,
)
from peftc.tasks.head_loss import token_classification_loss
from peftc.tasks.seq_cls import LabelledTask


@dataclass
class TokenClsSpec(SpecNode):
    labels: list[str] | None = param(
        None,
        "The tag set, in class-index order; data tags are names from it (or indices 0..n-1). "
        "null: the distinct tags of the training split, sorted, with 'O' first.",
    )

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        if self.labels is not None:
            check_labels(f"{key}.labels", self.labels)


def words(value: Any) -> list[str]:
    return [str(w) for w in value] if isinstance(value, (list, tuple)) else str(value).split()


@register
class TokenCls(LabelledTask):
    name = "token_cls"
    task_type = "TOKEN_CLS"
    schema = TokenClsSpec
    auto_class_name = "AutoModelForTokenClassification"
    primary_metric = "val_macro_f1"
    fields = ("tokens", "tags")
    input_fields = ("tokens",)
    list_fields = ("tokens", "tags")  # a row's words and tags: lists, or space-separated text
    label_field = "tags"

    def labels_in(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        tags = sorted_labels({tag for row in rows for tag in words(row["tags"])})
        return ["O", *(t for t in tags if t != "O")] if "O" in tags else tags  # "outside" first, as in CoNLL

    def check_row(self, row: Mapping[str, Any], spec: TokenClsSpec) -> str | None:
        objects = [field for field in ("tokens", "tags") if isinstance(row.get(field), dict)]
        if objects:
            return f"{objects[0]!r} is an object, not a list of words or tags"
        tokens, tags = words(row["tokens"]), words(row["tags"])
        if not tokens:
            return "no tokens"
        if len(tokens) != len(tags):
            return f"{len(tokens)} tokens but {len(tags)} tags (one tag per token)"
        for tag in tags:
            problem = label_problem(tag, spec.labels, "task.labels")
            if problem:
                return problem
        return None

    def encode(self, rows: Sequence[Mapping[str, Any]], run: RunSpec, tokenizer: Any) -> list[dict[str, Any]]:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("model.tokenizer", type(tokenizer).__name__, "token_cls needs a fast tokenizer (offsets)")
        examples = []
        for row in rows:
            tokens = words(row["tokens"])
            encoding = tokenize(tokenizer, " ".join(tokens), run, return_offsets_mapping=True)
            example: dict[str, Any] = token_fields(encoding)
            example["word_starts"] = first_tokens(tokens, encoding["offset_mapping"])
            if "tags" in row:
                labels = [IGNORE_INDEX] * len(example["input_ids"])
                for tag, position in zip(words(row["tags"]), example["word_starts"]):
                    if position is not None:
                        labels[position] = label_index(tag, run.task.labels)
                example["labels"] = labels
            examples.append(example)
        return examples

    def collate(
        self, examples: Sequence[Mapping[str, Any]], tokenizer: Any, pad_to: int | None = None
    ) -> dict[str, torch.Tensor]:
        batch = encoded_batch(examples, tokenizer, pad_to)
        if "labels" in examples[0]:
            batch["labels"] = pad([e["labels"] for e in examples], IGNORE_INDEX, pad_to)
        return batch

    def training_loss(self, model: Any, batch: Mapping[str, torch.Tensor], spec: Any = None) -> torch.Tensor:
        """The labelled tokens' mean cross-entropy in float32: most token classifiers average bf16
        logits in bf16 under bf16-true."""
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return token_classification_loss(logits, batch["labels"], model.config)

    def loss_terms(self, batch: Mapping[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())  # the labelled tokens

    def validation_stats(
        self, model: Any, batch: Mapping[str, torch.Tensor], spec: Any = None
    ) -> dict[str, torch.Tensor]:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return classification_stats(logits.argmax(-1).flatten(), batch["labels"].flatten(), logits.shape[-1])

    @torch.no_grad()
    def predict(self, model: Any, rows: Sequence[Mapping[str, Any]], tokenizer: Any, run: RunSpec) -> list[dict]:
        labels = run.task.labels
        examples = self.encode([{"tokens": r["tokens"]} for r in rows], run, tokenizer)
        tags: list[list[str | None]] = []
        for chunk in batches(examples, run.data.batch_size):
            predicted = model(**to_device(self.collate(chunk, tokenizer), model)).logits.argmax(-1).tolist()
            for example, row in zip(chunk, predicted):
                # a word cut off by truncation has no token, hence no tag
                tags.append([labels[row[p]] if p is not None else None for p in example["word_starts"]])
        return [{"tokens": words(r["tokens"]), "tags": t} for r, t in zip(rows, tags)]


def first_tokens(tokens: Sequence[str], offsets: Sequence[tuple[int, int]]) -> list[int | None]:
    """For each word of `' '.join(tokens)`, the index of the first token that overlaps it (a
    byte-level BPE token such as GPT-2's 'Ġred' may carry the space before its word: ' red')."""
    spans, start = [], 0
    for token in tokens:
        spans.append((start, start + len(token)))
        start += len(token) + 1
    firsts: list[int | None] = [None] * len(tokens)
    word = 0
    for position, (begin, end) in enumerate(offsets):
        if end <= begin:  # special tokens
            continue
        while word < len(spans) and begin >= spans[word][1]:
            word += 1
        if word < len(spans) and spans[word][0] < end and firsts[word] is None:
            firsts[word] = position
    return firsts
