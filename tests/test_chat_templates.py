"""The loss covers exactly the assistant turns under the chat templates of popular models
(tests/fixtures/chat_templates: condensed templates with each model's behaviour that matters),
including those that do not render a conversation as a prefix of its continuation."""

from __future__ import annotations

from pathlib import Path

import pytest

import peftc
from peftc.planning.model_source import load_tokenizer
from peftc.tasks import chat, chat_spans
from peftc.tasks.common import IGNORE_INDEX

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
SYSTEM = {"role": "system", "content": "Be brief."}
TWO_TURNS = [
    {"role": "user", "content": "What does the cat say?"},
    {"role": "assistant", "content": "<think>\nIt meows.\n</think>\n\nMeow."},
    {"role": "user", "content": "And the dog?"},
    {"role": "assistant", "content": "Woof."},
]

# The trained text of each assistant turn: its answer through its end-of-turn text.
TRAINED = {
    "chatml": ["<think>\nIt meows.\n</think>\n\nMeow.<|im_end|>\n", "Woof.<|im_end|>\n"],
    # earlier turns lose their reasoning; the last one writes an (empty) think block the model must learn
    "qwen3": ["Meow.<|im_end|>\n", "<think>\n\n</think>\n\nWoof.<|im_end|>\n"],
    "llama3": ["<think>\nIt meows.\n</think>\n\nMeow.<|eot_id|>", "Woof.<|eot_id|>"],
    "mistral": [" <think>\nIt meows.\n</think>\n\nMeow.</s>", " Woof.</s>"],
    "gemma": ["<think>\nIt meows.\n</think>\n\nMeow.<end_of_turn>\n", "Woof.<end_of_turn>\n"],
    "phi3": ["<think>\nIt meows.\n</think>\n\nMeow.<|end|>\n", "Woof.<|end|>\n</s>"],  # EOS ends the conversation
    "deepseek_r1": ["\n\nMeow.<｜end▁of▁sentence｜>", "Woof.<｜end▁of▁sentence｜>"],
    # what the {% generation %} blocks mark, as TRL's assistant_only_loss trains: here without the '\n'
    "chatml_generation": ["<think>\nIt meows.\n</think>\n\nMeow.<|im_end|>", "Woof.<|im_end|>"],
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(peftc.compile(["model=demo_llama"]).spec.model)


def use(tokenizer, name: str):
    tokenizer.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
    return tokenizer


def trained_turns(example: dict) -> list[list[int]]:
    turns, current = [], []
    for label in example["labels"]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            turns, current = [*turns, current], []
    return turns + ([current] if current else [])


# Gemma's template refuses a system message (test_chat_data covers the refusal): no such case.
@pytest.mark.parametrize(
    ("name", "with_system"),
    [(name, system) for name in sorted(TRAINED) for system in (False, True) if not (system and name == "gemma")],
    ids=lambda value: ("system" if value else "no-system") if isinstance(value, bool) else value,
)
def test_each_assistant_turn_is_trained_through_its_end_of_turn_text(tokenizer, name: str, with_system: bool) -> None:
    messages = [SYSTEM, *TWO_TURNS] if with_system else TWO_TURNS
    example = chat.encode(messages, use(tokenizer, name), "row")
    assert [tokenizer.decode(turn) for turn in trained_turns(example)] == TRAINED[name]


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_an_answer_marked_train_false_is_left_out_under_every_template(tokenizer, name: str) -> None:
    messages = [TWO_TURNS[0], {**TWO_TURNS[1], "train": False}, *TWO_TURNS[2:]]
    example = chat.encode(chat.check_messages(messages, "row"), use(tokenizer, name), "row")
    assert [tokenizer.decode(turn) for turn in trained_turns(example)] == TRAINED[name][1:]


def test_an_answer_that_starts_like_the_generation_prompt_is_trained_from_its_first_character(tokenizer) -> None:
    # DeepSeek-R1's generation prompt opens `<think>`, which an answer's `<b>` shares its '<' with
    messages = [{"role": "user", "content": "Tag?"}, {"role": "assistant", "content": "<b>bold</b>"}]
    example = chat.encode(messages, use(tokenizer, "deepseek_r1"), "row")
    assert [tokenizer.decode(turn) for turn in trained_turns(example)] == ["<b>bold</b><｜end▁of▁sentence｜>"]


def test_consecutive_answers_under_a_template_without_role_headers_are_both_trained(tokenizer) -> None:
    # each turn ends where the next one starts: adjacent, not overlapping
    tokenizer.chat_template = "{% for m in messages %}{{ m.content }}\n{% endfor %}"
    answers = [{"role": "assistant", "content": "Meow."}, {"role": "assistant", "content": "Purr."}]
    example = chat.encode([TWO_TURNS[0], *answers], tokenizer, "row")
    assert [tokenizer.decode(turn) for turn in trained_turns(example)] == ["Meow.\nPurr.\n"]


CONVERSATIONS = [
    TWO_TURNS,
    [SYSTEM, *TWO_TURNS],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}] * 2,  # empty answers
    [{"role": "user", "content": "Tag?"}, {"role": "assistant", "content": "<b>bold</b> \n"}],  # markup, trimmed space
]


# DeepSeek-R1's generation prompt (`<think>`) never prefixes its answers: nothing to compare there.
@pytest.mark.parametrize("name", sorted(set(TRAINED) - {"deepseek_r1", "chatml_generation"}))
def test_located_turns_are_the_prefix_methods_wherever_that_applies(tokenizer, name: str) -> None:
    """Locating a turn in the one rendering gives exactly the characters that rendering the
    conversation up to it, with and without it, gives, on every template and turn where the
    template renders the conversation as a prefix of its continuation."""
    use(tokenizer, name)
    compared = 0
    for messages in CONVERSATIONS:
        try:
            full = chat.render(tokenizer, messages)
        except peftc.DataError:  # Gemma: no system message
            continue
        render = lambda m, **options: chat.render(tokenizer, m, **options)  # noqa: E731
        for index in (i for i, m in enumerate(messages) if m["role"] == "assistant"):
            prompt, through = render(messages[:index], generation_prompt=True), render(messages[: index + 1])
            if through.startswith(prompt) and full.startswith(through):
                located = chat_spans._located(messages, index, full, prompt, render, tokenizer)
                assert located == (len(prompt), len(through)), (messages, index)
                compared += 1
    assert compared >= 3


def test_a_template_whose_turns_cannot_be_found_is_named_with_what_works(tokenizer) -> None:
    # the answer written as JSON, and the conversation's length up front: nothing locates the text
    tokenizer.chat_template = (
        "{{ messages | length }}{% for m in messages %}<|{{ m.role }}|>{{ m.content | tojson }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    with pytest.raises(peftc.DataError) as caught:
        chat.encode(TWO_TURNS, tokenizer, "chat.jsonl (train split, example 4)")
    assert str(caught.value).startswith("chat.jsonl (train split, example 4): the chat template renders")
    assert "mark what the assistant writes with {% generation %} ... {% endgeneration %}" in str(caught.value)


def test_generation_blocks_that_mark_nothing_are_named(tokenizer) -> None:
    tokenizer.chat_template = (TEMPLATES / "chatml_generation.jinja").read_text().replace("'assistant'", "'model'")
    with pytest.raises(peftc.DataError, match=r"row: the chat template's \{% generation %\} blocks mark no text"):
        chat.encode(TWO_TURNS, tokenizer, "row")
