"""Every registered method trains under Lightning's bf16-mixed and bf16-true precisions (both run
on CPU) with the loss and adapter gradients of its float32 run, within bf16 tolerance.

bf16-mixed runs the user's setup, `model.dtype=bfloat16 trainer.precision=bf16-mixed`: a bf16 base
with float32 adapters (peft's autocast_adapter_dtype) under autocast. Its float32 reference holds
the same numbers: the same adapter values over the bf16-rounded base. bf16-true converts the whole
model to bf16 (Lightning's HalfPrecision), adapters included.

Methods come from the registry, so a new method is covered without editing this file; VARIANTS
adds the options that change a method's forward (DoRA).
"""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftc
from peftc import methods, tasks
from peftc.planning import model_source
from peftc.tasks.common import IGNORE_INDEX
from peftc.training.lightning import PeftcLightningModule, quiet_lightning
from tests.helpers import build_base, run_cli, token_batch

# ensure_weight_tying on a tied embedding and head (tie_word_embeddings): the head's LoRA factors
# are the embedding's, transposed (TiedFactor: tensors it reads, not owns). The tied trained copy
# (modules_to_save) is one shared nn.Parameter, checked in tests/test_weight_tying.py.
VARIANTS = {
    "dora": ("peft=lora", "peft.use_dora=true"),
    "lora tied": (
        "peft=lora",
        "++model.config.tie_word_embeddings=true",
        "peft.ensure_weight_tying=true",
        "peft.target_modules=[embed_tokens,q_proj]",
    ),
}
BASE = ("model=tiny_llama", "model.config.num_hidden_layers=1")  # one block: half the cost, same code paths
# Tasks whose loss peftc computes another way than causal LM's (on one method: the loss is the task's)
TASK_CASES = {
    "lora seq2seq_lm": (
        "peft=lora",
        "model=tiny_t5",
        "task=seq2seq_lm",
        "model.config.num_layers=1",
        "model.config.num_decoder_layers=1",
    ),
    "lora seq_cls": ("peft=lora", "model=tiny_bert", "task=seq_cls", "task.labels=[a,b,c]"),
    "lora token_cls": ("peft=lora", "model=tiny_bert", "task=token_cls", "task.labels=[O,A,B]"),
    "lora question_ans": ("peft=lora", *BASE, "task=question_ans"),
}
STEPS = 2
# bf16 keeps 8 significant bits (relative rounding 2^-9). Measured on these cases: losses agree
# to <= 2.3e-4 relative, first-step gradients to <= 0.034 of their norm (p-tuning's MLP; others
# ~0.01); the bounds leave about 2x room (kernel changes move bf16 sums within rounding).
LOSS_TOLERANCE = 2e-3
GRADIENT_TOLERANCE = 0.06
ZERO_GRADIENT = 1e-5  # a gradient this small against the largest one is float32 rounding of zero


def registered_method_cases() -> dict[str, tuple[str, ...]]:
    """Hydra overrides per case: every registered method with its defaults, plus VARIANTS, on BASE."""
    on_base = {**{name: (f"peft={name}",) for name in sorted(methods.all_methods())}, **VARIANTS}
    return {name: (*overrides, *BASE) for name, overrides in on_base.items()}


METHOD_CASES = registered_method_cases()
CASES = {**METHOD_CASES, **TASK_CASES}


@dataclass
class Reference:
    loss: float
    gradients: dict[str, torch.Tensor]


def training_batch(plan: Any) -> dict[str, torch.Tensor]:
    ids = token_batch()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **task_targets(plan.task, ids)}
    for key, field in methods.get(plan.method).batch_fields(plan.spec.peft).items():
        batch[key] = torch.full((ids.shape[0],), field.default, dtype=torch.long)
    return batch


