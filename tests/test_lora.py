"""LoRA against the peft package (the oracle): same weights, same outputs, same files."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import peftc
from peftc.planning.plan import Plan
from tests.helpers import build_base, max_diff, peft_lora_config, token_batch, twin_bases

CASES = [
    ("tiny_llama", []),
    ("tiny_llama", ["peft.r=4", "peft.lora_alpha=16", "peft.use_rslora=true"]),
    (
        "tiny_llama",
        ["peft.target_modules=all-linear", "peft.rank_pattern={down_proj: 2}", "peft.alpha_pattern={o_proj: 3}"],
    ),
    ("tiny_llama", ["peft.target_modules=[embed_tokens,q_proj]", "peft.lora_alpha=16"]),  # scaling 2, not 1
    ("tiny_gpt2", []),
    ("tiny_gpt2", ["peft.target_modules=all-linear", "peft.r=2"]),
]
IDS = [" ".join([m, *o]) for m, o in CASES]


def paired(model: str, overrides: list[str]) -> tuple[Plan, peftc.runtime.materialize.PeftcModel, torch.nn.Module]:
    """Our model and peft's on identical base weights, with peft's adapter weights copied into ours."""
    from peft import get_peft_model

    plan = peftc.compile([f"model={model}", "peft.init_lora_weights=false", *overrides])
    ours_base, theirs_base = twin_bases(plan)
    theirs = get_peft_model(theirs_base, peft_lora_config(plan)).eval()
    ours = peftc.materialize(plan, base_model=ours_base).eval()
    from peft import get_peft_model_state_dict

    from peftc.files.load import fill

    fill(ours, "default", get_peft_model_state_dict(theirs))
    return plan, ours, theirs


@pytest.mark.parametrize(("model", "overrides"), CASES, ids=IDS)
def test_logits_match_peft(model: str, overrides: list[str]) -> None:
    plan, ours, theirs = paired(model, overrides)
    x = token_batch()
    assert max_diff(ours(input_ids=x).logits, theirs(input_ids=x).logits) <= 1e-5
    assert max_diff(ours(input_ids=x).logits, build_base(plan)(input_ids=x).logits) > 1e-4, (
        "the adapter must change the output (sanity)"
    )


@pytest.mark.parametrize(("model", "overrides"), CASES, ids=IDS)
def test_trainable_counts_and_saved_names_match_peft(model: str, overrides: list[str]) -> None:
    from peft import get_peft_model_state_dict

    plan, ours, theirs = paired(model, overrides)
    assert plan.trainable_params == ours.trainable_parameters() == theirs.get_nb_trainable_parameters()[0]
    assert plan.total_params == ours.total_parameters() == theirs.get_nb_trainable_parameters()[1]
    assert set(ours.adapter_state_dict("default")) == set(get_peft_model_state_dict(theirs))


@pytest.mark.parametrize(("model", "overrides"), CASES, ids=IDS)
def test_adapters_load_both_ways(model: str, overrides: list[str], tmp_path) -> None:
    from peft import PeftModel

    plan, ours, theirs = paired(model, overrides)
    x = token_batch()
    expected = theirs(input_ids=x).logits
    ours.save_adapter(tmp_path / "ours")
    loaded_in_peft = PeftModel.from_pretrained(build_base(plan), tmp_path / "ours").eval()
    assert max_diff(loaded_in_peft(input_ids=x).logits, expected) <= 1e-5
    theirs.save_pretrained(tmp_path / "theirs")
    loaded_in_ours = peftc.load_adapter(build_base(plan), tmp_path / "theirs")
    assert max_diff(loaded_in_ours(input_ids=x).logits, expected) <= 1e-5


@pytest.mark.parametrize(("model", "overrides"), CASES, ids=IDS)
def test_merge_unmerge_disable_unload(model: str, overrides: list[str]) -> None:
    plan, ours, _ = paired(model, overrides)
    x = token_batch()
    base_logits = build_base(plan)(input_ids=x).logits
    adapted = ours(input_ids=x).logits
    weights_before = {k: v.clone() for k, v in ours.base_model.state_dict().items() if "lora" not in k}
    ours.merge_adapter()
    assert max_diff(ours(input_ids=x).logits, adapted) <= 1e-5
    with pytest.warns(UserWarning, match="already merged"):
        ours.merge_adapter()
    assert max_diff(ours(input_ids=x).logits, adapted) <= 1e-5
    with ours.disable_adapter():  # unmerges first: float round-off of W + d - d (peft: 1e-5)
        assert max_diff(ours(input_ids=x).logits, base_logits) <= 1e-5
    ours.merge_adapter()
    ours.unmerge_adapter()
    after = {k: v for k, v in ours.base_model.state_dict().items() if "lora" not in k}
    assert max(max_diff(weights_before[k], after[k]) for k in weights_before) <= 1e-5
    assert max_diff(ours(input_ids=x).logits, adapted) <= 1e-5
    restored = ours.unload()
    assert max_diff(restored(input_ids=x).logits, base_logits) <= 1e-5


def test_a_nested_disable_adapter_keeps_the_adapter_off_until_the_outer_block_ends() -> None:
    """A helper that disables the adapter inside a caller's own disable_adapter() block (a
    reference-model pass) must not switch it back on for the rest of the caller's block."""
    plan, ours, _ = paired("tiny_llama", [])
    x = token_batch()
    base_logits, adapted = build_base(plan)(input_ids=x).logits, ours(input_ids=x).logits
    with ours.disable_adapter():
        with ours.disable_adapter():
            pass
        assert max_diff(ours(input_ids=x).logits, base_logits) <= 1e-6
    assert max_diff(ours(input_ids=x).logits, adapted) <= 1e-6


