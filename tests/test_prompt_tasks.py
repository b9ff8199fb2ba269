"""Prompt methods on the other tasks: seq2seq_lm (T5: encoder-side prompts, decoder prefixes
through EncoderDecoderCache) and seq_cls (BERT and a Llama classifier), against peft.

Where peft 0.21.2 cannot run on transformers 5 (prefix tuning for sequence classification:
"Model does not support past key values"), the oracle is the same base model called with the
cache peft's own `get_prompt` builds: that pins the meaning of the saved prefix tensor.
"""

from __future__ import annotations

import functools

import pytest
import torch

import peftc
from tests.helpers import assert_greedy, build_base, max_diff, peft_pair, token_batch

SEQ2SEQ_METHODS = [
    ("prompt_tuning", ()),
    ("p_tuning", ()),
    ("prefix_tuning", ()),
    ("prefix_tuning", ("peft.prefix_projection=true",)),
    ("multitask_prompt_tuning", ("peft.num_tasks=2",)),
]
CLS_CASES = [
    (model, method, extra)
    for model in ("tiny_bert", "tiny_llama")
    for method, extra in (
        ("prompt_tuning", ()),
        ("p_tuning", ()),
        ("prefix_tuning", ()),
        ("multitask_prompt_tuning", ("peft.num_tasks=2",)),
    )
] + [("tiny_llama", "adaption_prompt", ())]
# T5's shipped init (factor 0.1) gives near-uniform logits; a wider one makes greedy choices decisive.
SHARP_T5 = "model.config.initializer_factor=3.0"


def ids_of(cases: list[tuple]) -> list[str]:
    return [" ".join([c for c in case if isinstance(c, str)] + list(case[-1])) for case in cases]


def task_inputs(method: str) -> dict[str, torch.Tensor]:
    return {"task_ids": torch.tensor([1, 0])} if method == "multitask_prompt_tuning" else {}


@functools.cache
def seq2seq_pair(method: str, extra: tuple[str, ...]):
    return peft_pair(["model=tiny_t5", "task=seq2seq_lm", f"peft={method}", SHARP_T5, *extra])


@functools.cache
def cls_pair(model: str, method: str, extra: tuple[str, ...]):
    return peft_pair([f"model={model}", "task=seq_cls", f"peft={method}", *extra])


def assert_seq2seq_greedy(reference, source: torch.Tensor, decoded: torch.Tensor, **extra) -> None:
    """decoded (start token + new tokens) is the greedy decode under reference's forward. Decoder
    inputs go in as embeddings: peft's multitask forward cannot take decoder_input_ids."""
    embeds = reference.get_input_embeddings()(decoded[:, :-1])
    out = reference(input_ids=source, attention_mask=torch.ones_like(source), decoder_inputs_embeds=embeds, **extra)
    steps = decoded.shape[1] - 1  # decoder virtual tokens (multitask) add positions in front
    assert_greedy(out.logits[:, -steps:], decoded[:, 1:])


# ---------------------------------------------------------------------------------- seq2seq
@pytest.mark.parametrize(("method", "extra"), SEQ2SEQ_METHODS, ids=ids_of(SEQ2SEQ_METHODS))
def test_seq2seq_logits_counts_and_files_match_peft(method: str, extra: tuple[str, ...], tmp_path) -> None:
    from peft import PeftModel, get_peft_model_state_dict

    plan, ours, theirs = seq2seq_pair(method, extra)
    source, target = token_batch(), token_batch(length=5, seed=1).contiguous()
    kwargs = {"input_ids": source, "attention_mask": torch.ones_like(source), "labels": target, **task_inputs(method)}
    expected = theirs(**kwargs)
    actual = ours(**kwargs)
    assert max_diff(actual.logits, expected.logits) <= 1e-5
    assert abs(actual.loss.item() - expected.loss.item()) <= 1e-5
    assert plan.prompt.num_transformer_submodules == 2
    assert (plan.trainable_params, plan.total_params) == theirs.get_nb_trainable_parameters()
    assert {k: tuple(v.shape) for k, v in ours.adapter_state_dict("default").items()} == {
        k: tuple(v.shape) for k, v in get_peft_model_state_dict(theirs).items()
    }
    ours.save_adapter(tmp_path / "ours")
    in_peft = PeftModel.from_pretrained(build_base(plan), tmp_path / "ours").eval()
    assert max_diff(in_peft(**kwargs).logits, expected.logits) <= 1e-5
    theirs.save_pretrained(tmp_path / "theirs")
    in_ours = peftc.load_adapter(build_base(plan), tmp_path / "theirs")
    assert max_diff(in_ours(**kwargs).logits, expected.logits) <= 1e-5


