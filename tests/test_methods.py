"""Every injectable method against the peft package (the oracle): one case list, one test body
per behaviour.

A case is (method, model, overrides): Hydra overrides for a model= option, or spec fields
(`conv_spec`) for the convolutional test model of tests/conv_model.py. The oracle's config is
built by peft itself from OUR adapter_config.json (`peft.get_peft_config`), so each case also
checks our config mapping. Adapters start from peft's non-identity init (`RANDOM_INIT`) and our
adapter receives peft's weights, so the two models hold the same numbers. To cover a new
method or option, add a case; to cover a new method, also add its non-identity init.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import peftc
from peftc import io, methods
from peftc.adapters import fill
from peftc.model import PeftcModel
from peftc.plan import Plan
from tests.conv_model import TinyConvNet, images, plan_for
from tests.helpers import build_base, max_diff, token_batch

# The field that makes a fresh adapter a non-identity (peft's init_weights=False equivalent).
RANDOM_INIT = {
    "lora": "init_lora_weights",
    "ia3": "init_ia3_weights",
    "loha": "init_weights",
    "lokr": "init_weights",
    "oft": "init_weights",
    "adalora": "init_lora_weights",
}

# peft keeps some adapter bookkeeping as frozen Parameters that peftc keeps as plain numbers.
PEFT_ONLY_PARAMS = ("ranknum",)  # AdaLoRA: the initial rank, used in the scaling


@dataclass(frozen=True)
class Case:
    method: str
    model: str  # a model= option, or "conv" for tests.conv_model.TinyConvNet
    overrides: tuple[str, ...] = ()
    conv_spec: tuple[tuple[str, Any], ...] = ()  # spec fields for model="conv" (tuples: hashable)
    tolerance: float = 1e-5  # float32 outputs, ours vs peft's

    @property
    def id(self) -> str:
        fields = [f"{k}={v}" for k, v in self.conv_spec]
        return " ".join([self.method, self.model, *self.overrides, *fields])

    @property
    def conv(self) -> bool:
        return self.model == "conv"

    def compile(self) -> Plan:
        return _compiled(self)

    def base(self, plan: Plan) -> torch.nn.Module:
        return TinyConvNet() if self.conv else build_base(plan)

    def inputs(self) -> torch.Tensor:
        return images() if self.conv else token_batch()

    def loss(self, model: torch.nn.Module) -> torch.Tensor:
        x = self.inputs()
        return model(input_ids=x).square().mean() if self.conv else model(input_ids=x, labels=x).loss


@functools.cache
def _compiled(case: Case) -> Plan:  # plans are immutable; composing dominates a pairing's cost
    init = RANDOM_INIT[case.method]
    if case.conv:
        schema = methods.get(case.method).schema
        return plan_for(TinyConvNet(), schema(**dict(case.conv_spec), **{init: False}))
    return peftc.compile([f"peft={case.method}", f"model={case.model}", f"peft.{init}=false", *case.overrides])


CASES = [
    Case("lora", "tiny_llama"),
    Case("lora", "tiny_llama", ("peft.target_modules=all-linear", "peft.r=4", "peft.modules_to_save=[lm_head]")),
    Case("lora", "tiny_gpt2"),
    Case("ia3", "tiny_llama"),
    Case("ia3", "tiny_llama", ("peft.target_modules=[q_proj,up_proj,down_proj]", "peft.feedforward_modules=[up_proj]")),
    Case("ia3", "tiny_llama", ("peft.target_modules=[q_proj,o_proj]",)),  # default feed-forward matches no target
    Case("ia3", "tiny_gpt2"),
    Case("ia3", "tiny_gpt2", ("peft.target_modules=all-linear", "peft.feedforward_modules=.*mlp\\.c_proj")),
    Case("loha", "tiny_llama"),
    Case(
        "loha",
        "tiny_llama",
        (
            "peft.target_modules=all-linear",
            "peft.r=2",
            "peft.rank_pattern={up_proj: 4}",
            "peft.alpha_pattern={o_proj: 3}",
            "peft.modules_to_save=[lm_head]",
        ),
    ),
    Case("lokr", "tiny_llama"),
    Case(
        "lokr",
        "tiny_llama",
        (
            "peft.target_modules=all-linear",
            "peft.r=2",
            "peft.decompose_both=true",
            "peft.rank_pattern={gate_proj: 6}",
            "peft.alpha_pattern={k_proj: 5}",
        ),
    ),
    Case(
        "lokr",
        "tiny_llama",
        (
            "peft.target_modules=[o_proj,down_proj]",
            "peft.decompose_factor=4",
            "peft.r=1",
            "peft.layers_to_transform=[1]",
        ),
    ),
    Case("oft", "tiny_llama"),
    Case(
        "oft",
        "tiny_llama",
        ("peft.target_modules=all-linear", "peft.oft_block_size=0", "peft.r=8", "peft.use_cayley_neumann=false"),
    ),
    Case(
        "oft",
        "tiny_llama",
        (
            "peft.target_modules=[q_proj,down_proj,embed_tokens]",
            "peft.oft_block_size=16",
            "peft.block_share=true",
            "peft.num_cayley_neumann_terms=3",
        ),
    ),
    Case(
        "oft",
        "tiny_llama",
        ("peft.target_modules=[k_proj,up_proj]", "peft.coft=true", "peft.eps=0.05", "peft.modules_to_save=[lm_head]"),
    ),
    Case(
        "oft",
        "tiny_llama",
        ("peft.oft_block_size=24", "peft.adjust_block_size=true", "peft.target_modules=[q_proj,down_proj]"),
    ),
    # AdaLoRA's random init draws A, E, B from N(0, 1): a small lora_alpha keeps the update the
    # size of the base weights (alpha=8 makes it ~300x larger, and logits then differ by ~1e-5
    # from float32 rounding alone).
    Case("adalora", "tiny_llama", ("peft.lora_alpha=0.01",)),
    Case(
        "adalora",
        "tiny_llama",
        (
            "peft.target_modules=[q_proj,k_proj,o_proj,down_proj]",
            "peft.init_r=4",
            "peft.target_r=2",
            "peft.lora_alpha=0.02",
            "peft.layers_to_transform=[0]",
            "peft.modules_to_save=[lm_head]",
        ),
    ),
    Case("adalora", "tiny_gpt2", ("peft.lora_alpha=0.01",)),
    # Convolutions (tests/conv_model.py: conv 3x3, pointwise 1x1, grouped 3x3 groups=2, seq Conv1d k3, head Linear)
    Case(
        "ia3",
        "conv",
        conv_spec=(
            ("target_modules", ("conv", "pointwise", "grouped")),
            ("feedforward_modules", ("pointwise", "grouped")),
        ),
    ),
    Case("loha", "conv", conv_spec=(("target_modules", ("conv", "pointwise", "grouped", "seq", "head")), ("r", 2))),
    Case(
        "loha",
        "conv",
        conv_spec=(("target_modules", ("conv", "pointwise", "seq")), ("r", 2), ("use_effective_conv2d", True)),
    ),
    Case("lokr", "conv", conv_spec=(("target_modules", ("conv", "pointwise", "grouped", "seq")), ("r", 1))),
    # (not "seq": peft 0.21 cannot run LoKr's CP form on a Conv1d, a torch.kron stride quirk peftc avoids)
    Case(
        "lokr",
        "conv",
        conv_spec=(
            ("target_modules", ("conv", "pointwise")),
            ("r", 1),
            ("decompose_both", True),
            ("use_effective_conv2d", True),
        ),
    ),
    Case("lokr", "conv", conv_spec=(("target_modules", ("conv", "pointwise", "seq")), ("r", 8))),  # full W2
    Case(
        "adalora",
        "conv",
        conv_spec=(
            ("target_modules", ("conv", "pointwise", "head")),
            ("init_r", 4),
            ("target_r", 2),
            ("lora_alpha", 0.1),
        ),
    ),
]
IDS = [case.id for case in CASES]


@dataclass
class Pair:
    plan: Plan
    ours: PeftcModel
    theirs: torch.nn.Module


def oracle_config(plan: Plan, case: Case) -> object:
    """peft's config for a plan, built by peft from the adapter_config.json we would write."""
    from peft import get_peft_config

    config = {**io.adapter_config(plan), "inference_mode": False}
    if case.conv:
        config["task_type"] = None  # a plain nn.Module: peft's task wrappers expect a transformers model
    return get_peft_config(config)


