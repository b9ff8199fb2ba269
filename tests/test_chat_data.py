"""data.format=chat for causal_lm: conversations rendered with the chat template, the loss on the
assistant turns only; a tokenizer without a template and malformed conversations are named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import peftc
from peftc import tasks
from peftc.planning.model_source import load_tokenizer
from peftc.tasks import chat
from peftc.tasks.common import IGNORE_INDEX
from tests.helpers import run_cli

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ANIMALS = ("cat", "dog", "owl")


def conversation(i: int) -> dict:
    animal = ANIMALS[i % 3]
    return {
        "messages": [
            {"role": "user", "content": f"What does the {animal} say?"},
            {"role": "assistant", "content": f"The {animal} says hello."},
            {"role": "user", "content": "Again?"},
            {"role": "assistant", "content": "Hello."},
        ]
    }


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("chat")
    (directory / "chat.jsonl").write_text("".join(json.dumps(conversation(i)) + "\n" for i in range(60)))
    (directory / "chat.jinja").write_text(TEMPLATE)
    return directory


def overrides(chat_dir: Path, *extra: str) -> list[str]:
    return [
        "data.source=jsonl",
        f"data.path={chat_dir / 'chat.jsonl'}",
        "data.format=chat",
        f"model.chat_template={chat_dir / 'chat.jinja'}",
        "data.max_length=128",
        *extra,
    ]


def test_only_the_assistant_turns_are_trained(chat_dir: Path) -> None:
    plan = peftc.compile(overrides(chat_dir, "task.packing=false"))
    tokenizer = load_tokenizer(plan.spec.model)
    train, _ = tasks.get(plan.task).datasets(plan.spec, tokenizer)
    for example in train[:5]:
        text = tokenizer.decode(example["input_ids"])
        trained = tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
        animal = next(a for a in ANIMALS if f"the {a} say?" in text)
        assert trained == f"The {animal} says hello.\nHello.\n"  # both answers, no question, no role marker


def test_a_tokenizer_without_a_chat_template_is_named(chat_dir: Path) -> None:
    # tiny_llama: the config-built models' byte-level tokenizer has no template (demo_llama has one)
    plan = peftc.compile(
        [*(o for o in overrides(chat_dir) if not o.startswith("model.chat_template")), "model=tiny_llama"]
    )
    with pytest.raises(peftc.ConfigError, match="model.chat_template: data.format=chat needs a chat template"):
        tasks.get(plan.task).datasets(plan.spec, load_tokenizer(plan.spec.model))


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([{"role": "user", "content": "Hi"}], "has no assistant message to learn from"),
        ([{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "message 1 has role 'robot'"),
        ("Hi", "'messages' must be a non-empty list"),
    ],
)
def test_malformed_conversations_are_named(chat_dir: Path, tmp_path: Path, messages: object, problem: str) -> None:
    rows = [conversation(i) for i in range(30)] + [{"messages": messages}]
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_cli([*overrides(chat_dir, f"data.path={data}"), f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2 and problem in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


# A Hugging Face style template that refuses a role (as Gemma's and Mistral's refuse 'system').
REFUSING = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    + TEMPLATE[len("{% for m in messages %}") :]
)


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        (REFUSING, "(train split, example 1): the chat template refuses this conversation: System role not supported"),
        (
            "{% for m in messages %}{{ m.content }",
            "model.chat_template: is not a valid Jinja template (line 1: unexpected '}')",
        ),
    ],
    ids=["refuses-a-role", "syntax-error"],
)
def test_a_chat_template_that_fails_is_one_error(chat_dir: Path, tmp_path: Path, template: str, problem: str) -> None:
    system = {"messages": [{"role": "system", "content": "Be brief."}, *conversation(0)["messages"]]}
    data = tmp_path / "system.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [system] + [conversation(i) for i in range(30)]))
    (tmp_path / "t.jinja").write_text(template)
    run = [
        *overrides(chat_dir, f"data.path={data}", f"model.chat_template={tmp_path / 't.jinja'}", "data.val_fraction=0")
    ]
    result = run_cli([*run, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2 and problem in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_the_cli_learns_the_answers(chat_dir: Path, tmp_path: Path) -> None:
    result = run_cli([*overrides(chat_dir, "trainer.max_steps=60"), f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    before = next(line for line in result.stdout.splitlines() if line.startswith("sample before training"))
    assert not before.split(" -> ")[1].startswith("'Hello.")
    after = next(line for line in result.stdout.splitlines() if line.startswith("sample after training"))
    prompt, answer = after.split(" -> ")
    # the conversation up to its last answer, which the adapter has learned
    assert prompt.endswith("says hello.\\n<|user|>Again?\\n<|assistant|>'") and answer.startswith("'Hello.")


def test_a_chat_adapter_predicts_from_a_conversation_or_a_plain_question(chat_dir: Path, tmp_path: Path) -> None:
    """Prediction with data.format=chat renders the input with the chat template, as training
    did: a plain text is one user message, a conversation ending with a user turn is answered."""
    given = 'input=["What does the cat say?", {messages: [{role: user, content: "What does the cat say?"}]}]'
    args = [*overrides(chat_dir), "action=predict", given, "task.max_new_tokens=2", f"output_dir={tmp_path}"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plain, conversation = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert plain["text"] == "<|user|>What does the cat say?\n<|assistant|>"
    assert conversation == plain


def test_train_on_prompt_trains_every_token_of_the_conversation(chat_dir: Path) -> None:
    plan = peftc.compile(overrides(chat_dir, "task.packing=false", "task.train_on_prompt=true"))
    train, _ = tasks.get(plan.task).datasets(plan.spec, load_tokenizer(plan.spec.model))
    assert all(example["labels"] == example["input_ids"] for example in train)


def test_the_prompt_of_an_answered_conversation_leaves_out_its_last_answer(chat_dir: Path) -> None:
    """A validation conversation ends with the answer the model is to give: the sample prompt stops before it."""
    from peftc.tasks.chat import prompt_text

    tokenizer = load_tokenizer(peftc.compile(overrides(chat_dir)).spec.model)
    assert prompt_text(conversation(0)["messages"], tokenizer) == (
        "<|user|>What does the cat say?\n<|assistant|>The cat says hello.\n<|user|>Again?\n<|assistant|>"
    )


@pytest.fixture(scope="module")
def tokenizer(chat_dir: Path):
    return load_tokenizer(peftc.compile(overrides(chat_dir)).spec.model)


def trained_runs(messages: list, tokenizer, template: str = TEMPLATE) -> list[str]:
    """The trained text of a conversation, one string per run of trained tokens."""
    tokenizer.chat_template = template
    example = chat.encode(chat.check_messages(messages, "row"), tokenizer, "row")
    runs, run = [], []
    for label in [*example["labels"], IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            runs, run = [*runs, tokenizer.decode(run)], []
    return runs


QUESTION, ANSWER = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}


@pytest.mark.parametrize(
    "messages",
    [
        [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],  # ShareGPT
        [
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {**ANSWER, "content": [{"type": "text", "text": "Hello."}]},
        ],
    ],
    ids=["sharegpt-from-value", "openai-text-parts"],
)
def test_sharegpt_and_text_part_messages_read_as_role_and_content(messages: list) -> None:
    assert chat.check_messages(messages, "row") == [QUESTION, ANSWER]


def test_sharegpt_speakers_read_as_their_roles() -> None:
    messages = [{"from": speaker, "value": "x"} for speaker in ("system", "human", "gpt", "tool", "gpt")]
    roles = [m["role"] for m in chat.check_messages(messages, "row")]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]


def test_text_parts_are_joined_with_newlines() -> None:
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    assert chat.check_messages([{"role": "user", "content": parts}, ANSWER], "row")[0]["content"] == "Hi\nthere"


def test_messages_with_weight_0_or_train_false_are_not_trained(tokenizer) -> None:
    messages = [QUESTION, {**ANSWER, "content": "Bad.", "weight": 0}, QUESTION, {**ANSWER, "train": True}]
    assert trained_runs(messages, tokenizer) == ["Hello.\n"]
    messages[1] = {**ANSWER, "content": "Bad.", "train": False}
    assert trained_runs(messages, tokenizer) == ["Hello.\n"]


def test_a_message_with_both_flags_is_trained_only_when_both_say_so() -> None:
    for flags in ({"train": True, "weight": 0}, {"train": False, "weight": 1}):
        assert chat.check_messages([QUESTION, {**ANSWER, **flags}, QUESTION, ANSWER], "row")[1]["train"] is False


TOOL_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<call>{{ c.function.name }}({{ c.function.arguments | tojson }})</call>{% endfor %}{% else %}"
    "{{ m.content }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_an_assistant_tool_call_and_the_answer_after_its_result_are_trained(tokenizer) -> None:
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    messages = [
        QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "sunny"},
        ANSWER,
    ]
    assert trained_runs(messages, tokenizer, TOOL_TEMPLATE) == ['<call>weather({"city": "Paris"})</call>', "Hello."]


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": "x.png"}]},
            "message 1 has a content part of type 'image_url'",
        ),
        ({"role": "assistant", "content": None}, "message 1 must have a text 'content'; or a list of {type: text"),
        (  # only an assistant message calls tools in place of content
            {"role": "user", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
            "message 1 must have a text 'content'",
        ),
        ({**ANSWER, "weight": 0.5}, "message 1 has weight=0.5; give 0 or 1"),
        ({**ANSWER, "train": "yes"}, "message 1 has train='yes'; give true or false"),
        ({**QUESTION, "train": True}, "message 1 (user) is marked to be trained; only assistant messages are trained"),
        ({**QUESTION, "weight": 1, "train": False}, "message 1 (user) is marked to be trained"),
        (
            {"from": "bot", "value": "Hi"},
            "message 1 has role 'bot'; roles: system, user, assistant, tool (ShareGPT 'from': human, gpt",
        ),
    ],
)
def test_unusable_message_shapes_are_named_with_what_works(message: dict, problem: str) -> None:
    with pytest.raises(peftc.DataError, match="^row: " + re.escape(problem)):
        chat.check_messages([message, ANSWER], "row")


def test_a_row_whose_answers_all_have_weight_0_has_nothing_to_learn() -> None:
    with pytest.raises(
        peftc.DataError, match=r"has no assistant message to learn from \(all have weight 0 or train false\)"
    ):
        chat.check_messages([QUESTION, {**ANSWER, "weight": 0}], "row")


def test_a_template_that_fails_on_a_row_is_one_error(tokenizer) -> None:
    # DeepSeek's template adds a tool call's arguments to text: an arguments object fails there
    template = "{% for m in messages %}{{ '<call>' + m.tool_calls[0].function.arguments if m.tool_calls else m.content }}{% endfor %}"
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    with pytest.raises(
        peftc.DataError, match=r"^row: the chat template fails on this conversation: can only concatenate str"
    ):
        trained_runs([QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]}], tokenizer, template)
