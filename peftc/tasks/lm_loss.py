"""Next-token cross-entropy computed by the task itself, in chunks, without the full logits.

The loss is transformers' causal-LM loss: positions 0..T-2 predict labels 1..T-1, positions
whose label is IGNORE_INDEX do not count, mean over the rest. Labels are aligned with the
model's output positions from the right, so a model that prepends positions (prompt tuning's
virtual tokens) sees them with ignored labels, exactly as peft prepends them.

How it avoids the (batch x length x vocab) logits: the model is called without labels while a
pre-hook on its output embedding takes the last hidden states and lets the head run on one
position only (a probe). When the model returned that probe's head output unchanged (no
soft-capping or scaling after the head), the loss is computed from the hidden states:
- a plain nn.Linear head: `LinearCrossEntropy` walks the kept positions in chunks of rows; per
  chunk it forms the logits, the loss (log-softmax) and, when gradients are needed, the
  gradient (softmax - one-hot) @ W at once, so only one chunk of logits ever exists and no
  logits are kept for backward (ignored positions are never computed);
- any other head (an adapted or trained lm_head): the head on the kept positions, then
  cross-entropy.
Otherwise (the model post-processes logits, or never calls its output embedding) the model is
run again the ordinary way and that model is remembered; the loss is then the same function of
the full logits. Values agree with transformers' loss to float rounding (~1e-7 relative).

The same loss serves the Python API (`forward_with_chunked_loss`): `model(input_ids=x,
labels=x).loss` on a PeftcModel, the call peft and HF Trainer users make, when it is exactly
transformers' ForCausalLMLoss; the logits are then made only if the caller reads them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftc.planning.memory import CHUNK_ELEMENTS  # the plan's memory estimate sizes the chunks
from peftc.tasks.common import IGNORE_INDEX

_POSTPROCESSING_HEADS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class LinearCrossEntropy(torch.autograd.Function):
    """apply(hidden (M, d), weight (V, d), bias, targets (M,), need_grad) -> summed loss."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, need_grad):  # noqa: ANN001, ANN205 - autograd signature
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        want_h, want_w, want_b = (need_grad and t is not None and t.requires_grad for t in (hidden, weight, bias))
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        grad_b = torch.zeros_like(bias) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            part, wanted = hidden[start : start + rows], targets[start : start + rows]
            logits = F.linear(part, weight, bias)
            logp = torch.log_softmax(logits.float(), dim=-1)
            total -= logp.gather(1, wanted[:, None]).sum()
            if not (want_h or want_w or want_b):
                continue
            grad = logp.exp_()  # d(sum of -log p[target]) / d logits = softmax - one-hot
            grad.view(-1)[torch.arange(len(wanted), device=grad.device) * grad.shape[1] + wanted] -= 1.0
            grad = grad.to(logits.dtype)
            if want_h:
                torch.mm(grad, weight.to(grad.dtype), out=grad_h[start : start + rows])
            if want_w:
                grad_w.addmm_(grad.t(), part.to(grad.dtype))
            if want_b:
                grad_b += grad.sum(0)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.wanted = (want_h, want_w, want_b)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):  # noqa: ANN001, ANN205
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_total if wanted else None for wanted in ctx.wanted]
        return grads[0], grads[1], grads[2], None, None


def next_token_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss over the counted tokens, number of counted tokens) for a causal LM batch."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "position_ids" in inputs:
        # Whole examples packed into blocks (causal_lm._pack_whole), each with positions from 0:
        # transformers keeps them apart when there is no attention_mask and no KV cache (an
        # eval-mode call would create one). The mask stays in the batch for counting tokens.
        inputs.pop("attention_mask", None)
        inputs["use_cache"] = False
    head = output_head(model)
    if head is None or head in _POSTPROCESSING_HEADS:
        return _from_logits(model(**inputs).logits, labels)
    probe = _HeadProbe(head)
    with probe:
        logits = model(**inputs).logits
    if not probe.returned_unchanged(logits):
        _POSTPROCESSING_HEADS.add(head)
        return _from_logits(model(**inputs).logits, labels)
    return loss_from_hidden(head, probe.hidden, labels)


