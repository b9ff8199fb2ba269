"""Every injectable method against the peft package (the oracle): one case list
(tests/method_cases.py: methods, LoRA variants, conv sites, a classifier), one test body per
behaviour."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import peftc
from peftc import methods
from peftc.errors import PlanError
from peftc.files import adapter_files
from peftc.files.load import fill
from peftc.runtime.model import PeftcModel
from tests.helpers import build_base, max_diff
from tests.method_cases import (
    CASES,
    IDS,
    NO_OP_TOLERANCE,
    PEFT_ONLY_PARAMS,
    RANDOM_INIT,
    STACK_CASES,
    Case,
    StackCase,
    base_state,
    base_weights,
    logits,
    oracle_config,
    output,
    paired,
    peft_state,
    random_init_overrides,
    stack_second_adapter,
    touches_base,
)

MERGEABLE = [case for case in CASES if case.mergeable]
# Strict: when peft fixes its gradient, the case fails here and the mark must go.
GRADIENT_CASES = [
    pytest.param(case, marks=pytest.mark.xfail(strict=True, reason=case.peft_gradients_wrong))
    if case.peft_gradients_wrong
    else case
    for case in CASES
]
UNMERGEABLE = [case for case in CASES if not case.mergeable]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_outputs_and_base_weights_match_peft(case: Case) -> None:
    pair = paired(case)
    ours = output(pair.ours, case)
    assert max_diff(ours, output(pair.theirs, case)) <= case.tolerance
    # sanity: the adapter changes the output by far more than the parity tolerance
    assert max_diff(ours, output(case.base(pair.plan), case)) > 10 * case.tolerance
    ours_base, theirs_base = base_state(pair.ours), base_state(pair.theirs)
    assert ours_base.keys() == theirs_base.keys()
    assert max(max_diff(ours_base[k], theirs_base[k]) for k in ours_base) <= 1e-6, "PiSSA/OLoRA rewrite W like peft"


@pytest.mark.parametrize("case", GRADIENT_CASES, ids=IDS)
def test_gradients_match_peft(case: Case) -> None:
    pair = paired(case)
    extra = methods.get(case.method).extra_loss
    for model in (pair.ours, pair.theirs):
        model.train()
        torch.manual_seed(3)  # the same dropout masks in both
        loss = case.loss(model)
        # peft adds AdaLoRA's regulariser to a model output's .loss (a bare tensor has none);
        # peftc's training step adds the method's extra_loss
        penalty = extra(model, pair.plan.adapter_name) if model is pair.ours and not case.custom else None
        (loss if penalty is None else loss + penalty).backward()
    ours = {k: t.grad for k, t in pair.ours.adapter_state_dict(pair.plan.adapter_name).items() if t.requires_grad}
    theirs = {k: t.grad for k, t in peft_state(pair.theirs, params=True).items() if t.requires_grad}
    assert ours.keys() == theirs.keys()
    for key, grad in ours.items():
        scale = max(1.0, theirs[key].abs().max().item())
        assert grad is not None and max_diff(grad, theirs[key]) <= case.tolerance * scale, key


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
def test_saved_tensors_match_peft_and_the_plan(case: Case) -> None:
    pair = paired(case)
    saved = {k: tuple(v.shape) for k, v in pair.ours.adapter_state_dict(pair.plan.adapter_name).items()}
    assert saved == {k: tuple(v.shape) for k, v in peft_state(pair.theirs).items()}
    assert saved == {k: shape for k, (shape, _) in adapter_files.saved_layout(pair.plan).items()}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adapters_load_both_ways(case: Case, tmp_path: Path) -> None:
    from peft import PeftModel

    pair = paired(case)
    expected = output(pair.theirs, case)
    pair.ours.save_adapter(tmp_path / "ours")
    config = oracle_config(pair.plan, case) if case.custom else None  # peft would wrap a task model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)  # pissa_niter draws again when the residual is derived from the base
        loaded_in_peft = PeftModel.from_pretrained(case.base(pair.plan), tmp_path / "ours", config=config).eval()
    assert max_diff(output(loaded_in_peft, case), expected) <= case.tolerance
    pair.theirs.save_pretrained(tmp_path / "theirs")
    if case.custom:  # peft writes task_type null for a plain module; say which task ours plans for
        path = tmp_path / "theirs" / adapter_files.CONFIG_NAME
        path.write_text(json.dumps({**json.loads(path.read_text()), "task_type": "CAUSAL_LM"}))
    torch.manual_seed(0)
    loaded_in_ours = peftc.load_adapter(case.base(pair.plan), tmp_path / "theirs")
    assert max_diff(output(loaded_in_ours, case), expected) <= case.tolerance


@pytest.mark.parametrize("case", MERGEABLE, ids=[case.id for case in MERGEABLE])
def test_merge_unmerge_disable_unload(case: Case) -> None:
    pair = paired(case)
    ours, theirs = pair.ours, pair.theirs
    base_output = output(case.base(pair.plan), case)
    adapted = output(ours, case)
    before = base_weights(ours)
    ours.merge_adapter()
    merged, merged_weights = output(ours, case), base_weights(ours)
    assert max_diff(merged, adapted) <= case.tolerance
    with pytest.warns(UserWarning, match="already merged"):
        ours.merge_adapter()
    assert max_diff(output(ours, case), merged) <= 1e-6
    ours.unmerge_adapter()
    after = base_weights(ours)
    assert max(max_diff(before[k], after[k]) for k in before) <= 1e-6
    assert max_diff(output(ours, case), adapted) <= case.tolerance
    ours.train()
    ours.merge_adapter()  # train mode merges what eval mode merged (from the round-tripped weights)
    assert max(max_diff(merged_weights[k], v) for k, v in base_weights(ours).items()) <= 1e-6
    ours.eval()
    with ours.disable_adapter(), theirs.disable_adapter():  # ours unmerges first
        assert max_diff(output(ours, case), output(theirs, case)) <= case.tolerance
        if not touches_base(pair.plan):
            assert max_diff(output(ours, case), base_output) <= case.tolerance
    assert max_diff(output(ours, case), adapted) <= case.tolerance
    ours.merge_adapter()  # unload() gives the base weights back, also from a merged model
    restored = output(ours.unload(), case)
    unloaded = theirs.unload()
    if not _keeps_saved_wrappers(unloaded):  # peft's LN tuning unload leaves its modules_to_save wrappers in
        assert max_diff(restored, output(unloaded, case)) <= case.tolerance
    if not touches_base(pair.plan):  # modules_to_save: the originals come back, not the trained copies (peft 0.22)
        assert max_diff(restored, base_output) <= case.tolerance


def _keeps_saved_wrappers(model: torch.nn.Module) -> bool:
    from peft.utils.other import ModulesToSaveWrapper

    return any(isinstance(module, ModulesToSaveWrapper) for module in model.modules())


@pytest.mark.parametrize("case", MERGEABLE, ids=[case.id for case in MERGEABLE])
def test_merge_and_unload_matches_peft(case: Case) -> None:
    pair = paired(case)
    expected = output(pair.theirs.merge_and_unload(), case)
    merged = pair.ours.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, PeftcModel) for m in merged.modules())
    assert max_diff(output(merged, case), expected) <= case.tolerance


@pytest.mark.parametrize("case", UNMERGEABLE, ids=[case.id for case in UNMERGEABLE])
def test_unmergeable_adapters_refuse_to_merge_and_leave_weights_untouched(case: Case) -> None:
    ours = paired(case).ours
    before = {k: v.clone() for k, v in base_state(ours).items()}
    with pytest.raises(ValueError, match="cannot be merged"):
        ours.merge_adapter()
    assert all(torch.equal(before[k], v) for k, v in base_state(ours).items())
    assert not any(layer.merged_adapters for _, layer in ours.adapter_layers())


@pytest.mark.parametrize(
    "conv",
    [{"kernel_size": 3, "padding": 1}, {"kernel_size": (3, 1), "padding": (2, 0), "dilation": (2, 1)}],
    ids=["3x3", "3x1-dilated"],
)
def test_oft_on_a_conv2d_is_the_conv_with_its_rotated_weight_like_peft(conv: dict[str, Any], tmp_path: Path) -> None:
    """peft 0.22 runs OFT on a Conv2d as the convolution with W R^T (W viewed as out x in*kh*kw),
    the merged layer's weight: peftc gives its outputs unmerged and merged, for any kernel shape
    and dilation (peft 0.21 rotated input patches instead; see peftc/methods/oft/__init__.py)."""
    import peft
    from torch import nn

    from tests.conv_model import TinyConvNet, images

    def base() -> TinyConvNet:
        model = TinyConvNet()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            model.conv = nn.Conv2d(4, 8, **conv)
        return model

    x = images()
    config = peft.OFTConfig(target_modules=["conv"], oft_block_size=4, r=0, init_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on the conv layer
        torch.manual_seed(0)
        theirs = peft.get_peft_model(base(), config).eval()
        theirs.save_pretrained(tmp_path)
        ours = peftc.load_adapter(base(), tmp_path).eval()
    expected = theirs(x)
    assert max_diff(ours(x), expected) <= 1e-5
    assert max_diff(expected, base()(x)) > 1e-4, "a random (not no-op) rotation: far above the tolerance"
    rotation = theirs.base_model.model.conv.get_delta_weight("default")  # peft's block-diagonal R
    weight = base().conv.weight
    rotated = (weight.reshape(weight.shape[0], -1) @ rotation.T).reshape(weight.shape)
    merged = ours.merge_and_unload()
    assert max_diff(merged.conv.weight, rotated) <= 1e-6
    assert max_diff(merged(x), expected) <= 1e-5
    assert max_diff(theirs.merge_and_unload()(x), expected) <= 1e-5


def test_oft_refuses_a_grouped_conv2d_at_plan_time_in_one_line_as_peft_refuses_it() -> None:
    """OFT rotates all in_channels x k x k inputs of a filter; a grouped weight holds a share."""
    import peft

    from peftc.methods.oft.method import OFTSpec
    from tests.conv_model import TinyConvNet, plan_for

    with pytest.raises(PlanError) as error:
        plan_for(TinyConvNet(), OFTSpec(target_modules=["conv", "grouped"], oft_block_size=4))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("peft.target_modules='grouped': is a grouped Conv2d (groups=2)")
    assert message.endswith("exclude it: peft.exclude_modules=[grouped]")
    with pytest.raises(NotImplementedError, match="groups > 1"):
        peft.get_peft_model(TinyConvNet(), peft.OFTConfig(target_modules=["grouped"], oft_block_size=4, r=0))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_optimizer_steps_change_only_what_the_plan_trains(case: Case) -> None:
    pair = paired(case)
    ours = pair.ours.train()
    planned = {
        id(p) for _, layer in ours.adapter_layers() for n in layer.adapter_names for p in layer.adapter_parameters(n)
    }
    planned |= {id(p) for _, wrapper in ours.saved_modules() for p in wrapper.modules_to_save.parameters()}
    planned |= {id(ours.base_model.get_parameter(name)) for name in pair.plan.unfrozen}
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        case.loss(ours).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert {id(p) for p in ours.parameters() if p.requires_grad} == planned
    changed = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
    # Every planned tensor moves, except where the loss is flat in it: a key bias shifts all
    # attention scores of a query equally, which softmax ignores (its gradient is exactly 0).
    flat = re.compile(r"attention\.self\.key(\.base_layer)?\.bias$")
    assert changed == {n for n, p in ours.named_parameters() if id(p) in planned and not flat.search(n)}


def weight_methods() -> list[str]:
    """Methods whose adapters change layer weights (the harness's subject; adaption prompts and
    prompt methods have their own tests)."""
    return sorted(name for name, m in methods.all_methods().items() if m.kind == "injectable" and m.mergeable)


@pytest.mark.parametrize("method", weight_methods())
def test_default_init_is_an_exact_no_op(method: str) -> None:
    plan = peftc.compile([f"peft={method}"])
    plain = build_base(plan)
    ours = peftc.materialize(plan, base_model=build_base(plan)).eval()
    assert max_diff(logits(ours), logits(plain)) <= NO_OP_TOLERANCE.get(method, 0.0)


@pytest.mark.parametrize("method", sorted(RANDOM_INIT))
def test_safe_merge_refuses_a_broken_adapter_and_keeps_weights_bit_identical(method: str) -> None:
    plan = peftc.compile([f"peft={method}", *random_init_overrides(method)])
    model = peftc.materialize(plan)
    before = base_weights(model)
    _, layer = list(model.adapter_layers())[-1]
    with torch.no_grad():
        next(layer.adapter_parameters(plan.adapter_name)).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights") as refused:  # peft's type and words
        model.merge_and_unload(safe_merge=True)
    assert isinstance(refused.value, peftc.PeftcError), "a deliberate refusal is a PeftcError"
    after = base_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(layer.merged_adapters for _, layer in model.adapter_layers())


def test_every_method_with_a_non_identity_init_has_a_case() -> None:
    covered = {case.method for case in CASES}
    assert set(weight_methods()) <= covered <= set(RANDOM_INIT)


def test_every_method_has_a_second_adapter_case() -> None:
    assert sorted(stack.first.method for stack in STACK_CASES) == weight_methods()


@pytest.mark.parametrize("stack", STACK_CASES, ids=[stack.id for stack in STACK_CASES])
def test_two_active_adapters_stack_like_peft(stack: StackCase) -> None:
    """A second adapter of the same method: alone and stacked with the first, as in peft (or
    refused, where peft refuses to run two at once)."""
    from peft import get_peft_model_state_dict

    pair = paired(stack.first)
    other = stack.second_plan()
    config = oracle_config(other, stack.first)
    config.inference_mode = stack.inference_mode
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pair.theirs.add_adapter("other", config)
    pair.ours.add_adapter("other", other)
    fill(pair.ours, "other", get_peft_model_state_dict(pair.theirs, adapter_name="other"))
    for active in (["other"], ["default", "other"]):
        pair.theirs.base_model.set_adapter(active)
        pair.ours.set_adapter(active)
        if stack.one_active and len(active) > 1:
            with pytest.raises(ValueError):
                logits(pair.theirs)
            with pytest.raises(peftc.PeftcError):
                logits(pair.ours)
            pair.ours.set_adapter("default")  # the check below then runs the first adapter alone
            continue
        assert max_diff(logits(pair.ours), logits(pair.theirs)) <= 1e-5, active
    assert max_diff(logits(pair.ours), logits(build_base(pair.plan))) > 1e-4


# Two OFT adapters over the same layers: a Linear model's projections, a 3x3 Conv2d, an embedding
# (its rows rotate as E R_1 R_2: it folds them in order).
OFT_STACKS = [
    Case("oft", "tiny_llama"),
    CASES[IDS.index("oft conv target_modules=('conv',) r=3 oft_block_size=0")],
    Case("oft", "tiny_llama", ("peft.target_modules=[embed_tokens]", "peft.oft_block_size=16")),
]


@pytest.mark.parametrize("case", OFT_STACKS, ids=[case.id for case in OFT_STACKS])
def test_stacked_oft_adapters_merge_to_their_unmerged_outputs_as_in_peft(case: Case) -> None:
    """Active adapters rotate the input as x R_1 R_2, i.e. the weight as W R_2^T R_1^T: merging
    folds them in reverse, as peft 0.22 does (0.21 folded them in order, away from its forward)."""
    pair = paired(case)
    stack_second_adapter(pair, case)
    stacked = output(pair.ours, case)
    assert max_diff(stacked, output(pair.theirs, case)) <= case.tolerance
    pair.ours.merge_adapter()
    pair.theirs.base_model.merge_adapter()
    assert max_diff(output(pair.ours, case), stacked) <= case.tolerance
    assert max_diff(output(pair.theirs, case), stacked) <= case.tolerance
    pair.ours.unmerge_adapter()
    assert max_diff(output(pair.ours, case), stacked) <= case.tolerance


def test_oft_module_dropout_turns_that_share_of_blocks_into_the_identity_in_training_only() -> None:
    """peft 0.21 builds OFT's multiplicative dropout but never calls it (the strict xfail in
    tests/test_peft_field_matrix.py); peftc applies it: in training int(0.5 * blocks) random
    blocks rotate nothing, in eval every block rotates."""
    from peftc.methods.oft.layer import OFTLayer

    plan = peftc.compile(["model=tiny_llama", "peft=oft", "peft.init_weights=false", "peft.module_dropout=0.5"])
    model = peftc.materialize(plan, base_model=build_base(plan))
    layer = next(m for m in model.modules() if isinstance(m, OFTLayer))
    eye = torch.eye(layer.blocks("default").shape[-1])
    model.eval()
    assert not any(torch.allclose(block, eye) for block in layer.blocks("default"))
    model.train()
    torch.manual_seed(0)
    draws = [layer.blocks("default") for _ in range(4)]
    identities = [[torch.allclose(block, eye) for block in blocks] for blocks in draws]
    assert all(sum(row) == len(row) // 2 for row in identities), identities
    assert len({tuple(row) for row in identities}) > 1, "a new draw each step"


def test_lokr_factorization_splits_every_dimension_like_peft() -> None:
    """decompose_factor that does not divide a dimension caps the smaller side at that factor
    (the shipped cases' factors all divide their dimensions)."""
    from peft.tuners.lokr.layer import factorization as peft_factorization

    from peftc.methods.lycoris.lokr import factorization

    for dimension in range(1, 130):
        for factor in (-1, *range(1, 10)):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)


