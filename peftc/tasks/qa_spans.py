"""Answer spans of extractive question answering: a context cut into overlapping windows, character
spans mapped to tokens, the best span of each example across its windows, and span scores.

Positions come in two kinds. A window position indexes the tokens of one window (question,
specials and a slice of the context), as the model sees them. A context position indexes the
tokens of the whole context, so that spans found in different windows compare: a window's
context position is its window position plus the window's `context_shift`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from peftc.tasks.common import encoded_batch, pad

WINDOW_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def encode_windows(
    tokenizer: Any, question: str, context: str, max_length: int | None, stride: int
) -> list[dict[str, Any]]:
    """The question and context as one pair (question first), or, when max_length is set and
    the pair is longer, as the windows the tokenizer's overflow gives: each holds the whole
    question and a slice of the context, consecutive slices sharing `stride` tokens (run_qa's
    doc_stride). Each window carries its token ids, `context_mask` (1 on context tokens),
    character `offsets` and `context_shift` (window position + shift = context position)."""
    options: dict[str, Any] = {"return_offsets_mapping": True, "verbose": False}
    if max_length is not None:
        options.update(truncation="only_second", max_length=max_length, stride=stride, return_overflowing_tokens=True)
    encoding = tokenizer([question], [context], **options)
    windows, first_context_token = [], 0
    for index, ids in enumerate(encoding["input_ids"]):
        in_context = [sequence == 1 for sequence in encoding.sequence_ids(index)]
        window: dict[str, Any] = {"input_ids": list(ids)}
        if "token_type_ids" in encoding:
            window["token_type_ids"] = list(encoding["token_type_ids"][index])
        window["context_mask"] = [int(flag) for flag in in_context]
        window["offsets"] = [tuple(o) for o in encoding["offset_mapping"][index]]
        window["context_shift"] = first_context_token - (in_context.index(True) if any(in_context) else 0)
        windows.append(window)
        # the tokenizer's overflow repeats the last `stride` context tokens of a window in the next
        first_context_token += sum(in_context) - stride
    return windows


def context_offsets(windows: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
    """The character offsets of the whole context's tokens, by context position."""
    offsets: dict[int, tuple[int, int]] = {}
    for window in windows:
        for position, (flag, offset) in enumerate(zip(window["context_mask"], window["offsets"])):
            if flag:
                offsets[position + window["context_shift"]] = offset
    return [offsets[position] for position in sorted(offsets)]


def covering_tokens(
    offsets: Sequence[tuple[int, int]], in_context: Sequence[bool], start_char: int, end_char: int
) -> tuple[int, int] | None:
    """Positions of the first and last context token of a character span; None when the span is
    not wholly inside the tokens given."""
    positions = [i for i, (flag, (s, e)) in enumerate(zip(in_context, offsets)) if flag and e > s]
    covering = [i for i in positions if offsets[i][1] > start_char and offsets[i][0] < end_char]
    if not covering or offsets[covering[0]][0] > start_char or offsets[covering[-1]][1] < end_char:
        return None
    return covering[0], covering[-1]


def token_span(
    offsets: Sequence[tuple[int, int]], in_context: Sequence[bool], start_char: int, end_char: int
) -> tuple[int, int]:
    """Token positions of the first and last context token of a character span; (0, 0) when the
    span is not wholly inside the context of this window (the label of a window without the answer)."""
    return covering_tokens(offsets, in_context, start_char, end_char) or (0, 0)


# --------------------------------------------------------------------------------- batches
def window_batch(windows: Sequence[Mapping[str, Any]], tokenizer: Any, pad_to: int | None) -> dict[str, torch.Tensor]:
    """(windows, length) tensors: the model inputs and the context mask."""
    batch = encoded_batch(windows, tokenizer, pad_to)
    batch["context_mask"] = pad([w["context_mask"] for w in windows], 0, pad_to)
    return batch