def loss_from_hidden(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, counted tokens) of the head applied to the last hidden states (batch, positions, d)."""
    hidden, targets = _kept_positions(hidden, labels)
    count = targets.new_tensor(targets.numel())
    if type(head) is nn.Linear:
        need_grad = torch.is_grad_enabled()
        kind = hidden.device.type
        if kind == "meta" or not torch.is_autocast_enabled(kind):
            return LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, need_grad), count
        # Under autocast (bf16-mixed): the head's GEMMs in autocast's dtype, as F.linear would run
        # them, and the node itself with autocast off (its in-place products must not mix dtypes).
        dtype = torch.get_autocast_dtype(kind)
        bias = head.bias.to(dtype) if head.bias is not None else None
        with torch.autocast(kind, enabled=False):
            return LinearCrossEntropy.apply(hidden.to(dtype), head.weight.to(dtype), bias, targets, need_grad), count
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum"), count


def output_head(model: nn.Module) -> nn.Module | None:
    """The module the model calls to turn hidden states into logits (wrappers included)."""
    for candidate in (model, getattr(model, "base_model", None)):
        getter = getattr(candidate, "get_output_embeddings", None)
        if callable(getter) and (head := getter()) is not None:
            return head
    return None


def _aligned_targets(labels: torch.Tensor, positions: int) -> torch.Tensor:
    """The label each of `positions` output positions predicts (IGNORE_INDEX where none)."""
    extra = positions - labels.shape[1]
    if extra > 0:  # positions the model prepended (virtual tokens) have no labels
        labels = F.pad(labels, (extra, 0), value=IGNORE_INDEX)
    elif extra < 0:
        labels = labels[:, -positions:]
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _kept_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states, targets) of the positions whose target counts, flattened."""
    targets = _aligned_targets(labels.to(hidden.device), hidden.shape[1])
    keep = targets != IGNORE_INDEX
    return hidden[keep], targets[keep]


def _from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    targets = _aligned_targets(labels.to(logits.device), logits.shape[1])
    keep = targets != IGNORE_INDEX
    loss = F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
    return loss, keep.sum()


