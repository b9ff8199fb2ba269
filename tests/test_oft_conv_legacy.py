"""An OFT adapter that peft 0.21.2 trained on Conv2d layers keeps the outputs it was trained to
give. peft 0.22 rotates a conv's weight where 0.21 rotated the input's patches (and refuses the
grouped conv 0.21 adapted), so peftc runs such an adapter with 0.21's transform, warns once that
peft 0.22 would give other outputs, refuses to merge it, and saves it so that it keeps its meaning.

The fixture (tests/fixtures/peft_0_21_2/oft_conv) was written by peft 0.21.2 itself:
experiments/make_oft_conv_legacy_fixture.py (adapter on TinyConvNet's 3x3 `conv`, 1x1 `pointwise`
and grouped 3x3 `grouped`, an input, and peft 0.21.2's output on it).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import peftc
from peftc import methods
from peftc.errors import AdapterFileError, MergeError, PlanError
from peftc.methods.common import written_before_peft_0_22
from tests.conv_model import TinyConvNet, plan_for
from tests.helpers import max_diff

FIXTURE = Path(__file__).parent / "fixtures" / "peft_0_21_2" / "oft_conv"
PATCH_SITES = ["conv", "grouped"]  # the 1x1 pointwise conv is the same rotation under both transforms


def recorded() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(FIXTURE / "expected.safetensors")


def loaded(directory: Path = FIXTURE) -> tuple[peftc.PeftcModel, list[str]]:
    """The adapter on its base, and the messages of the warnings that loading it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peftc.load_adapter(TinyConvNet(seed=0), directory)
    return model, [str(w.message) for w in caught]