@pytest.mark.parametrize(("model", "overrides"), CASES[:1] + CASES[4:5], ids=IDS[:1] + IDS[4:5])
def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs(model: str, overrides: list[str]) -> None:
    plan, ours, _ = paired(model, overrides)
    x = token_batch()
    adapted = ours(input_ids=x).logits
    merged = ours.merge_and_unload()
    assert type(merged) is type(build_base(plan))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert max_diff(merged(input_ids=x).logits, adapted) <= 1e-5


def test_default_init_is_an_exact_no_op() -> None:
    plan = peftc.compile(["peft.target_modules=all-linear"])
    ours_base, plain = twin_bases(plan)
    ours = peftc.materialize(plan, base_model=ours_base).eval()
    x = token_batch()
    assert torch.equal(ours(input_ids=x).logits, plain(input_ids=x).logits)


def test_safe_merge_refuses_a_broken_adapter_and_leaves_weights_bit_identical() -> None:
    plan, ours, _ = paired("tiny_llama", [])
    before = {k: v.clone() for k, v in ours.base_model.state_dict().items() if ".lora_" not in k}
    last = list(ours.adapter_layers())[-1][1]
    with torch.no_grad():
        last.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        ours.merge_and_unload(safe_merge=True)
    after = ours.base_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(layer.merged_adapters for _, layer in ours.adapter_layers())


def test_lora_bias_on_a_bias_free_linear_runs_like_peft_and_refuses_to_merge_before_touching_weights() -> None:
    """lora_B's bias on Llama's bias-free projections: the forward adds it (the fused path must not
    drop it) and merging is refused as in peft, with no weight changed."""
    from peftc.errors import MergeError
    from tests.helpers import peft_pair

    _, ours, theirs = peft_pair(["peft.lora_bias=true", "peft.init_lora_weights=false"])
    x = token_batch()
    assert max_diff(ours(input_ids=x).logits, theirs(input_ids=x).logits) <= 1e-5
    before = {k: v.clone() for k, v in ours.base_model.state_dict().items() if ".lora_" not in k}
    with pytest.raises(MergeError, match="without a bias"):
        ours.merge_adapter()
    with pytest.raises(RuntimeError, match="base layer has no bias"):
        theirs.merge_adapter()
    after = ours.base_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(layer.merged_adapters for _, layer in ours.adapter_layers())


