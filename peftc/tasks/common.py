"""Pieces several tasks share: padding, label sets, classification counts and their metrics.

Classification metrics are computed from sums (correct, count, and per-class true positives,
false positives and false negatives), so they are exact however the split is batched:
  accuracy = correct / count
  F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c),  macro-F1 = mean of F1_c over the classes that occur
  (in the gold labels or the predictions), as scikit-learn's f1_score(average="macro") does.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from peftc.errors import ConfigError

IGNORE_INDEX = -100


def pad(sequences: Sequence[Sequence[int]], value: int, width: int | None = None) -> torch.Tensor:
    """A (batch, width) long tensor of right-padded sequences; width defaults to the longest."""
    longest = max((len(s) for s in sequences), default=0)
    width = max(longest, width or 0)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
    return out


def leading_special_tokens(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts in front of a text it encodes on its own: the BOS of
    Llama, Mistral and Gemma tokenizers, none for GPT-2's or Qwen's. A causal LM was pretrained
    with them and is served with them (a pipeline, vLLM), so training and prediction put them
    there too, as the HF language-modelling scripts and TRL do. Found by encoding a probe text
    with and without special tokens."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return list(full[:start])
    return []


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def encoded_batch(
    examples: Sequence[Mapping[str, Any]], tokenizer: Any, pad_to: int | None, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask (and token_type_ids when present) of tokenized examples."""
    ids = [e[f"{prefix}input_ids"] for e in examples]
    batch = {
        f"{prefix}input_ids": pad(ids, pad_id(tokenizer), pad_to),
        f"{prefix}attention_mask": pad([[1] * len(s) for s in ids], 0, pad_to),
    }
    if f"{prefix}token_type_ids" in examples[0]:
        batch[f"{prefix}token_type_ids"] = pad([e[f"{prefix}token_type_ids"] for e in examples], 0, pad_to)
    return batch


def tokenize(tokenizer: Any, text: Any, run: Any, text_pair: Any = None, **extra: Any) -> Any:
    """The tokenizer's encoding of one text (or pair) with data.max_length / data.truncation."""
    kwargs: dict[str, Any] = {"truncation": run.data.truncation}
    if run.data.truncation:
        kwargs["max_length"] = run.data.max_length
    return tokenizer(str(text), None if text_pair is None else str(text_pair), **kwargs, **extra)


def token_fields(encoding: Any) -> dict[str, list[int]]:
    fields = {"input_ids": list(encoding["input_ids"])}
    if "token_type_ids" in encoding:
        fields["token_type_ids"] = list(encoding["token_type_ids"])
    return fields


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def to_device(batch: Mapping[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------ label sets
def check_labels(key: str, labels: Sequence[str]) -> None:
    if len(labels) < 2:
        raise ConfigError(key, list(labels), "needs at least two labels", f"e.g. {key}=[negative,positive]")
    if len(set(map(str, labels))) != len(labels):
        raise ConfigError(key, list(labels), "has duplicate labels", "list each label once")


def label_index(value: Any, labels: Sequence[str]) -> int | None:
    """A label given by name, or by its index (an int, or digits in a CSV cell); None if neither.
    A label set with integer names (star ratings 1..5, the classes 0 and 2 a training split had)
    reads a number as a name only: as an index, 0 would silently be the class named '1'."""
    names = [str(label) for label in labels]
    if str(value) in names:
        return names.index(str(value))
    if isinstance(value, bool) or _integer_names(names):
        return None
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        index = int(value)
        return index if 0 <= index < len(names) else None
    return None


def label_problem(value: Any, labels: Sequence[str], key: str) -> str | None:
    if label_index(value, labels) is not None:
        return None
    shown = str(list(labels)) if len(labels) <= 10 else f"{str(list(labels[:10]))[:-1]}, ... ({len(labels)} labels)]"
    allowed = "a label name" if _integer_names(labels) else f"a label name or an index 0..{len(labels) - 1}"
    return f"label {value!r} is not in the label set {shown} (give {allowed}; or change {key})"


def _integer_names(labels: Sequence[Any]) -> bool:
    return any(str(label).lstrip("-").isdigit() for label in labels)


def label_config(labels: Sequence[str]) -> dict[str, Any]:
    """num_labels / id2label / label2id for a transformers config."""
    names = [str(label) for label in labels]
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
    }


def sorted_labels(labels: set[str]) -> list[str]:
    """Label names in a stable order: numerically when they are all integers, else as text."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def labels_for_count(labels: Sequence[str] | None, count: int) -> tuple[str, ...]:
    """Keep a label set that has `count` entries, else transformers' default names LABEL_i."""
    if labels is not None and len(labels) == count:
        return tuple(labels)
    return tuple(f"LABEL_{i}" for i in range(count))


# --------------------------------------------------------------------- classification sums
def classification_stats(pred: torch.Tensor, gold: torch.Tensor, num_labels: int) -> dict[str, torch.Tensor]:
    """Sums for accuracy and macro-F1; positions where gold == IGNORE_INDEX are skipped."""
    keep = gold != IGNORE_INDEX
    pred, gold = pred[keep], gold[keep]
    stats = {"correct": (pred == gold).sum(), "count": torch.tensor(gold.numel())}
    for c in range(num_labels):
        is_pred, is_gold = pred == c, gold == c
        stats[f"tp_{c}"] = (is_pred & is_gold).sum()
        stats[f"fp_{c}"] = (is_pred & ~is_gold).sum()
        stats[f"fn_{c}"] = (~is_pred & is_gold).sum()
    return stats


def classification_metrics(totals: Mapping[str, float], num_labels: int) -> dict[str, float]:
    count = totals.get("count", 0)
    if not count:
        return {}
    scores = []
    for c in range(num_labels):
        tp, fp, fn = (totals.get(f"{kind}_{c}", 0.0) for kind in ("tp", "fp", "fn"))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return {
        "val_accuracy": totals["correct"] / count,
        "val_macro_f1": sum(scores) / len(scores) if scores else 0.0,
    }
