"""Chat rows for causal_lm (data.format=chat): `messages` = [{role, content}, ...] rendered with the
tokenizer's chat template (or model.chat_template), the loss on the assistant turns only.

The rendered conversation is tokenized once; a token is trained when its characters lie in an
assistant turn, found by rendering the conversation up to each assistant message with and
without it (`add_generation_prompt` before it). That needs a template that renders a conversation
as a prefix of its continuation, which every common template does; one that does not is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from peftc.errors import ConfigError, DataError, first_line
from peftc.tasks.common import IGNORE_INDEX

ROLES = ("system", "user", "assistant", "tool")


def check_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "model.chat_template",
            None,
            "data.format=chat needs a chat template, and this tokenizer has none",
            "set model.chat_template to the Jinja template text or a file holding it",
        )


def check_messages(messages: Any, where: str, answered: bool = True) -> list[dict[str, str]]:
    """The conversation's messages as {role, content}; `answered`: it has an assistant turn to
    learn from (training rows; a conversation to predict on need not)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(where, "'messages' must be a non-empty list of {role, content} objects")
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise DataError(where, f"message {number} must be an object with a text 'content'")
        if message.get("role") not in ROLES:
            raise DataError(where, f"message {number} has role {message.get('role')!r}", f"roles: {', '.join(ROLES)}")
    if answered and not any(m["role"] == "assistant" for m in messages):
        raise DataError(where, "has no assistant message to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def encode(messages: list[dict[str, str]], tokenizer: Any, where: str) -> dict[str, list[int]]:
    """input_ids of the rendered conversation, labels masked outside the assistant turns."""
    full = render(tokenizer, messages, where=where)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:index], generation_prompt=True, where=where)
        through = render(tokenizer, messages[: index + 1], where=where)
        if not (full.startswith(through) and through.startswith(before)):
            raise DataError(where, "the chat template does not render a conversation as a prefix of its continuation")
        spans.append((len(before), len(through)))
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(ids, encoding["offset_mapping"])
    ]
    return {"input_ids": ids, "labels": labels}


def prompt_text(messages: Sequence[Mapping[str, str]], tokenizer: Any, where: str = "messages") -> str:
    """The conversation ready for the model to answer: without its last message when that is
    an answer (a validation row, whose answer the model is to give), else all of it."""
    asked = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    return render(tokenizer, list(asked), generation_prompt=True, where=where)


def render(
    tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False, where: str = "messages"
) -> str:
    """The conversation as the template writes it. A template that cannot be parsed is the
    config's error; one that refuses this conversation (`raise_exception(...)`, as Hugging Face
    templates do for a role they do not support) is the row's."""
    from jinja2 import TemplateError, TemplateSyntaxError

    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateSyntaxError as exc:
        raise ConfigError(
            "model.chat_template", None, f"is not a valid Jinja template (line {exc.lineno}: {exc.message})"
        ) from None
    except TemplateError as exc:
        raise DataError(where, f"the chat template refuses this conversation: {first_line(exc)}") from None
