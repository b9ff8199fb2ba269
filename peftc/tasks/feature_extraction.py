"""Feature extraction: sentence embeddings trained with an in-batch contrastive objective.

A row is a pair of texts that mean the same (anchor, positive). The embedding of a text is the
pooled last hidden state (mean over real tokens by default), L2-normalised. For a batch of B
pairs, the similarity matrix S = scale * A P^T (cosines) is scored with cross-entropy against the
diagonal: each anchor must pick its own positive among the B positives, the other pairs being
negatives (the "multiple negatives ranking" loss of sentence-transformers):
  loss = mean_i -log softmax_j(S_ij)[i]
Retrieval metrics over each validation batch: recall@1 (the anchor's nearest positive is its
own) and MRR (mean of 1 / rank of its own positive). They are sums over anchors, so they are
exact however batches are summed; the candidate pool is the batch (data.eval_batch_size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from peftc.config.spec import RunSpec, SpecNode, greater_than, one_of, param
from peftc.tasks import register
from peftc.tasks.base import Task
from peftc.tasks.common import batches, encoded_batch, to_device, token_fields, tokenize

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class FeatureExtractionSpec(SpecNode):
    pooling: str = param(
        "mean",
        "How token states become one vector: mean over real tokens, the first token (cls), or the last real token (last).",
        one_of("mean", "cls", "last"),
    )
    scale: float = param(
        20.0,
        "Inverse temperature of the contrastive loss (cosine similarities are multiplied by it).",
        greater_than(0.0),
    )


@register
class FeatureExtraction(Task):
    name = "feature_extraction"
    task_type = "FEATURE_EXTRACTION"
    schema = FeatureExtractionSpec
    auto_class_name = "AutoModel"
    primary_metric = "val_recall_at_1"
    fields = ("anchor", "positive")
    input_fields = ("text",)

    def sample_inputs(self, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [{"text": row["anchor"]} for row in rows]

    def encode(self, rows: Sequence[Mapping[str, Any]], run: RunSpec, tokenizer: Any) -> list[dict[str, Any]]:
        examples = []
        for row in rows:
            if "text" in row:
                examples.append(token_fields(tokenize(tokenizer, row["text"], run)))
                continue
            example = {}
            for side in ("anchor", "positive"):
                for key, ids in token_fields(tokenize(tokenizer, row[side], run)).items():
                    example[f"{side}_{key}"] = ids
            examples.append(example)
        return examples

    def collate(
        self, examples: Sequence[Mapping[str, Any]], tokenizer: Any, pad_to: int | None = None
    ) -> dict[str, torch.Tensor]:
        if "input_ids" in examples[0]:
            return encoded_batch(examples, tokenizer, pad_to)
        # anchors and positives padded to one width, so one forward pass embeds both
        width = max(len(e[f"{side}_input_ids"]) for e in examples for side in ("anchor", "positive"))
        width = max(width, pad_to or 0)
        batch = {}
        for side in ("anchor", "positive"):
            batch.update(encoded_batch(examples, tokenizer, width, prefix=f"{side}_"))
        return batch

    def training_loss(self, model: Any, batch: Mapping[str, torch.Tensor], spec: Any = None) -> torch.Tensor:
        return F.cross_entropy(self._similarities(model, batch, spec), _diagonal(batch))

    def validation_stats(
        self, model: Any, batch: Mapping[str, torch.Tensor], spec: Any = None
    ) -> dict[str, torch.Tensor]:
        scores = self._similarities(model, batch, spec)
        target = _diagonal(batch)
        own = scores.gather(1, target[:, None])
        rank = 1 + (scores > own).sum(1)  # ties count in the anchor's favour
        return {
            "loss_sum": F.cross_entropy(scores, target, reduction="sum").detach(),
            "hits": (rank == 1).sum(),
            "reciprocal_rank": (1.0 / rank.float()).sum(),
            "count": torch.tensor(len(rank)),
        }

    def metrics(self, totals: Mapping[str, float]) -> dict[str, float]:
        count = totals.get("count", 0)
        if not count:
            return {}
        return {
            "val_loss": totals["loss_sum"] / count,
            "val_recall_at_1": totals["hits"] / count,
            "val_mrr": totals["reciprocal_rank"] / count,
        }

    @torch.no_grad()
    def predict(self, model: Any, rows: Sequence[Mapping[str, Any]], tokenizer: Any, run: RunSpec) -> list[dict]:
        examples = self.encode([{"text": r["text"]} for r in rows], run, tokenizer)
        vectors: list[list[float]] = []
        for chunk in batches(examples, run.data.batch_size):
            vectors.extend(embed(model, to_device(self.collate(chunk, tokenizer), model), run.task.pooling).tolist())
        return [{"text": r["text"], "embedding": v} for r, v in zip(rows, vectors)]

    def _similarities(self, model: Any, batch: Mapping[str, torch.Tensor], spec: Any) -> torch.Tensor:
        both = {
            key: torch.cat([batch[f"anchor_{key}"], batch[f"positive_{key}"]])
            for key in MODEL_INPUTS
            if f"anchor_{key}" in batch
        }
        spec = spec or FeatureExtractionSpec()
        vectors = embed(model, both, spec.pooling)
        anchors, positives = vectors.chunk(2)
        return spec.scale * anchors @ positives.T


def _diagonal(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    first = batch["anchor_input_ids"]
    return torch.arange(first.shape[0], device=first.device)


def embed(model: Any, inputs: Mapping[str, torch.Tensor], pooling: str) -> torch.Tensor:
    """L2-normalised pooled last hidden states, one row per input."""
    states = model(**inputs).last_hidden_state.float()
    mask = inputs["attention_mask"].to(states.dtype)
    if pooling == "cls":
        pooled = states[:, 0]
    elif pooling == "last":
        last = mask.sum(1).long().clamp(min=1) - 1
        pooled = states[torch.arange(states.shape[0], device=states.device), last]
    else:
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
    return F.normalize(pooled, dim=-1)
