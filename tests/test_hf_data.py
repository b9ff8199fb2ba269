"""data.source=hf: parquet/arrow files, save_to_disk directories and hub datasets through the
datasets library, with the same row checks and one-line errors as JSONL/CSV files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

import peftc
from peftc.config.compose import compose, to_spec
from peftc.errors import ConfigError, DataError
from peftc.tasks.common import IGNORE_INDEX
from peftc.tasks.data import load_splits
from tests.helpers import offline_hub_snapshot

pytestmark = pytest.mark.filterwarnings("ignore:.*the validation split has only:UserWarning")

PROMPT_RESPONSE = ["data.source=hf", "data.format=prompt_response", "task.packing=false"]


def pairs(n: int, start: int = 0) -> list[dict]:
    return [{"instruction": f"Say {i}.", "output": f"{i}!", "id": i} for i in range(start, start + n)]


def splits(*overrides: str) -> tuple[list, list]:
    run = to_spec(compose([*PROMPT_RESPONSE, "data.columns={prompt: instruction, response: output}", *overrides]))
    return load_splits(run.data, ("prompt", "response"), seed=run.seed)


@pytest.fixture(scope="module")
def parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "pairs.parquet"
    Dataset.from_list(pairs(200)).to_parquet(str(path))
    return path


def test_a_parquet_file_is_read_with_the_column_mapping_and_a_held_out_split(parquet: Path) -> None:
    train, val = splits(f"data.path={parquet}", "data.val_fraction=0.25")
    assert (len(train), len(val)) == (150, 50)
    assert {r["prompt"] for r in train + val} == {f"Say {i}." for i in range(200)}
    assert set(train[0]) == {"prompt", "response"}  # only the task's fields; 'id' is not read


def test_a_save_to_disk_directory_gives_its_named_splits(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(pairs(30)), "dev": Dataset.from_list(pairs(12, start=100))}).save_to_disk(
        str(saved)
    )
    train, val = splits(f"data.path={saved}", "data.val_split=dev", "data.limit_val_examples=5")
    assert [r["prompt"] for r in train] == [f"Say {i}." for i in range(30)]
    assert [r["prompt"] for r in val] == [f"Say {i}." for i in range(100, 105)]
    with pytest.raises(ConfigError, match=r"data.val_split='deev': .* has no such split; did you mean 'dev'"):
        splits(f"data.path={saved}", "data.val_split=deev")


def test_a_validation_split_left_unused_is_named_in_a_warning(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(pairs(30)), "validation": Dataset.from_list(pairs(8))}).save_to_disk(
        str(saved)
    )
    with pytest.warns(UserWarning, match=r"has a 'validation' split, which is not used: validation holds out "):
        train, _ = splits(f"data.path={saved}")
    assert len(train) == 27  # as documented: a tenth of 'train' held out


def test_training_on_the_validation_split_warns_of_nothing_unused(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(pairs(30)), "validation": Dataset.from_list(pairs(8))}).save_to_disk(
        str(saved)
    )
    splits(f"data.path={saved}", "data.split=validation")
    assert not [w for w in recwarn if "which is not used" in str(w.message)]


def test_a_hub_id_reads_the_datasets_files_from_the_hugging_face_cache_offline(
    parquet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = offline_hub_snapshot(tmp_path, monkeypatch, "datasets--someone--pairs") / "data"
    data.mkdir(parents=True)
    shutil.copy(parquet, data / "train-00000-of-00001.parquet")
    train, val = splits("data.path=someone/pairs")
    assert len(train) + len(val) == 200
    with pytest.raises(DataError, match="^someone/missing: is not a local dataset and could not be fetched"):
        splits("data.path=someone/missing")


def test_streaming_reads_only_the_rows_the_run_uses(parquet: Path) -> None:
    train, val = splits(
        f"data.path={parquet}", "data.streaming=true", "data.limit_examples=16", "data.val_fraction=0.25"
    )
    assert len(train) == 16 and len(val) == 6  # 22 rows read, the first ones, a quarter held out
    assert {r["prompt"] for r in train + val} == {f"Say {i}." for i in range(22)}


def test_chat_rows_from_parquet_train_only_the_assistant_turns(tmp_path: Path) -> None:
    path = tmp_path / "chat.parquet"
    messages = [
        [{"role": "user", "content": f"Hi {i}?"}, {"role": "assistant", "content": f"Hello {i}."}] for i in range(12)
    ]
    Dataset.from_list([{"messages": m} for m in messages]).to_parquet(str(path))
    plan = peftc.compile(["data.source=hf", f"data.path={path}", "data.format=chat", "task.packing=false"])
    from peftc import tasks
    from peftc.planning.model_source import load_tokenizer

    tokenizer = load_tokenizer(plan.spec.model)  # demo_llama's own chat template
    train, _ = tasks.get(plan.task).datasets(plan.spec, tokenizer)
    trained = [t for t, label in zip(train[0]["input_ids"], train[0]["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained).startswith("Hello ") and "Hi " not in tokenizer.decode(trained)


SENTIMENT = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"])})


def sst2(path: Path, labels: list[int]) -> Path:
    """A GLUE SST-2-shaped split: its integer labels declared as a ClassLabel with names."""
    texts = [f"a {['dull', 'fine'][i % 2]} film, number {i}" for i in range(len(labels))]
    Dataset.from_dict({"sentence": texts, "label": labels}, features=SENTIMENT).to_parquet(str(path))
    return path


def classified(*overrides: str) -> tuple[tuple[str, ...], list, list]:
    """The label set a seq_cls run plans and its encoded (train, validation) examples."""
    from peftc import tasks
    from peftc.planning.model_source import load_tokenizer

    plan = peftc.compile(["model=tiny_bert", "data.source=hf", *overrides])
    train, val = tasks.get(plan.task).datasets(plan.spec, load_tokenizer(plan.spec.model))
    return plan.spec.task.labels, train, val


def test_class_label_names_are_the_label_set(tmp_path: Path) -> None:
    path = sst2(tmp_path / "sst2.parquet", [0, 1] * 6)
    labels, _, _ = classified("task=seq_cls", f"data.path={path}", "data.columns={text: sentence}")
    assert labels == ("negative", "positive")  # as run_glue names them (the head's id2label), not '0' and '1'


def test_class_label_integers_are_matched_by_name_whatever_order_task_labels_lists(tmp_path: Path) -> None:
    path = sst2(tmp_path / "sst2.parquet", [0, 1] * 6)
    _, train, _ = classified(
        "task=seq_cls",
        f"data.path={path}",
        "data.columns={text: sentence}",
        "task.labels=[positive,negative]",
        "data.val_fraction=0",
    )
    assert [e["label"] for e in train] == [1, 0] * 6  # 'negative' (ClassLabel's 0) is class 1 here


def test_tag_names_come_from_the_class_label_in_its_order_with_tags_absent_from_training(tmp_path: Path) -> None:
    tags = ClassLabel(names=["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    features = Features({"tokens": List(Value("string")), "ner_tags": List(tags)})
    rows = {"tokens": [["Ann", "is", "in", "Rome"]] * 4, "ner_tags": [[1, 0, 0, 3]] * 4}
    saved = tmp_path / "conll"
    DatasetDict(
        train=Dataset.from_dict(rows, features=features),
        validation=Dataset.from_dict({"tokens": [["New", "York"]], "ner_tags": [[3, 4]]}, features=features),
    ).save_to_disk(str(saved))
    overrides = ["task=token_cls", f"data.path={saved}", "data.columns={tags: ner_tags}", "data.val_split=validation"]
    labels, _, val = classified(*overrides)
    assert labels == ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")  # I-LOC is in validation only
    assert [t for t in val[0]["labels"] if t != IGNORE_INDEX] == [3, 4]


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_class_label_of_minus_one_is_an_unlabelled_row_named_with_its_split(tmp_path: Path, split: str) -> None:
    saved = tmp_path / "glue"
    labelled = Dataset.from_dict({"sentence": ["bad", "good"] * 3, "label": [0, 1] * 3}, features=SENTIMENT)
    unlabelled = Dataset.from_dict({"sentence": ["so-so", "meh"], "label": [1, -1]}, features=SENTIMENT)
    DatasetDict({"train": labelled, "test": unlabelled} if split == "test" else {"train": unlabelled}).save_to_disk(
        str(saved)
    )
    with pytest.raises(DataError, match=rf"glue \[{split}\] row 2: 'label' is -1, the datasets library's 'no label'"):
        classified("task=seq_cls", f"data.path={saved}", "data.columns={text: sentence}", "data.val_split=test")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.columns={prompt: question, response: output}"],
            r"pairs.parquet \[train\] row 1: missing column 'question'",
        ),
        (["data.split=test"], r"data.split='test': .*pairs.parquet has no such split; splits: train"),
        (["data.streaming=true"], r"data.streaming=True: reads only the rows the run uses, so it needs their number"),
        (["data.val_path=x.parquet"], r"data.val_path='x.parquet': is for source=jsonl\|csv"),
    ],
)
def test_bad_hf_settings_are_one_line_naming_the_key_or_the_row(
    parquet: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises((ConfigError, DataError), match=message) as error:
        splits(f"data.path={parquet}", *overrides)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("columns", [["prompt", "completion"], ["document", "summary"]])
def test_a_missing_column_is_named_beside_every_column_the_split_has(tmp_path: Path, columns: list[str]) -> None:
    """Not only the task's columns it has, and not 'the split has no rows' when it has none of them."""
    path = tmp_path / "other.parquet"
    Dataset.from_dict({name: ["a", "b"] for name in columns}).to_parquet(str(path))
    run = to_spec(compose([*PROMPT_RESPONSE, f"data.path={path}"]))
    with pytest.raises(
        DataError, match=rf"\[train\] row 1: missing column '(prompt|response)' .*present: {', '.join(columns)}$"
    ):
        load_splits(run.data, ("prompt", "response"), seed=run.seed)


