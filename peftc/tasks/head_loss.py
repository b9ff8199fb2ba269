"""The losses of transformers' classification and span heads, computed in float32 from the logits.

transformers computes these losses on the logits in the model's dtype. Under bf16-true (the whole
model in bf16) most heads then average bf16 cross-entropies in bf16: BERT-, DistilBERT-, GPT-2-,
T5- and DeBERTa-style heads, and Llama-style (generic) heads for sequence classification and
question answering; the loss lands 3e-3..1e-2 (relative) off the float32 loss of the same logits
(experiments/bf16_head_loss.py). Here each loss is transformers' own function, or the model's
inline formula, on `logits.float()`: in float32 it is exactly the model's `.loss`, under bf16 the
float32 loss of the bf16 logits. (Under autocast, bf16-mixed, torch already runs these losses in
float32.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# Model types whose sequence classifier has its own loss when config.problem_type is unset
# (DebertaForSequenceClassification, DebertaV2ForSequenceClassification): rows with a negative
# label are dropped, and a label row of probabilities is a soft target; problem_type is left unset.
_OWN_UNSET_PROBLEM_LOSS = frozenset({"deberta", "deberta-v2"})


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: Any) -> torch.Tensor:
    """The classifier's loss by config.problem_type, as transformers computes it: regression (MSE;
    what num_labels == 1 means when unset), single_label_classification (cross-entropy; integer
    labels), multi_label_classification (BCE with logits; float labels). An unset problem_type is
    written into the config, as the model's own forward does on its first labelled call."""
    if config.problem_type is None and getattr(config, "model_type", None) in _OWN_UNSET_PROBLEM_LOSS:
        return _deberta_unset_problem_loss(logits.float(), labels, config.num_labels)
    from transformers.loss.loss_utils import ForSequenceClassificationLoss

    return ForSequenceClassificationLoss(labels, logits.float(), config)


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: Any) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose label is not -100 (every token classifier's loss)."""
    from transformers.loss.loss_utils import ForTokenClassification

    return ForTokenClassification(logits.float(), labels, config)


def span_loss(
    start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor, end_positions: torch.Tensor
) -> torch.Tensor:
    """(start loss + end loss) / 2, each a mean cross-entropy over the examples; a position past the
    last token is clamped to the length and then ignored (every question-answering head's loss)."""
    from transformers.loss.loss_utils import ForQuestionAnsweringLoss

    return ForQuestionAnsweringLoss(start_logits.float(), end_logits.float(), start_positions, end_positions)


def _deberta_unset_problem_loss(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """DeBERTa's classifier loss with problem_type unset: MSE for one label; cross-entropy over the
    rows whose label is >= 0 (0 when there is none) for one class index per row; else the
    cross-entropy against each row's label distribution, -sum(labels * log_softmax(logits))."""
    if num_labels == 1:
        return F.mse_loss(logits.view(-1).to(labels.dtype), labels.view(-1))
    if labels.dim() == 1 or labels.size(-1) == 1:
        # DeBERTa gathers the labelled rows by index; a (batch, 1) label column is read as (batch,)
        labels = labels.view(-1)
        kept = labels >= 0
        if not kept.any():
            return torch.zeros((), dtype=logits.dtype, device=logits.device)
        return F.cross_entropy(logits.view(-1, num_labels)[kept], labels[kept].long())
    return -(torch.log_softmax(logits, dim=-1) * labels).sum(-1).mean()
