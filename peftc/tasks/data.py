"""Reading examples: the built-in datasets shipped with peftc, the user's JSONL/CSV files, or
anything the Hugging Face datasets library reads (data.source=hf, in tasks/hf_data.py).

Rows come back as plain dicts keyed by the task's field names (after `data.columns` mapping),
split into train and validation. Every problem names the file and the row.
"""

from __future__ import annotations

import csv
import json
import random
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peftc.config.spec import DataSpec
from peftc.errors import ConfigError, DataError, did_you_mean
from peftc.planning.model_source import ASSETS
from peftc.tasks import layouts
from peftc.tasks.rows import RowCheck, named_columns, select_rows

# Longest CSV field read (long documents are legitimate training text).
MAX_FIELD_CHARS = 1 << 30
# Below this many validation examples a run warns that its validation metrics are coarse.
FEW_VALIDATION_EXAMPLES = 20

BUILTIN_DIR = ASSETS / "data"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl"))


def load_splits(
    spec: DataSpec,
    fields: Sequence[str],
    seed: int = 0,
    check: RowCheck | None = None,
    optional: Mapping[str, Any] | None = None,
    lists: Collection[str] = (),
    alternatives: Mapping[str, Sequence[str]] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, validation) rows carrying exactly `fields` (plus 'split' for built-ins).

    `check` is the task's row validation (e.g. a label outside the label set); its problem is
    raised as a DataError naming the file and the row. `optional` fields ({name: default}, e.g.
    a method's task_id) are read when the row has the (mapped) column, else take the default.
    Cells hold text (or numbers); only the `lists` fields may hold lists or objects (token
    classification's words and tags, SQuAD's answers), which the task's check reads.
    `alternatives` ({field: columns}) are read from a row that lacks an unmapped field's column
    (rows.select_rows).
    """
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
        rows = list(select_rows(_read(path, "jsonl"), fields, {}, str(path), check, optional, lists, alternatives))
        train = [r for r in rows if r.get("split", "train") == "train"]
        val = [r for r in rows if r.get("split") == "validation"]
    elif spec.source == "hf":
        train, val, path = _hf_splits(spec, fields, seed, check, optional, lists, alternatives or {})
    else:
        path = Path(str(spec.path)).expanduser()
        columns = spec.columns or {}
        rows = list(
            select_rows(_read(path, spec.source), fields, columns, str(path), check, optional, lists, alternatives)
        )
        if spec.val_path:
            val_file = Path(spec.val_path).expanduser()
            val = list(
                select_rows(
                    _read(val_file, spec.source, key="data.val_path"),
                    fields,
                    columns,
                    str(val_file),
                    check,
                    optional,
                    lists,
                    alternatives,
                )
            )
            train = rows
        else:
            train, val = _split(rows, spec.val_fraction, seed, str(path))
    if spec.limit_examples is not None:
        train = train[: spec.limit_examples]
    if spec.limit_val_examples is not None:
        val = val[: spec.limit_val_examples]
    capped = spec.limit_val_examples is not None and len(val) == spec.limit_val_examples  # the user's choice
    if 0 < len(val) < FEW_VALIDATION_EXAMPLES and not capped:
        warnings.warn(
            f"{path}: the validation split has only {len(val)} example{'' if len(val) == 1 else 's'}, so its metrics "
            f"are coarse (each example weighs {1 / len(val):.0%} of them); use more "
            f"(data.val_fraction or data.{'val_split' if spec.source == 'hf' else 'val_path'})",
            stacklevel=2,
        )
    return train, val


def declared_labels(spec: DataSpec, field: str) -> list[str] | None:
    """The label names the data itself declares for a task field, in class-index order: a Hugging
    Face ClassLabel column's names (GLUE's label, CoNLL's ner_tags), as transformers' run_glue and
    run_ner take them. JSONL/CSV files and built-ins declare none (None)."""
    column = (spec.columns or {}).get(field, field)
    if spec.source != "hf" or not isinstance(column, str):  # a field read from several columns is text
        return None
    from peftc.tasks.hf_data import class_names

    with _bad_line_named(spec):
        return class_names(spec, column)


def _hf_splits(
    spec: DataSpec,
    fields: Sequence[str],
    seed: int,
    check: RowCheck | None,
    optional: Mapping[str, Any] | None,
    lists: Collection[str],
    alternatives: Mapping[str, Sequence[str]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """Train and validation rows through the datasets library (data.source=hf), checked as a
    file's rows are; rows are numbered within their split."""
    from peftc.tasks.hf_data import read_hf_splits

    columns = spec.columns or {}
    instead = {f: list(names) for f, names in alternatives.items() if f in fields and f not in columns}
    wanted = [c for f in [*fields, *(optional or {})] for c in named_columns(columns, f)]
    wanted += [c for names in instead.values() for c in names]
    wanted += layouts.watched(wanted)

    def complete(names: Collection[str]) -> bool:
        """Whether a split has the columns of every field (or all of its alternatives)."""
        return all(
            all(c in names for c in named_columns(columns, f)) or (f in instead and set(instead[f]) <= set(names))
            for f in fields
        )

    with _bad_line_named(spec):
        train_rows, val_rows, source = read_hf_splits(spec, wanted, complete)
    for name, rows in ((spec.split, train_rows), (spec.val_split, val_rows)):
        if rows is not None and not rows:
            raise DataError(
                f"{source} [{name}]", "the split has no rows", "pick another split (data.split, data.val_split)"
            )
    reading = (check, optional, lists, alternatives)
    train = list(select_rows(train_rows, fields, columns, f"{source} [{spec.split}]", *reading))
    if val_rows is None:
        train, val = _split(train, spec.val_fraction, seed, source)
    else:
        val = list(select_rows(val_rows, fields, columns, f"{source} [{spec.val_split}]", *reading))
    return train, val, source


@contextmanager
def _bad_line_named(spec: DataSpec) -> Iterator[None]:
    """A JSONL or CSV file the datasets library could not read is read again line by line to name
    the line (or byte) at fault, which the library's message does not (arrow counts rows from 0
    within a block); the library's error stands when this reading finds nothing wrong."""
    try:
        yield
    except DataError:
        path = Path(str(spec.path)).expanduser()
        suffix = path.suffix.lower()
        one_document = suffix == ".json" and not _json_lines(path)  # an array, SQuAD's {"data": ...}
        if path.is_file() and suffix in (".jsonl", ".json", ".csv") and not one_document:
            _read(path, "csv" if suffix == ".csv" else "jsonl")
        raise


def _json_lines(path: Path) -> bool:
    """Whether a .json file holds one JSON object per line (its first line is a whole object)."""
    try:
        with path.open(encoding="utf-8-sig") as fh:
            return isinstance(json.loads(fh.readline()), dict)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False


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


def _read(path: Path, fmt: str, key: str = "data.path") -> list[dict[str, Any]]:
    if not path.is_file():
        raise ConfigError(key, str(path), _not_a_file(path), "give an existing JSONL or CSV file")
    try:
        rows = _read_rows(path, fmt)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from exc
    except csv.Error as exc:
        raise DataError(str(path), f"is not valid CSV ({exc})") from exc
    if not rows:
        raise DataError(str(path), "the file has no rows", "add examples or point data.path at another file")
    return rows


def _not_a_file(path: Path) -> str:
    """Why a path given as a data file is not one: /dev/null exists, but has no rows to read."""
    if path.is_dir():
        return "is a directory, not a file"
    return "is not a regular file" if path.exists() else "no such file"


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> DataError:
    return DataError(str(path), f"is not UTF-8 text (byte {exc.start})", "save the file as UTF-8")


def _read_rows(path: Path, fmt: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    # utf-8-sig: Excel and Windows tools start UTF-8 files with a byte-order mark.
    with path.open(newline="", encoding="utf-8-sig") as fh:
        if fmt == "csv":
            csv.field_size_limit(MAX_FIELD_CHARS)  # the csv module's default refuses fields over 128 KiB
            reader = csv.DictReader(fh, delimiter=_delimiter(fh))
            if not reader.fieldnames:
                raise DataError(str(path), "the file is empty (no header row)")
            return [dict(row) for row in reader]
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except RecursionError:
                raise DataError(
                    f"{path}:{number}", "JSON nested too deeply", "each line must be one flat JSON object"
                ) from None
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{number}",
                    f"not valid JSON ({exc.msg})",
                    "each line must be one JSON object",
                ) from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}", f"expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _delimiter(fh: Any) -> str:
    """The column separator of a CSV file, from its header: a comma, else a tab (a .tsv file, or
    a spreadsheet's "text" export) or a semicolon (a spreadsheet's CSV where the comma is the
    decimal mark). A header without commas read with commas would be one column named by the
    whole line, never what was meant."""
    header = fh.readline()
    fh.seek(0)
    return next((d for d in (",", "\t", ";") if d in header), ",")