def paired(case: Case) -> Pair:
    """Our model and peft's on identical base weights, with peft's adapter weights copied into ours."""
    from peft import get_peft_model, get_peft_model_state_dict

    plan = case.compile()
    torch.manual_seed(0)  # peft's random init: the same numbers whatever ran before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on fan_in_fan_out, rank_pattern, ...
        theirs = get_peft_model(case.base(plan), oracle_config(plan, case)).eval()
    ours = peftc.materialize(plan, base_model=case.base(plan)).eval()
    fill(ours, plan.adapter_name, get_peft_model_state_dict(theirs))
    return Pair(plan, ours, theirs)


def output(model: torch.nn.Module, case: Case) -> torch.Tensor:
    with torch.no_grad():
        result = model(input_ids=case.inputs())
    return result if case.conv else result.logits


def logits(model: torch.nn.Module) -> torch.Tensor:
    """A causal LM's logits on the shared token batch."""
    with torch.no_grad():
        return model(input_ids=token_batch()).logits


def base_weights(model: PeftcModel) -> dict[str, torch.Tensor]:
    """Copies of the base tensors of every adapted layer (what merging may change)."""
    return {
        f"{path}.{name}": tensor.detach().clone()
        for path, layer in model.adapter_layers()
        for name, tensor in layer.base_layer.state_dict().items()
    }


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_outputs_match_peft(case: Case) -> None:
    pair = paired(case)
    ours = output(pair.ours, case)
    assert max_diff(ours, output(pair.theirs, case)) <= case.tolerance
    # sanity: the adapter changes the output by far more than the parity tolerance
    assert max_diff(ours, output(case.base(pair.plan), case)) > 10 * case.tolerance


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parameter_counts_match_peft_and_the_plan(case: Case) -> None:
    pair = paired(case)
    plan, ours, theirs = pair.plan, pair.ours, pair.theirs
    theirs_trainable, theirs_total = theirs.get_nb_trainable_parameters()
    assert plan.trainable_params == ours.trainable_parameters() == theirs_trainable
    peft_only = sum(p.numel() for n, p in theirs.named_parameters() if any(f".{x}." in n for x in PEFT_ONLY_PARAMS))
    assert plan.total_params == ours.total_parameters() == theirs_total - peft_only
    for site in plan.sites:
        layer = ours.base_model.get_submodule(site.path)
        created = {suffix: tuple(t.shape) for suffix, t in layer.adapter_tensors(plan.adapter_name).items()}
        assert created == {suffix: tuple(shape) for suffix, shape in site.tensors.items()}, site.path
        assert sum(p.numel() for p in layer.adapter_parameters(plan.adapter_name)) == site.params


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_saved_tensor_names_match_peft(case: Case) -> None:
    from peft import get_peft_model_state_dict

    pair = paired(case)
    assert set(pair.ours.adapter_state_dict(pair.plan.adapter_name)) == set(get_peft_model_state_dict(pair.theirs))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adapters_load_both_ways(case: Case, tmp_path) -> None:
    from peft import PeftModel

    pair = paired(case)
    expected = output(pair.theirs, case)
    pair.ours.save_adapter(tmp_path / "ours")
    config = oracle_config(pair.plan, case) if case.conv else None  # peft would wrap a task model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_in_peft = PeftModel.from_pretrained(case.base(pair.plan), tmp_path / "ours", config=config).eval()
    assert max_diff(output(loaded_in_peft, case), expected) <= case.tolerance
    pair.theirs.save_pretrained(tmp_path / "theirs")
    if case.conv:  # peft writes task_type null for a plain module; say which task ours plans for
        path = tmp_path / "theirs" / io.CONFIG_NAME
        path.write_text(json.dumps({**json.loads(path.read_text()), "task_type": "CAUSAL_LM"}))
    loaded_in_ours = peftc.load_adapter(case.base(pair.plan), tmp_path / "theirs")
    assert max_diff(output(loaded_in_ours, case), expected) <= case.tolerance


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_unmerge_disable_unload(case: Case) -> None:
    pair = paired(case)
    ours = pair.ours
    base_output = output(case.base(pair.plan), case)
    adapted = output(ours, case)
    before = base_weights(ours)
    ours.merge_adapter()
    merged = output(ours, case)
    assert max_diff(merged, adapted) <= case.tolerance
    with pytest.warns(UserWarning, match="already merged"):
        ours.merge_adapter()
    assert max_diff(output(ours, case), merged) <= 1e-6
    ours.unmerge_adapter()
    after = base_weights(ours)
    assert max(max_diff(before[k], after[k]) for k in before) <= 1e-6
    assert max_diff(output(ours, case), adapted) <= case.tolerance
    ours.merge_adapter()
    with ours.disable_adapter():  # unmerges first
        assert max_diff(output(ours, case), base_output) <= case.tolerance
    assert max_diff(output(ours, case), adapted) <= case.tolerance
    restored = ours.unload()
    assert max_diff(output(restored, case), base_output) <= case.tolerance


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_optimizer_steps_change_only_adapter_parameters(case: Case) -> None:
    ours = paired(case).ours.train()
    adapter_ids = {
        id(p) for _, layer in ours.adapter_layers() for n in layer.adapter_names for p in layer.adapter_parameters(n)
    }
    adapter_ids |= {id(p) for _, wrapper in ours.saved_modules() for p in wrapper.modules_to_save.parameters()}
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        case.loss(ours).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in ours.named_parameters() if id(p) in adapter_ids}


