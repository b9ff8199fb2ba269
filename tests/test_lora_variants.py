"""LoRA's own facts beyond the per-method parity harness (the LoRA variant cases, DoRA,
PiSSA/OLoRA/orthogonal, bias, lora_bias, conv sites and a classifier, are in
tests/method_cases.py and run through every test of tests/test_methods.py against peft).

Here: DoRA's magnitude init, that every initialisation starts as the base model, the refusals
(named config and plan errors, peft features refused on load), half-precision merges
restoring the weights bit for bit, target_parameters beyond the harness (stacked adapters,
what peft refuses beside it), and nn.MultiheadAttention's gradients and refusals. (The grouped-conv merge refusal is the harness's
`mergeable=False` case.)
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import peftc
from peftc.files import adapter_files
from peftc.methods.lora.method import LoraSpec
from tests.conv_model import TinyConvNet, plan_for
from tests.helpers import PISSA_ROUNDING, ROUNDING_INITS, build_base, max_diff, token_batch
from tests.method_cases import CASES, output, paired, stack_second_adapter
from tests.moe_model import TinyMoE, features


# ------------------------------------------------------------------------------ targeted facts
def test_default_dora_magnitude_is_the_row_norm_of_the_base_weight() -> None:
    plan = peftc.compile(["peft.use_dora=true"])
    base = build_base(plan)
    weight = base.get_submodule(plan.sites[0].path).weight.detach().clone()
    model = peftc.materialize(plan, base_model=base)
    magnitude = model.base_model.get_submodule(plan.sites[0].path).lora_magnitude_vector["default"]
    assert torch.allclose(magnitude, weight.norm(dim=1), atol=1e-6)


@pytest.mark.parametrize("init", ["true", "gaussian", "orthogonal", "pissa", "olora", "pissa_niter_3", "nora"])
def test_every_initialisation_starts_as_the_base_model(init: str) -> None:
    plan = peftc.compile([f"peft.init_lora_weights={init}", "peft.r=4", "peft.use_dora=true"])
    base = build_base(plan)
    x = token_batch()
    expected = base(input_ids=x).logits
    model = peftc.materialize(plan, base_model=base).eval()
    rounds = init.startswith(ROUNDING_INITS)
    assert max_diff(model(input_ids=x).logits, expected) <= (PISSA_ROUNDING if rounds else 1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_rewriting_inits_with_a_scaling_other_than_one_take_peft_s_factors_and_residual(init: str) -> None:
    """lora_alpha / r = 4: PiSSA's factors carry sqrt(S / scaling), so s B A is still W's principal
    part; the base keeps the same residual as peft's."""
    import copy

    from peft import get_peft_model, get_peft_model_state_dict

    from tests.helpers import peft_lora_config

    overrides = [f"peft.init_lora_weights={init}", "peft.r=4", "peft.lora_alpha=16", "peft.target_modules=[q_proj]"]
    plan = peftc.compile(overrides)
    base = build_base(plan)
    ours = peftc.materialize(plan, base_model=copy.deepcopy(base)).eval()
    theirs = get_peft_model(copy.deepcopy(base), peft_lora_config(plan)).eval()
    expected = get_peft_model_state_dict(theirs)
    tensors = ours.adapter_state_dict("default")
    assert all(max_diff(tensors[k], expected[k]) <= 1e-5 for k in expected)
    x = token_batch()
    with torch.no_grad(), ours.disable_adapter(), theirs.disable_adapter():
        assert max_diff(ours(input_ids=x).logits, theirs(input_ids=x).logits) <= 1e-5


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        (["peft.init_lora_weights=orthogonal", "peft.r=3"], "peft.init_lora_weights", "even"),
        (
            ["peft.init_lora_weights=orthogonal", "peft.r=4", "peft.rank_pattern={q_proj: 3}"],
            "peft.init_lora_weights",
            "even",
        ),
        (["peft.lora_bias=true", "peft.use_dora=true"], "peft.lora_bias", "DoRA"),
        (["peft.lora_bias=true", "peft.init_lora_weights=pissa"], "peft.lora_bias", "true or false"),
        (["peft.lora_bias=true", "peft.target_modules=[embed_tokens]"], "peft.lora_bias", "embeddings"),
        (["peft.init_lora_weights=pissa", "peft.r=65"], "peft.init_lora_weights", "r <= min(in, out)"),
        (["peft.bias=some"], "peft.bias", "none"),
    ],
)
def test_invalid_lora_options_are_named_config_errors(overrides: list[str], key: str, fragment: str) -> None:
    with pytest.raises(peftc.ConfigError) as info:
        peftc.compile(overrides)
    assert str(info.value).startswith(key) and fragment in str(info.value)