def output(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(recorded()["input"])


def test_a_peft_0_21_conv_adapter_gives_the_outputs_peft_0_21_recorded() -> None:
    model, _ = loaded()
    plan = model.plan_of("default")
    assert plan.spec.peft.conv_transform == "patches"
    assert {s.path: s.options["conv_transform"] for s in plan.sites} == {
        "conv": "patches",
        "grouped": "patches",
        "pointwise": "weight",
    }
    assert max_diff(output(model), recorded()["output"]) <= 1e-5
    assert max_diff(recorded()["output"], TinyConvNet(seed=0)(recorded()["input"])) > 1e-3, "not a no-op"


def test_loading_it_warns_once_that_peft_0_22_gives_other_outputs() -> None:
    _, messages = loaded()
    ours = [m for m in messages if "conv transform" in m]
    assert len(ours) == 1, messages
    assert "OFT on Conv2d conv, grouped uses peft < 0.22's conv transform" in ours[0]
    assert "peft 0.22 itself rotates the weight and gives other outputs" in ours[0]
    assert ours[0].startswith(str(FIXTURE / "adapter_config.json"))


def test_merging_it_is_refused_and_leaves_the_weights_as_they_were() -> None:
    model, _ = loaded()
    before = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    with pytest.raises(MergeError, match=r"conv_transform=patches.*keep it unmerged"):
        model.merge_adapter()
    assert all(torch.equal(before[k], v) for k, v in model.base_model.state_dict().items())
    assert max_diff(output(model), recorded()["output"]) <= 1e-5


def test_merging_it_between_current_adapters_on_the_same_conv_is_refused_by_its_name() -> None:
    """The refusal looks at every adapter merged into a layer, not just the first one."""
    config = json.loads((FIXTURE / "adapter_config.json").read_text())
    legacy = methods.get("oft").spec_from_peft_config({**config, "target_modules": ["conv"]})
    base = TinyConvNet(seed=0)
    model = peftc.materialize(plan_for(base, legacy), base_model=base)
    current = plan_for(base, legacy.replace(conv_transform="weight"))
    model.add_adapter("current", current)
    model.add_adapter("later", current)
    model.set_adapter(["current", "default", "later"])  # merged in either order, it is in the middle
    before = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    with pytest.raises(MergeError, match=r"OFT adapter 'default' .*conv_transform=patches"):
        model.merge_adapter()
    assert all(torch.equal(before[k], v) for k, v in model.base_model.state_dict().items())


def test_a_current_identity_adapter_stacked_on_it_keeps_the_outputs_peft_0_21_recorded() -> None:
    """Both active on one conv: the patch transform of the input still runs before the rotated
    weight's convolution, and a fresh current adapter (R = I) changes nothing."""
    model, _ = loaded()
    config = json.loads((FIXTURE / "adapter_config.json").read_text())
    spec = methods.get("oft").spec_from_peft_config({**config, "target_modules": ["conv"]})
    model.add_adapter("current", plan_for(TinyConvNet(), spec.replace(conv_transform="weight")))
    model.set_adapter(["default", "current"])
    assert max_diff(output(model), recorded()["output"]) <= 1e-5


class GroupedPointwise(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.grouped = torch.nn.Conv2d(8, 8, 1, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grouped(x)


def test_a_grouped_1x1_conv_keeps_the_patch_transform_that_peft_0_21_ran_on_it() -> None:
    """peft 0.21 rotated a grouped 1x1 conv's input channels, which no grouped weight holds: the
    adapter runs (unmergeable) with the patch transform where conv_transform=weight refuses it."""
    from peftc.methods.oft.method import OFTSpec

    spec = OFTSpec(target_modules=["grouped"], oft_block_size=4, r=0, conv_transform="patches")
    (site,) = plan_for(GroupedPointwise(), spec).sites
    assert site.options["conv_transform"] == "patches"
    with pytest.raises(PlanError, match="grouped Conv2d"):
        plan_for(GroupedPointwise(), spec.replace(conv_transform="weight"))


def test_saved_again_it_keeps_a_peft_version_before_0_22_and_its_outputs(tmp_path: Path) -> None:
    model, _ = loaded()
    model.save_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_version"] == "0.21.2"
    again, messages = loaded(tmp_path)
    assert again.plan_of("default").spec.peft.conv_transform == "patches"
    assert sum("conv transform" in m for m in messages) == 1
    assert max_diff(output(again), recorded()["output"]) <= 1e-5


def test_a_peft_0_21_adapter_without_patch_sites_needs_no_warning_and_saves_as_0_22() -> None:
    """Linear and 1x1 conv sites compute the same under both peft versions."""
    config = json.loads((FIXTURE / "adapter_config.json").read_text())
    spec = methods.get("oft").spec_from_peft_config({**config, "target_modules": ["pointwise"]})
    plan = plan_for(TinyConvNet(), spec)
    assert spec.conv_transform == "patches"
    assert plan.warnings == ()
    assert plan.adapter_config["peft_version"] == "0.22.0"


ABSENT = object()


@pytest.mark.parametrize(
    ("version", "before"),
    [
        (ABSENT, True),  # peft < 0.18 wrote no peft_version
        (None, False),  # peft reads null as its own version
        ("0.17.1", True),
        ("0.21.2", True),
        ("0.21.0.dev0", True),
        ("0.21.1.dev0", False),  # peft's main after its 0.22 changes
        ("0.21.1.dev0@1a2b3c4", False),  # a dev install writes its commit
        ("0.22.0", False),
        ("0.22.0rc1", False),
        ("0.23.1", False),
    ],
)
def test_peft_version_is_read_as_peft_0_22_reads_it(version: object, before: bool) -> None:
    config = {} if version is ABSENT else {"peft_version": version}
    assert written_before_peft_0_22(config) is before


@pytest.mark.parametrize("version", ["zero point two", 0.21])
def test_a_peft_version_that_is_no_version_is_an_adapter_file_error(version: object) -> None:
    with pytest.raises(AdapterFileError, match=rf"peft_version={version!r} is not a version"):
        written_before_peft_0_22({"peft_version": version})
