"""Chat rows for causal_lm (data.format=chat): `messages` = [{role, content}, ...] rendered with the
tokenizer's chat template (or model.chat_template), the loss on the assistant turns only. TRL's
conversational prompt-completion rows (`prompt` and `completion` message lists) are one such
conversation whose prompt is context: only the completion's assistant turns are learned, as TRL's
SFTTrainer learns the completion. A row's `tools` (JSON schemas of the functions it may call)
reach the template as `tools`, as TRL passes them.

The rendered conversation is tokenized once; a token is trained when its characters lie in an
assistant turn: from the end of the prompt that asks for it through its end-of-turn text (found
by chat_spans.py), or, when the template marks what the assistant writes with `{% generation %}`
blocks, exactly the tokens transformers' `return_assistant_tokens_mask` marks (what TRL's
assistant_only_loss trains).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from peftc.errors import ConfigError, DataError, first_line
from peftc.tasks.chat_spans import Unlocatable, assistant_spans
from peftc.tasks.common import IGNORE_INDEX

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's speakers (axolotl's sharegpt type), and the role each is
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool"}
# What chat templates read beside role and content: tool calls, their results, reasoning.
TEMPLATE_KEYS = ("tool_calls", "tool_call_id", "name", "reasoning_content")
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def check_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "model.chat_template",
            None,
            "data.format=chat needs a chat template, and this tokenizer has none",
            "set model.chat_template to the Jinja template text or a file holding it",
        )


def conversation(row: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """A chat row's conversation: its `messages`, or its TRL `prompt` + `completion`, the prompt's
    assistant messages (earlier answers) marked not to be learned."""
    if "messages" in row:
        return check_messages(row["messages"], where)
    if isinstance(row["prompt"], str) and isinstance(row["completion"], str):
        raise DataError(
            where,
            "'prompt' and 'completion' hold text, not conversations",
            "data.format=prompt_response reads text prompt-completion rows",
        )
    prompt = check_messages(row["prompt"], where, answered=False, name="prompt")
    completion = check_messages(row["completion"], where, name="completion")
    return [{**m, "train": False} if m["role"] == "assistant" else m for m in prompt] + completion


def check_tools(tools: Any, where: str) -> list[dict[str, Any]] | None:
    """A row's `tools`: a list of JSON schema objects, or the JSON text of one (how datasets keep
    them when the functions' schemas differ, which one Arrow column type cannot hold); None: none."""
    if tools is None:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            raise DataError(where, "'tools' is text that is not JSON", "give a list of function schemas") from None
    if not isinstance(tools, list) or not all(isinstance(tool, Mapping) for tool in tools):
        raise DataError(
            where,
            f"'tools' must be a list of JSON schema objects, got {json.dumps(tools)[:60]}",
            'e.g. [{"type": "function", "function": {"name": ..., "parameters": {...}}}]',
        )
    return tools


