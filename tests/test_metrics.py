"""Task metrics on hand-made examples with known answers, and exact aggregation over batches."""

from __future__ import annotations

import math

import pytest
import torch

from peftc import tasks
from peftc.tasks.common import IGNORE_INDEX, classification_metrics, classification_stats, label_index


def summed(*stats: dict[str, torch.Tensor]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for part in stats:
        for key, value in part.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def test_accuracy_and_macro_f1_match_hand_computed_values() -> None:
    pred = torch.tensor([0, 0, 1, 1, 2])
    gold = torch.tensor([0, 1, 1, 1, 2])
    metrics = classification_metrics(summed(classification_stats(pred, gold, 3)), 3)
    # class 0: TP1 FP1 FN0 -> 2/3; class 1: TP2 FP0 FN1 -> 4/5; class 2: TP1 -> 1
    assert metrics["val_accuracy"] == pytest.approx(4 / 5)
    assert metrics["val_macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)


def test_macro_f1_skips_classes_that_never_occur_and_ignored_positions() -> None:
    pred = torch.tensor([1, 1, 0, 2])
    gold = torch.tensor([1, 0, IGNORE_INDEX, IGNORE_INDEX])
    metrics = classification_metrics(summed(classification_stats(pred, gold, 4)), 4)
    # kept: (1,1) and (1,0). class 1: TP1 FP1 -> 2/3; class 0: FN1 -> 0; classes 2, 3 absent
    assert metrics["val_accuracy"] == pytest.approx(1 / 2)
    assert metrics["val_macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_classification_metrics_are_the_same_however_the_split_is_batched() -> None:
    generator = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 3, (37,), generator=generator)
    gold = torch.randint(0, 3, (37,), generator=generator)
    whole = classification_metrics(summed(classification_stats(pred, gold, 3)), 3)
    parts = [classification_stats(p, g, 3) for p, g in zip(pred.split(5), gold.split(5))]
    assert classification_metrics(summed(*parts), 3) == pytest.approx(whole)


def test_seq_cls_metrics_from_logits() -> None:
    task = tasks.get("seq_cls")

    class Fixed(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, **_: object) -> object:
            logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
            return type("Out", (), {"logits": logits})()

    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "labels": torch.tensor([0, 1, 1, 1])}
    metrics = task.metrics(summed(task.validation_stats(Fixed(), batch)))
    # predictions 0, 1, 0, 1 -> 3 of 4 right; class 0: TP1 FP1 -> 2/3; class 1: TP2 FN1 -> 4/5
    assert metrics == pytest.approx({"val_accuracy": 0.75, "val_macro_f1": (2 / 3 + 4 / 5) / 2})


def test_seq2seq_perplexity_is_exp_of_mean_target_token_loss() -> None:
    task = tasks.get("seq2seq_lm")
    vocab = 5
    logits = torch.log_softmax(torch.randn(2, 3, vocab, generator=torch.Generator().manual_seed(1)), -1)
    labels = torch.tensor([[1, 2, IGNORE_INDEX], [3, IGNORE_INDEX, IGNORE_INDEX]])

    class Fixed(torch.nn.Module):
        def forward(self, **_: object) -> object:
            return type("Out", (), {"logits": logits})()

    stats = [
        task.validation_stats(Fixed(), {"labels": labels}),
    ]
    metrics = task.metrics(summed(*stats))
    expected = -(logits[0, 0, 1] + logits[0, 1, 2] + logits[1, 0, 3]) / 3
    assert metrics["val_loss"] == pytest.approx(float(expected), rel=1e-6)
    assert metrics["val_perplexity"] == pytest.approx(math.exp(float(expected)), rel=1e-6)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("positive", 1), ("negative", 0), (1, 1), ("0", 0), (2, None), ("neutral", None), (True, None), (-1, None)],
)
def test_labels_are_names_or_indices(value: object, expected: int | None) -> None:
    assert label_index(value, ["negative", "positive"]) == expected
