"""User data: JSONL/CSV with a column mapping; bad files give one message naming file and row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftc import tasks
from peftc.config.compose import compose, to_spec
from peftc.errors import ConfigError, DataError
from peftc.planning.model_source import load_tokenizer


def datasets(overrides: list[str]) -> tuple[list, list]:
    run = to_spec(compose(overrides))
    task = tasks.for_spec(run.task)
    return task.datasets(run, load_tokenizer(run.model))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SEQ_CLS = ["task=seq_cls", "model=tiny_bert"]


def test_jsonl_with_a_column_mapping_becomes_labelled_examples(tmp_path: Path) -> None:
    rows = [{"review": f"text {i}", "stars": ["bad", "good"][i % 2]} for i in range(10)]
    path = write_jsonl(tmp_path / "reviews.jsonl", rows)
    train, val = datasets(
        [
            *SEQ_CLS,
            "data.source=jsonl",
            f"data.path={path}",
            "data.columns={text: review, label: stars}",
            "task.labels=[bad,good]",
        ]
    )
    assert len(train) == 9 and len(val) == 1
    assert {e["label"] for e in train + val} == {0, 1}


def test_csv_labels_may_be_names_or_indices(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("text,label\nfine,positive\nmeh,0\ngood,1\nbad,negative\n")
    train, val = datasets([*SEQ_CLS, "data.source=csv", f"data.path={path}", "data.val_fraction=0.25"])
    assert sorted(e["label"] for e in train + val) == [0, 0, 1, 1]


def test_a_label_outside_the_label_set_names_file_and_row(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": "positive"}, {"text": "b", "label": "negative"}, {"text": "c", "label": "neutral"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        datasets([*SEQ_CLS, "data.source=jsonl", f"data.path={path}"])
    assert str(info.value).startswith(f"{path} row 3: label 'neutral' is not in the label set ['negative', 'positive']")


def test_an_index_beyond_the_label_set_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("text,label\na,0\nb,2\n")
    with pytest.raises(DataError, match=r"bad.csv row 2: label '2' is not in the label set"):
        datasets([*SEQ_CLS, "data.source=csv", f"data.path={path}"])


def test_a_missing_column_names_file_row_and_the_mapping_to_set(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "reviews.jsonl", [{"body": "x", "label": "positive"}])
    with pytest.raises(DataError) as info:
        datasets([*SEQ_CLS, "data.source=jsonl", f"data.path={path}"])
    message = str(info.value)
    assert message.startswith(f"{path} row 1: missing column 'text' (task field 'text')")
    assert "set data.columns.text=<column>" in message


@pytest.mark.parametrize(
    ("name", "content", "source", "message"),
    [
        ("empty.jsonl", "", "jsonl", "the file has no rows"),
        ("blank.jsonl", "\n\n", "jsonl", "the file has no rows"),
        ("empty.csv", "", "csv", "the file is empty (no header row)"),
        ("header_only.csv", "text,label\n", "csv", "the file has no rows"),
    ],
)
def test_an_empty_file_is_refused_by_name(tmp_path: Path, name: str, content: str, source: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as info:
        datasets([*SEQ_CLS, f"data.source={source}", f"data.path={path}"])
    assert str(info.value).startswith(f"{path}: {message}")


def test_a_mapping_to_an_unknown_task_field_is_a_config_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": 0}])
    with pytest.raises(ConfigError, match=r"data.columns.txt='body': is not a field of this task"):
        datasets([*SEQ_CLS, "data.source=jsonl", f"data.path={path}", "data.columns={txt: body}"])


def test_truncation_and_padding_follow_the_data_settings(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x" * 40, "label": 0}, {"text": "y", "label": 1}])
    base = [*SEQ_CLS, "data.source=jsonl", f"data.path={path}", "data.val_fraction=0", "data.max_length=16"]
    train, _ = datasets(base)
    assert max(len(e["input_ids"]) for e in train) == 16
    train, _ = datasets([*base, "data.truncation=false"])
    assert max(len(e["input_ids"]) for e in train) == 42  # <s> + 40 bytes + </s>
    run = to_spec(compose([*base, "data.padding=max_length"]))
    task = tasks.for_spec(run.task)
    train, _ = task.datasets(run, load_tokenizer(run.model))
    batch = task.collate(train, load_tokenizer(run.model), pad_to=run.data.max_length)
    assert tuple(batch["input_ids"].shape) == (2, 16)


def test_builtin_datasets_have_fixed_disjoint_splits() -> None:
    from peftc.tasks.data import BUILTIN_DIR

    for path in sorted(BUILTIN_DIR.glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        splits = {r["split"] for r in rows}
        assert splits == {"train", "validation"}, path.name
        key = [json.dumps({k: v for k, v in r.items() if k != "split"}, sort_keys=True) for r in rows]
        assert len(set(key)) == len(key), f"{path.name} repeats an example"


def test_builtin_datasets_are_what_the_generator_writes() -> None:
    import importlib.util

    from peftc.tasks.data import BUILTIN_DIR

    spec = importlib.util.spec_from_file_location(
        "make_builtin_data", BUILTIN_DIR.parents[2] / "tools" / "make_builtin_data.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for name in tool.GENERATORS:
        shipped = [json.loads(line) for line in (BUILTIN_DIR / f"{name}.jsonl").read_text().splitlines()]
        assert shipped == list(tool.rows(name)), f"{name}.jsonl is stale: run python tools/make_builtin_data.py"
