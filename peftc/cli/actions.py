"""Running a model without training it: `action=eval` (the task's metrics on the validation
split) and `action=predict` (the task's predictions for given inputs), on a saved adapter
(`adapter=DIR`: base model, head and task rebuilt from the directory) or on the plan's
untrained adapter; plus the sample predictions a training run writes before saving.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from peftc import tasks
from peftc.config.spec import RunSpec, path_problem, plain
from peftc.errors import ConfigError, DataError
from peftc.files.run_dir import METRICS_FILE, PREDICTIONS_FILE


def run_action(run: RunSpec, output_dir: Path) -> dict[str, Any]:
    """action=eval|predict|merge|export; returns the summary row (metrics, the prediction count,
    or where the merged model / export was written)."""
    import torch

    from peftc.planning.model_source import load_tokenizer

    # Inputs to predict on are read first: a bad row or file is refused before the model loads
    # (the task, and the data format that shapes the rows, are the adapter's since compose).
    rows = input_rows(run, tasks.for_spec(run.task)) if run.action == "predict" else []
    model, run = _model_and_run(run)
    if run.action in ("merge", "export"):
        from peftc.cli import export

        return export.merge(model, run, output_dir) if run.action == "merge" else export.export(model, run, output_dir)
    tokenizer = load_tokenizer(run.model)
    task = tasks.for_spec(run.task)
    output_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if run.action == "eval":
            return _evaluate(model, task, run, tokenizer, output_dir)
        return _predict(model, task, rows, tokenizer, run, output_dir)


def _model_and_run(run: RunSpec) -> tuple[Any, RunSpec]:
    """The model to run and the run spec that describes it (task and model from the adapter)."""
    from peftc.planning import planner
    from peftc.planning.render import print_plan

    if run.adapter is None:
        from peftc.runtime.materialize import materialize

        plan = planner.plan(run)
        print_plan(plan)
        print("no adapter= given: running the plan's untrained adapter")
        return materialize(plan).eval(), run.replace(task=plan.spec.task)  # the labels the plan read from the data
    from peftc.files.load import load_adapter

    task = tasks.for_spec(run.task)
    model = load_adapter(run.adapter, task=task.name)  # the task only says which class rebuilds a task-less base
    plan = model.plan_of("default")
    saved = plan.spec
    if plan.task_type is None:  # saved without a task: the task given (or inferred), if the model fits it
        _check_labels_fit(model.base_model, run)
        print(
            f"adapter {run.adapter}: {plan.method} on {saved.model.label} ({plan.model.model_class}), task={task.name}"
        )
        return model, run.replace(model=saved.model)
    if type(saved.task) is not task.schema:
        raise ConfigError(
            "task",
            task.name,
            f"the adapter in {run.adapter} was trained for task={tasks.for_spec(saved.task).name}",
            "leave task= out: it follows the adapter",
        )
    # The head fixes some task settings (the label set): keep the adapter's when the run differs.
    task_spec = run.task if task.config_overrides(run.task) == task.config_overrides(saved.task) else saved.task
    print(f"adapter {run.adapter}: {plan.method} on {saved.model.label} ({plan.model.model_class}), task={task.name}")
    if run.action == "eval":
        print(f"data: {describe_data(run.data)}{' (as trained)' if run.data == saved.data else ''}")
    return model, run.replace(task=task_spec, model=saved.model)


def adapter_overrides(overrides: Sequence[str]) -> list[str]:
    """`adapter=DIR` on the command line: the task (and, for peftc adapters, its saved settings)
    follow the adapter. They go before the user's overrides, so an explicit `task.x=...` wins;
    an explicit `task=...` turns this off."""
    import dataclasses

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from peftc.config.compose import compose_error
    from peftc.files import adapter_files

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise compose_error(exc) from exc
    adapter = next((o.value() for o in parsed if o.key_or_group == "adapter"), None)
    if adapter is None or path_problem(str(adapter)) or any(o.key_or_group == "task" for o in parsed):
        return list(overrides)  # (a path problem is refused by the spec's check, naming the key)
    directory = adapter_files.adapter_directory(str(adapter))
    config = adapter_files.read_config(directory)
    task = tasks.for_task_type(config.get("task_type"), str(directory / adapter_files.CONFIG_NAME))
    if task.task_type is None:
        return [f"task={_task_of_base(directory).name}", *overrides]
    spec = (adapter_files.read_plan(directory) or {}).get("spec") or {}
    known = {f.name for f in dataclasses.fields(task.schema)}
    settings = [f"task.{k}={hydra_value(v)}" for k, v in (spec.get("task") or {}).items() if k in known]
    return [f"task={task.name}", *settings, *data_settings(spec.get("data") or {}), *overrides]


def data_settings(saved: Mapping[str, Any]) -> list[str]:
    """The data the run was trained with (file, columns, split, lengths), as overrides placed
    before the user's, which win: eval and predict read what the adapter learned from."""
    import dataclasses

    from peftc.config.spec import DataSpec

    known = {f.name for f in dataclasses.fields(DataSpec)}
    return [f"data.{k}={hydra_value(v)}" for k, v in saved.items() if k in known]


