"""Row layouts people bring from TRL and Alpaca, for task=causal_lm: TRL's prompt-completion rows
(text, or message lists read as one conversation whose completion is learned), instruction rows
whose prompt is composed of several columns, and preference sets refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset

import peftc
from peftc import tasks
from peftc.planning.model_source import load_tokenizer
from peftc.tasks.common import IGNORE_INDEX
from tests.helpers import run_cli

pytestmark = pytest.mark.filterwarnings("ignore:.*the validation split has only:UserWarning")

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
USER = {"role": "user", "content": "What does the cat say?"}
# TRL's conversational prompt-completion: the prompt may hold a system message and earlier turns
CONVERSATIONAL = {
    "prompt": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        USER,
    ],
    "completion": [{"role": "assistant", "content": "Meow."}],
}


def write(path: Path, rows: list[dict], source: str = "jsonl") -> Path:
    """Rows as a JSONL file, or (source=hf) a directory save_to_disk wrote."""
    if source == "hf":
        Dataset.from_list(rows).save_to_disk(str(path))
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def examples(path: Path, *overrides: str, source: str = "jsonl") -> tuple[list, object]:
    """The encoded training examples of a causal_lm run on the file, one per row, and the tokenizer."""
    template = path.parent / "chat.jinja"
    template.write_text(TEMPLATE)
    plan = peftc.compile(
        [
            f"data.source={source}",
            f"data.path={path}",
            f"model.chat_template={template}",
            "task.packing=false",
            "data.val_fraction=0",
            "data.max_length=128",
            *overrides,
        ]
    )
    tokenizer = load_tokenizer(plan.spec.model)
    train, _ = tasks.get(plan.task).datasets(plan.spec, tokenizer)
    return train, tokenizer


def texts(example: dict, tokenizer) -> tuple[str, str]:
    """(the whole text, the trained text) of an example."""
    trained = [t for t in example["labels"] if t != IGNORE_INDEX]
    return tokenizer.decode(example["input_ids"]), tokenizer.decode(trained)


@pytest.mark.parametrize("source", ["jsonl", "hf"])
def test_a_conversational_prompt_completion_row_learns_only_its_completion(tmp_path: Path, source: str) -> None:
    """As TRL's SFTTrainer: prompt + completion rendered as one conversation, the earlier answer in
    the prompt is context."""
    path = write(tmp_path / "trl", [CONVERSATIONAL] * 4, source)
    train, tokenizer = examples(path, "data.format=chat", source=source)
    whole, trained = texts(train[0], tokenizer)
    assert (
        whole
        == "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>Hello.\n<|user|>What does the cat say?\n<|assistant|>Meow.\n"
    )
    assert trained == "Meow.\n"


def test_train_on_prompt_learns_the_whole_conversational_row(tmp_path: Path) -> None:
    train, _ = examples(
        write(tmp_path / "trl.jsonl", [CONVERSATIONAL] * 4), "data.format=chat", "task.train_on_prompt=true"
    )
    assert all(example["labels"] == example["input_ids"] for example in train)


@pytest.mark.parametrize("source", ["jsonl", "hf"])
def test_a_standard_prompt_completion_row_reads_its_completion_as_the_response(tmp_path: Path, source: str) -> None:
    rows = [{"prompt": "What does the cat say?", "completion": " Meow."}] * 4
    train, tokenizer = examples(write(tmp_path / "trl", rows, source), "data.format=prompt_response", source=source)
    assert texts(train[0], tokenizer) == ("<s>What does the cat say? Meow.</s>", " Meow.</s>")


@pytest.mark.parametrize(
    ("row", "format", "problem"),
    [
        (
            {"prompt": "Q", "completion": " A"},
            "chat",
            "'prompt' and 'completion' hold text, not conversations; data.format=prompt_response reads text",
        ),
        (
            CONVERSATIONAL,
            "prompt_response",
            "), not text; a conversation: task=causal_lm data.format=chat reads conversations",
        ),
        (
            {"prompt": [USER], "completion": [USER]},
            "chat",
            "(train split, example 1) completion: has no assistant message to learn from",
        ),
    ],
    ids=["text-rows-as-chat", "conversation-as-prompt-response", "completion-without-an-answer"],
)
def test_prompt_completion_rows_in_the_other_format_name_the_one_that_reads_them(
    tmp_path: Path, row: dict, format: str, problem: str
) -> None:
    with pytest.raises(peftc.DataError) as error:
        examples(write(tmp_path / "trl.jsonl", [row] * 4), f"data.format={format}")
    assert problem in str(error.value)


ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": " 5"},
    {"instruction": "Say hello.", "input": "", "output": " Hello"},
]


def test_a_prompt_read_from_several_columns_joins_their_texts(tmp_path: Path) -> None:
    """Alpaca's input goes into the prompt after its instruction; an empty input is left out."""
    path = write(tmp_path / "alpaca.jsonl", ALPACA * 2)
    columns = "data.columns={prompt: [instruction, input], response: output}"
    train, tokenizer = examples(path, "data.format=prompt_response", columns)
    assert [texts(e, tokenizer) for e in train[:2]] == [
        ("<s>Add the numbers.\n\n2 and 3 5</s>", " 5</s>"),
        ("<s>Say hello. Hello</s>", " Hello</s>"),
    ]


