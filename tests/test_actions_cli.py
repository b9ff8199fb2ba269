"""action=eval and action=predict from the command line, on an adapter saved by a training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftc.errors import ConfigError
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained")
    result = run_cli(
        [
            "task=seq_cls",
            "model=tiny_bert",
            "task.labels=[negative,positive]",
            "trainer.max_steps=4",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=run_dir,
    )
    assert result.returncode == 0, result.stderr
    return run_dir


def test_eval_on_a_saved_adapter_gives_the_training_run_metrics(trained: Path, tmp_path: Path) -> None:
    result = run_cli(["action=eval", f"adapter={trained / 'adapter'}", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "validation: val_accuracy=" in result.stdout
    evaluated = json.loads((tmp_path / "metrics.json").read_text())
    at_training = json.loads((trained / "metrics.json").read_text())
    for key in ("val_accuracy", "val_macro_f1"):
        assert evaluated[key] == pytest.approx(at_training[key], abs=1e-6)
    assert evaluated["examples"] == 200


def test_eval_reads_the_data_the_run_was_trained_on(tmp_path: Path) -> None:
    """A run on the user's CSV (labels bad/good): eval on its adapter evaluates that CSV, not the
    built-in set, says so, and gets the training run's validation metrics; an override still wins."""
    reviews = tmp_path / "reviews.csv"
    rows = "".join(f"great thing {i},good\nawful thing {i},bad\n" for i in range(20))
    reviews.write_text("text,label\n" + rows)
    run_dir = tmp_path / "run"
    trained = run_cli(
        ["task=seq_cls", "model=tiny_bert", "data.source=csv", f"data.path={reviews}", "trainer.max_steps=2",
         "predict_samples=0", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    evaluated = tmp_path / "eval"
    result = run_cli(["action=eval", f"adapter={run_dir / 'adapter'}", f"hydra.run.dir={evaluated}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"data: csv {reviews} (as trained)" in result.stdout
    at_training = json.loads((run_dir / "metrics.json").read_text())
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["val_accuracy"] == pytest.approx(at_training["val_accuracy"], abs=1e-6)
    other = tmp_path / "other.csv"
    other.write_text("text,label\n" + "fine,good\nbad,bad\n" * 15)
    result = run_cli(["action=eval", f"adapter={run_dir / 'adapter'}", f"data.path={other}",
                      f"hydra.run.dir={tmp_path / 'eval2'}"], cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"data: csv {other}\n" in result.stdout


def test_predict_from_a_file_repeats_the_predictions_made_before_saving(trained: Path, tmp_path: Path) -> None:
    before = [json.loads(line) for line in (trained / "predictions.jsonl").read_text().splitlines()]
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("".join(p["text"] + "\n" for p in before))
    result = run_cli(
        ["action=predict", f"adapter={trained / 'adapter'}", f"input_file={inputs}", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    after = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [p["label"] for p in after] == [p["label"] for p in before]
    for b, a in zip(before, after):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)


def test_predict_on_one_text_prints_the_label(trained: Path, tmp_path: Path) -> None:
    result = run_cli(
        [
            "action=predict",
            f"adapter={trained / 'adapter'}",
            'input="The meal was not bad."',
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (prediction,) = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert prediction["text"] == "The meal was not bad." and prediction["label"] in ("negative", "positive")
    assert json.dumps(prediction) in result.stdout


def test_predict_with_the_task_named_takes_the_adapters_label_set(trained: Path, tmp_path: Path) -> None:
    """task=seq_cls on the command line turns off the adapter's saved task settings: the label
    set then comes from the adapter's head, not from task.labels (unset)."""
    args = ["action=predict", "task=seq_cls", "model=tiny_bert", f"adapter={trained / 'adapter'}", "input=fine"]
    result = run_cli([*args, f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (prediction,) = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert set(prediction["scores"]) == {"negative", "positive"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["action=predict"], "error: input: action=predict needs something to predict on"),
        (["action=eval", "adapter=/no/such/adapter"], "error: /no/such/adapter: no such adapter directory"),
        (
            ["adapter=ADAPTER", "task=causal_lm"],
            "error: task='causal_lm': the adapter in ADAPTER was trained for task=seq_cls",
        ),
        (["action=eval", "adapter=ADAPTER", "task=causal_lm"], "was trained for task=seq_cls"),
        (["action=predict", "adapter=ADAPTER", "input={txt: hello}"], "input 1 has no 'text'"),
    ],
)
def test_bad_action_input_is_one_message_and_exit_status_2(
    trained: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    args = [a.replace("ADAPTER", str(trained / "adapter")) for a in args]
    result = run_cli([*args, f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message.replace("ADAPTER", str(trained / "adapter")) in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_input_file_is_refused_before_the_model_loads_or_a_run_directory_exists(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text('{"text": "fine"}\n{"txt": "a typo in the field name"}\n')

    def load(run: object) -> None:
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr("peftc.cli.actions._model_and_run", load)
    run_dir = tmp_path / "run"
    result = run_cli(
        ["action=predict", f"adapter={trained / 'adapter'}", f"input_file={inputs}", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert f"{inputs}" in result.stderr and "row 2" in result.stderr and "'text'" in result.stderr
    assert not run_dir.exists()


def test_an_action_reads_its_inputs_before_it_loads_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also where no preflight runs first (a sweep's job, the Python API)."""
    from peftc.cli.actions import run_action
    from peftc.config.compose import compose, to_spec

    def load(run: object) -> None:
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr("peftc.cli.actions._model_and_run", load)
    run = to_spec(compose(["action=predict", "input={txt: hello}"]))
    with pytest.raises(ConfigError, match="input 1 has no 'text'"):
        run_action(run, tmp_path / "out")


def test_a_bad_label_in_user_data_stops_the_run_with_file_and_row(tmp_path: Path) -> None:
    data = tmp_path / "reviews.csv"
    data.write_text("review,stars\ngreat,good\nawful,bad\nso-so,meh\n")
    result = run_cli(
        [
            "task=seq_cls",
            "model=tiny_bert",
            "task.labels=[bad,good]",
            "data.source=csv",
            f"data.path={data}",
            "data.columns={text: review, label: stars}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert f"error: {data} row 3: label 'meh' is not in the label set ['bad', 'good']" in result.stderr
    assert not (tmp_path / "run" / "adapter").exists()


def test_merge_writes_a_model_transformers_loads_with_the_adapters_outputs(trained: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import peftc
    from tests.helpers import max_diff, token_batch

    result = run_cli(["action=merge", f"adapter={trained / 'adapter'}", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Writing model shards" not in result.stderr  # no progress-bar noise
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")("good")["input_ids"]
    adapted = peftc.load_adapter(trained / "adapter").eval()
    x = token_batch()
    with torch.no_grad():
        assert max_diff(merged(input_ids=x).logits, adapted(input_ids=x).logits) <= 1e-5
        with adapted.disable_adapter():
            assert max_diff(merged(input_ids=x).logits, adapted(input_ids=x).logits) > 1e-4, "the adapter was merged"


def test_the_card_names_a_hub_base_and_never_a_local_path(trained: Path) -> None:
    """The Hub reads `base_model:` as a model id: a local path is an invalid entry, and shows the path."""
    import peftc
    from peftc.cli.export import model_card

    plan = peftc.load_adapter(trained / "adapter").plan_of("default")
    hub = model_card(plan, {"base_model_name_or_path": "org/base-1B"}, {})
    assert hub.startswith("---\nlibrary_name: peft\nbase_model: org/base-1B\ntags:\n")
    local = model_card(plan, {"base_model_name_or_path": str(trained)}, {})
    assert "base_model:" not in local and f'from_pretrained("{trained}")' in local


def test_export_is_an_uploadable_adapter_with_a_model_card(trained: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel

    import peftc
    from tests.helpers import build_base, max_diff, token_batch

    result = run_cli(["action=export", f"adapter={trained / 'adapter'}", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    export = tmp_path / "export"
    card = (export / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\ntags:\n")  # a config-built base is no Hub id to name
    metrics = json.loads((trained / "metrics.json").read_text())
    assert f"| val_accuracy | {metrics['val_accuracy']:.4g} |" in card and "PeftModel.from_pretrained" in card
    shown = [k for k in metrics if k.startswith(("train_", "val_"))]
    assert any(k.startswith("train_") for k in shown) and all(f"| {k} | {metrics[k]:.4g} |" in card for k in shown)
    assert "after 4 training steps." in card
    # the plan file too: peftc.load_adapter on the export restores the task's settings (the labels)
    assert peftc.load_adapter(export).plan_of("default").spec.task.labels == ("negative", "positive")
    adapted = peftc.load_adapter(trained / "adapter").eval()
    theirs = PeftModel.from_pretrained(build_base(adapted.plan_of("default")), export).eval()
    x = token_batch()
    with torch.no_grad():
        assert max_diff(theirs(input_ids=x).logits, adapted(input_ids=x).logits) <= 1e-5


def test_eval_and_predict_without_an_adapter_use_the_labels_the_plan_read_from_the_data(tmp_path: Path) -> None:
    """No adapter= and no task.labels: the plan's untrained adapter, with the label set of the
    training data (as training has it); predictions go to the run directory, not the cwd."""
    common = ["task=seq_cls", "model=tiny_bert", "data.limit_val_examples=4"]
    evaluated = run_cli(["action=eval", *common, f"hydra.run.dir={tmp_path / 'eval'}"], cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["examples"] == 4
    predicted = run_cli(
        ["action=predict", *common, "input=good", f"hydra.run.dir={tmp_path / 'predict'}"], cwd=tmp_path
    )
    assert predicted.returncode == 0, predicted.stderr
    (prediction,) = [json.loads(line) for line in (tmp_path / "predict" / "predictions.jsonl").read_text().splitlines()]
    assert set(prediction["scores"]) == {"negative", "positive"}
    assert not (tmp_path / "predictions.jsonl").exists()


def test_eval_on_an_empty_validation_split_is_one_error(tmp_path: Path) -> None:
    reviews = tmp_path / "reviews.csv"
    reviews.write_text("text,label\ngreat,good\nawful,bad\n")
    result = run_cli(
        ["action=eval", "task=seq_cls", "model=tiny_bert", "data.source=csv", f"data.path={reviews}",
         "data.val_fraction=0", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "error: data: the validation split is empty; set data.val_fraction>0 or data.val_path" in result.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_task_settings_given_beside_an_adapter_win_over_the_saved_ones(tmp_path: Path) -> None:
    import peftc

    plan = peftc.compile(["model=tiny_llama", "peft.init_lora_weights=false", "task.max_new_tokens=40"])
    peftc.materialize(plan).save_adapter(tmp_path / "adapter")
    result = run_cli(
        ["action=predict", f"adapter={tmp_path / 'adapter'}", "input=hello", "task.max_new_tokens=2",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (prediction,) = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert 1 <= len(prediction["generated"]) <= 2  # byte-level tokenizer: a token is at most a character


def test_predict_writes_whole_embeddings_and_shortens_only_what_it_prints(tmp_path: Path) -> None:
    result = run_cli(
        ["action=predict", "task=feature_extraction", "model=tiny_bert", "input=hello", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (prediction,) = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(prediction["embedding"]) == 64 and all(isinstance(v, float) for v in prediction["embedding"])
    assert '"... 64 values"' in result.stdout