def grouped_batch(examples: Sequence[Mapping[str, Any]], tokenizer: Any, pad_to: int | None) -> dict[str, torch.Tensor]:
    """(examples, windows, length) tensors of examples that each hold their windows (an example
    with fewer windows than the most in the batch gets empty ones, attention_mask all 0), with
    (examples, windows) `context_shift` and, when the examples have gold answers, their
    (examples, answers, 2) `gold_spans` in context positions (-1: no answer there)."""
    counts = [len(e["windows"]) for e in examples]
    flat = window_batch([w for e in examples for w in e["windows"]], tokenizer, pad_to)
    slots = torch.tensor([[i < count for i in range(max(counts))] for count in counts])
    batch = {}
    for key, value in flat.items():
        grid = value.new_zeros((*slots.shape, value.shape[-1]))
        grid[slots] = value
        batch[key] = grid
    batch["context_shift"] = pad([[w["context_shift"] for w in e["windows"]] for e in examples], 0)
    if "gold_spans" in examples[0]:
        most = max(1, *(len(e["gold_spans"]) for e in examples))
        gold = torch.full((len(examples), most, 2), -1, dtype=torch.long)
        for row, example in enumerate(examples):
            for answer, span in enumerate(example["gold_spans"]):
                gold[row, answer] = torch.tensor(span)
        batch["gold_spans"] = gold
    return batch


def window_logits(model: Any, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Start and end logits of every real window of a grouped batch, in one forward over them all,
    and the (examples, windows) mask of which slots are real windows."""
    real = batch["attention_mask"].any(-1)
    out = model(**{key: batch[key][real] for key in WINDOW_INPUTS if key in batch})
    return out.start_logits, out.end_logits, real


def best_window_spans(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    context_mask: torch.Tensor,
    real: torch.Tensor,
    max_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example: the window holding its best span over all its windows, and that span's start
    and end window positions and start + end score (run_qa's choice across windows). The logits
    are those of the real windows (`window_logits`), `context_mask` is the grouped batch's."""
    real = real.to(start_logits.device)
    starts, ends, scores = best_spans(start_logits, end_logits, context_mask.to(real.device)[real], max_tokens)
    grids = []
    for values, fill in ((scores, float("-inf")), (starts, 0), (ends, 0)):
        grid = torch.full(real.shape, fill, dtype=values.dtype, device=values.device)
        grid[real] = values
        grids.append(grid)
    best, window = grids[0].max(-1)
    start, end = (grid.gather(1, window[:, None])[:, 0] for grid in grids[1:])
    return window, start, end, best


def best_spans(
    start_logits: torch.Tensor, end_logits: torch.Tensor, context_mask: torch.Tensor, max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per window, the context span (start <= end < start + max_tokens) maximising start + end score."""
    length = start_logits.shape[-1]
    scores = start_logits.float()[:, :, None] + end_logits.float()[:, None, :]
    index = torch.arange(length, device=scores.device)
    offset = index[None, :] - index[:, None]  # end - start
    allowed = (offset >= 0) & (offset < max_tokens)
    context = context_mask.bool().to(scores.device)
    allowed = allowed[None] & context[:, :, None] & context[:, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    best, flat = scores.flatten(1).max(-1)
    return flat // length, flat % length, best


# ---------------------------------------------------------------------------------- scores
def span_scores(
    starts: torch.Tensor, ends: torch.Tensor, gold_starts: torch.Tensor, gold_ends: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact match and token-overlap F1 of predicted vs gold spans (inclusive ends; broadcasts)."""
    gold_starts, gold_ends = gold_starts.to(starts.device), gold_ends.to(starts.device)
    exact = ((starts == gold_starts) & (ends == gold_ends)).float()
    overlap = (torch.minimum(ends, gold_ends) - torch.maximum(starts, gold_starts) + 1).clamp(min=0).float()
    precision = overlap / (ends - starts + 1).float()
    recall = overlap / (gold_ends - gold_starts + 1).float()
    f1 = torch.where(
        overlap > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(overlap)
    )
    return exact, f1


def best_gold_scores(
    starts: torch.Tensor, ends: torch.Tensor, gold_spans: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact match and F1 of each predicted span against the best of its gold spans ((examples,
    answers, 2), -1 where there is none), each taken separately, as the squad metric does; 0 for
    an example with no gold span."""
    gold_spans = gold_spans.to(starts.device)
    exact, f1 = span_scores(starts[:, None], ends[:, None], gold_spans[..., 0], gold_spans[..., 1])
    present = gold_spans[..., 0] >= 0
    exact, f1 = exact.masked_fill(~present, 0.0), f1.masked_fill(~present, 0.0)
    return exact.max(-1).values, f1.max(-1).values