@pytest.mark.parametrize("source", ["jsonl", "hf"])
@pytest.mark.parametrize(
    ("rows", "columns", "problem"),
    [
        (
            ALPACA,
            "data.columns={prompt: instruction, response: output}",
            "row 1: its 'input' holds text that no field reads (it completes the instruction's prompt); "
            "read both: data.columns.prompt=[instruction,input]",
        ),
        (  # Dolly's context
            [{"instruction": "Add.", "context": "2 and 3", "response": " 5"}],
            "+data.columns.prompt=instruction",
            "its 'context' holds text that no field reads (it completes the instruction's prompt); "
            "read both: data.columns.prompt=[instruction,context]",
        ),
        (
            ALPACA,
            "data.val_fraction=0",  # no mapping at all
            "missing column 'prompt' (task field 'prompt'); set +data.columns.prompt=<column>; "
            "instruction rows: data.columns={prompt: [instruction,input], response: output}",
        ),
    ],
    ids=["alpaca-input-unread", "dolly-context-unread", "alpaca-unmapped"],
)
def test_instruction_rows_read_without_their_input_are_refused_with_the_mapping_to_type(
    tmp_path: Path, source: str, rows: list, columns: str, problem: str
) -> None:
    path = write(tmp_path / "instructions", rows * 2, source)
    with pytest.raises(peftc.DataError) as error:
        examples(path, "data.format=prompt_response", columns, source=source)
    assert problem in str(error.value)


PREFERENCE = "has 'chosen' and 'rejected' columns: a preference dataset (TRL's DPO, ORPO, reward training), which peftc does not train"
KTO = "has a true/false 'label' beside its 'completion': an unpaired preference dataset (TRL's KTO), which peftc does not train"


@pytest.mark.parametrize("source", ["jsonl", "hf"])
@pytest.mark.parametrize(
    ("row", "format", "problem"),
    [
        (
            {"prompt": "Q", "chosen": " A", "rejected": " B"},
            "prompt_response",
            PREFERENCE + "; to fine-tune on the preferred answers alone: +data.columns.response=chosen",
        ),
        (
            {"prompt": "Q", "chosen": " A", "rejected": " B"},
            "text",
            PREFERENCE
            + "; to fine-tune on the preferred answers alone: data.format=prompt_response +data.columns.response=chosen",
        ),
        (
            {
                "chosen": [USER, {"role": "assistant", "content": "A"}],
                "rejected": [USER, {"role": "assistant", "content": "B"}],
            },
            "chat",
            PREFERENCE + "; to fine-tune on the preferred answers alone: +data.columns.messages=chosen",
        ),
        (
            {
                "prompt": [USER],
                "chosen": [{"role": "assistant", "content": "A"}],
                "rejected": [{"role": "assistant", "content": "B"}],
            },
            "chat",
            PREFERENCE,
        ),
        ({"prompt": "Q", "completion": " A", "label": True}, "prompt_response", KTO),
        ({"prompt": [USER], "completion": [{"role": "assistant", "content": "A"}], "label": False}, "chat", KTO),
    ],
    ids=[
        "dpo-standard",
        "dpo-standard-as-text",
        "dpo-implicit-prompt",
        "dpo-conversational",
        "kto-standard",
        "kto-conversational",
    ],
)
def test_a_preference_set_is_refused_in_one_line_saying_what_it_is(
    tmp_path: Path, source: str, row: dict, format: str, problem: str
) -> None:
    with pytest.raises(peftc.DataError) as error:
        examples(write(tmp_path / "preference", [row] * 4, source), f"data.format={format}", source=source)
    assert str(error.value).endswith("row 1: " + problem) or ("row 1: " + problem + ";") in str(error.value)


