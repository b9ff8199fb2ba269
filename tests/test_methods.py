"""Every injectable method against the peft package (the oracle): one case list, one test body
per behaviour.

A case is (method, model, overrides). The oracle's config is built by peft itself from OUR
adapter_config.json (`peft.get_peft_config`), so each case also checks our config mapping.
Adapters start from peft's non-identity init (`RANDOM_INIT`) and our adapter receives peft's
weights, so the two models hold the same numbers. To cover a new method or option, add a
case; to cover a new method, also add its non-identity init override.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import pytest
import torch

import peftc
from peftc import io, methods
from peftc.adapters import fill
from peftc.model import PeftcModel
from peftc.plan import Plan
from tests.helpers import build_base, max_diff, token_batch, twin_bases

# The override that makes a fresh adapter a non-identity (peft's init_weights=False equivalent).
RANDOM_INIT = {
    "lora": "peft.init_lora_weights=false",
    "ia3": "peft.init_ia3_weights=false",
    "loha": "peft.init_weights=false",
    "lokr": "peft.init_weights=false",
    "oft": "peft.init_weights=false",
    "adalora": "peft.init_lora_weights=false",
}

# peft keeps some adapter bookkeeping as frozen Parameters that peftc keeps as plain numbers.
PEFT_ONLY_PARAMS = ("ranknum",)  # AdaLoRA: the initial rank, used in the scaling


@dataclass(frozen=True)
class Case:
    method: str
    model: str
    overrides: tuple[str, ...] = ()
    tolerance: float = 1e-5  # float32 logits, ours vs peft's

    @property
    def id(self) -> str:
        return " ".join([self.method, self.model, *self.overrides])

    def compile(self) -> Plan:
        return _compiled(self)


@functools.cache
def _compiled(case: Case) -> Plan:  # plans are immutable; composing dominates a pairing's cost
    return peftc.compile([f"peft={case.method}", f"model={case.model}", RANDOM_INIT[case.method], *case.overrides])


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
]
IDS = [case.id for case in CASES]


@dataclass
class Pair:
    plan: Plan
    ours: PeftcModel
    theirs: torch.nn.Module


def oracle_config(plan: Plan) -> object:
    """peft's config for a plan, built by peft from the adapter_config.json we would write."""
    from peft import get_peft_config

    return get_peft_config({**io.adapter_config(plan), "inference_mode": False})


def paired(case: Case) -> Pair:
    """Our model and peft's on identical base weights, with peft's adapter weights copied into ours."""
    from peft import get_peft_model, get_peft_model_state_dict

    plan = case.compile()
    ours_base, theirs_base = twin_bases(plan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on fan_in_fan_out, rank_pattern, ...
        theirs = get_peft_model(theirs_base, oracle_config(plan)).eval()
    ours = peftc.materialize(plan, base_model=ours_base).eval()
    fill(ours, plan.adapter_name, get_peft_model_state_dict(theirs))
    return Pair(plan, ours, theirs)


def logits(model: torch.nn.Module) -> torch.Tensor:
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
def test_logits_match_peft(case: Case) -> None:
    pair = paired(case)
    ours = logits(pair.ours)
    assert max_diff(ours, logits(pair.theirs)) <= case.tolerance
    assert max_diff(ours, logits(build_base(pair.plan))) > 1e-3, "the adapter must change the output (sanity)"


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
    expected = logits(pair.theirs)
    pair.ours.save_adapter(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_in_peft = PeftModel.from_pretrained(build_base(pair.plan), tmp_path / "ours").eval()
    assert max_diff(logits(loaded_in_peft), expected) <= case.tolerance
    pair.theirs.save_pretrained(tmp_path / "theirs")
    loaded_in_ours = peftc.load_adapter(build_base(pair.plan), tmp_path / "theirs")
    assert max_diff(logits(loaded_in_ours), expected) <= case.tolerance


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_unmerge_disable_unload(case: Case) -> None:
    pair = paired(case)
    ours = pair.ours
    base_logits = logits(build_base(pair.plan))
    adapted = logits(ours)
    before = base_weights(ours)
    ours.merge_adapter()
    merged = logits(ours)
    assert max_diff(merged, adapted) <= case.tolerance
    with pytest.warns(UserWarning, match="already merged"):
        ours.merge_adapter()
    assert max_diff(logits(ours), merged) <= 1e-6
    ours.unmerge_adapter()
    after = base_weights(ours)
    assert max(max_diff(before[k], after[k]) for k in before) <= 1e-6
    assert max_diff(logits(ours), adapted) <= case.tolerance
    ours.merge_adapter()
    with ours.disable_adapter():  # unmerges first
        assert max_diff(logits(ours), base_logits) <= case.tolerance
    assert max_diff(logits(ours), adapted) <= case.tolerance
    restored = ours.unload()
    assert max_diff(logits(restored), base_logits) <= case.tolerance


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_optimizer_steps_change_only_adapter_parameters(case: Case) -> None:
    ours = paired(case).ours.train()
    adapter_ids = {
        id(p) for _, layer in ours.adapter_layers() for n in layer.adapter_names for p in layer.adapter_parameters(n)
    }
    adapter_ids |= {id(p) for _, wrapper in ours.saved_modules() for p in wrapper.modules_to_save.parameters()}
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    x = token_batch()
    for _ in range(3):
        ours(input_ids=x, labels=x).loss.backward()
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
    ours_base, plain = twin_bases(plan)
    ours = peftc.materialize(plan, base_model=ours_base).eval()
    assert torch.equal(logits(ours), logits(plain))


@pytest.mark.parametrize("method", sorted(RANDOM_INIT))
def test_safe_merge_refuses_a_broken_adapter_and_keeps_weights_bit_identical(method: str) -> None:
    plan = peftc.compile([f"peft={method}", RANDOM_INIT[method]])
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