@pytest.mark.parametrize(("method", "extra"), SEQ2SEQ_METHODS, ids=ids_of(SEQ2SEQ_METHODS))
def test_seq2seq_generate_follows_the_forward_pass(method: str, extra: tuple[str, ...]) -> None:
    _, ours, theirs = seq2seq_pair(method, extra)
    source = token_batch()
    inputs = task_inputs(method)
    generated = ours.generate(
        input_ids=source, attention_mask=torch.ones_like(source), max_new_tokens=6, do_sample=False, **inputs
    )
    assert generated.shape == (2, 7) and (generated[:, 0] == 0).all()  # T5 starts at <pad> = 0
    assert_seq2seq_greedy(theirs, source, generated, **inputs)
    assert len(set(generated[:, 1:].flatten().tolist())) > 1, "degenerate decode proves nothing"
    # beams: the virtual tokens (decoder-side prompts included) are expanded with each row
    beams = ours.generate(input_ids=source, max_new_tokens=6, num_beams=3, num_return_sequences=2, **inputs)
    assert beams.shape == (4, 7)
    if method in ("prompt_tuning", "p_tuning"):  # encoder-side prompts: peft's own generate works here
        assert torch.equal(generated, theirs.generate(input_ids=source, max_new_tokens=6, do_sample=False))


# ---------------------------------------------------------------------------------- seq_cls
@pytest.mark.parametrize(("model", "method", "extra"), CLS_CASES, ids=ids_of(CLS_CASES))
def test_seq_cls_logits_match_peft(model: str, method: str, extra: tuple[str, ...]) -> None:
    plan, ours, theirs = cls_pair(model, method, extra)
    x = token_batch()
    mask = torch.ones_like(x)
    labels = torch.tensor([0, 1])
    actual = ours(input_ids=x, attention_mask=mask, labels=labels, **task_inputs(method))
    expected = theirs(input_ids=x, attention_mask=mask, labels=labels, **task_inputs(method)).logits
    assert max_diff(actual.logits, expected) <= 1e-5
    assert max_diff(actual.logits, build_base(plan)(input_ids=x, attention_mask=mask).logits) > 1e-4


@pytest.mark.parametrize(("model", "method", "extra"), CLS_CASES, ids=ids_of(CLS_CASES))
def test_seq_cls_counts_and_files_match_peft(model: str, method: str, extra: tuple[str, ...], tmp_path) -> None:
    from peft import PeftModel

    plan, ours, theirs = cls_pair(model, method, extra)
    head = sum(m.params for m in plan.modules_to_save)
    trainable, total = theirs.get_nb_trainable_parameters()
    if method == "adaption_prompt":
        # peft leaves the new classification head frozen (random) for adaption prompt; we train
        # it like for every other method, as a seq_cls head must be.
        trainable, total = trainable + head, total + head
    assert head > 0 and (plan.trainable_params, plan.total_params) == (trainable, total)
    assert plan.trainable_params == ours.trainable_parameters()
    x = token_batch()
    reference = ours(input_ids=x, **task_inputs(method)).logits
    ours.save_adapter(tmp_path / "ours")
    assert (
        max_diff(
            peftc.load_adapter(build_base(plan), tmp_path / "ours")(input_ids=x, **task_inputs(method)).logits,
            reference,
        )
        <= 1e-6
    )
    if method != "prefix_tuning":  # peft cannot run a seq_cls prefix at all
        in_peft = PeftModel.from_pretrained(build_base(plan), tmp_path / "ours").eval()
        assert max_diff(in_peft(input_ids=x, **task_inputs(method)).logits, reference) <= 1e-5
    if method != "adaption_prompt":  # peft saves no head for adaption prompt
        theirs.save_pretrained(tmp_path / "theirs")
        in_ours = peftc.load_adapter(build_base(plan), tmp_path / "theirs")
        assert max_diff(in_ours(input_ids=x, **task_inputs(method)).logits, reference) <= 1e-5


def test_bert_prefix_tuning_trains() -> None:
    """The combination peft refuses on transformers 5: gradients reach the prefix and the head."""
    plan = peftc.compile(["model=tiny_bert", "task=seq_cls", "peft=prefix_tuning", "peft.prefix_projection=true"])
    ours = peftc.materialize(plan).train()
    x = token_batch()
    loss = ours(input_ids=x, attention_mask=torch.ones_like(x), labels=torch.tensor([0, 1])).loss
    loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