def trl_row(i: int) -> dict:
    return {
        "prompt": [{"role": "user", "content": f"Say {i}."}],
        "completion": [{"role": "assistant", "content": "Ok."}],
    }


def sharegpt_row(i: int) -> dict:
    return {"conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": "Ok."}]}


@pytest.mark.parametrize(
    ("row", "columns"),
    [(trl_row, []), (sharegpt_row, ["+data.columns.messages=conversations"])],
    ids=["trl-prompt-completion", "sharegpt"],
)
def test_the_cli_trains_and_samples_a_conversation_from_its_prompt(tmp_path: Path, row, columns: list) -> None:
    """The before/after sample continues a validation row's prompt (what TRL generates from), its
    messages read as training reads them."""
    path = write(tmp_path / "chats.jsonl", [row(i) for i in range(24)])
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    args = [
        "data.source=jsonl",
        f"data.path={path}",
        "data.format=chat",
        f"model.chat_template={tmp_path / 'chat.jinja'}",
    ]
    result = run_cli([*args, *columns, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sample = next(line for line in result.stdout.splitlines() if line.startswith("sample after training"))
    assert sample.split(" -> ")[0].startswith("sample after training: '<|user|>Say ")
    assert sample.split(" -> ")[0].endswith(".\\n<|assistant|>'")


def test_a_column_mapping_to_an_empty_list_is_refused() -> None:
    with pytest.raises(
        peftc.ConfigError, match=r"data.columns=.*must be a mapping of names to column names \(or to lists of columns"
    ):
        peftc.compile(["data.format=prompt_response", "data.columns={prompt: [], response: output}"])


# A template that lists the functions a conversation may call before it (as tool-calling templates do)
TOOLS_TEMPLATE = "{% if tools %}<|tools|>{% for t in tools %}{{ t.function.name }};{% endfor %}{% endif %}" + TEMPLATE
WEATHER = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]


def tool_rows(tools: object) -> list[dict]:
    return [{"messages": [USER, {"role": "assistant", "content": "Meow."}], "tools": tools}] * 4


@pytest.mark.parametrize(
    ("tools", "source"),
    [(WEATHER, "jsonl"), (json.dumps(WEATHER), "jsonl"), (WEATHER, "hf")],
    ids=["list", "json-text", "hf"],
)
def test_a_rows_tools_reach_the_chat_template_as_in_trl(tmp_path: Path, tools: object, source: str) -> None:
    path = write(tmp_path / "tools", tool_rows(tools), source)
    train, tokenizer = examples(
        path, "data.format=chat", f"model.chat_template={write_template(tmp_path)}", source=source
    )
    assert texts(train[0], tokenizer) == (
        "<|tools|>weather;<|user|>What does the cat say?\n<|assistant|>Meow.\n",
        "Meow.\n",
    )


def write_template(directory: Path) -> Path:
    (directory / "tools.jinja").write_text(TOOLS_TEMPLATE)
    return directory / "tools.jinja"


def test_tools_that_are_not_function_schemas_are_named(tmp_path: Path) -> None:
    path = write(tmp_path / "tools.jsonl", tool_rows("weather"))
    with pytest.raises(
        peftc.DataError, match=r"example 1\): 'tools' is text that is not JSON; give a list of function"
    ):
        examples(path, "data.format=chat", f"model.chat_template={write_template(tmp_path)}")


def test_a_tool_using_adapter_samples_and_predicts_with_the_rows_tools(tmp_path: Path) -> None:
    path = write(tmp_path / "tools.jsonl", tool_rows(WEATHER) * 6)
    args = [
        "data.source=jsonl",
        f"data.path={path}",
        "data.format=chat",
        f"model.chat_template={write_template(tmp_path)}",
    ]
    result = run_cli([*args, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sample after training: '<|tools|>weather;<|user|>" in result.stdout
    inputs = write(tmp_path / "inputs.jsonl", [{"messages": [USER], "tools": WEATHER}, {"messages": [USER]}])
    adapter = f"adapter={tmp_path / 'run' / 'adapter'}"
    given = f"input_file={inputs}"
    result = run_cli(
        ["action=predict", adapter, given, "task.max_new_tokens=2", f"output_dir={tmp_path}"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [p["text"] for p in predictions] == [
        "<|tools|>weather;<|user|>What does the cat say?\n<|assistant|>",
        "<|user|>What does the cat say?\n<|assistant|>",
    ]
