"""`model(input_ids=x, labels=x).loss` on a materialized model takes the chunked causal-LM loss
(issue 17): the same loss and gradients as transformers' own full-logits loss, in train mode
with dropout on, and the logits are still there for a caller who reads them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

import peftc
from peftc.tasks.lm_output import LazyLogitsCausalLMOutput
from tests.helpers import build_base, token_batch

LORA_WITH_DROPOUT = ["peft.init_lora_weights=false", "peft.target_modules=all-linear", "peft.lora_dropout=0.1"]


def labelled_batch() -> dict[str, torch.Tensor]:
    ids = token_batch(batch=3, length=14)
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[2, -3:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def trained_model(overrides: list[str]) -> nn.Module:
    plan = peftc.compile(["model=tiny_llama", *overrides])
    return peftc.materialize(plan, base_model=build_base(plan)).train()


def seeded_call(model: nn.Module, batch: dict, seed: int = 7, **extra: object) -> tuple[object, list[torch.Tensor]]:
    """(output, trainable gradients) of one seeded forward + backward of the labels loss."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**batch, **extra)
    out.loss.backward()
    return out, [p.grad.clone() for p in model.parameters() if p.requires_grad]


def transformers_call(model: nn.Module, batch: dict, seed: int = 7, **extra: object) -> tuple[object, list]:
    model.chunked_loss = False
    try:
        return seeded_call(model, batch, seed, **extra)
    finally:
        model.chunked_loss = True


