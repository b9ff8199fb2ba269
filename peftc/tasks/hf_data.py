"""data.source=hf: examples read with the Hugging Face `datasets` library.

`data.path` is a local data file (.parquet, .arrow, .json/.jsonl, .csv), a directory written by
`save_to_disk`, a directory of data files (with or without a dataset card naming configs), or a
hub dataset id (`org/name`), whose data files `huggingface_hub` takes from its local cache when
offline (HF_HUB_OFFLINE=1) or downloads when online; nothing is executed (no loading scripts).
`data.split` picks the training split, `data.val_split` the validation one, `data.subset` the
configuration. With `data.streaming=true` only the rows the run uses are read, lazily, from the
files. Rows come back as plain dicts holding only the columns the task reads, a ClassLabel
column's integers as the names the dataset declares for them.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

from peftc.config.spec import DataSpec
from peftc.errors import ConfigError, DataError, did_you_mean, first_line
from peftc.planning.model_source import HUB_ID

# Builder of `datasets` for each data file suffix.
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}
# Names datasets give their validation split.
VALIDATION_SPLITS = ("validation", "valid", "dev")
# Files fetched for a hub dataset: its data and its card (which names configs and splits).
HUB_DATA_PATTERNS = [f"*{suffix}" for suffix in FILE_BUILDERS] + ["README.md"]


def read_hf_splits(
    spec: DataSpec, columns: Sequence[str], complete: Callable[[Collection[str]], bool] = lambda names: True
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str]:
    """(train rows, validation rows or None when no data.val_split, the source's name for messages).
    A split whose column names are not `complete` (it lacks a column the caller needs) gives its
    first row whole, so that the caller's row check names the missing column beside the columns
    there are."""
    source = _local_source(spec)
    splits = _open(spec, source)  # once: both splits come from the same load
    train_split = _split(splits, source, spec.split, "data.split")
    train = _rows(train_split, columns, complete, _train_rows_wanted(spec), f"{spec.path} [{spec.split}]")
    val = None
    if spec.val_split is not None:
        val_split = _split(splits, source, spec.val_split, "data.val_split")
        val = _rows(val_split, columns, complete, spec.limit_val_examples, f"{spec.path} [{spec.val_split}]")
    else:
        _warn_of_unused_validation_split(spec, list(splits))
    return train, val, str(spec.path)


def _warn_of_unused_validation_split(spec: DataSpec, names: Sequence[str]) -> None:
    """A dataset that ships a validation split which data.val_split does not name: it is not
    used (transformers' example scripts would validate on it), so the run says so."""
    unused = next((name for name in VALIDATION_SPLITS if name in names and name != spec.split), None)
    if unused is None:
        return
    held_out = (
        f"validation holds out data.val_fraction={spec.val_fraction} of '{spec.split}'"
        if spec.val_fraction > 0
        else "nothing is validated (data.val_fraction=0)"
    )
    warnings.warn(
        f"{spec.path} has a '{unused}' split, which is not used: {held_out}; "
        f"set data.val_split={unused} to validate on it",
        stacklevel=4,
    )


def class_names(spec: DataSpec, column: str) -> list[str] | None:
    """The names of a ClassLabel column of the training split (or of a column of ClassLabel lists,
    like CoNLL's ner_tags), in class-index order; None for any other column."""
    source = _local_source(spec)
    split = _split(_open(spec, source), source, spec.split, "data.split")
    label = _class_label(split.features, column)
    return None if label is None else [str(name) for name in label.names]


def _class_label(features: Any, column: str) -> Any:
    """The ClassLabel of a column, or of the items of a list column; None when it has none."""
    from datasets import ClassLabel

    feature = (features or {}).get(column)
    for candidate in (feature, getattr(feature, "feature", None)):  # List/Sequence hold theirs in .feature
        if isinstance(candidate, ClassLabel):
            return candidate
    return None


def _train_rows_wanted(spec: DataSpec) -> int | None:
    """Rows to read when streaming: data.limit_examples for training, plus the share held out
    for validation when there is no validation split (so training still gets its N rows)."""
    if not spec.streaming or spec.limit_examples is None:
        return None
    if spec.val_split is not None or spec.val_fraction <= 0:
        return spec.limit_examples
    return math.ceil(spec.limit_examples / (1 - spec.val_fraction))


def _local_source(spec: DataSpec) -> Path:
    """A local path for data.path: as given, or a hub dataset's snapshot in the HF cache."""
    text = str(spec.path)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if not HUB_ID.fullmatch(text) or path.parent.exists():
        raise ConfigError(
            "data.path",
            text,
            "no such file or directory",
            "give a .parquet/.arrow/.jsonl/.json/.csv file, a save_to_disk directory or a hub dataset id (org/name)",
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, repo_type="dataset", allow_patterns=HUB_DATA_PATTERNS))
    except Exception as exc:  # not cached while offline, no such dataset, no network: one line
        raise DataError(
            text,
            f"is not a local dataset and could not be fetched from the hub ({first_line(exc)})",
            "give a local file or directory, or a hub dataset id in the Hugging Face cache",
        ) from exc


def _split(splits: Any, source: Path, split: str, key: str) -> Iterable[dict[str, Any]]:
    """One of the dataset's splits, as a Dataset (or an IterableDataset when streaming)."""
    if split not in splits:
        names = list(splits)
        raise ConfigError(
            key, split, f"{source} has no such split", did_you_mean(split, names) or f"splits: {', '.join(names)}"
        )
    return splits[split]


def _open(spec: DataSpec, source: Path) -> Any:
    """The dataset's splits ({name: Dataset}); every error of the library becomes one line."""
    import datasets

    datasets.disable_progress_bars()  # peftc prints its own one-line progress
    verbosity = datasets.logging.get_verbosity()
    # the library logs its own error line before raising; the DataError below is the one line shown
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        if _is_saved_dataset(source):
            loaded = datasets.load_from_disk(str(source))
            splits = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
            if spec.streaming:
                return {name: split.to_iterable_dataset() for name, split in splits.items()}
            return splits
        if source.is_file():
            builder = FILE_BUILDERS.get(source.suffix.lower())
            if builder is None:
                raise ConfigError(
                    "data.path",
                    str(source),
                    f"is not a data file datasets reads ({source.suffix or 'no suffix'})",
                    f"use one of {', '.join(FILE_BUILDERS)}",
                )
            return datasets.load_dataset(builder, data_files=str(source), streaming=spec.streaming)
        return datasets.load_dataset(str(source), name=spec.subset, streaming=spec.streaming)
    except ConfigError:
        raise
    except Exception as exc:  # datasets raises ValueError, FileNotFoundError, ArrowInvalid, ...
        raise DataError(str(source), f"datasets could not read it ({first_line(_innermost(exc))})") from exc
    finally:
        datasets.logging.set_verbosity(verbosity)


def _innermost(exc: BaseException) -> BaseException:
    """The error a library's wrapper was raised from: datasets says 'An error occurred while
    generating the dataset' above the UnicodeDecodeError or JSON parse error that says what.
    Only explicit causes (`raise ... from`) are followed: an error's __context__ is a fallback
    that failed while it was handled, which says less."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _rows(
    split: Any, columns: Sequence[str], complete: Callable[[Collection[str]], bool], limit: int | None, where: str
) -> list[dict[str, Any]]:
    """The split's rows with only `columns` (those it has), the first `limit` of them when given;
    ClassLabel integers as their names. Without a needed column, the first row with every
    column (selecting none would leave no rows at all, and the check could not say what is there)."""
    names = split.column_names or []  # an IterableDataset may not know its columns before reading
    if names and not complete(names):
        limit = 1
    elif names:
        split = split.select_columns([c for c in columns if c in names])
    if limit is not None:
        rows = [dict(row) for row in itertools.islice(split, limit)]
    elif hasattr(split, "to_list"):
        rows = split.to_list()
    else:
        rows = [dict(row) for row in split]
    for column in columns:
        label = _class_label(split.features, column)
        if label is not None:
            _name_classes(rows, column, label, where)
    return rows


def _name_classes(rows: list[dict[str, Any]], column: str, label: Any, where: str) -> None:
    """A ClassLabel column's integers replaced by the names the dataset declares (so labels are
    matched by name, whatever order task.labels lists them in). -1 is the library's "no label"
    (GLUE's test splits): such a row has nothing to learn or score, so it is refused."""
    for number, row in enumerate(rows, start=1):
        value = row.get(column)
        values = value if isinstance(value, list) else [value]
        if -1 in values:
            raise DataError(
                f"{where} row {number}",
                f"{column!r} is -1, the datasets library's 'no label' (as in GLUE's test splits)",
                "train and validate on labelled splits (data.split, data.val_split) or drop the unlabelled rows",
            )
        named = [label.int2str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in values]
        row[column] = named if isinstance(value, list) else named[0]