def task_targets(task: str, ids: torch.Tensor, num_labels: int = 3) -> dict[str, torch.Tensor]:
    """What a batch of `task` carries beside its inputs, made from the token ids (language models:
    the ids themselves; a tagger: every third token unlabelled; a span: one end past the input)."""
    if task == "seq_cls":
        return {"labels": ids[:, 0] % num_labels}
    if task == "token_cls":
        return {"labels": (ids % num_labels).masked_fill(ids % 3 == 0, IGNORE_INDEX)}
    if task == "question_ans":
        length = ids.shape[1]
        return {"start_positions": ids[:, 0] % length, "end_positions": ids[:, 1] % length + length // 2}
    return {"labels": ids}


def lightning_module(model: nn.Module, plan: Any) -> PeftcLightningModule:
    return PeftcLightningModule(model, tasks.get(plan.task), plan)


@functools.cache
def adapted_model(case: str) -> tuple[nn.Module, Any]:
    """(model, plan): float32 adapters moved off their identity init (every adapter tensor then
    changes the output and has a gradient) over a base rounded to bf16 values. Shared: copy it
    before changing it."""
    plan = peftc.compile(list(CASES[case]))
    torch.manual_seed(0)
    model = peftc.materialize(plan, base_model=build_base(plan))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
            else:  # values the bf16 base of the bf16-mixed run holds exactly
                param.copy_(param.to(torch.bfloat16))
    return model, plan


@functools.cache
def reference(case: str) -> Reference:
    """The float32 run's first step, computed once per case and shared by both precisions."""
    model, plan = adapted_model(case)
    model = copy.deepcopy(model).train()
    with warnings.catch_warnings():  # training_step logs; without a Trainer, Lightning warns that it cannot
        warnings.simplefilter("ignore")
        loss = lightning_module(model, plan).training_step(training_batch(plan), 0)
    loss.backward()
    gradients = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return Reference(float(loss.detach()), gradients)


class FirstStep(L.Callback):
    """Records the first step's loss and gradients (before the optimizer changes anything)."""

    def __init__(self) -> None:
        self.gradients: dict[str, torch.Tensor] = {}
        self.losses: list[float] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        if not self.gradients:
            prefix = "model."
            self.gradients = {
                n.removeprefix(prefix): p.grad.float().clone() for n, p in module.named_parameters() if p.requires_grad
            }

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses.append(float(outputs["loss"]))


def train(model: nn.Module, plan: Any, precision: str) -> FirstStep:
    quiet_lightning()
    model.train()  # as peftc.training.lightning.fit does
    batch = training_batch(plan)
    recorder = FirstStep()
    trainer = L.Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=STEPS,
        logger=False,
        callbacks=[recorder],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    torch.manual_seed(1)
    with warnings.catch_warnings():  # no validation data, on purpose
        warnings.filterwarnings("ignore", message=".*val_dataloader.*")
        trainer.fit(lightning_module(model, plan), torch.utils.data.DataLoader([batch] * STEPS, batch_size=None))
    return recorder


def bf16_base_model(case: str) -> tuple[nn.Module, Any]:
    """`model.dtype=bfloat16`: peftc's own bf16 base and adapters, holding the reference's values."""
    plan = peftc.compile([*CASES[case], "model.dtype=bfloat16"])
    model = peftc.materialize(plan, base_model=build_base(plan))
    model.load_state_dict(adapted_model(case)[0].state_dict())
    return model, plan


def assert_trained_like_float32(case: str, run: FirstStep, model: nn.Module) -> None:
    """The first step's loss and gradients are the float32 run's within bf16 rounding, and the
    optimizer moved the adapter."""
    start = adapted_model(case)[0].state_dict()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(p.float(), start[n].float()) for n, p in trained.items()), "no step was taken"
    expected = reference(case)
    assert len(run.losses) == STEPS and all(map(torch.isfinite, torch.tensor(run.losses)))
    assert abs(run.losses[0] - expected.loss) <= LOSS_TOLERANCE * abs(expected.loss), (run.losses[0], expected.loss)
    assert run.gradients.keys() == expected.gradients.keys()
    largest = max(gradient.norm() for gradient in expected.gradients.values())
    for name, gradient in expected.gradients.items():
        # A gradient that is zero but for float32 rounding (a span head's bias: softmax is
        # shift-invariant) is compared on the scale of the largest gradient instead of its own.
        scale = gradient.norm() if gradient.norm() > ZERO_GRADIENT * largest else largest
        error = (run.gradients[name] - gradient).norm() / scale.clamp_min(1e-12)
        assert gradient.norm() > 0, f"{name}: no gradient in the float32 run (the comparison would be vacuous)"
        assert error <= GRADIENT_TOLERANCE, f"{name}: bf16 gradient off by {error:.3f} of its norm"


@pytest.mark.parametrize("case", CASES)
def test_method_trains_in_bf16_mixed_with_float32_adapters_over_a_bf16_base(case: str) -> None:
    model, plan = bf16_base_model(case)
    run = train(model, plan, "bf16-mixed")
    assert_trained_like_float32(case, run, model)
    heads = tasks.get(plan.task).head_modules
    in_head = {n for n, _ in model.named_parameters() if any(f".{head}." in f".{n}" for head in heads)}
    adapters = {p.dtype for n, p in model.named_parameters() if p.requires_grad and n not in in_head}
    base = {p.dtype for n, p in model.named_parameters() if not p.requires_grad or n in in_head}
    assert adapters == {torch.float32}, "adapters must stay float32 under mixed precision"
    assert base == {torch.bfloat16}, (
        "the base keeps its dtype, trained heads included (as peft's autocast_adapter_dtype)"
    )


