"""Every task end to end from the command line on a tiny model: train a few steps, save, reload
the adapter by path (base rebuilt from what was saved) and predict exactly what the trained
model predicted before saving."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

import peftc
from peftc import tasks
from peftc.planning.model_source import load_tokenizer
from tests.helpers import run_cli

pytestmark = pytest.mark.slow

TASK_MODELS = [
    ("causal_lm", "tiny_gpt2"),
    ("seq2seq_lm", "tiny_t5"),
    ("seq_cls", "tiny_bert"),
    ("token_cls", "tiny_llama"),  # a decoder's `score` head
    ("question_ans", "tiny_bert"),
    ("feature_extraction", "tiny_bert"),
]


def assert_same(before: Any, after: Any, where: str = "") -> None:
    if isinstance(before, float):
        assert math.isclose(before, after, rel_tol=1e-4, abs_tol=1e-5), f"{where}: {before} != {after}"
    elif isinstance(before, dict):
        assert before.keys() == after.keys(), where
        for key in before:
            assert_same(before[key], after[key], f"{where}.{key}")
    elif isinstance(before, list):
        assert len(before) == len(after), where
        for i, (b, a) in enumerate(zip(before, after)):
            assert_same(b, a, f"{where}[{i}]")
    else:
        assert before == after, f"{where}: {before!r} != {after!r}"


@pytest.mark.parametrize(("task_name", "model"), TASK_MODELS)
def test_task_trains_saves_and_reloads_with_the_same_predictions(tmp_path: Path, task_name: str, model: str) -> None:
    result = run_cli(
        [f"task={task_name}", f"model={model}", "trainer.max_steps=4", f"hydra.run.dir={tmp_path}"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    task = tasks.get(task_name)
    assert metrics["steps"] == 4 and task.primary_metric in metrics
    heads = {m["path"] for m in json.loads((tmp_path / "plan.json").read_text())["modules_to_save"]}
    assert len(heads) == (1 if task.head_modules else 0) and heads <= set(task.head_modules)
    if heads:  # the head is shown in the plan and saved whole in the adapter file
        assert "modules trained in full and saved" in result.stdout
        saved = safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt").keys()
        assert f"base_model.model.{heads.pop()}.weight" in saved
    before = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(before) == 4

    reloaded = peftc.load_adapter(tmp_path / "adapter")
    run = reloaded.plan_of("default").spec
    assert type(run.task) is task.schema and run.model.name == model
    rows = [{field: p[field] for field in task.input_fields} for p in before]
    after = task.predict(reloaded, rows, load_tokenizer(run.model), run)
    assert_same(before, after)


def test_question_ans_windows_long_contexts_and_scores_each_example_once(tmp_path: Path) -> None:
    """Contexts longer than data.max_length are cut into windows (task.doc_stride): training
    validates per example, action=eval (batched otherwise) gets the same metrics over the 10
    validation rows, and each prediction is an answer read from its own context."""
    long_contexts = ["task=question_ans", "model=tiny_bert", "data.max_length=64", "trainer.max_steps=2"]
    long_contexts += ["data.limit_examples=16", "data.limit_val_examples=10"]
    trained = tmp_path / "train"
    result = run_cli([*long_contexts, "data.eval_batch_size=3", f"hydra.run.dir={trained}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    evaluated = tmp_path / "eval"
    result = run_cli(
        ["action=eval", f"adapter={trained / 'adapter'}", "data.eval_batch_size=4", f"hydra.run.dir={evaluated}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    at_training = json.loads((trained / "metrics.json").read_text())
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["examples"] == 10
    for key in ("val_exact_match", "val_f1"):
        assert metrics[key] == pytest.approx(at_training[key], abs=1e-6)
    predictions = [json.loads(line) for line in (trained / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4
    assert all(p["context"][p["start"] : p["end"]] == p["answer"] for p in predictions)
