"""The learning-rate schedule (trainer.scheduler, trainer.warmup_steps) and which way each task's
primary metric improves (early stopping and trainer.save_best read it)."""

from __future__ import annotations

import pytest
import torch

from peftc import tasks
from peftc.training.lightning import lr_schedule, metric_mode


def transformers_factors(kind: str, warmup: int, total: int) -> list[float]:
    """The multipliers HF Trainer users get from transformers' schedulers, step by step."""
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if kind == "constant":
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    else:
        make = get_linear_schedule_with_warmup if kind == "linear" else get_cosine_schedule_with_warmup
        scheduler = make(optimizer, warmup, total)
    factors = []
    for _ in range(total):
        factors.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return factors


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_the_schedule_warms_up_from_the_first_step_then_decays_as_transformers_does(kind: str) -> None:
    """Warm-up reaches the peak on its last step, and the first step already learns (1/warmup of
    the peak; transformers' schedulers give the first step 0, a step that trains nothing). From
    the end of warm-up on, the factors are transformers' for the same kind."""
    warmup, total = 3, 10
    factor = lr_schedule(kind, warmup, total)
    ours = [factor(step) for step in range(total)]
    assert ours[:warmup] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert ours[warmup:] == pytest.approx(transformers_factors(kind, warmup, total)[warmup:], abs=1e-12)
    assert lr_schedule(kind, 0, total)(0) == 1.0, "no warm-up: the first step at the peak"


# Every task's primary metric, by hand: a new task must add its line.
PRIMARY_METRICS = {
    "as_is": ("val_loss", "min"),
    "causal_lm": ("val_perplexity", "min"),
    "feature_extraction": ("val_recall_at_1", "max"),
    "question_ans": ("val_f1", "max"),
    "seq2seq_lm": ("val_perplexity", "min"),
    "seq_cls": ("val_accuracy", "max"),
    "token_cls": ("val_macro_f1", "max"),
}


def test_each_tasks_primary_metric_improves_in_the_right_direction() -> None:
    found = {name: tasks.get(name).primary_metric for name in tasks.all_tasks()}
    assert found == {name: metric for name, (metric, _) in PRIMARY_METRICS.items()}
    assert {metric: metric_mode(metric) for metric, _ in PRIMARY_METRICS.values()} == dict(PRIMARY_METRICS.values())
