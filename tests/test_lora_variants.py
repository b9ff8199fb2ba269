"""LoRA variants and options against the peft package (the oracle), one parametrized suite.

Every case is run through the same tests: the peft model is built from OUR adapter_config.json
(`peft.get_peft_config`, which also tests the mapping), both models start from the same base
weights and the same seed (so PiSSA/OLoRA rewrite the base identically), peft's adapter is
perturbed like a trained one and copied into ours. Then outputs, gradients, counts, files,
loading both ways, the merge lifecycle and training must agree.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import peftc
from peftc import io
from peftc.adapters import fill
from peftc.methods.lora import LoraSpec
from peftc.plan import Plan
from tests.conv_model import TinyConvNet, images, plan_for
from tests.helpers import build_base, max_diff, token_batch

warnings.filterwarnings("ignore", message=r".*(PiSSA|OLoRA|lora_bias|already merged|Already unmerged).*")


@dataclass(frozen=True)
class Case:
    id: str
    model: str  # a model= option, or "conv" for tests.conv_model.TinyConvNet
    overrides: tuple[str, ...] = ()
    conv_spec: dict[str, Any] = field(default_factory=dict)
    mergeable: bool = True

    def plan(self) -> Plan:
        if self.model == "conv":
            return plan_for(TinyConvNet(), LoraSpec(**self.conv_spec))
        return peftc.compile([f"model={self.model}", *self.overrides])

    def base(self, plan: Plan) -> torch.nn.Module:
        return TinyConvNet() if self.model == "conv" else build_base(plan)

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": images() if self.model == "conv" else token_batch()}

    def loss(self, model: torch.nn.Module) -> torch.Tensor:
        x = self.inputs()["input_ids"]
        if self.model == "conv":
            return model(input_ids=x).square().mean()
        labels = torch.arange(x.shape[0]) % 2 if "task=seq_cls" in self.overrides else x
        return model(input_ids=x, labels=labels).loss


CASES = [
    Case("dora", "tiny_llama", ("peft.use_dora=true",)),
    Case("dora-dropout", "tiny_llama", ("peft.use_dora=true", "peft.lora_dropout=0.1")),
    Case("dora-gpt2-all-linear", "tiny_gpt2", ("peft.use_dora=true", "peft.target_modules=all-linear", "peft.r=4")),
    Case("dora-embedding", "tiny_llama", ("peft.use_dora=true", "peft.target_modules=[embed_tokens,v_proj]")),
    Case(
        "dora-patterns-rslora",
        "tiny_llama",
        (
            "peft.use_dora=true",
            "peft.use_rslora=true",
            "peft.target_modules=[q_proj,v_proj,o_proj,up_proj,down_proj,gate_proj]",
            "peft.rank_pattern={down_proj: 2}",
            "peft.alpha_pattern={o_proj: 3}",
            "peft.layers_to_transform=[1]",
            "peft.exclude_modules=[gate_proj]",
        ),
    ),
    Case("gaussian", "tiny_llama", ("peft.init_lora_weights=gaussian",)),
    Case("pissa", "tiny_llama", ("peft.init_lora_weights=pissa", "peft.target_modules=[q_proj,down_proj]")),
    Case("pissa-niter", "tiny_llama", ("peft.init_lora_weights=pissa_niter_2", "peft.r=4")),
    Case("pissa-gpt2-dora", "tiny_gpt2", ("peft.init_lora_weights=pissa", "peft.use_dora=true")),
    Case("olora", "tiny_llama", ("peft.init_lora_weights=olora", "peft.target_modules=[q_proj,down_proj]")),
    Case("orthogonal", "tiny_llama", ("peft.init_lora_weights=orthogonal", "peft.r=4")),
    Case("bias-all-gpt2", "tiny_gpt2", ("peft.bias=all",)),
    Case("bias-all-modules-to-save", "tiny_gpt2", ("peft.bias=all", "peft.modules_to_save=[ln_f]")),
    Case("bias-lora-only-gpt2", "tiny_gpt2", ("peft.bias=lora_only", "peft.target_modules=all-linear")),
    Case("lora-bias-gpt2", "tiny_gpt2", ("peft.lora_bias=true", "peft.init_lora_weights=false")),
    Case("conv", "conv", conv_spec={"target_modules": ["conv", "pointwise", "seq"], "r": 4}),
    Case(
        "conv-dora-bias", "conv", conv_spec={"target_modules": ["conv", "seq", "head"], "use_dora": True, "bias": "all"}
    ),
    Case("conv-lora-bias", "conv", conv_spec={"target_modules": ["conv", "pointwise"], "lora_bias": True, "r": 2}),
    Case("conv3d-dora", "conv", conv_spec={"target_modules": ["volume", "pointwise"], "use_dora": True, "r": 2}),
    Case("seq-cls-dora-bias-all", "tiny_bert", ("task=seq_cls", "peft.use_dora=true", "peft.bias=all")),
    Case("conv-grouped", "conv", conv_spec={"target_modules": ["grouped"], "r": 4}, mergeable=False),
]
IDS = [c.id for c in CASES]


def peft_config(plan: Plan, model: str) -> Any:
    """The oracle's config, made by peft from our adapter_config.json."""
    from peft import get_peft_config

    config = {**io.adapter_config(plan), "inference_mode": False}
    if model == "conv":
        config["task_type"] = None  # a plain nn.Module: peft's task wrappers expect a transformers model
    return get_peft_config(config)


