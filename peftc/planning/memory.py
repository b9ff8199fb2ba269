"""Training-memory estimate for a plan (per device): what one optimizer step keeps alive.

    total = base weights            frozen base in its stored dtype, quantization aware
                                    (the quant backend's `base_bytes`)
          + adapter weights         every parameter the plan adds (adapters in fp32, saved copies)
          + gradients               one per trainable parameter (fp32)
          + optimizer state         AdamW: two fp32 moments per trainable parameter
          + activations             batch x sequence x (per-block saved tensors x layers) + logits
                                    (LM heads; decoder blocks over the target length)
          + prefix key/values       prefix tuning: batch x virtual tokens x layers x 2 x kv width

Activations are what autograd saves for backward. A frozen linear saves nothing (its input
gradient needs only its weight), so per token and block the saved tensors are the norm
inputs/outputs, the attention inputs and output (the fused CPU/GPU attention kernels keep
q, k, v, the output and a log-sum-exp, not the score matrix), the MLP's gate/up/activation
outputs, and each adapted site's input copy when its dropout is on (or when the base dtype is
not fp32: adapters compute in fp32). The logits and their log-softmax (and the logits' gradient
at the start of backward) are batch x sequence x vocab in fp32, except for tasks whose loss
walks the hidden states in chunks (causal LM, tasks/lm_loss.py): there one chunk's logits and
softmax exist at a time. With gradient checkpointing
only each block's input is kept, plus one block's activations while it is recomputed.
Sharding strategies divide what they shard by the number of processes. Validated against
measured peak RSS in experiments/RESULTS.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peftc.config.spec import RunSpec
    from peftc.planning.graph import ModelGraph
    from peftc.planning.plan import Plan, PromptPlan, Site

FP32 = 4
ADAMW_MOMENTS = 2
LOGIT_COPIES = 3  # logits, their log-softmax (saved), the logits' gradient at backward start
CHUNK_COPIES = 2  # a chunked loss: one chunk's logits and its softmax (the gradient in place)
# Logits per chunk of a task's chunked loss (64 MiB in float32: 512 rows at a 32k vocabulary),
# decided here because the estimate depends on it. Each chunk reads the whole head weight twice
# (logits, then the hidden-state gradient), so chunks much smaller than this are bound by memory
# bandwidth. Loss forward + backward alone, 1020 x 1024 hidden states, 32k vocabulary, 2
# threads: 256-row chunks 6 % slower than unchunked, 512-row chunks 5 % faster.
CHUNK_ELEMENTS = 1 << 24
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 1024**3

# Which training-state components each sharding strategy divides across processes.
_SHARDED = {
    "fsdp": ("base_weights", "adapter_weights", "gradients", "optimizer_state"),
    "deepspeed_stage_1": ("optimizer_state",),
    "deepspeed_stage_2": ("gradients", "optimizer_state"),
    "deepspeed_stage_3": ("base_weights", "adapter_weights", "gradients", "optimizer_state"),
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Training-memory estimate in bytes, by component (see peftc.planning.memory for the model)."""

    base_weights: int
    adapter_weights: int
    gradients: int
    optimizer_state: int
    activations: int
    prefix_kv: int = 0  # prefix tuning's per-layer key/value prefixes, expanded over the batch
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return (
            self.base_weights
            + self.adapter_weights
            + self.gradients
            + self.optimizer_state
            + self.activations
            + self.prefix_kv
        )