@pytest.mark.parametrize("case", CASES)
def test_method_trains_in_bf16_true_like_its_float32_run(case: str) -> None:
    model, plan = adapted_model(case)
    model = copy.deepcopy(model)
    run = train(model, plan, "bf16-true")
    assert_trained_like_float32(case, run, model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ------------------------------------------------------------ the heads' losses, in float32
# A classification or span head's loss, computed by the task from the logits. problem: how the
# labels read (seq_cls: config.problem_type, or DeBERTa's own readings when it is unset).
# own_in_bf16: transformers computes this head's loss in bf16 under bf16-true, so the task's
# float32 loss must differ from it (experiments/bf16_head_loss.py); else they must be equal.
@dataclass(frozen=True)
class HeadCase:
    task: str
    model: tuple[str, ...]
    problem: str = "single_label"
    own_in_bf16: bool = True


BERT = ("model=tiny_bert",)  # T5's heads compute their losses as BERT's do (experiments/bf16_head_loss.py)
DEBERTA = ("model=tiny_bert", "model.model_type=deberta-v2")
HEAD_CASES = {
    "seq_cls bert": HeadCase("seq_cls", BERT),
    "seq_cls bert regression": HeadCase("seq_cls", BERT, "regression", own_in_bf16=False),  # MSE promotes
    "seq_cls bert multi_label": HeadCase("seq_cls", BERT, "multi_label"),
    "seq_cls llama": HeadCase("seq_cls", BASE),
    "seq_cls deberta-v2": HeadCase("seq_cls", DEBERTA, "deberta_single", own_in_bf16=False),  # DeBERTa upcasts
    "seq_cls deberta-v2 regression": HeadCase("seq_cls", DEBERTA, "deberta_regression", own_in_bf16=False),
    "seq_cls deberta-v2 soft labels": HeadCase("seq_cls", DEBERTA, "deberta_soft"),
    # DeBERTa drops the rows of any negative label, not only -100 (its loss is 0 when none is left)
    "seq_cls deberta-v2 label -1": HeadCase("seq_cls", DEBERTA, "deberta_negative", own_in_bf16=False),
    "seq_cls deberta-v2 unlabelled": HeadCase("seq_cls", DEBERTA, "deberta_unlabelled", own_in_bf16=False),  # 0
    "token_cls bert": HeadCase("token_cls", BERT),
    "token_cls llama": HeadCase("token_cls", BASE, own_in_bf16=False),  # ForTokenClassification upcasts
    "question_ans bert": HeadCase("question_ans", BERT),
    "question_ans llama": HeadCase("question_ans", BASE),
}
HEAD_CONFIG = {  # transformers config fields per problem (the task sizes the head with its labels)
    "regression": {"num_labels": 1, "id2label": {0: "score"}, "label2id": {"score": 0}},
    "deberta_regression": {"num_labels": 1, "id2label": {0: "score"}, "label2id": {"score": 0}},
    "multi_label": {"problem_type": "multi_label_classification"},
}
FLOAT32_ROUNDING = 1e-6  # relative: two float32 computations of one loss
BF16_LOSS_GAP = 1e-4  # relative: below this, a case would not tell a bf16 loss from a float32 one


@functools.cache
def head_model(case: str) -> tuple[nn.Module, Any]:
    """(float32 base with the task's head, plan); the head's weights widened so that its logits
    are far from uniform (a fresh head's are near zero, where bf16 rounds little)."""
    spec = HEAD_CASES[case]
    labels = ("task.labels=[a,b,c]",) if spec.task != "question_ans" else ()
    plan = peftc.compile([*spec.model, f"task={spec.task}", *labels])
    task = tasks.get(plan.task)
    overrides = {**task.config_overrides(plan.spec.task), **HEAD_CONFIG.get(spec.problem, {})}
    model = model_source.build_model(plan.spec.model, task.auto_class_name, overrides)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(f".{head}." in f".{name}" for head in task.head_modules):
                param.normal_(0.0, 0.5)
    return model.train(), plan


def head_batch(case: str) -> dict[str, torch.Tensor]:
    """Inputs and targets for the case: one seq_cls row unlabelled (-100), a span end past the input."""
    spec = HEAD_CASES[case]
    ids = token_batch(batch=4, length=12)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **task_targets(spec.task, ids)}
    generator = torch.Generator().manual_seed(1)
    if spec.task == "seq_cls" and spec.problem in ("single_label", "deberta_single"):
        batch["labels"][0] = IGNORE_INDEX
    elif spec.problem in ("regression", "deberta_regression"):
        batch["labels"] = torch.randn(4, generator=generator)
    elif spec.problem == "multi_label":
        batch["labels"] = (torch.rand(4, 3, generator=generator) > 0.5).float()
    elif spec.problem == "deberta_soft":
        batch["labels"] = torch.rand(4, 3, generator=generator).softmax(-1)
    elif spec.problem == "deberta_negative":
        batch["labels"][0] = -1
    elif spec.problem == "deberta_unlabelled":
        batch["labels"] = torch.full_like(batch["labels"], -1)
    return batch


