"""Chat rows for causal_lm (data.format=chat): `messages` = [{role, content}, ...] rendered with the
tokenizer's chat template (or model.chat_template), the loss on the assistant turns only.

The rendered conversation is tokenized once; a token is trained when its characters lie in an
assistant turn: from the end of the prompt that asks for it through its end-of-turn text (found
by chat_spans.py), or, when the template marks what the assistant writes with `{% generation %}`
blocks, exactly the tokens transformers' `return_assistant_tokens_mask` marks (what TRL's
assistant_only_loss trains).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from peftc.errors import ConfigError, DataError, first_line
from peftc.tasks.chat_spans import Unlocatable, assistant_spans
from peftc.tasks.common import IGNORE_INDEX

ROLES = ("system", "user", "assistant", "tool")
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


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
    if GENERATION_BLOCK.search(tokenizer.chat_template):
        encoding = _apply(
            tokenizer, messages, where, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, trained = list(encoding["input_ids"]), [bool(mark) for mark in encoding["assistant_masks"]]
        if not any(trained):
            raise DataError(
                where,
                "the chat template's {% generation %} blocks mark no text of this conversation",
                "put what the assistant writes (and its end-of-turn text) inside them",
            )
    else:
        full = render(tokenizer, messages, where=where)
        try:
            spans = assistant_spans(messages, full, lambda m, **k: render(tokenizer, m, where=where, **k), tokenizer)
        except Unlocatable as exc:
            raise DataError(
                where,
                f"the chat template renders this conversation so that its assistant turns cannot be found ({exc})",
                "mark what the assistant writes with {% generation %} ... {% endgeneration %} in the template",
            ) from None
        encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoding["input_ids"])
        trained = [any(start <= begin < end for start, end in spans) for begin, _ in encoding["offset_mapping"]]
    return {"input_ids": ids, "labels": [token if keep else IGNORE_INDEX for token, keep in zip(ids, trained)]}


def prompt_text(messages: Sequence[Mapping[str, str]], tokenizer: Any, where: str = "messages") -> str:
    """The conversation ready for the model to answer: without its last message when that is
    an answer (a validation row, whose answer the model is to give), else all of it."""
    asked = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    return render(tokenizer, list(asked), generation_prompt=True, where=where)


def render(
    tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False, where: str = "messages"
) -> str:
    """The conversation as the template writes it."""
    if not messages:
        return ""
    return _apply(tokenizer, messages, where, tokenize=False, add_generation_prompt=generation_prompt)


def _apply(tokenizer: Any, messages: list[dict[str, str]], where: str, **options: Any) -> Any:
    """apply_chat_template. A template that cannot be parsed is the config's error; one that
    refuses this conversation (`raise_exception(...)`, as Hugging Face templates do for a role
    they do not support) is the row's."""
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        return tokenizer.apply_chat_template(messages, **options)
    except TemplateSyntaxError as exc:
        raise ConfigError(
            "model.chat_template", None, f"is not a valid Jinja template (line {exc.lineno}: {exc.message})"
        ) from None
    except TemplateError as exc:
        raise DataError(where, f"the chat template refuses this conversation: {first_line(exc)}") from None