def estimate(
    run: RunSpec,
    graph: ModelGraph,
    base_bytes: int,
    added_bytes: int,
    trainable_params: int,
    prompt_tokens: int = 0,
    *,
    prompt: PromptPlan | None = None,
    sites: tuple[Site, ...] = (),
) -> MemoryEstimate:
    """`added_bytes`: every parameter the plan adds (adapters in fp32, modules_to_save copies).

    `prompt` (or, for callers that only know a token count, `prompt_tokens`) lengthens the
    sequence for input-side prompts or adds per-layer key/value prefixes for prefix tuning.
    """
    facts = graph.facts
    act_bytes, train_bytes = precision_bytes(run)
    prefix = prefix_tokens(prompt)
    input_prompt = (prompt.num_virtual_tokens if prompt is not None else prompt_tokens) if not prefix else 0
    batch, seq = run.data.batch_size, run.data.max_length + input_prompt
    layers = (facts.num_layers or 0) + (facts.num_decoder_layers or 0)
    kv_width = _kv_width(graph)
    per_token_block = _per_token_block_bytes(graph, act_bytes, seq_kv_ratio=(seq + prefix) / seq)
    per_token_block += _site_copies_per_token(sites, act_bytes, facts.intermediate_size) // max(layers, 1)
    hidden = facts.hidden_size or 0
    # Encoder-decoder: the decoder runs over the target (a seq2seq task's max_target_length).
    out_len = getattr(run.task, "max_target_length", None) or seq if facts.is_encoder_decoder else seq
    decoder_layers = facts.num_decoder_layers or 0
    token_layers = seq * (layers - decoder_layers) + out_len * decoder_layers  # sum over blocks
    if run.trainer.gradient_checkpointing:
        blocks = batch * (token_layers * hidden * act_bytes + max(seq, out_len) * per_token_block)
    else:
        blocks = batch * token_layers * per_token_block
    # Vocabulary logits only with a language-model head (a classifier's logits are tiny).
    vocab = (facts.vocab_size or 0) if graph.output_embedding is not None else 0
    logits = _logit_bytes(run, batch * out_len, vocab)
    prefix_kv = batch * prefix * layers * 2 * kv_width * act_bytes
    notes = ["per device; activations assume fused attention kernels (the math path also stores batch x heads x seq^2)"]
    if run.trainer.gradient_checkpointing:
        notes.append("gradient checkpointing: block inputs kept, one block recomputed at a time")
    precision = str(run.trainer.precision)
    if precision.endswith("-mixed"):
        notes.append(f"{precision}: activations in 16 bits; adapters, gradients and optimizer state in float32")
    elif train_bytes < FP32:
        notes.append(f"{precision}: the whole model, its gradients and optimizer state in 16 bits")
    parts = {
        "base_weights": base_bytes,
        "adapter_weights": added_bytes * train_bytes // FP32,
        "gradients": trainable_params * train_bytes,
        "optimizer_state": trainable_params * ADAMW_MOMENTS * train_bytes,
    }
    world = _world_size(run)
    sharded = _SHARDED.get(_strategy_family(run.trainer.strategy), ())
    if world > 1 and sharded:
        parts = {k: (v + world - 1) // world if k in sharded else v for k, v in parts.items()}
        notes.append(f"{run.trainer.strategy}: {', '.join(sharded)} divided over {world} processes")
    return MemoryEstimate(**parts, activations=blocks + logits, prefix_kv=prefix_kv, notes=tuple(notes))


def precision_bytes(run: RunSpec) -> tuple[int, int]:
    """(bytes per activation, bytes per trainable value) under the trainer's precision: mixed
    precision keeps float32 adapters (peft's autocast_adapter_dtype) and stores 16-bit
    activations; `*-true` runs everything in its dtype; 32-true follows model.dtype."""
    precision = str(run.trainer.precision)
    if precision.startswith(("bf16", "16")):
        return 2, (2 if precision.endswith("-true") else FP32)
    if precision.startswith("64"):
        return 8, 8
    return DTYPE_BYTES.get(run.model.dtype, 4), FP32


def _logit_bytes(run: RunSpec, positions: int, vocab: int) -> int:
    from peftc.config.registry import TASKS

    if vocab and TASKS.for_spec(run.task).loss_in_chunks:
        rows = min(positions, max(1, CHUNK_ELEMENTS // vocab))
        return rows * vocab * FP32 * CHUNK_COPIES
    return positions * vocab * FP32 * LOGIT_COPIES


def _per_token_block_bytes(graph: ModelGraph, act_bytes: int, seq_kv_ratio: float = 1.0) -> int:
    """Bytes autograd saves per token in one transformer block (frozen base weights)."""
    facts = graph.facts
    hidden = facts.hidden_size or 0
    inner = facts.intermediate_size or 4 * hidden
    heads = facts.num_attention_heads or 0
    head_dim = facts.head_dim or (hidden // heads if heads else 0)
    q_width = heads * head_dim or hidden
    kv = _kv_width(graph)
    norms = 4 * hidden  # two norms: input and normalized output of each
    attention = 2 * q_width + int(2 * kv * seq_kv_ratio)  # q and output; k and v (with any prefix)
    mlp = 3 * inner  # gate, up, activation(gate)
    return (norms + attention + mlp) * act_bytes


def _site_copies_per_token(sites: tuple[Site, ...], act_bytes: int, inner: int | None) -> int:
    """Adapter inputs saved on top of the block's own tensors: a dropout copy (+ 1-byte mask),
    an fp32 copy when the base computes in another dtype (adapters run in fp32), and the input
    of an adapted MLP down-projection (the block saves gate/up/activation, not their product,
    which only the adapter's gradient needs; the other projections read tensors already kept)."""
    total = 0
    for site in sites:
        width = site.in_features or 0
        if inner and width == inner:
            total += width * act_bytes
        if site.dropout > 0:
            total += width * (act_bytes + 1)
        if act_bytes != FP32:
            total += width * FP32
    return total


def _kv_width(graph: ModelGraph) -> int:
    facts = graph.facts
    heads = facts.num_attention_heads or 0
    head_dim = facts.head_dim or ((facts.hidden_size or 0) // heads if heads else 0)
    return (facts.num_key_value_heads or heads) * head_dim


def prefix_tokens(prompt: PromptPlan | None) -> int:
    """Virtual tokens that enter as per-layer key/value prefixes (prefix tuning), else 0.

    An input-side prompt lengthens the sequence instead."""
    if prompt is None:
        return 0
    return prompt.num_virtual_tokens if prompt.prefix_kv else 0


def _strategy_family(strategy: str) -> str:
    for family in ("deepspeed_stage_3", "deepspeed_stage_2", "deepspeed_stage_1", "fsdp"):
        if strategy.startswith(family):
            return family
    return "deepspeed_stage_2" if strategy == "deepspeed" else strategy


def _world_size(run: RunSpec) -> int:
    devices = run.trainer.devices
    count = len(devices) if isinstance(devices, (list, tuple)) else devices if isinstance(devices, int) else 1
    return max(1, count) * run.trainer.num_nodes


def budget_verdict(plan: Plan) -> dict[str, float | bool] | None:
    """Compare the estimate with budget.memory_gb: fits or not, and by how much (GiB)."""
    budget_gb = plan.spec.budget.memory_gb
    if budget_gb is None:
        return None
    needed_gb = plan.memory.total / GIB
    return {
        "budget_gb": budget_gb,
        "needed_gb": round(needed_gb, 4),
        "fits": needed_gb <= budget_gb,
        "margin_gb": round(budget_gb - needed_gb, 4),
    }