def perturb(model: torch.nn.Module) -> None:
    """Move every trainable tensor away from its initial value, as training would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def peft_tensors(model: Any, params: bool = False) -> dict[str, torch.Tensor]:
    """peft's saved names -> its tensors (the live Parameters with `params`, so grads are reachable).

    Leaves out the copies peft adds with bias='all' inside modules_to_save wrappers
    (`.original_module.bias`, `.modules_to_save.bias`): peftc neither writes them nor needs them
    (see peftc.adapters._without_peft_artifacts).
    """
    from peft import get_peft_model_state_dict

    state = dict(model.named_parameters()) if params else None
    tensors = get_peft_model_state_dict(model, state_dict=state)
    return {k: v for k, v in tensors.items() if ".original_module." not in k and ".modules_to_save." not in k}


def paired(case: Case) -> tuple[Plan, Any, Any]:
    """(plan, ours, theirs) on identical base weights and seeds, with peft's perturbed adapter copied into ours.

    Built once per case; every test gets its own deep copy (building costs ~20x more).
    """
    if case.id not in _PAIRED:
        _PAIRED[case.id] = _build_pair(case)
    plan, ours, theirs = _PAIRED[case.id]
    return plan, copy.deepcopy(ours), copy.deepcopy(theirs)


_PAIRED: dict[str, tuple[Plan, Any, Any]] = {}


def _build_pair(case: Case) -> tuple[Plan, Any, Any]:
    from peft import get_peft_model

    plan = case.plan()
    base = case.base(plan)
    torch.manual_seed(0)
    theirs = get_peft_model(copy.deepcopy(base), peft_config(plan, case.model))
    torch.manual_seed(0)
    ours = peftc.materialize(plan, base_model=base)
    perturb(theirs)
    fill(ours, "default", peft_tensors(theirs))
    return plan, ours.eval(), theirs.eval()


def output(model: Any, case: Case) -> torch.Tensor:
    out = model(**case.inputs())
    return out if isinstance(out, torch.Tensor) else out.logits


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Base-model weights, keyed by module path (adapter wrappers and adapter tensors left out)."""
    from peft import PeftModel

    prefix = "base_model.model." if isinstance(model, PeftModel) else "base_model."
    keep = {}
    for name, tensor in model.state_dict().items():
        if any(part in name for part in (".lora_", "modules_to_save.", "original_module.")):
            continue
        keep[name.removeprefix(prefix).replace(".base_layer", "")] = tensor
    return keep


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_outputs_and_rewritten_base_match_peft(case: Case) -> None:
    plan, ours, theirs = paired(case)
    expected = output(theirs, case)
    assert max_diff(output(ours, case), expected) <= 1e-5
    assert max_diff(output(ours, case), output(case.base(plan), case)) > 1e-4, "the adapter must matter (sanity)"
    theirs_base = base_state(theirs)
    ours_base = base_state(ours)
    assert ours_base.keys() == theirs_base.keys()
    assert max(max_diff(ours_base[k], theirs_base[k]) for k in ours_base) <= 1e-6


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_match_peft(case: Case) -> None:
    _, ours, theirs = paired(case)
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(3)  # same dropout masks in both
        case.loss(model).backward()
    ours_grads = {k: t.grad for k, t in ours.adapter_state_dict("default").items() if t.requires_grad}
    theirs_grads = {k: t.grad for k, t in peft_tensors(theirs, params=True).items() if t.requires_grad}
    assert ours_grads.keys() == theirs_grads.keys()
    for key, grad in ours_grads.items():
        assert grad is not None and max_diff(grad, theirs_grads[key]) <= 1e-5 * max(
            1.0, theirs_grads[key].abs().max().item()
        ), key


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_counts_and_saved_tensors_match_peft(case: Case) -> None:
    plan, ours, theirs = paired(case)
    trainable, total = theirs.get_nb_trainable_parameters()
    assert plan.trainable_params == ours.trainable_parameters() == trainable
    assert plan.total_params == ours.total_parameters() == total
    for site in plan.sites:
        layer = ours.base_model.get_submodule(site.path)
        assert sum(p.numel() for p in layer.adapter_parameters("default")) == site.params, site.path
    saved = {k: tuple(v.shape) for k, v in ours.adapter_state_dict("default").items()}
    assert saved == {k: tuple(v.shape) for k, v in peft_tensors(theirs).items()}
    assert saved == {k: shape for k, (shape, _) in io.saved_layout(plan).items()}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adapters_load_both_ways(case: Case, tmp_path: Path) -> None:
    from peft import PeftModel

    plan, ours, theirs = paired(case)
    expected = output(theirs, case)
    ours.save_adapter(tmp_path / "ours")
    torch.manual_seed(0)  # pissa_niter draws again when peft re-derives the residual
    config = peft_config(plan, case.model) if case.model == "conv" else None
    loaded_in_peft = PeftModel.from_pretrained(case.base(plan), tmp_path / "ours", config=config).eval()
    assert max_diff(output(loaded_in_peft, case), expected) <= 1e-5
    theirs.save_pretrained(tmp_path / "theirs")
    if case.model == "conv":  # peft writes task_type null for a plain module; say what task ours plans for
        path = tmp_path / "theirs" / io.CONFIG_NAME
        path.write_text(json.dumps({**json.loads(path.read_text()), "task_type": "CAUSAL_LM"}))
    torch.manual_seed(0)
    loaded_in_ours = peftc.load_adapter(case.base(plan), tmp_path / "theirs")
    assert max_diff(output(loaded_in_ours, case), expected) <= 1e-5