def _task_of_base(directory: Path) -> Any:
    """The task of an adapter saved without a task type: the one its base model's class has."""
    from peftc.files.provenance import base_model_task

    task = base_model_task(directory)
    if task is None:
        raise ConfigError(
            "task",
            None,
            f"the adapter in {directory} was saved without a task type (task_type null) and its base model's "
            "class has no head peftc knows",
            "pass the task, e.g. task=causal_lm or task=feature_extraction",
        )
    return task


def _check_labels_fit(model: Any, run: RunSpec) -> None:
    """A task-less adapter's base keeps its own head (load_adapter checked its class against the
    task): a label set must have as many labels as that head has rows."""
    heads = getattr(getattr(model, "config", None), "num_labels", None)
    labels = getattr(run.task, "labels", None)
    if labels is not None and heads is not None and len(labels) != heads:
        raise ConfigError(
            "task.labels",
            list(labels),
            f"has {len(labels)} labels but the head of the adapter's base model has {heads}",
            f"give its {heads} labels in class-index order",
        )


def describe_data(data: Any) -> str:
    """Which examples a run reads, in a few words."""
    if data.source == "builtin":
        return f"built-in {data.name}"
    where = f"{data.source} {data.path}" + (f" (validation: {data.val_path})" if data.val_path else "")
    return where + (f", columns {dict(data.columns)}" if data.columns else "")


def hydra_value(value: Any) -> str:
    """A value written in Hydra's override grammar (strings quoted, so any text survives)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    # Hydra: \' is a quote, \${ no interpolation; other backslashes are literal unless before a quote or the end
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, str(value))
    return "'" + text.replace("'", "\\'").replace("${", "\\${") + "'"


def _evaluate(model: Any, task: Any, run: RunSpec, tokenizer: Any, output_dir: Path) -> dict[str, Any]:
    _, val = task.datasets(run, tokenizer)
    if not len(val):
        raise DataError("data", "the validation split is empty", "set data.val_fraction>0 or data.val_path")
    metrics = evaluate(model, task, val, tokenizer, run)
    summary = {"status": "evaluated", "examples": len(val), **metrics}
    _write_json(output_dir / METRICS_FILE, summary)
    print("validation: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return summary


def evaluate(model: Any, task: Any, examples: Sequence[Any], tokenizer: Any, run: RunSpec) -> dict[str, float]:
    """The task's metrics over `examples`, batched as in training validation (sums, then metrics)."""
    from peftc.tasks.common import batches, to_device

    pad_to = run.data.max_length if run.data.padding == "max_length" else None
    totals: dict[str, float] = defaultdict(float)
    model.eval()
    for chunk in batches(list(examples), run.data.eval_batch_size or run.data.batch_size):
        batch = to_device(task.collate(chunk, tokenizer, pad_to), model)
        stats = {
            **task.validation_stats(model, batch, run.task),
            **task.generation_stats(model, batch, run.task, tokenizer),
        }
        for key, value in stats.items():
            totals[key] += float(value)
    return {k: float(v) for k, v in task.metrics(totals).items()}


