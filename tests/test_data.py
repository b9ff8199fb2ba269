"""User data: JSONL/CSV with a column mapping; bad files give one message naming file and row."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

from peftc import tasks
from peftc.config.compose import compose, to_spec
from peftc.errors import ConfigError, DataError
from peftc.planning.model_source import load_tokenizer


def datasets(overrides: list[str]) -> tuple[list, list]:
    run = to_spec(compose(overrides))
    task = tasks.for_spec(run.task)
    run = run.replace(task=task.with_data_settings(run))  # as the planner does
    return task.datasets(run, load_tokenizer(run.model))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SEQ_CLS = ["task=seq_cls", "model=tiny_bert", "task.labels=[negative,positive]"]


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


def test_the_held_out_rows_are_drawn_by_the_runs_seed(tmp_path: Path) -> None:
    """data.val_fraction holds out rows chosen by `seed`: the same seed the same rows, another
    seed other rows (a seed sweep varies the split, as HF's train_test_split(seed=...) does)."""
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"row {i}", "label": i % 2} for i in range(40)])
    base = [*SEQ_CLS, "data.source=jsonl", f"data.path={path}", "data.val_fraction=0.25"]

    def held_out(seed: int) -> list:
        return [e["input_ids"] for e in datasets([*base, f"seed={seed}"])[1]]

    assert held_out(1) == held_out(1)
    assert held_out(1) != held_out(2)


@pytest.mark.parametrize(("rows", "blocks"), [(2, 1), (3, 1), (4, 2)])
def test_packing_fills_every_whole_block_the_text_makes(tmp_path: Path, rows: int, blocks: int) -> None:
    """Packed causal-LM data is the token stream cut into max_length blocks; a stream that fills
    its last block exactly keeps it (each row here is 3 byte tokens and an EOS: 4 tokens)."""
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "abc"}] * rows)
    run = ["task=causal_lm", "model=tiny_llama", "data.source=jsonl", f"data.path={path}", "data.val_fraction=0"]
    train, _ = datasets([*run, "data.max_length=8", "task.packing=true"])
    assert [len(e["input_ids"]) for e in train] == [8] * blocks


def test_causal_lm_padding_is_never_a_target() -> None:
    """Unpacked documents of different lengths: the padded positions carry -100 labels (and a 0
    attention mask), so the loss never learns to predict padding."""
    task = tasks.get("causal_lm")
    tokenizer = load_tokenizer(to_spec(compose(["model=tiny_llama"])).model)
    batch = task.collate([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}], tokenizer, pad_to=4)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7, -100], [8, -100, -100, -100]]


def test_limit_examples_cuts_the_training_split_only(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(60)])
    base = [*SEQ_CLS, "data.source=jsonl", f"data.path={path}", "data.val_fraction=0.5"]
    train, val = datasets([*base, "data.limit_examples=3"])
    assert (len(train), len(val)) == (3, 30)
    train, val = datasets([*base, "data.limit_examples=3", "data.limit_val_examples=25"])
    assert (len(train), len(val)) == (3, 25)


def test_an_empty_optional_cell_takes_the_fields_default(tmp_path: Path) -> None:
    """A CSV row whose optional column (multitask prompt tuning's task_id) is blank is read
    like a row without the column: the default, not a bad integer."""
    from peftc.tasks.data import load_splits

    path = tmp_path / "d.csv"
    path.write_text("text,task_id\nan owl,2\na duck,\n")
    spec = to_spec(compose(["data.source=csv", f"data.path={path}", "data.val_fraction=0"])).data
    train, _ = load_splits(spec, ("text",), optional={"task_id": 0})
    assert [row["task_id"] for row in train] == [2, 0]


