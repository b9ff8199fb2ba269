"""The learning-rate schedule (trainer.scheduler, trainer.warmup_steps), which way each task's
primary metric improves (early stopping and trainer.save_best read it), and what an HF Trainer
user's trainer.max_epochs does beside max_steps."""

from __future__ import annotations

import pytest
import torch

from peftc import tasks
from peftc.config.compose import compose, to_spec
from peftc.training.lightning import lr_schedule, metric_mode, warn_if_steps_stop_before_epochs


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


def test_the_optimizer_takes_the_trainer_settings_and_steps_the_schedule_every_step() -> None:
    """AdamW over the trainable tensors only, with trainer.lr, betas and weight_decay; the schedule
    advances every optimizer step (a warm-up stepped per epoch would never leave its first factor)."""
    configured, model = _configured(["trainer.weight_decay=0.1", "trainer.warmup_steps=2", "trainer.scheduler=linear"])
    decayed, kept = configured["optimizer"].param_groups
    for group in (decayed, kept):
        assert (group["lr"], group["betas"]) == (0.01 / 2, (0.8, 0.95))
    assert (decayed["weight_decay"], kept["weight_decay"]) == (0.1, 0.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = decayed["params"] + kept["params"]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    schedule = configured["lr_scheduler"]
    assert schedule["interval"] == "step"
    factors = [schedule["scheduler"].get_last_lr()[0] / 0.01]
    for _ in range(5):
        configured["optimizer"].step()
        schedule["scheduler"].step()
        factors.append(schedule["scheduler"].get_last_lr()[0] / 0.01)
    assert factors == pytest.approx([1 / 2, 1.0, 1.0, 0.75, 0.5, 0.25])


def _configured(overrides: list[str]) -> tuple[dict, torch.nn.Module]:
    from types import SimpleNamespace

    import peftc
    from peftc.training.lightning import PeftcLightningModule
    from tests.helpers import build_base

    settings = ["model=tiny_gpt2", "trainer.lr=0.01", "trainer.betas=[0.8,0.95]", "peft.bias=lora_only"]
    plan = peftc.compile([*settings, *overrides])
    model = peftc.materialize(plan, base_model=build_base(plan))
    module = PeftcLightningModule(model, tasks.get(plan.task), plan)
    module._trainer = SimpleNamespace(estimated_stepping_batches=6)
    return module.configure_optimizers(), model


def test_weight_decay_shrinks_matrices_and_leaves_biases_and_vectors_alone() -> None:
    """As the HF Trainer spares biases and norms and LitGPT every 1-D parameter: decay would pull
    a norm weight or an IA3 vector, which start at 1, towards 0."""
    configured, model = _configured(["trainer.weight_decay=0.5"])
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in trainable.items()}
    for p in trainable.values():
        p.grad = torch.zeros_like(p)  # the step is decay alone
    configured["optimizer"].step()
    vectors = [name for name, p in trainable.items() if p.ndim == 1]
    assert vectors, "the adapted biases are trainable vectors"
    for name, p in trainable.items():
        if p.ndim == 1:
            assert torch.equal(p, before[name]), name
        else:
            assert torch.allclose(p, before[name] * (1 - 0.01 * 0.5)), name


@pytest.mark.parametrize(
    ("override", "attribute", "expected"),
    [
        ("trainer.precision=bf16-mixed", "precision", "bf16-mixed"),
        ("trainer.gradient_clip_val=0.5", "gradient_clip_val", 0.5),
        ("trainer.accumulate_grad_batches=4", "accumulate_grad_batches", 4),
    ],
)
def test_trainer_settings_reach_lightnings_trainer(override: str, attribute: str, expected: object, tmp_path) -> None:
    """A trainer.* key the Trainer ignored would train silently without it (bf16 without autocast,
    no clipping, one batch per step)."""
    import peftc
    from peftc.training.lightning import build_trainer

    trainer = build_trainer(peftc.compile([override, "trainer.logger=none"]), tmp_path, [])
    assert getattr(trainer, attribute) == expected


def test_max_epochs_that_max_steps_cuts_short_is_a_warning_saying_how_to_train_by_epochs() -> None:
    """`trainer.max_epochs=3` alone (num_train_epochs) stops at the default max_steps, as in Lightning."""
    trainer = to_spec(compose(["trainer.max_epochs=3"])).trainer
    with pytest.warns(UserWarning, match=r"max_steps=100 stops training first, after 0\.72 epochs of 139 steps; set"):
        warn_if_steps_stop_before_epochs(trainer, batches_per_epoch=139)


@pytest.mark.parametrize(("max_steps", "warned"), [(4, False), (3, True)])
def test_an_epochs_last_partial_accumulation_is_a_step(max_steps: int, warned: bool) -> None:
    """10 batches accumulated 3 at a time are 4 optimizer steps an epoch (Lightning steps on the last 1)."""
    import warnings

    overrides = ["trainer.max_epochs=1", f"trainer.max_steps={max_steps}", "trainer.accumulate_grad_batches=3"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_steps_stop_before_epochs(to_spec(compose(overrides)).trainer, batches_per_epoch=10)
    assert bool(caught) is warned


@pytest.mark.parametrize("overrides", [["trainer.max_epochs=3", "trainer.max_steps=-1"], ["trainer.max_epochs=1"]])
def test_max_epochs_that_end_training_first_are_not_warned_about(overrides: list[str]) -> None:
    import warnings

    trainer = to_spec(compose(overrides)).trainer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_steps_stop_before_epochs(trainer, batches_per_epoch=50)
