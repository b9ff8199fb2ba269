"""An optimizer step's loss is the mean over all of the step's tokens (or examples), however the
step is split into accumulated micro-batches or processes: batch 2 accumulated 4 times trains as
batch 8 does (peftc/training/step_loss.py)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

import peftc
from peftc import tasks
from peftc.planning.model_source import load_tokenizer
from peftc.training.lightning import PeftcLightningModule, build_trainer
from peftc.training.loaders import dataloaders
from peftc.training.step_loss import BATCH_TERMS, STEP_TERMS, step_weight

# Trained tokens per row differ 40-fold: a batch of short answers and one of long answers would
# count alike if each micro-batch's own mean were averaged.
ANSWERS = ["yes", "the owl flew over the barn and the fox " * 4, "no", "a red apple fell from the old tree " * 3]


def _rows_file(tmp_path: Path, rows: int) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "rows.jsonl"
    lines = [{"prompt": f"question {i}:", "response": ANSWERS[i % len(ANSWERS)].strip()} for i in range(rows)]
    path.write_text("\n".join(json.dumps(line) for line in lines))
    return path


def _plan(tmp_path: Path, task: str, batch_size: int, accumulate: int, rows: int, *extra: str) -> peftc.Plan:
    data = {
        "causal_lm": [
            f"data.path={_rows_file(tmp_path, rows)}",
            "data.source=jsonl",
            "data.format=prompt_response",
            "task.packing=false",
            "data.val_fraction=0",
        ],
        "seq_cls": [f"data.limit_examples={rows}", "task.labels=[negative,positive]"],
    }[task]
    return peftc.compile(
        [f"task={task}", "model=tiny_llama", "peft.lora_dropout=0", "trainer.logger=none", "trainer.max_steps=1"]
        + [f"data.batch_size={batch_size}", f"trainer.accumulate_grad_batches={accumulate}", "data.max_length=64"]
        + data
        + list(extra)
    )


class _StepGradients(L.Callback):
    """The adapter's gradients as the optimizer is about to take the first step."""

    def __init__(self) -> None:
        self.gradients: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:  # noqa: ANN001
        if not self.gradients:
            self.gradients = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def _first_step(plan: peftc.Plan, tmp_path: Path) -> tuple[dict[str, torch.Tensor], float]:
    """The adapter's gradients at the first optimizer step, and the loss logged for that step."""
    torch.manual_seed(0)
    model = peftc.materialize(plan)
    train, _ = dataloaders(plan, load_tokenizer(plan.spec.model))
    capture = _StepGradients()
    module = PeftcLightningModule(model, tasks.get(plan.task), plan)
    trainer = build_trainer(plan, tmp_path, [capture])
    trainer.fit(module, train)
    return capture.gradients, float(trainer.callback_metrics["train_loss"])


@pytest.mark.parametrize("task", ["causal_lm", "seq_cls"])
def test_accumulated_micro_batches_give_the_gradient_and_loss_of_one_large_batch(tmp_path: Path, task: str) -> None:
    # 8 rows in one batch, or 4 micro-batches of 2 (the same rows: the sampler's order is fixed);
    # 7 rows make the seq_cls step's last micro-batch a single row.
    rows = 8 if task == "causal_lm" else 7
    whole, whole_loss = _first_step(_plan(tmp_path / "a", task, 8, 1, rows), tmp_path / "a")
    split, split_loss = _first_step(_plan(tmp_path / "b", task, 2, 4, rows), tmp_path / "b")
    assert split_loss == pytest.approx(whole_loss, rel=1e-6), "train_loss is the step's loss, not a micro-batch's"
    assert whole.keys() == split.keys() and whole
    moved = [name for name, gradient in whole.items() if gradient.abs().max() > 0]
    assert moved, "the step must have gradients to compare"
    for name in whole:
        scale = whole[name].abs().max().clamp_min(1e-12)
        assert (split[name] - whole[name]).abs().max() / scale < 1e-5, name


def test_the_step_weight_counts_every_rank_and_undoes_the_averages() -> None:
    """Lightning divides each micro-batch's loss by the batches per step and DDP averages the
    ranks: the weight of a batch of 30 tokens in a step of 100 tokens per rank on 2 ranks is
    30 x 4 x 2 / 200."""

    class _Strategy:
        def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
            assert reduce_op == "sum"
            return tensor * 2  # the other rank's step holds as many terms

    class _Trainer:
        world_size, accumulate_grad_batches, strategy = 2, 4, _Strategy()

    weight = step_weight(torch.tensor(30), torch.tensor(100), _Trainer())
    assert weight.item() == pytest.approx(30 * 4 * 2 / 200)


def test_the_training_loader_tags_each_batch_with_the_terms_its_loss_averages(tmp_path: Path) -> None:
    # 4 batches: a step of 3, then one of 1. Prompt tokens are trained too, so that a batch's
    # first token, which nothing predicts, would be miscounted.
    plan = _plan(tmp_path, "causal_lm", 2, 3, 8, "task.train_on_prompt=true")
    train, _ = dataloaders(plan, load_tokenizer(plan.spec.model))
    task, model = tasks.get(plan.task), peftc.materialize(plan).eval()
    batches = list(train)
    with torch.no_grad():
        counted = [
            int(task.validation_stats(model, {k: v for k, v in b.items() if not k.startswith("peftc_")})["tokens"])
            for b in batches
        ]
    assert [int(b[BATCH_TERMS]) for b in batches] == counted
    assert [int(b[STEP_TERMS]) for b in batches] == [sum(counted[:3])] * 3 + [counted[3]]
