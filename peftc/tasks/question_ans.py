"""Extractive question answering: find the answer span inside the context.

A row has a question, a context and the answer: its text, which must occur in the context (its
first occurrence is the gold span), or SQuAD's `answers` object, {text: [...], answer_start: [...]},
each answer at its answer_start. Training learns the first answer (as transformers' run_qa trains);
validation scores a prediction against each answer of the row and keeps the best (as the squad
metric does). A row without an answer (SQuAD v2's unanswerable questions) is refused: there is no
span to learn.

Question and context are encoded as a pair, the question first. A pair longer than
data.max_length is split as run_qa splits it: into windows that each hold the whole question and
a slice of the context, consecutive slices sharing task.doc_stride tokens (qa_spans.py). Each
window is a training example; one that does not hold the whole answer points at position 0 (the
CLS token), as in transformers. An answer that no window holds whole (longer than the overlap,
across a window's end) is counted in a warning. The model (head `qa_outputs`, trained in full and
saved, as peft does for QUESTION_ANS) scores each token as span start and end; loss is the mean
of the two cross-entropies.

Prediction and validation pick, over all windows of an example, the context span (start <= end,
at most task.max_answer_tokens) with the highest start + end score, as run_qa's post-processing
does. Metrics compare predicted and gold token spans, positions counted in the whole context's
tokens:
  exact match = 1 if both ends agree;  F1 = 2 P R / (P + R) with P = overlap / predicted length,
  R = overlap / gold length (overlap in tokens);  each the best over the row's gold answers,
  averaged over examples (rows, whatever their number of windows).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peftc.config.spec import RunSpec, SpecNode, at_least, param
from peftc.errors import ConfigError, DataError
from peftc.tasks import register
from peftc.tasks.base import Task
from peftc.tasks.common import batches, to_device
from peftc.tasks.head_loss import span_loss
from peftc.tasks.qa_spans import (
    best_gold_scores,
    best_window_spans,
    context_offsets,
    covering_tokens,
    encode_windows,
    grouped_batch,
    token_span,
    window_batch,
    window_logits,
)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")
ROW_FIELDS = ("windows", "gold_spans")  # what an example holds beside the method's fields


@dataclass
class QuestionAnsSpec(SpecNode):
    max_answer_tokens: int = param(30, "Longest answer span (in tokens) a prediction may pick.", at_least(1))
    doc_stride: int | None = param(
        None,
        "Context tokens shared by consecutive windows of a context longer than data.max_length "
        "(run_qa's doc_stride); null: a third of data.max_length (run_qa's 128 of 384), at most half "
        "of what the question leaves for the context.",
        at_least(0),
    )

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        if run is not None and self.doc_stride is not None and self.doc_stride >= run.data.max_length:
            length = run.data.max_length
            raise ConfigError(
                f"{key}.doc_stride",
                self.doc_stride,
                f"must be less than data.max_length={length} (windows of {length} tokens share it)",
                f"e.g. {key}.doc_stride={length // 3}",
            )


@register
class QuestionAns(Task):
    name = "question_ans"
    task_type = "QUESTION_ANS"
    schema = QuestionAnsSpec
    auto_class_name = "AutoModelForQuestionAnswering"
    head_modules = ("qa_outputs",)
    primary_metric = "val_f1"
    fields = ("question", "context", "answer")
    input_fields = ("question", "context")
    list_fields = ("answer",)  # SQuAD's answers object

    def check_row(self, row: Mapping[str, Any], spec: QuestionAnsSpec) -> str | None:
        answers = gold_answers(row["answer"])
        if isinstance(answers, str):
            return answers
        context = str(row["context"])
        for number, (text, start) in enumerate(answers, start=1):
            problem = _answer_problem(text, start, context)
            if problem:
                return _numbered(problem, number, len(answers))
        return None

    def datasets(self, run: RunSpec, tokenizer: Any) -> tuple[Any, Any]:
        """Training: one example per window (run_qa trains on each); validation: one per row,
        holding its windows, so that it is scored once, on its best span over them."""
        train, val = super().datasets(run, tokenizer)
        return training_windows(train), val

    def encode(self, rows: Sequence[Mapping[str, Any]], run: RunSpec, tokenizer: Any) -> list[dict[str, Any]]:
        """One example per row: its `windows` (each with its training label when the row has an
        answer) and the `gold_spans` of its answers in context positions."""
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(
                "model.tokenizer",
                type(tokenizer).__name__,
                "question_ans needs a fast tokenizer (character offsets, and overflowing windows for long contexts)",
                "give a tokenizer directory with tokenizer.json, which transformers loads as a fast tokenizer",
            )
        examples = []
        for number, row in enumerate(rows, start=1):
            question, context = str(row["question"]), str(row["context"])
            excerpt = question if len(question) <= 40 else question[:40] + "..."
            windows = pair_windows(tokenizer, question, context, run, f"example {number} (question {excerpt!r})")
            example: dict[str, Any] = {"windows": windows}
            if "answer" in row:
                spans = [_char_span(text, start, context) for text, start in gold_answers(row["answer"])]
                for window in windows:  # the first answer is learned, as run_qa learns it
                    in_context = [bool(flag) for flag in window["context_mask"]]
                    window["start_positions"], window["end_positions"] = token_span(
                        window["offsets"], in_context, *spans[0]
                    )
                whole = context_offsets(windows)
                gold = [covering_tokens(whole, [True] * len(whole), *span) for span in spans]
                example["gold_spans"] = [list(span) for span in gold if span is not None]
            examples.append(example)
        _warn_of_cut_answers(examples, run)
        return examples

    def collate(
        self, examples: Sequence[Mapping[str, Any]], tokenizer: Any, pad_to: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Windows (training) into (windows, length) tensors with their labels; examples holding
        their windows (validation, prediction) into (examples, windows, length) tensors."""
        if "windows" in examples[0]:
            return grouped_batch(examples, tokenizer, pad_to)
        batch = window_batch(examples, tokenizer, pad_to)
        if "start_positions" in examples[0]:
            for key in ("start_positions", "end_positions"):
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.long)
        return batch

    def training_loss(self, model: Any, batch: Mapping[str, torch.Tensor], spec: Any = None) -> torch.Tensor:
        """The mean of the start and end cross-entropies in float32, as transformers computes it
        (positions past the input ignored), which averages bf16 logits in bf16 under bf16-true."""
        out = model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS and not k.endswith("_positions")})
        return span_loss(out.start_logits, out.end_logits, batch["start_positions"], batch["end_positions"])

    def validation_stats(
        self, model: Any, batch: Mapping[str, torch.Tensor], spec: Any = None
    ) -> dict[str, torch.Tensor]:
        start_logits, end_logits, real = window_logits(model, batch)
        longest = (spec or QuestionAnsSpec()).max_answer_tokens  # the span a prediction could give
        window, starts, ends, _ = best_window_spans(start_logits, end_logits, batch["context_mask"], real, longest)
        shift = batch["context_shift"].to(window.device).gather(1, window[:, None])[:, 0]
        exact, f1 = best_gold_scores(starts + shift, ends + shift, batch["gold_spans"])
        return {"exact": exact.sum(), "f1": f1.sum(), "count": torch.tensor(len(exact))}

    def metrics(self, totals: Mapping[str, float]) -> dict[str, float]:
        if not totals.get("count"):
            return {}
        return {"val_exact_match": totals["exact"] / totals["count"], "val_f1": totals["f1"] / totals["count"]}

    @torch.no_grad()
    def predict(self, model: Any, rows: Sequence[Mapping[str, Any]], tokenizer: Any, run: RunSpec) -> list[dict]:
        examples = self.encode([{f: r[f] for f in self.input_fields} for r in rows], run, tokenizer)
        out = []
        for chunk in batches(examples, run.data.batch_size):
            batch = self.collate(chunk, tokenizer)
            start_logits, end_logits, real = window_logits(model, to_device(batch, model))
            windows, starts, ends, scores = best_window_spans(
                start_logits.cpu(), end_logits.cpu(), batch["context_mask"], real.cpu(), run.task.max_answer_tokens
            )
            for example, window, start, end, score in zip(
                chunk, windows.tolist(), starts.tolist(), ends.tolist(), scores.tolist()
            ):
                offsets = example["windows"][window]["offsets"]
                out.append((offsets[start][0], offsets[end][1], score))
        return [
            {
                **{f: r[f] for f in self.input_fields},
                "answer": str(r["context"])[s:e],
                "start": s,
                "end": e,
                "score": score,
            }
            for r, (s, e, score) in zip(rows, out)
        ]


