"""The pieces of action=eval|predict that need no subprocess: inputs, Hydra quoting, overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftc import tasks
from peftc.cli.actions import adapter_overrides, hydra_value, input_rows
from peftc.config.compose import compose, to_spec
from peftc.errors import ConfigError, DataError


@pytest.mark.parametrize("labels", [["neg", "pos"], ["it's", "a,b", "sp ace", "x\\y", "end\\", "${x}", "a=b", "[1]"]])
def test_saved_task_settings_survive_hydra_quoting(labels: list[str]) -> None:
    run = to_spec(compose(["task=seq_cls", "task.labels=" + hydra_value(labels)]))
    assert run.task.labels == tuple(labels)


def test_an_adapter_brings_its_task_and_settings_but_explicit_overrides_win(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "SEQ_CLS"}))
    plan = {"spec": {"task": {"labels": ["bad", "good", "ok"]}}}
    (tmp_path / "peftc_plan.json").write_text(json.dumps(plan))
    overrides = adapter_overrides(["action=eval", f"adapter={tmp_path}"])
    assert overrides[:2] == ["task=seq_cls", "task.labels=['bad','good','ok']"]
    assert to_spec(compose(overrides)).task.labels == ("bad", "good", "ok")
    assert adapter_overrides(["action=eval", f"adapter={tmp_path}", "task=causal_lm"])[0] == "action=eval"


def run_for(overrides: list[str]) -> object:
    return to_spec(compose(["action=predict", *overrides]))


def test_predict_inputs_from_text_mapping_and_list() -> None:
    qa = tasks.get("question_ans")
    run = run_for(["task=question_ans", "model=tiny_bert", "input={question: Who?, context: Anna.}"])
    assert input_rows(run, qa) == [{"question": "Who?", "context": "Anna."}]
    seq_cls = tasks.get("seq_cls")
    run = run_for(["task=seq_cls", "model=tiny_bert", "input=[good,bad]"])
    assert input_rows(run, seq_cls) == [{"text": "good"}, {"text": "bad"}]


def test_predict_inputs_missing_a_field_name_it() -> None:
    run = run_for(["task=question_ans", "model=tiny_bert", "input={question: Who?}"])
    with pytest.raises(ConfigError, match="input 1 has no 'context'"):
        input_rows(run, tasks.get("question_ans"))


def test_predict_input_files(tmp_path: Path) -> None:
    text = tmp_path / "in.txt"
    text.write_text("one\n\ntwo\n")
    run = run_for(["task=seq_cls", "model=tiny_bert", f"input_file={text}"])
    assert input_rows(run, tasks.get("seq_cls")) == [{"text": "one"}, {"text": "two"}]
    table = tmp_path / "in.csv"
    table.write_text("q,c\nWho?,Anna.\n")
    run = run_for(
        ["task=question_ans", "model=tiny_bert", f"input_file={table}", "data.columns={question: q, context: c}"]
    )
    assert input_rows(run, tasks.get("question_ans")) == [{"question": "Who?", "context": "Anna."}]
    run = run_for(["task=question_ans", "model=tiny_bert", f"input_file={text}"])
    with pytest.raises(DataError, match="a .txt file gives one field per line"):
        input_rows(run, tasks.get("question_ans"))


def test_a_whitespace_only_input_is_refused_as_empty() -> None:
    run = run_for(["task=seq_cls", "model=tiny_bert", "input=[good,'   ']"])
    with pytest.raises(ConfigError, match="'text' is empty"):
        input_rows(run, tasks.get("seq_cls"))


def test_predictions_run_the_model_in_eval_mode_and_leave_its_mode_as_it_was() -> None:
    """Sample predictions are made mid-training: dropout must be off for them, and training
    must go on in train mode afterwards."""
    import peftc
    from peftc.cli.actions import predict_rows
    from peftc.planning.model_source import load_tokenizer

    overrides = ["task.labels=[bad,good]", "peft.init_lora_weights=false", "peft.lora_dropout=0.9"]
    plan = peftc.compile(["task=seq_cls", "model=tiny_bert", *overrides])
    model, tokenizer = peftc.materialize(plan), load_tokenizer(plan.spec.model)
    rows, seq_cls = [{"text": "good"}, {"text": "not good"}], tasks.get("seq_cls")
    expected = predict_rows(model.eval(), seq_cls, rows, tokenizer, plan.spec)
    assert predict_rows(model.train(), seq_cls, rows, tokenizer, plan.spec) == expected
    assert model.training


def test_sample_predictions_are_made_from_the_first_validation_rows(tmp_path: Path) -> None:
    import peftc
    from peftc.cli.actions import sample_predictions
    from peftc.planning.model_source import load_tokenizer

    train, val = tmp_path / "train.csv", tmp_path / "val.csv"
    train.write_text("text,label\n" + "".join(f"train {i},{'good' if i % 2 else 'bad'}\n" for i in range(8)))
    val.write_text("text,label\n" + "".join(f"val {i},{'good' if i % 2 else 'bad'}\n" for i in range(8)))
    data = ["data.source=csv", f"data.path={train}", f"data.val_path={val}"]
    plan = peftc.compile(["task=seq_cls", "model=tiny_bert", *data])
    predictions = sample_predictions(peftc.materialize(plan), plan.spec, load_tokenizer(plan.spec.model), 3)
    assert [p["text"] for p in predictions] == ["val 0", "val 1", "val 2"]