def test_base_rewriting_inits_take_a_rank_up_to_min_in_out() -> None:
    """r = min(in, out) = 64 (q_proj) is the full rank, which PiSSA and OLoRA accept (65 is refused above)."""
    plan = peftc.compile(["peft.init_lora_weights=pissa", "peft.r=64", "peft.target_modules=[q_proj]"])
    assert {site.options["r"] for site in plan.sites} == {64}


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ({"target_modules": ["conv"], "init_lora_weights": "pissa"}, "peft.init_lora_weights"),
        ({"target_modules": ["grouped"], "r": 3}, "peft.r"),
    ],
)
def test_conv_combinations_peft_refuses_are_plan_errors(spec: dict[str, Any], key: str) -> None:
    with pytest.raises(peftc.PlanError, match=key):
        plan_for(TinyConvNet(), LoraSpec(**spec))


def test_half_precision_merge_unmerge_restores_the_weights_bit_for_bit() -> None:
    plan = peftc.compile(["peft.use_dora=true", "peft.init_lora_weights=false", "peft.target_modules=all-linear"])
    base = build_base(plan).to(torch.bfloat16)
    before = {k: v.clone() for k, v in base.state_dict().items()}

    def base_tensors() -> dict[str, torch.Tensor]:
        return {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if ".lora_" not in k}

    model = peftc.materialize(plan, base_model=base)
    model.merge_adapter()
    assert any(not torch.equal(before[k], v) for k, v in base_tensors().items())
    assert {v.dtype for v in base_tensors().values()} == {torch.bfloat16}, "merged weights keep the base's dtype"
    model.unmerge_adapter()
    assert all(torch.equal(before[k], v) for k, v in base_tensors().items())


def test_tied_trainable_tokens_merge_into_the_shared_weight_and_unmerge_bit_for_bit() -> None:
    """On GPT-2's tied embedding the head follows the embedding's rows; in bfloat16 a merge writes
    them into the one shared weight and an unmerge of both layers leaves it exactly as it was."""
    plan = peftc.compile(["model=tiny_gpt2", "peft.trainable_token_indices=[13,51]", "peft.init_lora_weights=false"])
    base = build_base(plan).to(torch.bfloat16)
    shared = base.get_input_embeddings().weight
    before = shared.detach().clone()
    model = peftc.materialize(plan, base_model=base)
    assert base.lm_head.base_layer.weight is shared, "the head still shares the embedding's weight"
    model.merge_adapter()
    assert not torch.equal(shared[[13, 51]], before[[13, 51]]) and torch.equal(shared[:13], before[:13])
    model.unmerge_adapter()  # the head unmerges after the embedding: it must not restore merged rows
    assert torch.equal(shared, before)


def test_peft_features_peftc_lacks_are_refused_on_load(tmp_path: Path) -> None:
    plan = peftc.compile([])
    model = peftc.materialize(plan)
    model.save_adapter(tmp_path)
    path = tmp_path / adapter_files.CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), "layer_replication": [[0, 1]]}))
    with pytest.raises(peftc.AdapterFileError, match="layer_replication"):
        peftc.load_adapter(build_base(plan), tmp_path)


# ------------------------------------------------------------------- target_parameters (MoE)
EXPERT_CASE = next(
    c for c in CASES if dict(c.spec_fields).get("target_parameters") == ("experts.gate_up_proj", "experts.down_proj")
)


