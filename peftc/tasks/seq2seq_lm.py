"""Sequence-to-sequence language modelling (encoder-decoder models such as T5).

Loss: cross-entropy of the target tokens given the source (teacher forcing; the model shifts
the labels right to build decoder inputs). Metrics: target-token loss and perplexity
exp(sum of token losses / target tokens); with task.eval_with_generate also what generation gives:
corpus BLEU (sacreBLEU's, from n-gram counts summed over every batch and rank, so it equals
sacreBLEU on the whole split) and exact match. Prediction generates from the source
(task.generation: greedy by default).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from peftc.config.spec import RunSpec, SpecNode, at_least, param
from peftc.tasks import register
from peftc.tasks.base import Task
from peftc.tasks.common import IGNORE_INDEX, batches, encoded_batch, pad, to_device, token_fields, tokenize
from peftc.tasks.generation import GenerationSpec, generate_kwargs


@dataclass
class Seq2SeqLmSpec(SpecNode):
    max_target_length: int = param(64, "Target tokens per example after truncation.", at_least(1))
    max_new_tokens: int = param(32, "Tokens generated per input at prediction time.", at_least(1))
    eval_with_generate: bool = param(
        False,
        "Validation also generates from each source and scores it against the target: val_bleu (sacreBLEU, "
        "corpus) and val_exact_match (slower validation; needs peftc[metrics]).",
    )
    generation: GenerationSpec = field(
        default_factory=GenerationSpec,
        metadata={"help": "How predictions generate: task.generation.* (greedy by default)."},
    )


@register
class Seq2SeqLm(Task):
    name = "seq2seq_lm"
    task_type = "SEQ_2_SEQ_LM"
    schema = Seq2SeqLmSpec
    auto_class_name = "AutoModelForSeq2SeqLM"
    needs_encoder_decoder = True
    primary_metric = "val_perplexity"
    fields = ("source", "target")
    input_fields = ("source",)
    generates_text = True

    def encode(self, rows: Sequence[Mapping[str, Any]], run: RunSpec, tokenizer: Any) -> list[dict[str, Any]]:
        examples = []
        for row in rows:
            example = token_fields(tokenize(tokenizer, row["source"], run))
            example.pop("token_type_ids", None)
            if "target" in row:
                target = tokenizer(str(row["target"]), truncation=True, max_length=run.task.max_target_length)
                example["labels"] = list(target["input_ids"])
            examples.append(example)
        return examples

    def collate(
        self, examples: Sequence[Mapping[str, Any]], tokenizer: Any, pad_to: int | None = None
    ) -> dict[str, torch.Tensor]:
        batch = encoded_batch(examples, tokenizer, pad_to)
        if "labels" in examples[0]:
            # contiguous: T5's loss calls labels.view(-1)
            batch["labels"] = pad([e["labels"] for e in examples], IGNORE_INDEX).contiguous()
        return batch

    def training_loss(self, model: Any, batch: Mapping[str, torch.Tensor], spec: Any = None) -> torch.Tensor:
        """The target tokens' mean cross-entropy in float32, as validation computes it: T5's own
        loss averages 16-bit logits in 16 bits (bf16-true: 5e-3 off the float32 loss)."""
        total, tokens = _target_loss(model, batch)
        return total / tokens.clamp_min(1)

    def loss_terms(self, batch: Mapping[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())  # the target tokens

    def validation_stats(
        self, model: Any, batch: Mapping[str, torch.Tensor], spec: Any = None
    ) -> dict[str, torch.Tensor]:
        total, tokens = _target_loss(model, batch)
        return {"loss_sum": total.detach(), "tokens": tokens}

    def generation_stats(
        self, model: Any, batch: Mapping[str, torch.Tensor], spec: Any, tokenizer: Any
    ) -> dict[str, torch.Tensor]:
        """BLEU's sufficient statistics and exact matches of what the model generates for the batch."""
        if not spec.eval_with_generate:
            return {}
        from sacrebleu.metrics import BLEU

        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        devices = [inputs["input_ids"].device] if inputs["input_ids"].is_cuda else []
        with torch.random.fork_rng(devices=devices):  # sampling here must not move training's random stream
            kwargs = generate_kwargs(spec.generation, seed=0)
            generated = model.generate(**inputs, max_new_tokens=spec.max_new_tokens, **kwargs)
        hypotheses = [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
        labels = batch["labels"].masked_fill(batch["labels"] == IGNORE_INDEX, tokenizer.pad_token_id)
        references = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        score = BLEU().corpus_score(hypotheses, [references])
        stats = {f"bleu_correct_{n}": torch.tensor(c) for n, c in enumerate(score.counts, start=1)}
        stats.update({f"bleu_total_{n}": torch.tensor(t) for n, t in enumerate(score.totals, start=1)})
        stats.update(
            bleu_sys_len=torch.tensor(score.sys_len),
            bleu_ref_len=torch.tensor(score.ref_len),
            exact=torch.tensor(sum(h == r for h, r in zip(hypotheses, references))),
            generated=torch.tensor(len(hypotheses)),
        )
        return stats

    def metrics(self, totals: Mapping[str, float]) -> dict[str, float]:
        if not totals.get("tokens"):
            return {}
        loss = totals["loss_sum"] / totals["tokens"]
        out = {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}
        if totals.get("generated"):
            out.update(val_bleu=corpus_bleu(totals), val_exact_match=totals["exact"] / totals["generated"])
        return out

    @torch.no_grad()
    def predict(self, model: Any, rows: Sequence[Mapping[str, Any]], tokenizer: Any, run: RunSpec) -> list[dict]:
        out = []
        examples = self.encode([{"source": r["source"]} for r in rows], run, tokenizer)
        for chunk in batches(examples, run.data.batch_size):
            generated = model.generate(
                **to_device(self.collate(chunk, tokenizer), model),
                max_new_tokens=run.task.max_new_tokens,
                **generate_kwargs(run.task.generation, run.seed),
            )
            out.extend(tokenizer.batch_decode(generated, skip_special_tokens=True))
        return [{"source": r["source"], "generated": text} for r, text in zip(rows, out)]


def corpus_bleu(totals: Mapping[str, float]) -> float:
    """sacreBLEU's corpus BLEU (its default exp smoothing) from n-gram counts summed over batches."""
    from sacrebleu.metrics import BLEU

    order = range(1, 5)
    score = BLEU.compute_bleu(
        [int(totals[f"bleu_correct_{n}"]) for n in order],
        [int(totals[f"bleu_total_{n}"]) for n in order],
        int(totals["bleu_sys_len"]),
        int(totals["bleu_ref_len"]),
        smooth_method="exp",
    )
    return float(score.score)


def _target_loss(model: Any, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the target tokens' cross-entropy in float32, number of target tokens)."""
    logits = model(**batch).logits
    labels = batch["labels"]
    total = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, (labels != IGNORE_INDEX).sum()
