"""A data row's cells as the task's fields: the columns data.columns names for each field, checked
(text where text belongs, a missing column named with the columns there are), whatever the source.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

from peftc.errors import ConfigError, DataError, did_you_mean

RowCheck = Callable[[Mapping[str, Any]], "str | None"]  # returns the problem with a row, if any


def select_rows(
    rows: list[dict[str, Any]],
    fields: Sequence[str],
    columns: Mapping[str, str],
    source: str,
    check: RowCheck | None = None,
    optional: Mapping[str, Any] | None = None,
    lists: Collection[str] = (),
) -> Iterator[dict[str, Any]]:
    """Each row as {field: cell} for `fields` (`columns` maps a field to its column), the
    `optional` ones when there, each checked; `source` names the rows in errors."""
    optional = dict(optional or {})
    unknown = set(columns) - set(fields) - set(optional)
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(
            f"data.columns.{name}",
            columns[name],
            "is not a field of this task",
            f"fields: {', '.join([*fields, *optional])}",
        )
    for number, row in enumerate(rows, start=1):
        selected = {}
        for field in fields:
            column = columns.get(field, field)
            if column not in row:
                hint = did_you_mean(column, row) or f"columns present: {', '.join(map(str, row))}"
                raise DataError(
                    f"{source} row {number}",
                    f"missing column {column!r} (task field {field!r})",
                    # Hydra adds a key data.columns lacks only with '+'
                    f"set {'' if field in columns else '+'}data.columns.{field}=<column>; {hint}",
                )
            problem = cell_problem(row[column], column, field in lists)
            if problem:
                raise DataError(f"{source} row {number}", problem, "fix the row or remove it")
            selected[field] = row[column]
        for field, default in optional.items():
            value = row.get(columns.get(field, field))
            missing = value is None or value == ""
            selected[field] = default if missing else _integer(value, field, f"{source} row {number}")
        problem = check(selected) if check is not None else None
        if problem:
            raise DataError(f"{source} row {number}", problem)
        if "split" in row:
            selected["split"] = row["split"]
        yield selected


def cell_problem(value: Any, column: str, list_allowed: bool = False) -> str | None:
    """Text fields hold text: an empty cell trains on nothing, and an object or a list (where the
    task does not take one) is a file from another schema, which str() would silently turn
    into "['a', 'b']" training text. A null (JSON null, a parquet/arrow missing value) holds nothing."""
    if value is None:
        return f"{column!r} is empty (null)"
    if isinstance(value, str) and not value.strip():
        return f"{column!r} is empty"
    if isinstance(value, dict) and not list_allowed:
        return f"{column!r} is an object ({json.dumps(value)[:60]}), not text"
    if isinstance(value, list) and not list_allowed:
        return f"{column!r} is a list ({json.dumps(value)[:60]}), not text"
    return None


def _integer(value: Any, field: str, where: str) -> int:
    """Optional fields are small integers (task ids); CSV cells arrive as strings."""
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())):
        raise DataError(where, f"{field} must be a non-negative integer, got {value!r}")
    return int(value)