def test_after_optimizer_steps_only_adapter_parameters_changed() -> None:
    plan, ours, _ = paired("tiny_llama", ["peft.target_modules=all-linear"])
    ours.train()
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    x = token_batch()
    for _ in range(3):
        loss = ours(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
    adapter = {n for n, p in ours.named_parameters() if ".lora_" in n}
    assert changed == adapter


def test_two_adapters_switch_and_stack() -> None:
    plan_a = peftc.compile(["peft.init_lora_weights=false"])
    plan_b = peftc.compile(["peft.init_lora_weights=false", "peft.target_modules=[q_proj,o_proj]", "peft.r=2"])
    torch.manual_seed(0)
    model = peftc.materialize(plan_a)
    model.add_adapter("other", plan_b)
    x = token_batch()
    out_a = model(input_ids=x).logits
    model.set_adapter("other")
    out_b = model(input_ids=x).logits
    assert max_diff(out_a, out_b) > 1e-4
    assert model.trainable_parameters() == plan_b.trainable_params
    model.set_adapter(["default", "other"])
    both = model(input_ids=x).logits
    assert max_diff(both, out_a) > 1e-4 and max_diff(both, out_b) > 1e-4
    model.set_adapter("default")
    assert max_diff(model(input_ids=x).logits, out_a) <= 1e-6
    model.delete_adapter("other")
    assert model.adapter_names == ["default"]
    assert not any("o_proj" in path for path, _ in model.adapter_layers())


def test_several_adapters_save_in_peft_layout_and_load_in_peft(tmp_path) -> None:
    from peft import PeftModel

    plan_a = peftc.compile(["peft.init_lora_weights=false"])
    plan_b = peftc.compile(["peft.init_lora_weights=false", "peft.r=2"])
    model = peftc.materialize(plan_a)
    model.add_adapter("second", plan_b)
    model.save_adapter(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "second" / "adapter_model.safetensors").exists()
    x = token_batch()
    model.set_adapter("second")
    expected = model(input_ids=x).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(build_base(plan_a), tmp_path)
        theirs.load_adapter(tmp_path / "second", "second")
        theirs.set_adapter("second")
    assert max_diff(theirs.eval()(input_ids=x).logits, expected) <= 1e-5


@pytest.mark.parametrize("init", ["true", "gaussian", "false", "nora"])
def test_fresh_factors_are_peft_s_draws_under_the_same_seed(init: str) -> None:
    """peft.init_lora_weights: the same random stream as peft (kaiming-uniform A, or N(0, 1/r) A,
    B zero; false: B drawn too), so a seeded run starts from the adapter peft would start from.
    (The oracle tests copy peft's tensors into ours, so only this checks our own draws.)"""
    from peft import get_peft_model, get_peft_model_state_dict

    plan = peftc.compile([f"peft.init_lora_weights={init}"])
    base = build_base(plan)
    torch.manual_seed(0)
    ours = peftc.materialize(plan, base_model=copy.deepcopy(base)).adapter_state_dict("default")
    torch.manual_seed(0)
    theirs = get_peft_model_state_dict(get_peft_model(copy.deepcopy(base), peft_lora_config(plan)))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert any(t.std() > 0 for t in theirs.values())


def test_a_float_embed_scale_is_rounded_to_the_weight_dtype_as_peft_rounds_it() -> None:
    """BART keeps embed_scale as a Python float (sqrt(48) here, not a bf16 number); peft multiplies
    the float32 adapter's lookup by it rounded to the base weight's dtype, so a bf16 base gives
    bit-identical embeddings only with that rounding."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from peftc.files.load import fill
    from tests.method_cases import TINY_BART

    plan = peftc.compile(
        ["model=tiny_t5", *TINY_BART, "model.config.d_model=48", "model.dtype=bfloat16"]
        + ["peft.target_modules=[embed_tokens]", "peft.init_lora_weights=false"]
    )
    base = build_base(plan)
    asked = LoraConfig(
        task_type="SEQ_2_SEQ_LM", target_modules=["embed_tokens"], init_lora_weights=False, r=plan.spec.peft.r
    )
    theirs = get_peft_model(copy.deepcopy(base), asked, autocast_adapter_dtype=True)
    ours = peftc.materialize(plan, base_model=base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: save_embedding_layers set to True
        fill(ours, "default", get_peft_model_state_dict(theirs))

    def encoder_embedding(model: torch.nn.Module) -> torch.nn.Module:
        return next(m for name, m in model.named_modules() if name.endswith("encoder.embed_tokens"))

    x = token_batch()
    with torch.no_grad():
        expected = encoder_embedding(theirs)(x)
        assert expected.dtype == torch.bfloat16
        assert torch.equal(encoder_embedding(ours)(x), expected)
