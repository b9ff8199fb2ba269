"""Prompt-learning methods and adaption prompt on causal LMs, against the peft package.

Same base weights and same adapter weights (peft's copied into ours) must give the same logits,
parameter counts, saved tensor names and files that load both ways. generate() is compared with
greedy decoding over peft's forward: peft 0.21.2's own generate() re-injects the prompt at every
step on transformers 5 (it looks for `past_key_values`, which transformers 5 calls `cache`), so
its token sequence is not a usable oracle here.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import peftc
from peftc.planning.plan import Plan
from tests.helpers import assert_causal_greedy, build_base, max_diff, peft_pair, token_batch

METHOD_CASES = [
    ("prompt_tuning", ()),
    ("p_tuning", ()),
    ("p_tuning", ("peft.encoder_reparameterization_type=LSTM", "peft.encoder_hidden_size=16")),
    ("prefix_tuning", ()),
    ("prefix_tuning", ("peft.prefix_projection=true", "peft.encoder_hidden_size=24")),
    ("multitask_prompt_tuning", ("peft.num_tasks=3", "peft.num_ranks=2")),
    ("adaption_prompt", ("peft.adapter_len=4", "peft.adapter_layers=2")),
]
MODELS = ("tiny_llama", "tiny_gpt2")
CASES = [(model, method, extra) for model in MODELS for method, extra in METHOD_CASES]
IDS = [" ".join([model, method, *extra]) for model, method, extra in CASES]
# A wider init than the shipped models' 0.02 makes next-token choices decisive, so token
# identity in generate() means something.
SHARP = "+model.config.initializer_range=0.2"


def task_inputs(method: str) -> dict[str, torch.Tensor]:
    return {"task_ids": torch.tensor([0, 2])} if method == "multitask_prompt_tuning" else {}


@functools.cache
def paired(
    model: str, method: str, extra: tuple[str, ...]
) -> tuple[Plan, peftc.runtime.model.PeftcModel, torch.nn.Module]:
    """Cached: the tests below only read these models."""
    return peft_pair([f"model={model}", f"peft={method}", SHARP, *extra])


@pytest.mark.parametrize(("model", "method", "extra"), CASES, ids=IDS)
def test_logits_and_loss_match_peft(model: str, method: str, extra: tuple[str, ...]) -> None:
    plan, ours, theirs = paired(model, method, extra)
    x = token_batch()
    mask = torch.ones_like(x)
    mask[1, -3:] = 0  # right padding: the prompt's mask must be extended, not replaced
    kwargs = {"attention_mask": mask, "labels": x, **task_inputs(method)}
    expected = theirs(input_ids=x, **kwargs)
    actual = ours(input_ids=x, **kwargs)
    assert actual.logits.shape == expected.logits.shape
    assert max_diff(actual.logits, expected.logits) <= 1e-5
    assert abs(actual.loss.item() - expected.loss.item()) <= 1e-5
    base_logits = build_base(plan)(input_ids=x, attention_mask=mask).logits
    assert max_diff(actual.logits[:, -x.shape[1] :], base_logits) > 1e-3, "the prompt must change the output"


VIRTUAL_TOKENS = {name: case for case, name in zip(CASES, IDS) if case[1] != "adaption_prompt" and not case[2]}


@pytest.mark.filterwarnings("ignore:Position ids are not supported")  # peft's prompt tuning drops them
@pytest.mark.parametrize(("model", "method", "extra"), VIRTUAL_TOKENS.values(), ids=VIRTUAL_TOKENS.keys())
def test_explicit_position_ids_of_the_real_tokens_give_the_implicit_positions_logits(
    model: str, method: str, extra: tuple[str, ...]
) -> None:
    """position_ids number the caller's tokens: the virtual tokens come before them, so with
    0..L-1 given the model sees what it sees when positions are left implicit, as in peft (which
    shifts them under prefix tuning and drops them under prompt tuning)."""
    _, ours, theirs = paired(model, method, extra)
    x = token_batch()
    positions = torch.arange(x.shape[1]).expand_as(x)
    implicit = ours(input_ids=x, **task_inputs(method)).logits
    explicit = ours(input_ids=x, position_ids=positions, **task_inputs(method)).logits
    assert max_diff(explicit, implicit) <= 1e-5
    assert max_diff(explicit, theirs(input_ids=x, position_ids=positions, **task_inputs(method)).logits) <= 1e-5


@pytest.mark.parametrize(("model", "method", "extra"), CASES, ids=IDS)
def test_plan_counts_equal_materialized_and_peft(model: str, method: str, extra: tuple[str, ...]) -> None:
    from peft import get_peft_model_state_dict

    plan, ours, theirs = paired(model, method, extra)
    theirs_trainable, theirs_total = theirs.get_nb_trainable_parameters()
    assert plan.trainable_params == ours.trainable_parameters() == theirs_trainable
    assert plan.total_params == ours.total_parameters() == theirs_total
    saved = ours.adapter_state_dict("default")
    reference = get_peft_model_state_dict(theirs)
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert all(torch.allclose(saved[k], reference[k], atol=1e-6) for k in saved)


@pytest.mark.parametrize(("model", "method", "extra"), CASES, ids=IDS)
def test_adapter_files_load_both_ways(model: str, method: str, extra: tuple[str, ...], tmp_path) -> None:
    from peft import PeftModel

    plan, ours, theirs = paired(model, method, extra)
    x = token_batch()
    inputs = task_inputs(method)
    expected = theirs(input_ids=x, **inputs).logits
    ours.save_adapter(tmp_path / "ours")
    in_peft = PeftModel.from_pretrained(build_base(plan), tmp_path / "ours").eval()
    assert max_diff(in_peft(input_ids=x, **inputs).logits, expected) <= 1e-5
    theirs.save_pretrained(tmp_path / "theirs")
    in_ours = peftc.load_adapter(build_base(plan), tmp_path / "theirs")
    assert max_diff(in_ours(input_ids=x, **inputs).logits, expected) <= 1e-5
    assert in_ours.trainable_parameters() == 0


@pytest.mark.parametrize(("model", "method", "extra"), CASES, ids=IDS)
def test_greedy_generate_gives_peft_forward_tokens(model: str, method: str, extra: tuple[str, ...]) -> None:
    _, ours, theirs = paired(model, method, extra)
    x = token_batch()
    inputs = task_inputs(method)
    generated = ours.generate(
        input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False, **inputs
    )
    assert generated.shape == (2, x.shape[1] + 6) and torch.equal(generated[:, : x.shape[1]], x)
    assert_causal_greedy(theirs, generated, x.shape[1], **inputs)
    assert len(set(generated[:, x.shape[1] :].flatten().tolist())) > 1, "degenerate decode proves nothing"


def test_untrained_adaption_prompt_is_an_exact_no_op() -> None:
    for model in MODELS:
        plan = peftc.compile([f"model={model}", "peft=adaption_prompt", "peft.adapter_layers=2", SHARP])
        base = build_base(plan)
        ours = peftc.materialize(plan, base_model=copy.deepcopy(base)).eval()
        x = token_batch()
        assert torch.equal(ours(input_ids=x).logits, base(input_ids=x).logits)
        assert ours.trainable_parameters() == plan.trainable_params > 0


def test_generate_works_with_beams_sampling_padding_and_embeddings() -> None:
    for method in ("prompt_tuning", "prefix_tuning"):
        _, ours, _ = paired("tiny_llama", method, ())
        x = token_batch()
        mask = torch.ones_like(x)
        mask[1, :3] = 0  # left padding
        beams = ours.generate(input_ids=x, attention_mask=mask, max_new_tokens=3, num_beams=3, num_return_sequences=2)
        assert beams.shape == (4, x.shape[1] + 3)
        sampled = ours.generate(input_ids=x, max_new_tokens=3, do_sample=True, num_return_sequences=2)
        assert sampled.shape == (4, x.shape[1] + 3)
        greedy = ours.generate(input_ids=x, max_new_tokens=3, do_sample=False)
        embeds = ours.base_model.get_input_embeddings()(x)
        from_embeds = ours.generate(inputs_embeds=embeds, max_new_tokens=3, do_sample=False)
        assert torch.equal(from_embeds, greedy[:, x.shape[1] :])


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_a_left_padded_row_generates_what_it_generates_alone(method: str) -> None:
    """generate() keeps the caller's attention mask behind the virtual tokens: the padding of a
    left-padded row is never attended, so greedy decoding gives the unpadded row's tokens."""
    _, ours, _ = paired("tiny_llama", method, ())
    x = token_batch()
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding
    batched = ours.generate(input_ids=x, attention_mask=mask, max_new_tokens=4, do_sample=False)
    alone = ours.generate(input_ids=x[1:, 3:], max_new_tokens=4, do_sample=False)
    assert torch.equal(batched[1, x.shape[1] :], alone[0, x.shape[1] - 3 :])