@pytest.mark.parametrize(
    ("fields", "key", "fragment"),
    [
        ({"lora_dropout": 0.1}, "peft.lora_dropout", "peft refuses"),
        ({"use_dora": True}, "peft.use_dora", "peft refuses"),
        ({"lora_bias": True}, "peft.lora_bias", "peft refuses"),
        ({"init_lora_weights": "pissa"}, "peft.init_lora_weights", "true, false, gaussian and nora"),
        ({"target_parameters": []}, "peft.target_parameters", "non-empty list"),
        ({"target_parameters": ["experts.gate_up"]}, "peft.target_parameters", "did you mean 'experts.gate_up_proj'"),
        ({"target_parameters": ["mixer"]}, "peft.target_parameters", "name its parameter, e.g. mixer.weight"),
        (
            {"target_parameters": ["router.weight"], "target_modules": ["router"]},
            "peft.target_parameters",
            "also a LoRA target",
        ),
    ],
)
def test_target_parameters_misuse_is_named(fields: dict[str, Any], key: str, fragment: str) -> None:
    spec = {"target_modules": [], "target_parameters": ["experts.gate_up_proj"], **fields}
    with pytest.raises(peftc.ConfigError) as info:
        plan_for(TinyMoE(), LoraSpec(**spec))
    assert str(info.value).startswith(key) and fragment in str(info.value)


def test_rank_and_alpha_patterns_pick_expert_stacks_by_parameter_name_like_peft() -> None:
    """rank_pattern / alpha_pattern keys match a targeted parameter's name (down_proj), as in
    peft, where both parameters of `experts` share one module path."""
    from peft import LoraConfig, get_peft_model

    fields = {
        "target_modules": [],
        "target_parameters": ["experts.gate_up_proj", "experts.down_proj"],
        "r": 2,
        "rank_pattern": {"down_proj": 4},
        "alpha_pattern": {"down_proj": 8},
    }
    theirs = get_peft_model(TinyMoE(), LoraConfig(**fields))
    wrappers = [m for m in theirs.modules() if type(m).__name__ == "ParamWrapper"]
    expected = sorted((m.r["default"], m.scaling["default"]) for m in wrappers)
    plan = plan_for(TinyMoE(), LoraSpec(**fields))
    assert sorted((site.options["r"], site.options["scaling"]) for site in plan.sites) == expected
    assert expected == [(2, 4.0), (4, 2.0)]


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_fresh_factors_on_expert_stacks_are_peft_s_draws_under_the_same_seed(init: Any) -> None:
    """gaussian draws A ~ N(0, 1/r) with the per-expert rank r (peft's `self.r`), not r * experts.
    (One parameter per module: peftc draws nested wrappers outermost first, peft innermost first.)"""
    import copy

    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    fields = {
        "target_modules": [],
        "target_parameters": ["experts.down_proj", "mixer.weight"],
        "r": 2,
        "init_lora_weights": init,
    }
    base = TinyMoE()
    torch.manual_seed(0)
    ours = peftc.materialize(plan_for(base, LoraSpec(**fields)), base_model=copy.deepcopy(base))
    torch.manual_seed(0)
    theirs = get_peft_model_state_dict(get_peft_model(copy.deepcopy(base), LoraConfig(**fields)))
    ours_tensors = ours.adapter_state_dict("default")
    assert ours_tensors.keys() == theirs.keys()
    assert all(torch.equal(ours_tensors[k], theirs[k]) for k in theirs)


def test_nora_on_expert_stacks_normalises_each_expert_s_columns() -> None:
    """NoRA on a 3-D stack: A holds one (r, in) block per expert, each column of each block at unit
    norm (peft 0.22's nora_init; its own ParamWrapper crashes before reaching it on a module
    without a .weight, so the rule is checked directly), B zero: the model is unchanged."""
    base = TinyMoE()
    fields = {"target_modules": [], "target_parameters": ["experts.down_proj"], "r": 2, "init_lora_weights": "nora"}
    model = peftc.materialize(plan_for(base, LoraSpec(**fields)), base_model=copy.deepcopy(base))
    tensors = model.adapter_state_dict("default")
    a = next(v for k, v in tensors.items() if k.endswith("lora_A.weight"))
    b = next(v for k, v in tensors.items() if k.endswith("lora_B.weight"))
    experts = base.experts.down_proj.shape[0]
    norms = a.view(experts, 2, -1).norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    assert a.view(experts, 2, -1).norm(dim=2).std() > 0 and not b.any()
    with torch.no_grad():
        assert max_diff(model(input_ids=features()), base(input_ids=features())) <= 1e-6


def test_parameters_peft_cannot_wrap_are_plan_errors() -> None:
    with pytest.raises(peftc.PlanError, match="2-D and 3-D"):
        plan_for(TinyConvNet(), LoraSpec(target_modules=[], target_parameters=["conv.weight"]))  # 4-D
    model = TinyMoE()
    model.temperature = torch.nn.Parameter(torch.ones(2, 2))
    with pytest.raises(peftc.PlanError, match="TinyMoE itself"):
        plan_for(model, LoraSpec(target_modules=[], target_parameters=["temperature"]))