@pytest.mark.parametrize("case", [c for c in CASES if c.mergeable], ids=[c.id for c in CASES if c.mergeable])
def test_merge_lifecycle_matches_peft(case: Case) -> None:
    _, ours, theirs = paired(case)
    adapted = output(ours, case)
    weights = {k: v.clone() for k, v in base_state(ours).items()}
    ours.merge_adapter()
    assert max_diff(output(ours, case), adapted) <= 1e-5
    merged_weights = {k: v.clone() for k, v in base_state(ours).items()}
    with pytest.warns(UserWarning, match="already merged"):
        ours.merge_adapter()
    assert all(torch.equal(merged_weights[k], v) for k, v in base_state(ours).items()), "merging twice is a no-op"
    ours.unmerge_adapter()
    assert max(max_diff(weights[k], v) for k, v in base_state(ours).items()) <= 1e-6
    ours.train()
    ours.merge_adapter()  # from the round-tripped weights: equal up to their round-off
    assert max(max_diff(merged_weights[k], v) for k, v in base_state(ours).items()) <= 1e-6, "train-mode merge"
    ours.eval()
    with ours.disable_adapter(), theirs.disable_adapter():
        assert max_diff(output(ours, case), output(theirs, case)) <= 1e-5
    assert max_diff(output(ours, case), adapted) <= 1e-5
    expected_unloaded = output(theirs.unload(), case)
    assert max_diff(output(ours.unload(), case), expected_unloaded) <= 1e-5


@pytest.mark.parametrize("case", [c for c in CASES if c.mergeable], ids=[c.id for c in CASES if c.mergeable])
def test_merge_and_unload_matches_peft(case: Case) -> None:
    _, ours, theirs = paired(case)
    expected = output(theirs.merge_and_unload(), case)
    merged = ours.merge_and_unload(safe_merge=True)
    assert not any(".lora_" in name for name, _ in merged.named_parameters())
    assert max_diff(output(merged, case), expected) <= 1e-5


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_optimizer_steps_change_only_what_the_plan_trains(case: Case) -> None:
    plan, ours, _ = paired(case)
    ours.train()
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        case.loss(ours).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
    unfrozen = {f"base_model.{io.unfrozen_saved_name(plan, n)}" for n in plan.unfrozen}
    planned = {n for n in before if ".lora_" in n or ".modules_to_save." in n} | unfrozen
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == planned
    # Every planned tensor moves, except where the loss is flat in it: a key bias shifts all
    # attention scores of a query equally, which softmax ignores (its gradient is exactly 0).
    assert changed == {n for n in planned if not re.search(r"attention\.self\.key(\.base_layer)?\.bias$", n)}