def test_only_prompt_parameters_train() -> None:
    for method in ("prompt_tuning", "p_tuning", "prefix_tuning", "multitask_prompt_tuning", "adaption_prompt"):
        plan = peftc.compile([f"peft={method}"])
        ours = peftc.materialize(plan).train()
        before = {n: p.detach().clone() for n, p in ours.named_parameters()}
        optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
        x = token_batch()
        for _ in range(2):
            ours(input_ids=x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        changed = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
        trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
        assert changed and changed <= trainable, method
        assert not any(n.startswith("base_model.") and "adaption_" not in n for n in changed), method


@pytest.mark.parametrize("layers", [2, 6])
def test_the_prefix_gradient_is_formed_once_whatever_the_depth(layers: int) -> None:
    """The per-layer keys and values are views of one table. Cut out one index at a time, each
    piece's backward wrote a zero-filled gradient of the whole table and autograd summed them:
    4 x layers - 1 table-sized tensors per step (quadratic in depth; 87 at 1.1B's 22 layers)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    plan = peftc.compile(["model=tiny_llama", "peft=prefix_tuning", f"model.config.num_hidden_layers={layers}"])
    model = peftc.materialize(plan).train()
    x = token_batch()
    encoder = next(m for m in model.modules() if hasattr(m, "key_values"))
    table = encoder.key_values(len(x), torch.float32)[0][0].numel() * 2 * layers

    class TableSized(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
            out = func(*args, **(kwargs or {}))
            self.count += isinstance(out, torch.Tensor) and not func.is_view and out.numel() == table
            return out

    loss = model(input_ids=x, labels=x).loss
    with TableSized() as counter:
        loss.backward()
    assert 0 < counter.count <= 2, counter.count


def test_disable_adapter_runs_the_base_model() -> None:
    _, ours, _ = paired("tiny_llama", "prefix_tuning", ())
    x = token_batch()
    base = build_base(ours.plan_of("default"))
    with ours.disable_adapter():
        assert torch.equal(ours(input_ids=x).logits, base(input_ids=x).logits)


def test_two_prompt_adapters_switch_and_save_in_peft_layout(tmp_path) -> None:
    import warnings

    from peft import PeftModel

    model = peftc.materialize(peftc.compile(["peft=prompt_tuning", SHARP])).eval()
    model.add_adapter("short", peftc.compile(["peft=prompt_tuning", "peft.num_virtual_tokens=4", SHARP]))
    x = token_batch()
    first = model(input_ids=x).logits[:, -x.shape[1] :]
    model.set_adapter("short")
    second = model(input_ids=x).logits
    assert max_diff(first, second[:, -x.shape[1] :]) > 1e-3
    assert second.shape[1] == x.shape[1] + 4
    assert model.trainable_parameters() == model.plan_of("short").trainable_params
    model.save_adapter(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(build_base(model.plan_of("default")), tmp_path)
        theirs.load_adapter(tmp_path / "short", "short")  # peft cannot mix peft types in one model
        theirs.set_adapter("short")
    assert max_diff(theirs.eval()(input_ids=x).logits, second) <= 1e-5
    model.set_adapter("default")
    assert torch.equal(model(input_ids=x).logits[:, -x.shape[1] :], first)


def test_virtual_tokens_train_under_gradient_checkpointing() -> None:
    plan = peftc.compile(["peft=p_tuning", "trainer.gradient_checkpointing=true"])
    model = peftc.materialize(plan).train()
    x = token_batch()
    model(input_ids=x, labels=x).loss.backward()
    grads = [p.grad for p in model.prompt_encoders["default"].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_p_tuning_s_lstm_dropout_acts_in_training_as_peft_s_does() -> None:
    """encoder_dropout drops between the LSTM's layers in training only: under one seed the
    training-mode logits are peft's (the same masks), and differ from evaluation's."""
    _, ours, theirs = peft_pair(
        [
            "peft=p_tuning",
            "peft.encoder_reparameterization_type=LSTM",
            "peft.encoder_num_layers=2",
            "peft.encoder_dropout=0.5",
        ]
    )
    x = token_batch()
    ours.train()
    theirs.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        trained = ours(input_ids=x).logits
        torch.manual_seed(3)
        assert max_diff(trained, theirs(input_ids=x).logits) <= 1e-5
    ours.eval()
    assert max_diff(trained, ours(input_ids=x).logits) > 1e-2, "the dropout must act in training"
