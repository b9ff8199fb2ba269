"""Extractive question answering: find the answer span inside the context.

A row has a question, a context and the answer: its text, which must occur in the context (its
first occurrence is the gold span), or SQuAD's `answers` object, {text: [...], answer_start: [...]},
whose first answer starts at its answer_start (as transformers' run_qa trains on it). A row
without an answer (SQuAD v2's unanswerable questions) is refused: there is no span to learn.
Question and context are encoded as a pair; only the context is truncated. The model (head
`qa_outputs`, trained in full and saved, as peft does for QUESTION_ANS) scores each token as span
start and end; loss is the mean of the two cross-entropies. An answer cut off by truncation
points at position 0, as in transformers (and is counted in a warning).

Prediction picks the context span (start <= end, at most max_answer_tokens) with the highest
start + end score. Metrics compare predicted and gold token spans:
  exact match = 1 if both ends agree;  F1 = 2 P R / (P + R) with P = overlap / predicted length,
  R = overlap / gold length (overlap in tokens);  both averaged over examples.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peftc.config.spec import RunSpec, SpecNode, at_least, param
from peftc.errors import ConfigError
from peftc.tasks import register
from peftc.tasks.base import Task
from peftc.tasks.common import batches, encoded_batch, pad, to_device, token_fields
from peftc.tasks.head_loss import span_loss

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")


@dataclass
class QuestionAnsSpec(SpecNode):
    max_answer_tokens: int = param(30, "Longest answer span (in tokens) a prediction may pick.", at_least(1))


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
        answer = gold_answer(row["answer"])
        if isinstance(answer, str):
            return answer
        text, start = answer
        context = str(row["context"])
        if not text.strip():
            return "the answer is empty"
        if start is not None and context[start : start + len(text)] != text:
            found = context[start : start + len(text)]
            return f"answer_start {start} does not point at the answer {text!r} (the context there reads {found!r})"
        if text not in context:
            return f"the answer {text!r} does not occur in the context (answers are spans of the context)"
        return None

    def encode(self, rows: Sequence[Mapping[str, Any]], run: RunSpec, tokenizer: Any) -> list[dict[str, Any]]:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(
                "model.tokenizer", type(tokenizer).__name__, "question_ans needs a fast tokenizer (offsets)"
            )
        examples = []
        for row in rows:
            context = str(row["context"])
            truncation: Any = "only_second" if run.data.truncation else False
            encoding = tokenizer(
                str(row["question"]),
                context,
                truncation=truncation,
                max_length=run.data.max_length if run.data.truncation else None,
                return_offsets_mapping=True,
            )
            in_context = [sid == 1 for sid in encoding.sequence_ids()]
            example: dict[str, Any] = token_fields(encoding)
            example["context_mask"] = [int(flag) for flag in in_context]
            example["offsets"] = [tuple(o) for o in encoding["offset_mapping"]]
            if "answer" in row:
                text, start_char = gold_answer(row["answer"])
                start_char = context.index(text) if start_char is None else start_char
                span = token_span(example["offsets"], in_context, start_char, start_char + len(text))
                example["start_positions"], example["end_positions"] = span
            examples.append(example)
        _warn_of_cut_answers(examples, run)
        return examples

    def collate(
        self, examples: Sequence[Mapping[str, Any]], tokenizer: Any, pad_to: int | None = None
    ) -> dict[str, torch.Tensor]:
        batch = encoded_batch(examples, tokenizer, pad_to)
        batch["context_mask"] = pad([e["context_mask"] for e in examples], 0, pad_to)
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
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS and not k.endswith("_positions")}
        out = model(**inputs)
        starts, ends, _ = best_spans(out.start_logits, out.end_logits, batch["context_mask"], 10**6)
        exact, f1 = span_scores(starts, ends, batch["start_positions"], batch["end_positions"])
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
            result = model(**to_device({k: v for k, v in batch.items() if k in MODEL_INPUTS}, model))
            starts, ends, scores = best_spans(
                result.start_logits.cpu(), result.end_logits.cpu(), batch["context_mask"], run.task.max_answer_tokens
            )
            for example, start, end, score in zip(chunk, starts.tolist(), ends.tolist(), scores.tolist()):
                out.append((example["offsets"][start][0], example["offsets"][end][1], score))
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


def _warn_of_cut_answers(examples: Sequence[Mapping[str, Any]], run: RunSpec) -> None:
    """Answers that truncation cut off point at position 0, as in transformers, so the model learns
    'not in view' and validation counts them as misses; transformers' run_qa would instead split a
    long context into overlapping windows (doc_stride), which peftc does not. Said, not silent."""
    cut = sum(1 for e in examples if "start_positions" in e and e["start_positions"] == e["end_positions"] == 0)
    if cut:
        warnings.warn(
            f"{run.data.path or run.data.name}: {cut} of {len(examples)} examples have their answer past "
            f"data.max_length={run.data.max_length} tokens (question + context), so they train to point at "
            "position 0 and count as misses in validation; raise data.max_length (long contexts are not split "
            "into windows)",
            stacklevel=3,
        )


def gold_answer(value: Any) -> tuple[str, int | None] | str:
    """(answer text, its character start or None for the first occurrence) of an answer cell: a
    text, or SQuAD's {text: [...], answer_start: [...]} (its first answer); else the problem."""
    if isinstance(value, list):
        return "'answer' is a list: give the answer text, or SQuAD's {text: [...], answer_start: [...]}"
    if not isinstance(value, dict):
        return str(value), None
    if "text" not in value or "answer_start" not in value:
        return f"'answer' is an object with {sorted(value)}, not SQuAD's text and answer_start"
    texts, starts = value["text"], value["answer_start"]
    texts, starts = (texts, starts) if isinstance(texts, list) else ([texts], [starts])
    if not texts:
        return (
            "has no answer (a SQuAD v2 unanswerable question): question_ans learns answer spans; "
            "drop such rows, e.g. dataset.filter(lambda row: len(row['answers']['text']) > 0)"
        )
    start = starts[0] if isinstance(starts, list) and starts else None
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        return f"answer_start {start!r} is not a character position (a non-negative integer)"
    return str(texts[0]), start