# ------------------------------------------------------------------------------ targeted facts
def test_default_dora_magnitude_is_the_row_norm_of_the_base_weight() -> None:
    plan = peftc.compile(["peft.use_dora=true"])
    base = build_base(plan)
    weight = base.get_submodule(plan.sites[0].path).weight.detach().clone()
    model = peftc.materialize(plan, base_model=base)
    magnitude = model.base_model.get_submodule(plan.sites[0].path).lora_magnitude_vector["default"]
    assert torch.allclose(magnitude, weight.norm(dim=1), atol=1e-6)


@pytest.mark.parametrize("init", ["true", "gaussian", "orthogonal", "pissa", "olora", "pissa_niter_3"])
def test_every_initialisation_starts_as_the_base_model(init: str) -> None:
    plan = peftc.compile([f"peft.init_lora_weights={init}", "peft.r=4", "peft.use_dora=true"])
    base = build_base(plan)
    x = token_batch()
    expected = base(input_ids=x).logits
    model = peftc.materialize(plan, base_model=base).eval()
    assert max_diff(model(input_ids=x).logits, expected) <= 1e-5


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        (["peft.init_lora_weights=orthogonal", "peft.r=3"], "peft.init_lora_weights", "even"),
        (["peft.lora_bias=true", "peft.use_dora=true"], "peft.lora_bias", "DoRA"),
        (["peft.lora_bias=true", "peft.init_lora_weights=pissa"], "peft.lora_bias", "true or false"),
        (["peft.lora_bias=true", "peft.target_modules=[embed_tokens]"], "peft.lora_bias", "embeddings"),
        (["peft.init_lora_weights=pissa", "peft.r=65"], "peft.init_lora_weights", "r <= min(in, out)"),
        (["model=tiny_gpt2", "peft.init_lora_weights=olora"], "peft.init_lora_weights", "Conv1D"),
        (["peft.bias=some"], "peft.bias", "none"),
    ],
)
def test_invalid_lora_options_are_named_config_errors(overrides: list[str], key: str, fragment: str) -> None:
    with pytest.raises(peftc.ConfigError) as info:
        peftc.compile(overrides)
    assert str(info.value).startswith(key) and fragment in str(info.value)


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ({"target_modules": ["conv"], "init_lora_weights": "pissa"}, "peft.init_lora_weights"),
        ({"target_modules": ["grouped"], "r": 3}, "peft.r"),
        ({"target_modules": ["grouped"], "r": 4, "use_dora": True}, "peft.use_dora"),
    ],
)
def test_conv_combinations_peft_refuses_are_plan_errors(spec: dict[str, Any], key: str) -> None:
    with pytest.raises(peftc.PlanError, match=key):
        plan_for(TinyConvNet(), LoraSpec(**spec))


def test_dilated_conv_is_refused_while_planning() -> None:
    model = TinyConvNet()
    model.conv = torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2)
    with pytest.raises(peftc.PlanError, match="dilated"):
        plan_for(model, LoraSpec(target_modules=["conv"]))


def test_grouped_conv_refuses_to_merge_and_leaves_weights_untouched() -> None:
    _, ours, _ = paired(CASES[IDS.index("conv-grouped")])
    before = {k: v.clone() for k, v in base_state(ours).items()}
    with pytest.raises(ValueError, match="groups"):
        ours.merge_adapter()
    assert all(torch.equal(before[k], v) for k, v in base_state(ours).items())


def test_half_precision_merge_unmerge_restores_the_weights_bit_for_bit() -> None:
    plan = peftc.compile(["peft.use_dora=true", "peft.init_lora_weights=false", "peft.target_modules=all-linear"])
    base = build_base(plan).to(torch.bfloat16)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = peftc.materialize(plan, base_model=base)
    model.merge_adapter()
    assert any(not torch.equal(before[k], v) for k, v in base_state(model).items())
    model.unmerge_adapter()
    assert all(torch.equal(before[k], v) for k, v in base_state(model).items())


def test_peft_features_peftc_lacks_are_refused_on_load(tmp_path: Path) -> None:
    plan = peftc.compile([])
    model = peftc.materialize(plan)
    model.save_adapter(tmp_path)
    path = tmp_path / io.CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), "layer_replication": [[0, 1]]}))
    with pytest.raises(peftc.AdapterFileError, match="layer_replication"):
        peftc.load_adapter(build_base(plan), tmp_path)