class _HeadProbe:
    """While active, the head sees only each sequence's last position; the full hidden states
    it was given are kept in `hidden`, its output in `output`."""

    def __init__(self, head: nn.Module) -> None:
        self.head = head
        self.hidden: torch.Tensor | None = None
        self.output: Any = None
        self.calls = 0
        self._handles: list[Any] = []

    def __enter__(self) -> _HeadProbe:
        self._handles = [
            self.head.register_forward_pre_hook(self._before),
            self.head.register_forward_hook(self._after),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _before(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        self.calls += 1
        if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
            return None
        self.hidden = args[0]
        # detached: the probe's output is only compared, never differentiated (no graph kept).
        # Contiguous: F.linear cannot fold a strided (batch, 1, d) slice into one GEMM and runs a
        # batched product over the weight expanded per sequence; in bfloat16 on a CPU that copies
        # batch x vocab x d elements (406 ms per step at 4 x 32000 x 1024; 4.5 ms contiguous).
        return (args[0][:, -1:].detach().contiguous(), *args[1:])

    def _after(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.output = output

    def returned_unchanged(self, logits: Any) -> bool:
        """Whether the model's logits are exactly the head's output on the probe."""
        if self.calls != 1 or self.hidden is None or not isinstance(self.output, torch.Tensor):
            return False
        return logits is self.output or (
            isinstance(logits, torch.Tensor) and logits.shape == self.output.shape and torch.equal(logits, self.output)
        )


# ------------------------------------------------------------------------ the Python API call
# model(input_ids=..., labels=...) on a PeftcModel: the loss users get from peft or the HF
# Trainer, computed here in chunks when that is exactly transformers' ForCausalLMLoss.
_FAITHFUL_HEADS: weakref.WeakSet[nn.Module] = weakref.WeakSet()
# Heads of models whose output is not a plain CausalLMOutputWithPast (an MoE model adds its router
# loss to the labels loss): the API call keeps the model's own loss; the task's loss is unaffected.
_OTHER_OUTPUT_HEADS: weakref.WeakSet[nn.Module] = weakref.WeakSet()
# Arguments that change what transformers' loss or logits are: with any of them, its own call.
_LOSS_CHANGING_ARGUMENTS = ("shift_labels", "ignore_index")


def forward_with_chunked_loss(run: Callable[..., Any], model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    """`run(*args, **kwargs)`, where `run` calls the causal LM `model` (through any prompt encoder).

    A training-style call (labels given, gradients enabled) of a transformers causal LM whose
    loss is ForCausalLMLoss, whose head is a plain nn.Linear and whose logits are that head's
    output unchanged gets the chunked loss: the same value and gradients (shift by one, -100
    ignored, mean over the counted tokens or sum / num_items_in_batch when given), without the
    full logits, which are made only if read (lm_output.py). Any other call is `run` unchanged.
    The first call on a model whose logits turn out post-processed runs again the ordinary way,
    with the random state rewound so its dropout masks are those of a single call.
    """
    head = _chunkable_head(model, args, kwargs)
    if head is None:
        return run(*args, **kwargs)
    inputs = dict(kwargs)
    labels, items = inputs.pop("labels"), inputs.pop("num_items_in_batch", None)
    rewind = None if head in _FAITHFUL_HEADS else _random_state_rewinder(head.weight.device)
    probe = _HeadProbe(head)
    with probe:
        output = run(*args, **inputs)
    plain = _plain_causal_output(output)
    if not plain or not probe.returned_unchanged(output.logits):
        (_POSTPROCESSING_HEADS if plain else _OTHER_OUTPUT_HEADS).add(head)
        if rewind is not None:
            rewind()
        return run(*args, **kwargs)
    _FAITHFUL_HEADS.add(head)
    total, count = loss_from_hidden(head, probe.hidden, labels)
    loss = total / (count if items is None else _on_device(items, total.device))
    from peftc.tasks.lm_output import LazyLogitsCausalLMOutput

    return LazyLogitsCausalLMOutput.deferred(output, loss, _deferred_logits(head, probe.hidden))


def _chunkable_head(model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> nn.Linear | None:
    """The model's plain linear head when this call may take the chunked loss, else None."""
    if kwargs.get("labels") is None or len(args) > 1 or not torch.is_grad_enabled():
        return None
    if torch.compiler.is_compiling() or any(k in kwargs for k in _LOSS_CHANGING_ARGUMENTS):
        return None
    keep = kwargs.get("logits_to_keep", 0)
    if not (isinstance(keep, int) and keep == 0) or kwargs.get("return_dict") is False:
        return None
    if not _uses_causal_lm_loss(model):
        return None
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head in _POSTPROCESSING_HEADS or head in _OTHER_OUTPUT_HEADS:
        return None
    return head


def _uses_causal_lm_loss(model: nn.Module) -> bool:
    """A decoder-only transformers model whose labels loss is ForCausalLMLoss by its own type
    (a model without a known loss type also falls back to it, but may compute its own)."""
    if getattr(model, "loss_type", None) != "ForCausalLM" or not hasattr(model, "get_output_embeddings"):
        return False
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    from transformers.loss.loss_utils import ForCausalLMLoss

    return model.loss_function is ForCausalLMLoss


def _plain_causal_output(output: Any) -> bool:
    """transformers' own CausalLMOutputWithPast: a subclass (MoE outputs) may add to the loss."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return type(output) is CausalLMOutputWithPast


def _on_device(items: Any, device: torch.device) -> Any:
    return items.to(device) if isinstance(items, torch.Tensor) else items


def _deferred_logits(head: nn.Linear, hidden: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The head on the hidden states, later, under this call's grad and autocast modes."""
    kind = hidden.device.type
    autocast = kind != "meta" and torch.is_autocast_enabled(kind)
    dtype = torch.get_autocast_dtype(kind) if autocast else None
    grad = torch.is_grad_enabled()

    def make() -> torch.Tensor:
        modes = torch.autocast(kind, dtype=dtype, enabled=autocast) if kind != "meta" else nullcontext()
        with torch.set_grad_enabled(grad), modes:
            return head(hidden)

    return make


def _random_state_rewinder(device: torch.device) -> Callable[[], None]:
    """A function that puts the CPU and `device`'s random generators back where they are now."""
    cpu = torch.get_rng_state()
    module = torch.get_device_module(device.type) if device.type not in ("cpu", "meta") else None
    accelerator = module.get_rng_state_all() if module is not None and hasattr(module, "get_rng_state_all") else None

    def rewind() -> None:
        torch.set_rng_state(cpu)
        if accelerator is not None:
            module.set_rng_state_all(accelerator)

    return rewind
