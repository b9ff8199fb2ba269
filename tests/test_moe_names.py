"""LoRA configs written for transformers 4's mixture-of-experts layout (per-expert nn.Linear
projections, a Linear router, or `all-linear` that reached them) on transformers 5's fused experts:
peftc rewrites them against the model as peft 0.22 does, so both adapt the same tensors with the
same ranks and give the same logits, and the rewritten config is what both save and read back."""

from __future__ import annotations

import copy

import pytest
import torch

import peftc
from peftc.errors import ConfigError
from peftc.files.load import fill
from tests.helpers import build_base, max_diff, token_batch

QWEN3_MOE = (
    "model=tiny_llama",
    "model.model_type=qwen3_moe",
    "+model.config.num_experts=4",
    "+model.config.num_experts_per_tok=2",
    "+model.config.moe_intermediate_size=32",
    "+model.config.head_dim=16",
)
MIXTRAL = ("model=tiny_llama", "model.model_type=mixtral", "+model.config.num_local_experts=4")


@pytest.mark.parametrize(
    ("model", "targets"),
    [
        (QWEN3_MOE, "all-linear"),
        (QWEN3_MOE, ["q_proj", "gate_proj", "up_proj", "down_proj"]),
        (QWEN3_MOE, r".*layers\.1\..*(v_proj|gate)"),  # the router of layer 1 only, as peft reads the regex
        (MIXTRAL, ["q_proj", "w1", "w2", "w3", "gate"]),
    ],
    ids=["qwen3_moe all-linear", "qwen3_moe v4 names", "qwen3_moe regex", "mixtral v4 names"],
)
def test_old_expert_names_adapt_what_peft_adapts_with_its_logits(model: tuple[str, ...], targets: object) -> None:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    shown = f"'{targets}'" if isinstance(targets, str) else f"[{','.join(targets)}]"
    plan = peftc.compile([*model, f"peft.target_modules={shown}", "peft.init_lora_weights=false", "peft.r=4"])
    base = build_base(plan)
    asked = LoraConfig(task_type="CAUSAL_LM", target_modules=targets, r=4, lora_alpha=8, init_lora_weights=False)
    torch.manual_seed(0)
    theirs = get_peft_model(copy.deepcopy(base), asked).eval()
    rewritten = theirs.peft_config["default"]  # peft rewrites its config in place
    ours = plan.adapter_config
    assert set(ours["target_modules"]) == set(rewritten.target_modules)
    assert set(ours["target_parameters"]) == set(rewritten.target_parameters)
    assert (ours["rank_pattern"], ours["alpha_pattern"]) == (rewritten.rank_pattern, rewritten.alpha_pattern)
    model_ours = peftc.materialize(plan, base_model=base).eval()
    fill(model_ours, "default", get_peft_model_state_dict(theirs))
    x = token_batch()
    assert max_diff(model_ours(input_ids=x).logits, theirs(input_ids=x).logits) <= 1e-5


def test_half_of_a_fused_pair_and_dropout_on_the_experts_are_refused_by_the_names_written() -> None:
    with pytest.raises(ConfigError, match=r"names gate_proj but not up_proj, which transformers 5 stores in one"):
        peftc.compile([*QWEN3_MOE, "peft.target_modules=[q_proj,gate_proj]"])
    # peft raises "lora.ParamWrapper does not work with lora_dropout != 0" from inside get_peft_model
    with pytest.raises(ConfigError, match=r"peft.lora_dropout=0.05: does not work on the expert weights"):
        peftc.compile([*MIXTRAL, "peft.target_modules=all-linear", "peft.lora_dropout=0.05"])
    plain = peftc.compile([*MIXTRAL, "peft.target_modules=[q_proj,v_proj]", "peft.lora_dropout=0.05"])
    assert plain.adapter_config["target_parameters"] is None  # names of today's layout are left alone