def read_inputs(
    path: str | Path,
    fields: Sequence[str],
    columns: Mapping[str, Any] | None = None,
    check: RowCheck | None = None,
    lists: Collection[str] = (),
    optional: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Rows to predict on from a file: .jsonl/.csv/.tsv with the task's input fields (after the
    data.columns mapping; the `optional` ones where there), or .txt with one value of the first
    input field per line."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise ConfigError("input_file", str(path), _not_a_file(path), "give an existing .txt, .jsonl or .csv file")
        try:
            lines = [line.rstrip("\n") for line in path.open(encoding="utf-8") if line.strip()]
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, exc) from exc
        if not lines:
            raise DataError(str(path), "the file has no rows", "write one input per line")
        if len(fields) != 1:
            raise DataError(
                str(path), f"a .txt file gives one field per line but this task needs {', '.join(fields)}", "use .jsonl"
            )
        rows = [{fields[0]: line} for line in lines]
        return list(select_rows(rows, fields, {}, str(path), check, lists=lists))
    fmt = "csv" if path.suffix.lower() in (".csv", ".tsv") else "jsonl"
    read = {*fields, *(optional or {})}
    mapping = {k: v for k, v in (columns or {}).items() if k in read}  # target columns are not needed
    return list(select_rows(_read(path, fmt, key="input_file"), fields, mapping, str(path), check, optional, lists))