def test_target_parameters_over_a_quantized_base_are_refused() -> None:
    with pytest.raises(peftc.ConfigError, match="unquantized models only, not with quant=quanto_int8"):
        peftc.compile(["quant=quanto_int8", "peft.target_parameters=[down_proj.weight]"])


def test_two_adapters_on_expert_stacks_stack_like_peft() -> None:
    pair = paired(EXPERT_CASE)
    stack_second_adapter(pair, EXPERT_CASE)
    both = output(pair.ours, EXPERT_CASE)
    assert max_diff(both, output(pair.theirs, EXPERT_CASE)) <= 1e-5
    pair.ours.set_adapter("default")
    assert max_diff(both, output(pair.ours, EXPERT_CASE)) > 1e-3  # the second adapter counts


def test_adapters_on_other_parameters_of_a_wrapped_module_are_refused() -> None:
    model = peftc.materialize(EXPERT_CASE.compile(), base_model=TinyMoE())
    other = plan_for(TinyMoE(), LoraSpec(target_modules=[], target_parameters=["experts.gate_up_proj"]))
    with pytest.raises(peftc.PlanError, match="must target the same parameters"):
        model.add_adapter("other", other)
    assert model.adapter_names == ["default"]
    assert all(layer.adapter_names == ["default"] for _, layer in model.adapter_layers())
    with pytest.raises(
        peftc.ConfigError, match="target parameters or MultiheadAttention, which peftc does not combine"
    ):
        model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="linear")


# ------------------------------------------------------------------- nn.MultiheadAttention
ATTENTION_CASE = next(c for c in CASES if c.model == "mha")


def test_attention_gradients_are_the_chain_rule_through_peft_s_merged_weights() -> None:
    """peft 0.22's own backward skips out_proj's update (MHA_GRADIENTS marks it); peftc's adapter
    gradients are those of the function peft's forward computes: with G = dL/dW of peft's merged
    attention (W + s B A for in_proj and out_proj), dL/dA = s B^T G and dL/dB = s G A^T."""
    pair = paired(ATTENTION_CASE)
    ATTENTION_CASE.loss(pair.ours.train()).backward()
    merged = pair.theirs.merge_and_unload().requires_grad_(True)
    ATTENTION_CASE.loss(merged).backward()
    scaling = pair.plan.sites[0].options["scaling"]
    ours = pair.ours.adapter_state_dict("default")
    merged_weights = {"attn": merged.attn.in_proj_weight, "attn.base_layer.out_proj": merged.attn.out_proj.weight}
    for path, weight in merged_weights.items():
        a, b = (ours[f"base_model.model.{path}.lora_{x}.weight"] for x in "AB")
        for tensor, grad in ((a, scaling * b.detach().T @ weight.grad), (b, scaling * weight.grad @ a.detach().T)):
            assert max_diff(tensor.grad, grad) <= 1e-5 * max(1.0, grad.abs().max().item()), path


@pytest.mark.parametrize(
    ("fields", "key", "fragment"),
    [
        ({"use_dora": True}, "peft.use_dora", "peft does not implement DoRA there"),
        ({"lora_bias": True}, "peft.lora_bias", "peft 0.22 refuses it there too"),
        ({"init_lora_weights": "orthogonal"}, "peft.init_lora_weights", "true, false and gaussian"),
        ({"target_modules": ["out_proj"]}, "peft.target_modules", "never calls it"),
    ],
)
def test_attention_combinations_peft_refuses_are_named(fields: dict[str, Any], key: str, fragment: str) -> None:
    from tests.attention_model import TinyAttention

    with pytest.raises(peftc.PlanError) as info:
        plan_for(TinyAttention(), LoraSpec(**{"target_modules": ["attn"], **fields}))
    assert str(info.value).startswith(key) and fragment in str(info.value)


def test_attention_with_keys_of_another_size_is_refused_like_peft() -> None:
    from tests.attention_model import TinyAttention

    model = TinyAttention()
    model.attn = torch.nn.MultiheadAttention(8, 2, kdim=6, vdim=6)
    with pytest.raises(peftc.PlanError, match="keys/values of another size"):
        plan_for(model, LoraSpec(target_modules=["attn"]))
