"""A data row's cells as the task's fields: the columns data.columns names for each field, checked
(text where text belongs, a missing column named with the columns there are), whatever the source.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

from peftc.errors import ConfigError, DataError, did_you_mean
from peftc.tasks import layouts

RowCheck = Callable[[Mapping[str, Any]], "str | None"]  # returns the problem with a row, if any


def select_rows(
    rows: list[dict[str, Any]],
    fields: Sequence[str],
    columns: Mapping[str, Any],
    source: str,
    check: RowCheck | None = None,
    optional: Mapping[str, Any] | None = None,
    lists: Collection[str] = (),
    alternatives: Mapping[str, Sequence[str]] | None = None,
) -> Iterator[dict[str, Any]]:
    """Each row as {field: cell} for `fields` (`columns` maps a field to its column, or to several
    whose texts are joined by a blank line), the `optional` ones when there, each checked;
    `source` names the rows in errors. A field with `alternatives` ({field: columns}) that
    data.columns leaves unmapped reads those columns instead, under their own names, from a row
    that has them and not the field's own (TRL's `completion` for a response)."""
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
    alternatives = {f: list(names) for f, names in (alternatives or {}).items() if f not in columns}
    for number, row in enumerate(rows, start=1):
        where = f"{source} row {number}"
        read = {f: _read_from(row, named_columns(columns, f), alternatives.get(f, [])) for f in fields}
        unread = layouts.unread(row, [c for names in read.values() for c in names], columns)
        if unread:
            raise DataError(where, *unread)
        selected = {}
        for field, names in read.items():
            selected.update(_cells(row, field, names, columns, lists, where))
        for field, default in optional.items():
            value = row.get(columns.get(field, field))
            if value is None or value == "":
                selected[field] = default
            elif isinstance(default, int):  # a method's task id (CSV cells arrive as text)
                selected[field] = _integer(value, field, where)
            else:
                _refuse(cell_problem(value, field, field in lists), value, where)
                selected[field] = value
        problem = check(selected) if check is not None else None
        if problem:
            raise DataError(where, problem)
        if "split" in row:
            selected["split"] = row["split"]
        yield selected


def named_columns(columns: Mapping[str, Any], field: str) -> list[str]:
    """The columns data.columns names for a field (the field's own name when unmapped)."""
    column = columns.get(field, field)
    return [column] if isinstance(column, str) else list(column)


def _read_from(row: Mapping[str, Any], own: list[str], alternatives: list[str]) -> list[str]:
    if alternatives and any(c not in row for c in own) and all(c in row for c in alternatives):
        return alternatives
    return own


def _cells(
    row: Mapping[str, Any], field: str, names: list[str], columns: Mapping[str, Any], lists: Collection[str], where: str
) -> dict[str, Any]:
    """{field: cell} from the field's column(s), or the alternatives' {column: cell}, checked."""
    missing = next((c for c in names if c not in row), None)
    if missing is not None:
        raise _missing_column(row, field, missing, field in columns, where)
    own = names == named_columns(columns, field)
    for column in names:
        if own and len(names) > 1 and _blank(row[column]):
            continue  # an empty part of a joined text is left out (Alpaca's empty input)
        _refuse(cell_problem(row[column], column, field in lists if own else column in lists), row[column], where)
    if not own:
        return {column: row[column] for column in names}
    texts = [str(row[column]) for column in names if not _blank(row[column])]
    if len(names) > 1 and not texts:
        raise DataError(where, f"{', '.join(map(repr, names))} are all empty", "fix the row or remove it")
    return {field: "\n\n".join(texts) if len(names) > 1 else row[names[0]]}


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _refuse(problem: str | None, value: Any, where: str) -> None:
    if problem:
        raise DataError(where, problem, layouts.conversation(value) or "fix the row or remove it")


def _missing_column(row: Mapping[str, Any], field: str, column: str, mapped: bool, where: str) -> DataError:
    refused = layouts.preference(row, field)
    if refused:
        return DataError(where, *refused)
    hint = (None if mapped else layouts.hint(row, field)) or did_you_mean(column, row)
    hint = hint or f"columns present: {', '.join(map(str, row))}"
    return DataError(
        where,
        f"missing column {column!r} (task field {field!r})",
        # Hydra adds a key data.columns lacks only with '+'
        f"set {'' if mapped else '+'}data.columns.{field}=<column>; {hint}",
    )


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