def check_messages(messages: Any, where: str, answered: bool = True, name: str = "messages") -> list[dict[str, Any]]:
    """The conversation's messages as {role, content} (with the keys templates read for tool calls
    and reasoning, and `train: False` on an assistant message not to learn from); `answered`: it
    has an assistant turn to learn from (training rows; a conversation to predict on need not).
    Accepted besides: ShareGPT's {from, value} messages, OpenAI's content as a list of text parts
    (joined with newlines, as vLLM serves them to a text template), an assistant message with
    `tool_calls` and no content, axolotl's per-message `train` and OpenAI fine-tuning's `weight`.
    `name`: the row's column holding them (a TRL row's prompt or completion is named in errors)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(where, f"{name!r} must be a non-empty list of {{role, content}} objects")
    where = where if name == "messages" else f"{where} {name}"
    checked = [_message(message, number, where) for number, message in enumerate(messages, start=1)]
    if answered and not any(m["role"] == "assistant" and m.get("train", True) for m in checked):
        flagged = any(m["role"] == "assistant" for m in checked)
        raise DataError(
            where, "has no assistant message to learn from" + (" (all have weight 0 or train false)" if flagged else "")
        )
    return checked


def _message(message: Any, number: int, where: str) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise DataError(where, f"message {number} must be an object with a 'role' and a text 'content'")
    if "role" not in message and "from" in message:  # ShareGPT
        speaker = message["from"]
        message = {**message, "role": SHAREGPT_ROLES.get(speaker, speaker), "content": message.get("value")}
    role = message.get("role")
    if role not in ROLES:
        raise DataError(
            where,
            f"message {number} has role {role!r}",
            f"roles: {', '.join(ROLES)} (ShareGPT 'from': {', '.join(SHAREGPT_ROLES)})",
        )
    checked = {"role": role, "content": _content(message, number, where)}
    checked.update({key: message[key] for key in TEMPLATE_KEYS if message.get(key) is not None})
    if not _learned(message, role, number, where) and role == "assistant":
        checked["train"] = False
    return checked


def _content(message: Mapping[str, Any], number: int, where: str) -> str | None:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(part, Mapping) for part in content):
        other = next(
            (p.get("type") for p in content if p.get("type") != "text" or not isinstance(p.get("text"), str)), 0
        )
        if other != 0:
            raise DataError(
                where, f"message {number} has a content part of type {other!r}", "data.format=chat trains on text parts"
            )
        return "\n".join(part["text"] for part in content)
    if content is None and message.get("role") == "assistant" and message.get("tool_calls"):
        if not isinstance(message["tool_calls"], list):
            raise DataError(where, f"message {number}'s 'tool_calls' must be a list of calls")
        return None
    raise DataError(
        where,
        f"message {number} must have a text 'content'",
        "or a list of {type: text, text: ...} parts, or (an assistant message) 'tool_calls'",
    )


def _learned(message: Mapping[str, Any], role: str, number: int, where: str) -> bool:
    """Whether the message is trained: assistant messages are, unless axolotl's `train: false` or
    OpenAI fine-tuning's `weight: 0` says otherwise; asking it of another role is refused, since
    only assistant turns are located."""
    flags = []
    if message.get("train") is not None:
        if not isinstance(message["train"], bool):
            raise DataError(where, f"message {number} has train={message['train']!r}", "give true or false")
        flags.append(message["train"])
    if message.get("weight") is not None:
        if message["weight"] not in (0, 1) or isinstance(message["weight"], str):
            raise DataError(where, f"message {number} has weight={message['weight']!r}", "give 0 or 1")
        flags.append(bool(message["weight"]))
    if role != "assistant":
        if any(flags):
            raise DataError(
                where, f"message {number} ({role}) is marked to be trained", "only assistant messages are trained"
            )
        return False
    return all(flags)


def encode(
    messages: list[dict[str, Any]], tokenizer: Any, where: str, tools: list[dict[str, Any]] | None = None
) -> dict[str, list[int]]:
    """input_ids of the rendered conversation (with the row's `tools`), labels masked outside the
    assistant turns (and the turns marked `train: False`)."""
    learned = [m.get("train", True) for m in messages if m["role"] == "assistant"]
    full = render(tokenizer, messages, where=where, tools=tools)
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, starts = list(encoding["input_ids"]), [begin for begin, _ in encoding["offset_mapping"]]
    if GENERATION_BLOCK.search(tokenizer.chat_template):
        marked = _apply(
            tokenizer, messages, where, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        trained = [bool(mark) for mark in marked["assistant_masks"]]
        if not any(trained):
            raise DataError(
                where,
                "the chat template's {% generation %} blocks mark no text of this conversation",
                "put what the assistant writes (and its end-of-turn text) inside them",
            )
        skipped = [] if all(learned) else _spans(messages, full, tokenizer, where, tools)
    else:
        spans = _spans(messages, full, tokenizer, where, tools)
        trained = [any(start <= begin < end for start, end in _kept(spans, learned)) for begin in starts]
        skipped = spans
    untrained = _kept(skipped, [not learn for learn in learned])
    trained = [
        keep and not any(start <= begin < end for start, end in untrained) for keep, begin in zip(trained, starts)
    ]
    return {"input_ids": ids, "labels": [token if keep else IGNORE_INDEX for token, keep in zip(ids, trained)]}


def _spans(
    messages: list[dict[str, Any]], full: str, tokenizer: Any, where: str, tools: list[dict[str, Any]] | None
) -> list[tuple[int, int]]:
    def rendered(some: list[dict[str, Any]], **options: Any) -> str:
        return render(tokenizer, some, where=where, tools=tools, **options)

    try:
        return assistant_spans(messages, full, rendered, tokenizer)
    except Unlocatable as exc:
        raise DataError(
            where,
            f"the chat template renders this conversation so that its assistant turns cannot be found ({exc})",
            "mark what the assistant writes with {% generation %} ... {% endgeneration %} in the template",
        ) from None


def _kept(spans: list[tuple[int, int]], keep: list[bool]) -> list[tuple[int, int]]:
    return [span for span, kept in zip(spans, keep) if kept]


def prompt_text(
    messages: Sequence[Mapping[str, str]],
    tokenizer: Any,
    where: str = "messages",
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The conversation ready for the model to answer: without its last message when that is
    an answer (a validation row, whose answer the model is to give), else all of it."""
    asked = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    return render(tokenizer, list(asked), generation_prompt=True, where=where, tools=tools)


def render(
    tokenizer: Any,
    messages: list[dict[str, str]],
    generation_prompt: bool = False,
    where: str = "messages",
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The conversation as the template writes it (given the functions it may call, `tools`)."""
    if not messages:
        return ""
    return _apply(tokenizer, messages, where, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def _apply(tokenizer: Any, messages: list[dict[str, str]], where: str, **options: Any) -> Any:
    """apply_chat_template. A template that cannot be parsed is the config's error; one that
    refuses this conversation (`raise_exception(...)`, as Hugging Face templates do for a role
    they do not support) or fails on it (text added to a tool call's arguments object) is the
    row's."""
    from jinja2 import TemplateError, TemplateSyntaxError

    rendered = [{key: value for key, value in m.items() if key != "train"} for m in messages]
    try:
        return tokenizer.apply_chat_template(rendered, **options)
    except TemplateSyntaxError as exc:
        raise ConfigError(
            "model.chat_template", None, f"is not a valid Jinja template (line {exc.lineno}: {exc.message})"
        ) from None
    except TemplateError as exc:
        raise DataError(where, f"the chat template refuses this conversation: {first_line(exc)}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise DataError(where, f"the chat template fails on this conversation: {first_line(exc)}") from None