def weight_methods() -> list[str]:
    """Methods whose adapters change layer weights (the harness's subject; adaption prompts and
    prompt methods have their own tests)."""
    return sorted(name for name, m in methods.all_methods().items() if m.kind == "injectable" and m.mergeable)


@pytest.mark.parametrize("method", weight_methods())
def test_default_init_is_an_exact_no_op(method: str) -> None:
    plan = peftc.compile([f"peft={method}"])
    plain = build_base(plan)
    ours = peftc.materialize(plan, base_model=build_base(plan)).eval()
    assert torch.equal(logits(ours), logits(plain))


@pytest.mark.parametrize("method", sorted(RANDOM_INIT))
def test_safe_merge_refuses_a_broken_adapter_and_keeps_weights_bit_identical(method: str) -> None:
    plan = peftc.compile([f"peft={method}", f"peft.{RANDOM_INIT[method]}=false"])
    model = peftc.materialize(plan)
    before = base_weights(model)
    _, layer = list(model.adapter_layers())[-1]
    with torch.no_grad():
        next(layer.adapter_parameters(plan.adapter_name)).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        model.merge_and_unload(safe_merge=True)
    after = base_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(layer.merged_adapters for _, layer in model.adapter_layers())


def test_every_method_with_a_non_identity_init_has_a_case() -> None:
    covered = {case.method for case in CASES}
    assert set(weight_methods()) <= covered <= set(RANDOM_INIT)


@pytest.mark.parametrize("method", weight_methods())
def test_two_active_adapters_stack_like_peft(method: str) -> None:
    """A second adapter of the same method: alone and stacked with the first, as in peft."""
    from peft import get_peft_model_state_dict

    small = ("peft.lora_alpha=0.01",) if method == "adalora" else ()
    pair = paired(Case(method, "tiny_llama", small))
    other = Case(method, "tiny_llama", ("peft.target_modules=[v_proj,o_proj]", *small)).compile()
    config = oracle_config(other, CASES[0])
    config.inference_mode = method == "adalora"  # peft trains one AdaLoRA adapter at a time
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pair.theirs.add_adapter("other", config)
    pair.ours.add_adapter("other", other)
    fill(pair.ours, "other", get_peft_model_state_dict(pair.theirs, adapter_name="other"))
    for active in (["other"], ["default", "other"]):
        pair.theirs.base_model.set_adapter(active)
        pair.ours.set_adapter(active)
        assert max_diff(logits(pair.ours), logits(pair.theirs)) <= 1e-5, active
    assert max_diff(logits(pair.ours), logits(build_base(pair.plan))) > 1e-4
