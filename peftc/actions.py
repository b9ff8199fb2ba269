"""Running a model without training it: predictions on rows, and their files."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from peftc import tasks
from peftc.spec import RunSpec

PREDICTIONS_FILE = "predictions.jsonl"


def sample_predictions(model: Any, run: RunSpec, tokenizer: Any, count: int) -> list[dict]:
    """Predictions for the first `count` validation rows (only their input fields are shown)."""
    from peftc.data import load_splits
    from peftc.tasks.base import method_fields

    task = tasks.for_spec(run.task)
    # method fields (a mapped task_id column) are read so data.columns stays valid; predictions use inputs only
    _, val_rows = load_splits(run.data, task.fields, seed=run.seed, optional=method_fields(run))
    rows = [{f: row[f] for f in task.input_fields} for row in val_rows[:count]]
    return predict_rows(model, task, rows, tokenizer, run) if rows else []


def predict_rows(model: Any, task: Any, rows: Sequence[Mapping[str, Any]], tokenizer: Any, run: RunSpec) -> list[dict]:
    was_training = model.training
    model.eval()
    try:
        return task.predict(model, rows, tokenizer, run)
    finally:
        model.train(was_training)


def write_predictions(output_dir: Path, predictions: Sequence[Mapping[str, Any]]) -> Path:
    from peftc.run import write_text_atomic

    path = Path(output_dir) / PREDICTIONS_FILE
    write_text_atomic(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    return path