def pair_windows(tokenizer: Any, question: str, context: str, run: RunSpec, where: str) -> list[dict[str, Any]]:
    """The windows of one question and context: the whole pair when it fits data.max_length (or
    data.truncation=false), else windows of data.max_length tokens sharing `doc_stride` tokens."""
    whole = encode_windows(tokenizer, question, context, None, 0)
    length = run.data.max_length
    if not run.data.truncation or len(whole[0]["input_ids"]) <= length:
        return whole
    room = length - (len(whole[0]["input_ids"]) - sum(whole[0]["context_mask"]))  # context tokens per window
    if room < 1:
        raise DataError(
            where,
            f"the question (with the special tokens) takes {length - room} tokens, leaving no room for the "
            f"context in data.max_length={length}",
            "raise data.max_length or shorten the question",
        )
    stride = run.task.doc_stride
    if stride is None:
        stride = min(length // 3, room // 2)
    elif stride >= room:
        raise DataError(
            where,
            f"task.doc_stride={stride} is not less than the {room} context tokens a window of "
            f"data.max_length={length} holds beside this question, so the windows would not advance",
            f"lower task.doc_stride below {room} or raise data.max_length",
        )
    return encode_windows(tokenizer, question, context, length, stride)


def training_windows(examples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One training example per window, with the other fields of its row's example (e.g. a
    method's task_id)."""
    return [
        {**window, **{k: v for k, v in example.items() if k not in ROW_FIELDS}}
        for example in examples
        for window in example["windows"]
    ]


def _warn_of_cut_answers(examples: Sequence[Mapping[str, Any]], run: RunSpec) -> None:
    """An answer that no window holds whole trains every window of its example to point at
    position 0, as in run_qa, and validation can match it at most in part. Said, not silent."""
    cut = sum(
        1
        for e in examples
        if "gold_spans" in e and all(w["start_positions"] == w["end_positions"] == 0 for w in e["windows"])
    )
    if cut:
        length = run.data.max_length
        stride = run.task.doc_stride if run.task.doc_stride is not None else f"null ({length // 3} or less)"
        warnings.warn(
            f"{_source(run)}: {cut} of {len(examples)} examples have their answer in no single window of "
            f"data.max_length={length} tokens (consecutive windows of a long context share task.doc_stride={stride} "
            "tokens; a longer answer across a window's end is cut in both), so they train to point at position 0 "
            "and validation can match them only in part; raise task.doc_stride or data.max_length",
            stacklevel=3,
        )


def gold_answers(value: Any) -> list[tuple[str, int | None]] | str:
    """(answer text, its character start or None for the first occurrence) of each answer of an
    answer cell: a text, or SQuAD's {text: [...], answer_start: [...]}; else the problem."""
    if isinstance(value, list):
        return "'answer' is a list: give the answer text, or SQuAD's {text: [...], answer_start: [...]}"
    if not isinstance(value, dict):
        return [(str(value), None)]
    if "text" not in value or "answer_start" not in value:
        return f"'answer' is an object with {sorted(value)}, not SQuAD's text and answer_start"
    texts, starts = value["text"], value["answer_start"]
    texts, starts = (texts, starts) if isinstance(texts, list) else ([texts], [starts])
    starts = starts if isinstance(starts, list) else [starts]
    if not texts:
        return (
            "has no answer (a SQuAD v2 unanswerable question): question_ans learns answer spans; "
            "drop such rows, e.g. dataset.filter(lambda row: len(row['answers']['text']) > 0)"
        )
    if len(starts) != len(texts):
        return f"has {len(texts)} answer texts and {len(starts)} answer_start values (give one start per text)"
    for number, start in enumerate(starts, start=1):
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            problem = f"answer_start {start!r} is not a character position (a non-negative integer)"
            return _numbered(problem, number, len(starts))
    return [(str(text), start) for text, start in zip(texts, starts)]


def _answer_problem(text: str, start: int | None, context: str) -> str | None:
    if not text.strip():
        return "the answer is empty"
    if start is not None and context[start : start + len(text)] != text:
        found = context[start : start + len(text)]
        return f"answer_start {start} does not point at the answer {text!r} (the context there reads {found!r})"
    if text not in context:
        return f"the answer {text!r} does not occur in the context (answers are spans of the context)"
    return None


def _numbered(problem: str, number: int, count: int) -> str:
    """A problem of one answer of a row, naming which when the row has several."""
    return problem if count == 1 else f"answer {number} of {count}: {problem}"


def _char_span(text: str, start: int | None, context: str) -> tuple[int, int]:
    start = context.index(text) if start is None else start
    return start, start + len(text)


def _source(run: RunSpec) -> str:
    return str(run.data.path or run.data.name)
