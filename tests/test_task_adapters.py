"""Loading adapters back by path, for every task, across peftc and the peft package.

- An adapter the peft package saved (LoRA + the task head in modules_to_save) loads with
  `peftc.load_adapter(dir)` alone: the base is rebuilt from `base_model_name_or_path` with the
  task's head (label count read off the saved head) and gives peft's outputs.
- An adapter peftc saved loads with peft's `AutoPeftModelFor<Task>.from_pretrained(dir)` and
  gives peftc's outputs (heads included).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peftc
from peftc import tasks
from peftc.planning.model_source import load_tokenizer
from tests.helpers import build_base, max_diff, token_batch

# task, tiny model, peft auto class, label count (for heads)
CASES = [
    ("causal_lm", "tiny_llama", "AutoPeftModelForCausalLM", None),
    ("seq2seq_lm", "tiny_t5", "AutoPeftModelForSeq2SeqLM", None),
    ("seq_cls", "tiny_bert", "AutoPeftModelForSequenceClassification", 3),
    ("seq_cls", "tiny_llama", "AutoPeftModelForSequenceClassification", 2),
    ("token_cls", "tiny_bert", "AutoPeftModelForTokenClassification", 4),
    ("question_ans", "tiny_bert", "AutoPeftModelForQuestionAnswering", None),
    ("feature_extraction", "tiny_bert", "AutoPeftModelForFeatureExtraction", None),
]
IDS = [f"{task}-{model}" for task, model, _, _ in CASES]


def labels_override(count: int | None) -> list[str]:
    return [] if count is None else ["task.labels=[" + ",".join(f"L{i}" for i in range(count)) + "]"]


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], str]:
    """Each tiny model with the task's head, saved as a plain transformers directory."""
    dirs = {}
    for task, model, _, count in CASES:
        plan = peftc.compile([f"task={task}", f"model={model}", *labels_override(count)])
        path = tmp_path_factory.mktemp(f"{task}-{model}")
        build_base(plan).save_pretrained(path)
        load_tokenizer(plan.spec.model).save_pretrained(path)
        dirs[(task, model)] = str(path)
    return dirs


def inputs(task: str) -> dict[str, torch.Tensor]:
    ids = token_batch(length=10)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "seq2seq_lm":
        batch["decoder_input_ids"] = token_batch(length=6, seed=1)
    return batch


def outputs(model: torch.nn.Module, task: str) -> torch.Tensor:
    out = model(**inputs(task))
    if task == "question_ans":
        return torch.cat([out.start_logits, out.end_logits], -1)
    return out.last_hidden_state if task == "feature_extraction" else out.logits


def perturb_heads(model: torch.nn.Module) -> None:
    """Move the trainable head copies away from the base head, as training would."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)) * 0.5)


@pytest.mark.parametrize(("task", "model", "auto_class", "count"), CASES, ids=IDS)
def test_peft_saved_adapter_loads_by_path_alone(
    tmp_path: Path, base_dirs: dict, task: str, model: str, auto_class: str, count: int | None
) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.utils import TaskType

    plan = peftc.compile([f"task={task}", f"model={model}", *labels_override(count)])
    base = build_base(plan)
    base.name_or_path = base.config._name_or_path = base_dirs[(task, model)]  # peft writes base_model_name_or_path
    config = LoraConfig(task_type=TaskType(plan.task_type), r=4, lora_alpha=8, init_lora_weights=False)
    theirs = get_peft_model(base, config).eval()
    perturb_heads(theirs)
    theirs.save_pretrained(tmp_path)

    ours = peftc.load_adapter(tmp_path)
    saved = ours.plan_of("default")
    assert [m.path for m in saved.modules_to_save] == [
        m for m in tasks.get(task).head_modules if m in dict(theirs.base_model.model.named_modules())
    ]
    with torch.no_grad():
        assert max_diff(outputs(ours, task), outputs(theirs, task)) <= 1e-5
    if count is not None:
        assert len(saved.spec.task.labels) == count


@pytest.mark.parametrize(("task", "model", "auto_class", "count"), CASES, ids=IDS)
def test_peftc_adapter_loads_with_peft_auto_class(
    tmp_path: Path, base_dirs: dict, task: str, model: str, auto_class: str, count: int | None
) -> None:
    import peft

    plan = peftc.compile(
        [
            f"task={task}",
            "model=hf",
            f"model.name_or_path={base_dirs[(task, model)]}",
            "peft.init_lora_weights=false",
            *labels_override(count),
        ]
    )
    ours = peftc.materialize(plan).eval()
    perturb_heads_ours(ours)
    ours.save_adapter(tmp_path)
    theirs = getattr(peft, auto_class).from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert max_diff(outputs(ours, task), outputs(theirs, task)) <= 1e-5
        with ours.disable_adapter():
            moved = max_diff(outputs(ours, task), outputs(theirs, task))
    assert moved > 1e-4, "the adapter must change the outputs for this comparison to mean something"


def perturb_heads_ours(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for _path, wrapper in model.saved_modules():
            for param in wrapper.modules_to_save["default"].parameters():
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)) * 0.5)


def test_head_only_training_plans_no_adapter_layers_and_round_trips(tmp_path: Path, base_dirs: dict) -> None:
    import peft

    plan = peftc.compile(
        [
            "task=seq_cls",
            "model=hf",
            f"model.name_or_path={base_dirs[('seq_cls', 'tiny_bert')]}",
            "task.labels=[L0,L1,L2]",
            "peft.target_modules=dummy-target-modules",
        ]
    )
    assert plan.sites == () and [m.path for m in plan.modules_to_save] == ["classifier"]
    assert plan.trainable_params == 64 * 3 + 3
    ours = peftc.materialize(plan).eval()
    assert ours.trainable_parameters() == plan.trainable_params
    perturb_heads_ours(ours)
    ours.save_adapter(tmp_path)
    theirs = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    again = peftc.load_adapter(tmp_path)
    with torch.no_grad():
        assert max_diff(outputs(ours, "seq_cls"), outputs(theirs, "seq_cls")) <= 1e-6
        assert max_diff(outputs(ours, "seq_cls"), outputs(again, "seq_cls")) <= 1e-6


def test_head_only_needs_a_head_to_train() -> None:
    from peftc.errors import PlanError

    with pytest.raises(PlanError, match="adapts no module, and there is no task head"):
        peftc.compile(["task=causal_lm", "peft.target_modules=dummy-target-modules"])


def test_a_task_head_peft_would_leave_untrained_must_be_named() -> None:
    """T5ForSequenceClassification's head is `classification_head`, not one of the names peft
    keeps trainable: refused until peft.modules_to_save names it, then trained."""
    from peftc.errors import ConfigError

    with pytest.raises(ConfigError, match="the task head of this model is not one peft keeps trainable"):
        peftc.compile(["model=tiny_t5", "task=seq_cls"])
    plan = peftc.compile(["model=tiny_t5", "task=seq_cls", "peft.modules_to_save=[classification_head]"])
    assert [saved.path for saved in plan.modules_to_save] == ["classification_head"]