def _predict(
    model: Any, task: Any, rows: Sequence[Mapping[str, Any]], tokenizer: Any, run: RunSpec, output_dir: Path
) -> dict[str, Any]:
    predictions = predict_rows(model, task, rows, tokenizer, run)
    path = write_predictions(output_dir, predictions)
    for prediction in predictions:
        print(json.dumps(_shortened(prediction), ensure_ascii=False))
    print(f"{len(predictions)} predictions written to {path}")
    return {"status": "predicted", "predictions": len(predictions)}


def input_rows(run: RunSpec, task: Any) -> list[dict[str, Any]]:
    """The rows to predict on, from `input` (text / mapping / list) or `input_file`."""
    from peftc.tasks.data import read_inputs

    fields, optional = task.prediction_fields(run), task.optional_fields(run)
    check = _input_check(fields)
    if run.input_file is not None:
        read = read_inputs(run.input_file, fields, run.data.columns, check, task.list_fields, optional)
        return [task.prediction_row(row, run, f"{run.input_file} row {n}") for n, row in enumerate(read, start=1)]
    values = list(run.input) if isinstance(run.input, (list, tuple)) else [run.input]
    rows = []
    for number, value in enumerate(values, start=1):
        row = plain(value) if isinstance(value, Mapping) else {fields[0]: value}
        missing = [f for f in fields if f not in row]
        if missing:
            raise ConfigError(
                "input",
                plain(value),
                f"input {number} has no {missing[0]!r}",
                f"task={task.name} predicts from {', '.join(fields)}, e.g. input={{{', '.join(f'{f}: ...' for f in fields)}}}",
            )
        problem = check(row)
        if problem:
            raise ConfigError("input", plain(value), problem)
        given = {f: row[f] for f in [*fields, *optional] if f in row}
        rows.append(task.prediction_row(given, run, f"input {number}"))
    return rows


def _input_check(fields: Sequence[str]) -> Any:
    def check(row: Mapping[str, Any]) -> str | None:
        empty = [f for f in fields if not str(row.get(f, "")).strip()]
        return f"{empty[0]!r} is empty" if empty else None

    return check


def _shortened(prediction: Mapping[str, Any]) -> dict[str, Any]:
    """Long vectors (embeddings) shortened for the terminal; the file keeps them whole."""
    shown = dict(prediction)
    for key, value in prediction.items():
        if isinstance(value, list) and len(value) > 8 and all(isinstance(v, float) for v in value):
            shown[key] = [round(v, 4) for v in value[:4]] + [f"... {len(value)} values"]
    return shown


def sample_predictions(model: Any, run: RunSpec, tokenizer: Any, count: int) -> list[dict]:
    """Predictions for the first `count` validation rows (made from their input fields)."""
    task = tasks.for_spec(run.task)
    _, val_rows = task.read_rows(run)
    rows = task.sample_inputs(val_rows[:count])
    return predict_rows(model, task, rows, tokenizer, run) if rows else []


def predict_rows(model: Any, task: Any, rows: Sequence[Mapping[str, Any]], tokenizer: Any, run: RunSpec) -> list[dict]:
    was_training = model.training
    model.eval()
    try:
        return task.predict(model, rows, tokenizer, run)
    finally:
        model.train(was_training)


def write_predictions(output_dir: Path, predictions: Sequence[Mapping[str, Any]]) -> Path:
    from peftc.files.atomic import write_text_atomic

    path = Path(output_dir) / PREDICTIONS_FILE
    write_text_atomic(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    return path


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    from peftc.files.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