@pytest.mark.parametrize(
    "overrides",
    [
        ("peft=loha",),
        ("peft=lokr",),
        ("peft=lokr", "peft.init_weights=lycoris"),
        ("peft=lokr", "peft.decompose_both=true", "peft.r=1"),
        ("peft=lokr", "peft.decompose_both=true", "peft.r=1", "peft.init_weights=lycoris"),
    ],
    ids=["loha", "lokr", "lokr-lycoris", "lokr-decomposed", "lokr-decomposed-lycoris"],
)
def test_lycoris_no_op_inits_start_the_same_factors_at_zero_as_peft(overrides: tuple[str, ...]) -> None:
    """Either zero factor makes the update a no-op; which one it is decides the first steps'
    gradients (every other factor random), so it must be peft's."""
    from peft import get_peft_model

    plan = peftc.compile(list(overrides))
    ours = peftc.materialize(plan, base_model=build_base(plan))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(
            build_base(plan), oracle_config(plan, Case(overrides[0].removeprefix("peft="), "tiny_llama"))
        )
    zero = {k: bool((v == 0).all()) for k, v in ours.adapter_state_dict(plan.adapter_name).items()}
    assert zero == {k: bool((v == 0).all()) for k, v in peft_state(theirs).items()}
    assert 0 < sum(zero.values()) < len(zero)


def test_lokr_cp_form_on_a_conv1d_runs_and_merges_to_the_same_outputs() -> None:
    """peft 0.21 cannot run LoKr's CP form on a Conv1d (torch.kron cannot view the einsum over a
    k x 1 core), so no peft case covers it: the formed update merges to the unmerged outputs."""
    case = Case("lokr", "conv", spec_fields=(("target_modules", ("seq",)), ("r", 1), ("use_effective_conv2d", True)))
    plan = case.compile()
    assert "lokr_t2" in plan.sites[0].tensors
    model = peftc.materialize(plan, base_model=case.base(plan)).eval()
    expected = output(model, case)
    assert max_diff(expected, output(case.base(plan), case)) > 1e-3, "a random (not no-op) update"
    assert max_diff(output(model.merge_and_unload(), case), expected) <= 1e-5