def test_csv_labels_may_be_names_or_indices(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("text,label\nfine,positive\nmeh,0\ngood,1\nbad,negative\n")
    train, val = datasets([*SEQ_CLS, "data.source=csv", f"data.path={path}", "data.val_fraction=0.25"])
    assert sorted(e["label"] for e in train + val) == [0, 0, 1, 1]


def test_sentence_pairs_are_encoded_as_one_pair_when_text_pair_is_mapped(tmp_path: Path) -> None:
    rows = [{"question": f"Is it {i}?", "sentence": f"It is {i}.", "label": i % 2} for i in range(4)]
    path = write_jsonl(tmp_path / "qnli.jsonl", rows)
    columns = "data.columns={text: question, text_pair: sentence}"
    train, _ = datasets([*SEQ_CLS, "data.source=jsonl", f"data.path={path}", columns, "data.val_fraction=0"])
    tokenizer = load_tokenizer(to_spec(compose(SEQ_CLS)).model)
    assert tokenizer.decode(train[0]["input_ids"]) == tokenizer.decode(tokenizer("Is it 0?", "It is 0.")["input_ids"])


def test_a_label_outside_the_label_set_names_file_and_row(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": "positive"}, {"text": "b", "label": "negative"}, {"text": "c", "label": "neutral"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        datasets([*SEQ_CLS, "data.source=jsonl", f"data.path={path}"])
    assert str(info.value).startswith(f"{path} row 3: label 'neutral' is not in the label set ['negative', 'positive']")


def test_a_long_label_set_is_shortened_in_the_message(tmp_path: Path) -> None:
    """A text column mapped as the label makes a label per row: the message stays one line."""
    rows = [{"text": f"t{i}", "label": f"sentence number {i:02d}"} for i in range(12)] + [{"text": "x", "label": "new"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    labels = "[" + ", ".join(f"'sentence number {i:02d}'" for i in range(10)) + ", ... (12 labels)]"
    overrides = [
        "task=seq_cls",
        "model=tiny_bert",
        "data.source=jsonl",
        f"data.path={path}",
        "data.val_path=" + str(path),
    ]
    with pytest.raises(DataError, match=re.escape(f"label 'new' is not in the label set {labels} (give a label")):
        datasets([*overrides, "task.labels=[" + ",".join(f"'sentence number {i:02d}'" for i in range(12)) + "]"])


def test_an_index_beyond_the_label_set_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("text,label\na,0\nb,2\n")
    with pytest.raises(DataError, match=r"bad.csv row 2: label '2' is not in the label set"):
        datasets([*SEQ_CLS, "data.source=csv", f"data.path={path}"])


# The override to type: Hydra adds a key that data.columns lacks only with '+'.
@pytest.mark.parametrize(
    ("mapping", "column", "override"),
    [
        ([], "text", "+data.columns.text=<column>"),
        (["data.columns={text: review}"], "review", "data.columns.text=<column>"),
    ],
    ids=["unmapped", "mapped"],
)
def test_a_missing_column_names_file_row_and_the_mapping_to_set(
    tmp_path: Path, mapping: list[str], column: str, override: str
) -> None:
    path = write_jsonl(tmp_path / "reviews.jsonl", [{"body": "x", "label": "positive"}])
    with pytest.raises(DataError) as info:
        datasets([*SEQ_CLS, "data.source=jsonl", f"data.path={path}", *mapping])
    message = str(info.value)
    assert message.startswith(f"{path} row 1: missing column '{column}' (task field 'text')")
    assert f"; set {override};" in message


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


def test_unset_labels_are_the_training_splits_own_sorted_and_printed_in_the_plan(tmp_path: Path) -> None:
    import peftc
    from peftc.planning.render import render_plan

    path = tmp_path / "reviews.csv"
    path.write_text("text,label\nawful,bad\nnice,good\nmeh,bad\ngreat,good\nso-so,fine\n")
    plan = peftc.compile(
        ["task=seq_cls", "model=tiny_bert", "data.source=csv", f"data.path={path}", "data.val_fraction=0"]
    )
    assert list(plan.spec.task.labels) == ["bad", "fine", "good"]
    assert "labels: [bad, fine, good] (3 classes" in render_plan(plan)
    head = next(m for m in plan.modules_to_save if m.path == "classifier")
    assert head.tensors["weight"][0] == 3  # the head is sized by the inferred set


def test_integer_labels_sort_as_numbers(tmp_path: Path) -> None:
    import peftc

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": n} for t, n in zip("abcd", (10, 2, 2, 10))])
    plan = peftc.compile(["task=seq_cls", "model=tiny_bert", "data.source=jsonl", f"data.path={path}"])
    assert list(plan.spec.task.labels) == ["2", "10"]


def test_negative_integer_labels_sort_as_numbers() -> None:
    from peftc.tasks.common import sorted_labels

    assert sorted_labels({"3", "-1", "10", "-2"}) == ["-2", "-1", "3", "10"]


def test_training_data_with_one_label_is_refused_at_compile_time(tmp_path: Path) -> None:
    import peftc

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": "good"} for t in "abcd"])
    with pytest.raises(ConfigError, match=r"task.labels: is unset and the training data has 1 distinct label"):
        peftc.compile(["task=seq_cls", "model=tiny_bert", "data.source=jsonl", f"data.path={path}"])


def test_fractional_labels_are_refused_as_regression_scores_not_made_classes(tmp_path: Path) -> None:
    import peftc

    rows = [{"text": f"pair {i}", "label": score} for i, score in enumerate([0.0, 1.25, 3.8, 5.0, 2.5, 4.0])]
    path = write_jsonl(tmp_path / "stsb.jsonl", rows)
    with pytest.raises(ConfigError, match=r"task.labels: is unset and the training labels are fractional numbers"):
        peftc.compile(["task=seq_cls", "model=tiny_bert", "data.source=jsonl", f"data.path={path}"])


def test_token_cls_words_or_tags_given_as_an_object_name_the_row(tmp_path: Path) -> None:
    # str() of {"w": "fox"} is two words, "{'w':" and "'fox'}", that two tags would silently label
    rows = [{"tokens": "a fox", "tags": "O ANIMAL"}, {"tokens": {"w": "fox"}, "tags": ["O", "ANIMAL"]}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    run = ["task=token_cls", "model=tiny_bert", "task.labels=[O,ANIMAL]", "data.source=jsonl", f"data.path={path}"]
    with pytest.raises(DataError, match=r"t.jsonl row 2: 'tokens' is an object, not a list of words or tags"):
        datasets([*run, "data.val_fraction=0"])


def test_unset_tags_put_o_first(tmp_path: Path) -> None:
    import peftc

    rows = [{"tokens": "Ann ate figs", "tags": "NAME O FOOD"}, {"tokens": "a red fox", "tags": "O COLOR ANIMAL"}]
    path, val = write_jsonl(tmp_path / "t.jsonl", rows), write_jsonl(tmp_path / "v.jsonl", rows[:1])
    overrides = ["task=token_cls", "model=tiny_bert", "data.source=jsonl", f"data.path={path}", f"data.val_path={val}"]
    plan = peftc.compile(overrides)
    assert list(plan.spec.task.labels) == ["O", "ANIMAL", "COLOR", "FOOD", "NAME"]


@pytest.mark.parametrize(
    ("cell", "problem"),
    [
        ("   ", r"'review' is empty"),
        (None, r"'review' is empty \(null\); fix the row or remove it$"),  # a parquet null, a JSON null
        ({"en": "good"}, r"'review' is an object \(\{\"en\": \"good\"\}\), not text"),
    ],
)
def test_a_text_cell_that_is_empty_null_or_an_object_names_the_row(tmp_path: Path, cell: object, problem: str) -> None:
    rows = [{"review": "fine", "label": "positive"}, {"review": cell, "label": "negative"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=rf"d.jsonl row 2: {problem}"):
        datasets([*SEQ_CLS, "data.source=jsonl", f"data.path={path}", "data.columns={text: review}"])


QUESTION_ANS = ["task=question_ans", "model=tiny_bert", "data.source=jsonl", "data.val_fraction=0"]
EIFFEL = "Eiffel's tower is in Paris. It was built by Gustave Eiffel."


def squad_rows(answers: dict) -> list[dict]:
    return [{"question": "Who built it?", "context": EIFFEL, "answers": answers}] * 2


def test_a_squad_answers_object_trains_on_the_span_at_its_answer_start(tmp_path: Path) -> None:
    second = EIFFEL.rindex("Eiffel")  # the answer's text also occurs earlier in the context
    # the first of its answers, as run_qa trains (validation rows list several, in other places)
    answers = {"text": ["Eiffel", "Eiffel"], "answer_start": [second, EIFFEL.index("Eiffel")]}
    path = write_jsonl(tmp_path / "squad.jsonl", squad_rows(answers))
    train, _ = datasets([*QUESTION_ANS, f"data.path={path}", "data.columns={answer: answers}"])
    assert train[0]["offsets"][train[0]["start_positions"]][0] == second


@pytest.mark.parametrize(
    ("answers", "problem"),
    [
        ({"text": [], "answer_start": []}, r"has no answer \(a SQuAD v2 unanswerable question\)"),
        ({"text": ["Paris"], "answer_start": [3]}, r"answer_start 3 does not point at the answer 'Paris' \(the"),
        (  # every gold answer is checked: validation scores against each
            {"text": ["Paris", "Eiffel"], "answer_start": [EIFFEL.index("Paris"), 3]},
            r"answer 2 of 2: answer_start 3 does not point at the answer 'Eiffel' \(the",
        ),
        ({"text": ["Paris", "Eiffel"], "answer_start": [22]}, r"has 2 answer texts and 1 answer_start values"),
    ],
)
def test_a_squad_row_without_a_span_to_learn_is_refused_by_row(tmp_path: Path, answers: dict, problem: str) -> None:
    path = write_jsonl(tmp_path / "squad.jsonl", squad_rows(answers))
    with pytest.raises(DataError, match=rf"squad.jsonl row 1: {problem}"):
        datasets([*QUESTION_ANS, f"data.path={path}", "data.columns={answer: answers}"])


def test_answers_that_no_window_holds_whole_are_counted_in_a_warning(tmp_path: Path) -> None:
    """A long context is cut into windows sharing task.doc_stride tokens: an answer far into it is
    in a later window, but one longer than the overlap, across a window's end, is in none."""
    far = {"question": "Where?", "context": "Nothing here. " * 20 + "It is in Paris.", "answer": "Paris"}
    near = {"question": "Where?", "context": "It is in Paris." + " Nothing here." * 20, "answer": "Paris"}
    # windows hold 55 context characters and advance by 51: characters 45..58 are in neither of the first two
    across = {"question": "Where?", "context": "Nothing here. " * 3 + "in Gustave Eiffel" + " Nothing." * 9}
    path = write_jsonl(tmp_path / "qa.jsonl", [far, {**across, "answer": "Gustave Eiffel"}, near])
    with pytest.warns(
        UserWarning,
        match=r"qa.jsonl: 1 of 3 examples have their answer in no single window of data.max_length=64 tokens "
        r"\(consecutive windows of a long context share task.doc_stride=4 tokens",
    ):
        train, _ = datasets([*QUESTION_ANS, f"data.path={path}", "data.max_length=64", "task.doc_stride=4"])
    assert len(train) > 3 and [e["start_positions"] > 0 for e in train].count(True) == 2


def test_a_small_validation_split_is_a_warning_with_its_size(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.warns(
        UserWarning,
        match=r"the validation split has only 5 examples, so its metrics are coarse \(each example weighs 20% of them\)",
    ):
        datasets([*SEQ_CLS, "data.source=jsonl", f"data.path={path}", "data.val_fraction=0.25"])


def test_a_validation_split_the_user_capped_is_no_warning(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(80)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, val = datasets(
            [*SEQ_CLS, "data.source=jsonl", f"data.path={path}", "data.val_fraction=0.25", "data.limit_val_examples=4"]
        )
    assert len(val) == 4


def test_a_cap_above_the_validation_split_still_warns_of_its_size(tmp_path: Path) -> None:
    """data.limit_val_examples=100 did not choose the 5 examples the split has: the warning stays."""
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.warns(UserWarning, match=r"the validation split has only 5 examples"):
        datasets(
            [
                *SEQ_CLS,
                "data.source=jsonl",
                f"data.path={path}",
                "data.val_fraction=0.25",
                "data.limit_val_examples=100",
            ]
        )


def test_a_csv_saved_by_excel_with_a_byte_order_mark_reads_its_first_column(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("text,label\nfine,positive\nbad,negative\nok,positive\nno,negative\n".encode("utf-8-sig"))
    train, val = datasets([*SEQ_CLS, "data.source=csv", f"data.path={path}", "data.val_fraction=0.25"])
    assert len(train) + len(val) == 4  # '\ufefftext' would be a missing 'text' column


@pytest.mark.parametrize(
    ("name", "separator"), [("tabs.tsv", "\t"), ("semicolons.csv", ";"), ("excel-semicolons.csv", ";")]
)
def test_a_csv_separated_by_tabs_or_semicolons_reads_its_columns(tmp_path: Path, name: str, separator: str) -> None:
    """A spreadsheet's text export (tabs) or a CSV where the comma is the decimal mark
    (semicolons): the header says which; commas inside its cells stay text."""
    lines = [
        ["review", "stars"],
        ["fine, really", "positive"],
        ["bad", "negative"],
        ["ok", "positive"],
        ["no", "negative"],
    ]
    text = "".join(separator.join(line) + "\r\n" for line in lines)
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8-sig" if name.startswith("excel") else "utf-8"))
    overrides = [
        *SEQ_CLS,
        "data.source=csv",
        f"data.path={path}",
        "data.val_fraction=0",
        "data.columns={text: review, label: stars}",
    ]
    train, _ = datasets(overrides)
    tokenizer = load_tokenizer(to_spec(compose(overrides)).model)
    assert [tokenizer.decode(e["input_ids"], skip_special_tokens=True) for e in train[:2]] == ["fine, really", "bad"]
    assert [e["label"] for e in train] == [1, 0, 1, 0]


def test_a_long_csv_field_is_read(tmp_path: Path) -> None:
    path = tmp_path / "long.csv"
    path.write_text("text,label\n" + "x" * 200_000 + ",positive\nshort,negative\n")
    train, _ = datasets([*SEQ_CLS, "data.source=csv", f"data.path={path}", "data.val_fraction=0"])
    assert len(train) == 2


def test_a_deeply_nested_json_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "fine", "label": 0}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"deep.jsonl:2: JSON nested too deeply"):
        datasets([*SEQ_CLS, "data.source=jsonl", f"data.path={path}"])


def test_prediction_input_suffixes_are_case_insensitive(tmp_path: Path) -> None:
    from peftc.tasks.data import read_inputs

    path = tmp_path / "INPUTS.CSV"
    path.write_text("text\nhello\nworld\n")
    rows = read_inputs(path, ("text",), {})
    assert [r["text"] for r in rows] == ["hello", "world"]


def test_prediction_inputs_from_a_tsv_file_read_its_tab_separated_columns(tmp_path: Path) -> None:
    from peftc.tasks.data import read_inputs

    path = tmp_path / "inputs.tsv"
    path.write_text("id\ttext\n1\thello, world\n2\tbye\n")
    rows = read_inputs(path, ("text",), {})
    assert [r["text"] for r in rows] == ["hello, world", "bye"]


def test_a_prediction_text_file_not_in_utf8_is_one_data_error(tmp_path: Path) -> None:
    from peftc.tasks.data import read_inputs

    path = tmp_path / "inputs.txt"
    path.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"inputs.txt: is not UTF-8 text \(byte 3\)"):
        read_inputs(path, ("text",), {})


@pytest.mark.parametrize("key", ["data.path", "data.val_path"])
def test_a_data_path_that_is_not_a_regular_file_is_refused_by_its_own_key(key: str, tmp_path: Path) -> None:
    """/dev/null exists (it is not 'no such file') but has no rows; the error names the key that gave it."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"row {i}"} for i in range(4)])
    paths = {"data.path": train, "data.val_path": train, key: "/dev/null"}
    with pytest.raises(ConfigError, match=re.escape(f"{key}='/dev/null': is not a regular file")):
        datasets(["data.source=jsonl", *(f"{k}={v}" for k, v in paths.items())])


def test_a_validation_file_is_read_with_the_training_files_column_mapping(tmp_path: Path) -> None:
    from peftc.tasks.data import load_splits

    rows = [{"review": f"text {i}", "stars": ["bad", "good"][i % 2]} for i in range(4)]
    train_file, val_file = write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "val.jsonl", rows[:2])
    overrides = [
        "data.source=jsonl",
        f"data.path={train_file}",
        f"data.val_path={val_file}",
        "data.limit_val_examples=2",
    ]
    spec = to_spec(compose([*overrides, "data.columns={text: review, label: stars}"])).data
    train, val = load_splits(spec, ("text", "label"))
    assert len(train) == 4
    assert val == [{"text": "text 0", "label": "bad"}, {"text": "text 1", "label": "good"}]


def test_prediction_inputs_take_the_input_columns_of_a_mapping_that_also_names_targets(tmp_path: Path) -> None:
    """The run's data.columns maps the label too; a file to predict on has no label column."""
    from peftc.tasks.data import read_inputs

    path = write_jsonl(tmp_path / "inputs.jsonl", [{"review": "great"}])
    assert read_inputs(path, ("text",), {"text": "review", "label": "stars"}) == [{"text": "great"}]


def test_unpacked_documents_keep_their_first_max_length_tokens(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "abcdefghijkl"}])
    run = ["task=causal_lm", "model=tiny_llama", "data.source=jsonl", f"data.path={path}", "data.val_fraction=0"]
    train, _ = datasets([*run, "data.max_length=8", "task.packing=false"])
    tokenizer = load_tokenizer(to_spec(compose(["model=tiny_llama"])).model)
    assert tokenizer.decode(train[0]["input_ids"]) == "<s>abcdefg"  # the BOS, then the document's start