@pytest.mark.parametrize(
    "overrides",
    [LORA_WITH_DROPOUT, ["peft=prompt_tuning", "peft.num_virtual_tokens=3"]],
    ids=["lora dropout 0.1", "prompt tuning"],
)
def test_api_loss_and_gradients_equal_transformers_loss_in_train_mode(overrides: list[str]) -> None:
    model = trained_model(overrides)
    batch = labelled_batch()
    fast, fast_grads = seeded_call(model, batch)
    assert isinstance(fast, LazyLogitsCausalLMOutput) and fast.logits_pending, "the chunked loss must be taken"
    reference, reference_grads = transformers_call(model, batch)
    assert type(reference) is CausalLMOutputWithPast
    torch.testing.assert_close(fast.loss, reference.loss, rtol=1e-6, atol=0)
    for ours, theirs in zip(fast_grads, reference_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_num_items_in_batch_divides_the_summed_loss_as_transformers_does() -> None:
    model = trained_model(LORA_WITH_DROPOUT)
    batch = labelled_batch()
    items = torch.tensor(40)  # the HF Trainer's token count over gradient-accumulation steps
    fast, fast_grads = seeded_call(model, batch, num_items_in_batch=items)
    reference, reference_grads = transformers_call(model, batch, num_items_in_batch=items)
    recomputed = ForCausalLMLoss(
        reference.logits, batch["labels"], reference.logits.shape[-1], num_items_in_batch=items
    )
    torch.testing.assert_close(reference.loss, recomputed, rtol=1e-6, atol=0)
    torch.testing.assert_close(fast.loss, reference.loss, rtol=1e-6, atol=0)
    for ours, theirs in zip(fast_grads, reference_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_an_ignore_index_argument_is_honoured_as_transformers_honours_it() -> None:
    """`model(..., labels=x, ignore_index=0)`: transformers' loss skips the labels equal to 0,
    so the call keeps transformers' own loss (the chunked loss only knows -100)."""
    model = trained_model(LORA_WITH_DROPOUT)
    batch = labelled_batch()
    batch["labels"] = batch["labels"].masked_fill(batch["labels"] == -100, 0)
    batch["labels"][1, 5:9] = 0  # labels the -100 convention would count
    ours, ours_grads = seeded_call(model, batch, ignore_index=0)
    reference, reference_grads = transformers_call(model, batch, ignore_index=0)
    counting_zeros, _ = transformers_call(model, batch)
    torch.testing.assert_close(ours.loss, reference.loss, rtol=1e-6, atol=0)
    assert abs(ours.loss.item() - counting_zeros.loss.item()) > 1e-4
    for mine, theirs in zip(ours_grads, reference_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)


def test_api_loss_and_gradients_equal_peft_in_train_mode_with_dropout() -> None:
    """peft's model and ours on identical weights, one seed: the same dropout masks, the same loss."""
    from peft import get_peft_model, get_peft_model_state_dict

    from peftc.files.load import fill
    from tests.helpers import peft_lora_config

    plan = peftc.compile(["model=tiny_llama", *LORA_WITH_DROPOUT])
    base = build_base(plan)
    theirs = get_peft_model(copy.deepcopy(base), peft_lora_config(plan)).train()
    ours = peftc.materialize(plan, base_model=base).train()
    fill(ours, "default", get_peft_model_state_dict(theirs))
    batch = labelled_batch()
    fast, ours_grads = seeded_call(ours, batch)
    assert isinstance(fast, LazyLogitsCausalLMOutput)
    reference, theirs_grads = seeded_call(theirs, batch)
    torch.testing.assert_close(fast.loss, reference.loss, rtol=1e-6, atol=0)
    for ours_grad, theirs_grad in zip(ours_grads, theirs_grads, strict=True):
        torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-5, atol=1e-7)
    no_dropout, _ = seeded_call(ours, batch, seed=8)  # another seed: other masks, so dropout did run
    assert abs(no_dropout.loss.item() - fast.loss.item()) > 1e-4


def test_logits_are_made_when_read_and_equal_transformers_logits() -> None:
    model = trained_model(LORA_WITH_DROPOUT)
    batch = labelled_batch()
    fast, _ = seeded_call(model, batch)
    reference, _ = transformers_call(model, batch)
    assert fast["loss"] is fast.loss and "logits" in fast and fast.logits_pending  # reading the loss makes none
    assert list(fast.keys()) == list(reference.keys()) and not fast.logits_pending
    torch.testing.assert_close(fast[1], reference.logits, rtol=0, atol=1e-6)
    assert fast.to_tuple()[1] is fast.logits is fast["logits"]


def test_logits_read_before_backward_carry_gradients_like_transformers_logits() -> None:
    model = trained_model(["peft.init_lora_weights=false", "peft.target_modules=all-linear"])
    batch = labelled_batch()
    grads = []
    for chunked in (True, False):
        model.chunked_loss = chunked
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        (out.loss + 1e-3 * out.logits.square().mean()).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    model.chunked_loss = True
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_calls_without_gradients_keep_transformers_output() -> None:
    model = trained_model(LORA_WITH_DROPOUT).eval()
    with torch.no_grad():
        out = model(**labelled_batch())
    assert type(out) is CausalLMOutputWithPast and out.logits is not None


def test_the_chunked_api_loss_keeps_no_logits_for_backward() -> None:
    model = trained_model(["peft.target_modules=all-linear"])
    vocab = model.base_model.get_output_embeddings().weight.shape[0]
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        model(**labelled_batch())
    assert saved and not any(shape and shape[-1] == vocab and shape.numel() > vocab for shape in saved)


def test_post_processed_logits_fall_back_with_the_masks_of_a_single_call() -> None:
    """A model that rescales its logits after the head: transformers' loss of the rescaled
    logits, and the first (probing) forward leaves the random state as one call would."""
    model = trained_model(LORA_WITH_DROPOUT)

    def halve(module: nn.Module, args: object, output: object) -> object:
        output.logits = output.logits * 0.5
        return output

    model.base_model.register_forward_hook(halve)
    batch = labelled_batch()
    first, first_grads = seeded_call(model, batch)
    reference, reference_grads = transformers_call(model, batch)
    assert type(first) is CausalLMOutputWithPast
    torch.testing.assert_close(first.loss, reference.loss, rtol=0, atol=0)
    for ours, theirs in zip(first_grads, reference_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_models_with_their_own_output_type_keep_their_own_loss() -> None:
    """An output class other than CausalLMOutputWithPast (MoE models add a router loss to the
    labels loss) is left to the model: its loss exactly, on the first call and after."""
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    model = trained_model(LORA_WITH_DROPOUT)

    def with_router_loss(module: nn.Module, args: object, output: CausalLMOutputWithPast) -> object:
        extra = 0.25 if output.loss is not None else None
        loss = None if output.loss is None else output.loss + extra
        return MoeCausalLMOutputWithPast(loss=loss, logits=output.logits, aux_loss=torch.tensor(extra or 0.0))

    model.base_model.register_forward_hook(with_router_loss)
    batch = labelled_batch()
    for _ in range(2):
        out, grads = seeded_call(model, batch)
        reference, reference_grads = transformers_call(model, batch)
        assert type(out) is MoeCausalLMOutputWithPast
        torch.testing.assert_close(out.loss, reference.loss, rtol=0, atol=0)
        for ours, theirs in zip(grads, reference_grads, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_under_bf16_autocast_the_loss_and_the_read_logits_match_transformers() -> None:
    """bf16-mixed: the head's products in bf16 as F.linear runs them; logits read later are
    made under the call's autocast, so they have transformers' dtype and values."""
    model = trained_model(["peft.init_lora_weights=false", "peft.target_modules=all-linear"])
    batch = labelled_batch()
    outputs = []
    for chunked in (True, False):
        model.chunked_loss = chunked
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs.append(model(**batch))
    model.chunked_loss = True
    fast, reference = outputs
    assert isinstance(fast, LazyLogitsCausalLMOutput) and fast.logits_pending
    assert abs(fast.loss.item() - reference.loss.item()) <= 1e-2 * abs(reference.loss.item())
    assert fast.logits.dtype == reference.logits.dtype == torch.bfloat16
    torch.testing.assert_close(fast.logits, reference.logits, rtol=0, atol=0)