def test_a_file_datasets_cannot_read_is_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"^.*broken.parquet: datasets could not read it \("):
        splits(f"data.path={broken}")
    with pytest.raises(ConfigError, match=r"data.path=.*notes.txt': is not a data file datasets reads \(.txt\)"):
        (tmp_path / "notes.txt").write_text("hi")
        splits(f"data.path={tmp_path / 'notes.txt'}")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("rows.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": c}\n', r"rows.jsonl:3: not valid JSON"),
        ("rows.json", b'{"text": "a"}\n{"text": "b"\n', r"rows.json:2: not valid JSON"),  # JSON lines named .json
        ("rows.csv", "text\ncafé\n".encode("latin-1"), r"rows.csv: is not UTF-8 text \(byte 8\)"),
        ("rows.csv", b'text\n"unclosed\n', r"rows.csv: datasets could not read it \(Error tokenizing data"),
    ],
)
def test_a_data_file_datasets_cannot_parse_names_the_line_or_the_cause_in_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture, name: str, content: bytes, message: str
) -> None:
    """Not the library's 'An error occurred while generating the dataset', nor its own log line."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        splits(f"data.path={tmp_path / name}", "data.columns={prompt: text, response: text}")
    assert capfd.readouterr().err == ""


def test_hf_only_keys_are_refused_for_file_sources() -> None:
    with pytest.raises(ConfigError, match=r"data.subset='en': is read by data.source=hf only \(source is jsonl\)"):
        to_spec(compose(["data.source=jsonl", "data.path=x.jsonl", "data.subset=en"]))


def test_a_missing_datasets_package_is_named_at_compile_time(monkeypatch: pytest.MonkeyPatch, parquet: Path) -> None:
    from peftc.planning import compat

    real = compat._missing
    monkeypatch.setattr(compat, "_missing", lambda module: module == "datasets" or real(module))
    with pytest.raises(
        ConfigError,
        match=r"data.source='hf': .*datasets package, which is not installed; pip install 'peftc\[datasets\]'",
    ):
        peftc.compile(["data.source=hf", f"data.path={parquet}", "dry_run=true"])


def test_a_saved_single_dataset_is_the_train_split(tmp_path: Path) -> None:
    """Dataset.save_to_disk (not a DatasetDict) writes one unnamed split: it is data.split=train."""
    saved = tmp_path / "saved"
    Dataset.from_list(pairs(8)).save_to_disk(str(saved))
    train, val = splits(f"data.path={saved}", "data.val_fraction=0.25")
    assert (len(train), len(val)) == (6, 2)


SQUAD = Features(
    {
        "question": Value("string"),
        "context": Value("string"),
        "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))},
    }
)


def test_squad_validation_rows_keep_every_gold_answer_and_training_learns_the_first(tmp_path: Path) -> None:
    """SQuAD's validation rows list several answers (by different annotators): validation scores
    against each (as the squad metric does), training learns the first (as run_qa does)."""
    from peftc import tasks
    from peftc.planning.model_source import load_tokenizer

    context = "The tower was built by Gustave Eiffel in 1889."
    golds = ["Gustave Eiffel", "Eiffel", "Gustave Eiffel"]
    answers = {"text": golds, "answer_start": [context.index(text) for text in golds]}
    row = {"question": "Who built it?", "context": context, "answers": answers}
    squad = {
        "train": Dataset.from_list([row] * 4, features=SQUAD),
        "validation": Dataset.from_list([row], features=SQUAD),
    }
    DatasetDict(squad).save_to_disk(str(tmp_path / "squad"))
    plan = peftc.compile(
        ["task=question_ans", "model=tiny_bert", "data.source=hf", f"data.path={tmp_path / 'squad'}"]
        + ["data.val_split=validation", "data.columns={answer: answers}"]
    )
    train, val = tasks.get("question_ans").datasets(plan.spec, load_tokenizer(plan.spec.model))
    first = train[0]["offsets"][train[0]["start_positions"]][0], train[0]["offsets"][train[0]["end_positions"]][1]
    assert len(train) == 4 and context[slice(*first)] == "Gustave Eiffel"
    start = context.index("Gustave")  # one byte token per character: context positions are characters
    gustave_eiffel, eiffel = [start, start + 13], [start + 8, start + 13]
    assert [example["gold_spans"] for example in val] == [[gustave_eiffel, eiffel, gustave_eiffel]]
