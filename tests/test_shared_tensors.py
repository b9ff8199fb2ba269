"""Model-level shared tensors (Plan.shared): planned with names, shapes and whether saved, created
once per adapter, read by every site's layer, saved once at `base_model.<name>` (or not at all).

The contract is method-independent, so it is exercised here on a LoRA plan given two shared
tensors and a creator that counts its calls (VeRA, its one user, has parity cases of its own).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import peftc
from peftc import methods
from peftc.errors import ConfigError
from peftc.files.adapter_files import saved_layout
from peftc.files.load import fill
from peftc.planning.plan import Plan, SharedTensor
from peftc.planning.render import render_plan
from tests.helpers import build_base

SAVED = SharedTensor("proj_in", (2, 3), saved=True, options={"seed": 7})
UNSAVED = SharedTensor("proj_out", (4,), saved=False)


@pytest.fixture(scope="module")
def lora_plan() -> Plan:
    return peftc.compile(["peft.target_modules=[q_proj,v_proj]"])


@pytest.fixture
def creations() -> list[str]:
    """The names of the shared tensors each call of create_shared made."""
    return []


@pytest.fixture
def shared_plan(lora_plan: Plan, creations: list[str], monkeypatch: pytest.MonkeyPatch) -> Plan:
    """The LoRA plan with SAVED and UNSAVED declared; LoRA creates them from their seed."""

    def create_shared(self: Any, spec: Any, shared: Any) -> dict[str, torch.Tensor]:
        creations.append(",".join(t.name for t in shared))
        generator = torch.Generator().manual_seed(shared[0].options["seed"])
        return {t.name: torch.randn(t.shape, generator=generator) for t in shared}

    monkeypatch.setattr(type(methods.get("lora")), "create_shared", create_shared)
    return dataclasses.replace(lora_plan, shared=(SAVED, UNSAVED))


def test_a_plan_without_shared_tensors_reads_as_before(lora_plan: Plan) -> None:
    assert "shared" not in lora_plan.to_dict()


def test_the_plan_lists_shared_tensors_and_the_layout_saves_only_saved_ones(lora_plan: Plan) -> None:
    plan = dataclasses.replace(lora_plan, shared=(SAVED, UNSAVED))
    assert plan.to_dict()["shared"] == [
        {"name": "proj_in", "shape": [2, 3], "saved": True, "options": {"seed": 7}},
        {"name": "proj_out", "shape": [4], "saved": False, "options": {}},
    ]
    added = set(saved_layout(plan)) - set(saved_layout(lora_plan))
    assert added == {"base_model.proj_in"}
    assert plan.adapter_fingerprint != lora_plan.adapter_fingerprint
    text = render_plan(plan, width=140)
    assert "proj_in (2, 3), frozen, saved once" in text and "proj_out (4,), frozen, not saved" in text


def test_shared_tensors_are_created_once_and_every_layer_reads_the_same_ones(
    shared_plan: Plan, creations: list[str]
) -> None:
    model = peftc.materialize(shared_plan, base_model=build_base(shared_plan))
    assert creations == ["proj_in,proj_out"]
    held = model.shared_tensors["default"].get_buffer("proj_in")
    layers = [layer for _, layer in model.adapter_layers()]
    assert len(layers) > 1 and all(layer.shared_tensor("default", "proj_in") is held for layer in layers)
    assert not any("proj_" in name for name in model.state_dict())  # not per layer, not in checkpoints
    model.double()  # moving the model replaces the buffers; layers look them up afresh
    assert layers[0].shared_tensor("default", "proj_in").dtype == torch.float64


def test_only_saved_shared_tensors_are_written_once_and_loaded_back(shared_plan: Plan) -> None:
    model = peftc.materialize(shared_plan, base_model=build_base(shared_plan))
    tensors = model.adapter_state_dict("default")
    assert [k for k in tensors if "proj_" in k] == ["base_model.proj_in"]
    other = peftc.materialize(shared_plan, base_model=build_base(shared_plan))
    trained = {k: v.detach() + 1.0 if k == "base_model.proj_in" else v.detach() for k, v in tensors.items()}
    fill(other, "default", trained)
    assert torch.equal(other.shared_tensors["default"].get_buffer("proj_in"), trained["base_model.proj_in"])


def test_deleting_the_adapter_drops_its_shared_tensors(shared_plan: Plan) -> None:
    model = peftc.materialize(shared_plan, base_model=build_base(shared_plan))
    model.add_adapter("other", dataclasses.replace(shared_plan, spec=shared_plan.spec.replace(adapter_name="other")))
    model.delete_adapter("other")
    assert list(model.shared_tensors) == ["default"]
    assert all("other" not in layer.shared_holders for _, layer in model.adapter_layers())


def test_an_adapter_beside_another_must_create_its_shared_tensors_alike(shared_plan: Plan) -> None:
    model = peftc.materialize(shared_plan, base_model=build_base(shared_plan))
    reseeded = dataclasses.replace(SAVED, options={"seed": 8})
    other = dataclasses.replace(
        shared_plan, shared=(reseeded, UNSAVED), spec=shared_plan.spec.replace(adapter_name="other")
    )
    with pytest.raises(ConfigError) as refused:
        model.add_adapter("other", other)
    assert refused.value.key == "peft.seed"
    assert list(model.shared_tensors) == ["default"]
