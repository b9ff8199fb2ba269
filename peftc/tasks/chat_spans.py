"""Where each assistant turn lies in a rendered conversation: the characters the loss covers.

A turn's text runs from the end of the prompt that asks for it (the conversation before it with
the template's generation prompt, e.g. `<|im_start|>assistant\\n`) through its end-of-turn text
(`<|im_end|>\\n`, `<|eot_id|>`, EOS), which the model must learn to write to stop.

Most templates render a conversation as a prefix of its continuation; then the turn is simply
what rendering it adds to that prompt. Many real ones do not: Qwen3 drops the reasoning of
earlier turns and writes an empty think block only in the last one, DeepSeek-R1's generation
prompt opens a `<think>` its rendered answers lack, Phi-3 ends a conversation with EOS,
Mistral's templates move the system message to the last user turn. For those each turn is
located in the one rendering of the whole conversation: its end by rendering the conversation
again with a marker after that message's text (where the two renderings part is where the text
ends), extended through the end-of-turn text the template writes after it; its start where the
rendering parts from the prompt that asks for it, or, when the template renders the earlier
messages differently once an answer follows (a moved system message), after the previous
message's end-of-turn text and the generation prompt. Where both apply this gives exactly the
prefix method's characters (tests/test_chat_templates.py checks it on every template).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from typing import Any

# Appended to one message's text to find where the template writes that text; no chat text has it.
MARKER = "\x00peftc-turn-end\x00"

Render = Callable[..., str]


class Unlocatable(Exception):
    """The template writes a message in a way its span cannot be found exactly."""


def assistant_spans(messages: list[dict[str, Any]], full: str, render: Render, tokenizer: Any) -> list[tuple[int, int]]:
    """(start, end) character spans of the assistant turns in `full`, the rendered conversation.
    `render(messages, generation_prompt=False)` renders with the tokenizer's template."""
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:index], generation_prompt=True)
        through = render(messages[: index + 1])
        if through.startswith(prompt) and full.startswith(through):
            spans.append((len(prompt), len(through)))
        else:
            spans.append(_located(messages, index, full, prompt, render, tokenizer))
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start < end:
            raise Unlocatable("two assistant turns overlap")
    return spans


def _located(
    messages: list[dict[str, Any]], index: int, full: str, prompt: str, render: Render, tokenizer: Any
) -> tuple[int, int]:
    text_end, end = _turn_end(messages, index, full, render, tokenizer)
    if full.startswith(prompt):
        start = len(prompt)
    else:
        context = render(messages[:index])
        if not prompt.startswith(context):
            raise Unlocatable("the generation prompt does not follow the conversation it asks to continue")
        # the earlier messages render alike: only the generation prompt differs (DeepSeek-R1's `<think>`)
        start = _shared(prompt, full)
        if start < len(context):  # they do not (a moved system message): start after the last one
            start = _turn_end(messages, index - 1, full, render, tokenizer)[1] if index else 0
            generation_prompt = prompt[len(context) :]
            start += _whole_tokens(generation_prompt, _shared(generation_prompt, full[start:]), tokenizer)
        else:
            start = len(context) + _whole_tokens(prompt[len(context) :], start - len(context), tokenizer)
        # a generation prompt shares characters with the answer (`<think>` with `<b>`) only where
        # the answer's own text does not start yet
        start = min(start, text_end, _text_bound(messages, index, full, render, at_start=True))
    return start, end


def _turn_end(messages: list[dict[str, Any]], index: int, full: str, render: Render, tokenizer: Any) -> tuple[int, int]:
    """Where message `index`'s text ends in `full`, and where its end-of-turn text does: the text the template
    writes after the message when it is the last one, as far as `full` has it too (in whole tokens,
    so a final EOS is not half-matched against the next turn's header)."""
    alone = render(messages[: index + 1])
    text_end = _text_end(messages, index, full, render)
    alone_end = _text_end(messages[: index + 1], index, alone, render)
    after = alone[alone_end:]
    return text_end, text_end + _whole_tokens(after, _shared(after, full[text_end:]), tokenizer)


def _text_end(messages: list[dict[str, Any]], index: int, rendered: str, render: Render) -> int:
    """Where the template writes the end of message `index`'s text in `rendered`."""
    return _text_bound(messages, index, rendered, render, at_start=False)


def _text_bound(messages: list[dict[str, Any]], index: int, rendered: str, render: Render, at_start: bool) -> int:
    """Where the template writes the end (or start) of message `index`'s text in `rendered`, the
    rendering of `messages`: the first character at which a rendering with MARKER after (before)
    that text differs. A start the template drops (Qwen3 drops earlier turns' reasoning) is the
    end of the rendering: no bound."""
    marked = [dict(m) for m in messages]
    text = marked[index].get("content") or ""
    marked[index]["content"] = MARKER + text if at_start else text + MARKER
    with_marker = render(marked)
    parted = _shared(rendered, with_marker)
    added = len(with_marker) - len(rendered)
    if MARKER not in with_marker[parted : parted + added] or with_marker[parted + added :] != rendered[parted:]:
        if at_start:
            return len(rendered)
        raise Unlocatable(f"message {index + 1}'s text cannot be found in the rendering")
    return parted


def _whole_tokens(text: str, length: int, tokenizer: Any) -> int:
    """`length` cut back to the end of the last whole token of `text` it covers."""
    if length in (0, len(text)):
        return length
    starts = [
        start for start, _ in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    ]
    boundaries = sorted({*starts, len(text)})
    return boundaries[bisect_right(boundaries, length) - 1]


def _shared(first: str, second: str) -> int:
    """Length of the common prefix of two strings (binary search over slice comparisons)."""
    low, high = 0, min(len(first), len(second))
    while low < high:
        middle = (low + high + 1) // 2
        if first[:middle] == second[:middle]:
            low = middle
        else:
            high = middle - 1
    return low
