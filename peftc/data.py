"""Reading examples: the built-in datasets shipped with peftc, or the user's JSONL/CSV files.

Rows come back as plain dicts keyed by the task's field names (after `data.columns` mapping),
split into train and validation. Every problem names the file and the row.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from peftc.errors import ConfigError, DataError, did_you_mean
from peftc.loading import ASSETS
from peftc.spec import DataSpec

BUILTIN_DIR = ASSETS / "data"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl"))


def load_splits(
    spec: DataSpec, fields: Sequence[str], seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, validation) rows carrying exactly `fields` (plus 'split' for built-ins)."""
    if spec.source == "builtin":
        path = BUILTIN_DIR / f"{spec.name}.jsonl"
        if not path.is_file():
            names = builtin_names()
            raise ConfigError(
                "data.name",
                spec.name,
                "no such built-in dataset",
                did_you_mean(str(spec.name), names) or "available: " + ", ".join(names),
            )
        rows = list(_select(_read(path, "jsonl"), fields, {}, str(path)))
        train = [r for r in rows if r.get("split", "train") == "train"]
        val = [r for r in rows if r.get("split") == "validation"]
    else:
        path = Path(str(spec.path)).expanduser()
        rows = list(_select(_read(path, spec.source), fields, spec.columns or {}, str(path)))
        if spec.val_path:
            val_file = Path(spec.val_path).expanduser()
            val = list(_select(_read(val_file, spec.source), fields, spec.columns or {}, str(val_file)))
            train = rows
        else:
            train, val = _split(rows, spec.val_fraction, seed, str(path))
    if spec.limit_examples is not None:
        train = train[: spec.limit_examples]
    return train, val


def _split(rows: list[dict[str, Any]], fraction: float, seed: int, source: str) -> tuple[list, list]:
    if fraction <= 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(rows) * fraction))
    if n_val >= len(rows):
        raise DataError(
            source,
            f"{len(rows)} rows cannot be split with val_fraction={fraction}",
            "add rows, lower data.val_fraction, or give data.val_path",
        )
    held = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _read(path: Path, fmt: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ConfigError("data.path", str(path), "no such file", "give an existing JSONL or CSV file")
    rows: list[dict[str, Any]] = []
    with path.open(newline="", encoding="utf-8") as fh:
        if fmt == "csv":
            reader = csv.DictReader(fh)
            if not reader.fieldnames:
                raise DataError(str(path), "the file is empty (no header row)")
            rows = [dict(row) for row in reader]
        else:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}:{number}",
                        f"not valid JSON ({exc.msg})",
                        "each line must be one JSON object",
                    ) from exc
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{number}", f"expected a JSON object, got {type(row).__name__}")
                rows.append(row)
    if not rows:
        raise DataError(str(path), "the file has no rows", "add examples or point data.path at another file")
    return rows


def _select(
    rows: list[dict[str, Any]], fields: Sequence[str], columns: dict[str, str], source: str
) -> Iterator[dict[str, Any]]:
    unknown = set(columns) - set(fields)
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(
            f"data.columns.{name}",
            columns[name],
            "is not a field of this task",
            f"fields: {', '.join(fields)}",
        )
    for number, row in enumerate(rows, start=1):
        selected = {}
        for field in fields:
            column = columns.get(field, field)
            if column not in row or row[column] is None:
                hint = did_you_mean(column, row) or f"columns present: {', '.join(map(str, row))}"
                raise DataError(
                    f"{source} row {number}",
                    f"missing column {column!r} (task field {field!r})",
                    f"set data.columns.{field}=<column>; {hint}",
                )
            selected[field] = row[column]
        if "split" in row:
            selected["split"] = row["split"]
        yield selected
