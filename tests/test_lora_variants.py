"""LoRA's own facts beyond the per-method parity harness (the LoRA variant cases, DoRA,
PiSSA/OLoRA/orthogonal, bias, lora_bias, conv sites and a classifier, are in
tests/method_cases.py and run through every test of tests/test_methods.py against peft).

Here: DoRA's magnitude init, that every initialisation starts as the base model, the refusals
(named config and plan errors, peft features refused on load), and half-precision merges
restoring the weights bit for bit. (The grouped-conv merge refusal is the harness's
`mergeable=False` case.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import peftc
from peftc.files import adapter_files
from peftc.methods.lora.method import LoraSpec
from tests.conv_model import TinyConvNet, plan_for
from tests.helpers import PISSA_ROUNDING, build_base, max_diff, token_batch


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
    assert max_diff(model(input_ids=x).logits, expected) <= (PISSA_ROUNDING if "pissa" in init else 1e-5)


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


def test_half_precision_merge_unmerge_restores_the_weights_bit_for_bit() -> None:
    plan = peftc.compile(["peft.use_dora=true", "peft.init_lora_weights=false", "peft.target_modules=all-linear"])
    base = build_base(plan).to(torch.bfloat16)
    before = {k: v.clone() for k, v in base.state_dict().items()}

    def base_tensors() -> dict[str, torch.Tensor]:
        return {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if ".lora_" not in k}

    model = peftc.materialize(plan, base_model=base)
    model.merge_adapter()
    assert any(not torch.equal(before[k], v) for k, v in base_tensors().items())
    model.unmerge_adapter()
    assert all(torch.equal(before[k], v) for k, v in base_tensors().items())


def test_peft_features_peftc_lacks_are_refused_on_load(tmp_path: Path) -> None:
    plan = peftc.compile([])
    model = peftc.materialize(plan)
    model.save_adapter(tmp_path)
    path = tmp_path / adapter_files.CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), "layer_replication": [[0, 1]]}))
    with pytest.raises(peftc.AdapterFileError, match="layer_replication"):
        peftc.load_adapter(build_base(plan), tmp_path)