def token_span(
    offsets: Sequence[tuple[int, int]], in_context: Sequence[bool], start_char: int, end_char: int
) -> tuple[int, int]:
    """Token positions of the first and last context token of a character span; (0, 0) when the
    span is not wholly inside the (possibly truncated) context."""
    positions = [i for i, (flag, (s, e)) in enumerate(zip(in_context, offsets)) if flag and e > s]
    covering = [i for i in positions if offsets[i][1] > start_char and offsets[i][0] < end_char]
    if not covering or offsets[covering[0]][0] > start_char or offsets[covering[-1]][1] < end_char:
        return 0, 0
    return covering[0], covering[-1]


def best_spans(
    start_logits: torch.Tensor, end_logits: torch.Tensor, context_mask: torch.Tensor, max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example, the context span (start <= end < start + max_tokens) maximising start + end score."""
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


def span_scores(
    starts: torch.Tensor, ends: torch.Tensor, gold_starts: torch.Tensor, gold_ends: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact match and token-overlap F1 of predicted vs gold spans (inclusive ends)."""
    gold_starts, gold_ends = gold_starts.to(starts.device), gold_ends.to(starts.device)
    exact = ((starts == gold_starts) & (ends == gold_ends)).float()
    overlap = (torch.minimum(ends, gold_ends) - torch.maximum(starts, gold_starts) + 1).clamp(min=0).float()
    precision = overlap / (ends - starts + 1).float()
    recall = overlap / (gold_ends - gold_starts + 1).float()
    f1 = torch.where(
        overlap > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(overlap)
    )
    return exact, f1