def float32_loss_of(case: str, out: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers' loss formula for the case's head, written out, on its logits cast to float32."""
    problem = HEAD_CASES[case].problem
    if HEAD_CASES[case].task == "question_ans":
        length = out.start_logits.shape[1]
        start, end = (
            F.cross_entropy(logits.float(), batch[key].clamp(0, length), ignore_index=length)
            for logits, key in ((out.start_logits, "start_positions"), (out.end_logits, "end_positions"))
        )
        return (start + end) / 2
    logits, labels = out.logits.float(), batch["labels"]
    if problem in ("regression", "deberta_regression"):
        return F.mse_loss(logits.view(-1), labels)
    if problem == "multi_label":
        return F.binary_cross_entropy_with_logits(logits, labels)
    if problem == "deberta_soft":
        return -(logits.log_softmax(-1) * labels).sum(-1).mean()
    labels, logits = labels.reshape(-1), logits.reshape(-1, logits.shape[-1])
    labelled = labels >= 0  # IGNORE_INDEX, or any negative label for DeBERTa
    return F.cross_entropy(logits[labelled], labels[labelled]) if labelled.any() else logits.sum() * 0


def task_loss(model: nn.Module, plan: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return tasks.get(plan.task).training_loss(model, batch, plan.spec.task)


def without_targets(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")}


@pytest.mark.parametrize("case", HEAD_CASES)
def test_task_loss_in_float32_is_the_models_own_loss(case: str) -> None:
    model, plan = head_model(case)
    batch = head_batch(case)
    torch.manual_seed(0)  # same dropout masks (T5's) in both calls
    loss = task_loss(model, plan, batch)
    torch.manual_seed(0)
    own = model(**batch).loss
    torch.testing.assert_close(loss, own, rtol=FLOAT32_ROUNDING, atol=0.0)


@pytest.mark.parametrize("case", HEAD_CASES)
def test_task_loss_in_bf16_true_is_the_float32_loss_of_the_bf16_logits(case: str) -> None:
    model, plan = head_model(case)
    model = copy.deepcopy(model).to(torch.bfloat16)
    batch = head_batch(case)
    torch.manual_seed(0)
    loss = task_loss(model, plan, batch)
    torch.manual_seed(0)
    expected = float32_loss_of(case, model(**without_targets(batch)), batch)
    torch.manual_seed(0)
    own = model(**batch).loss.float()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=FLOAT32_ROUNDING, atol=0.0)
    gap = float((own - expected).detach().abs() / expected.detach().abs().clamp_min(1e-12))
    if HEAD_CASES[case].own_in_bf16:
        assert gap > BF16_LOSS_GAP, f"transformers' bf16 loss is {gap:.1e} off: this case tells nothing apart"
    else:
        assert gap <= FLOAT32_ROUNDING, f"transformers' own loss is {gap:.1e} off the float32 loss here"


@pytest.mark.slow
def test_cli_trains_in_bf16_mixed_and_saves_an_adapter_peft_loads(tmp_path: Path) -> None:
    from peft import PeftModel

    result = run_cli(
        ["trainer.precision=bf16-mixed", "trainer.max_steps=3", "predict_samples=0", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plan = peftc.compile([])
    loaded = PeftModel.from_pretrained(build_base(plan), tmp_path / "adapter")
    ours = peftc.load_adapter(build_base(plan), tmp_path / "adapter").eval()
    ids = token_batch()
    torch.testing.assert_close(ours(input_ids=ids).logits, loaded.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
