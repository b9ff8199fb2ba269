"""Training-memory estimate for a plan: weights, gradients, optimizer state, activations.

A first-order model of what a step keeps alive: the frozen base in its stored dtype, the
trainable parameters with their gradients and two fp32 AdamW moments, and the activations
autograd saves per transformer block (fewer with gradient checkpointing) plus the logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftc.plan import MemoryEstimate

if TYPE_CHECKING:
    from peftc.graph import ModelGraph
    from peftc.spec import RunSpec

FP32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def estimate(
    run: RunSpec,
    graph: ModelGraph,
    base_bytes: int,
    added_bytes: int,
    trainable_params: int,
    prompt_tokens: int = 0,
) -> MemoryEstimate:
    """`added_bytes`: every parameter the plan adds (adapters in fp32, modules_to_save copies)."""
    facts = graph.facts
    batch, seq = run.data.batch_size, run.data.max_length + prompt_tokens
    act_bytes = DTYPE_BYTES.get(run.model.dtype, 4)
    hidden = facts.hidden_size or 0
    inner = facts.intermediate_size or 4 * hidden
    layers = (facts.num_layers or 0) + (facts.num_decoder_layers or 0)
    heads = facts.num_attention_heads or 0
    # Per token per block: ~10 hidden-sized tensors (norms, q/k/v/o inputs and outputs,
    # residuals) and ~3 intermediate-sized ones (gate, up, activation), plus attention
    # probabilities (heads x seq per token) on the math attention path.
    per_token_block = (10 * hidden + 3 * inner + heads * seq) * act_bytes
    if run.trainer.gradient_checkpointing:
        blocks = batch * seq * (layers * hidden * act_bytes + per_token_block)
    else:
        blocks = batch * seq * layers * per_token_block
    logits = batch * seq * (facts.vocab_size or 0) * FP32 * 2
    notes = ["activations assume the math attention path; fused kernels store less"]
    if run.trainer.gradient_checkpointing:
        notes.append("gradient checkpointing: block inputs kept, one block recomputed at a time")
    return MemoryEstimate(
        base_weights=base_bytes,
        adapter_weights=added_bytes,
        gradients=trainable_params * FP32,
        optimizer_state=trainable_params * 2 * FP32,
        activations=blocks + logits,
        notes=tuple(notes),
    )
