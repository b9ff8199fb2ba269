"""LoRA adapters on nn.MultiheadAttention written by a peft before 0.22, which added out_proj's
update twice (huggingface/peft#3774), load with the outputs they had there: as peft 0.22 does,
peftc doubles out_proj's lora_B on load by peft 0.22's rule on `peft_version` and warns once,
and it writes peft_version 0.22.0, so an adapter saved again is not doubled again. The fixture
is peft 0.21.2's own file (experiments/make_lora_mha_legacy_fixture.py)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import peftc
from peftc.errors import AdapterFileError
from tests.attention_model import TinyAttention
from tests.helpers import max_diff

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "peft_0_21_2" / "lora_mha"
ADAPTER = FIXTURE / "adapter"
OUT_PROJ_B = "base_model.model.attn.base_layer.out_proj.lora_B.weight"
DOUBLING = "huggingface/peft#3774"  # in peftc's warning
MISSING = object()  # a config without peft_version (peft before 0.18)
TOLERANCE = 1e-5


def load(directory: Path) -> tuple[peftc.PeftcModel, list[str]]:
    """peftc's model from an adapter directory, and the doubling warnings the load gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peftc.load_adapter(TinyAttention(), directory)
    return model, [str(w.message) for w in caught if DOUBLING in str(w.message)]


def load_in_peft(directory: Path) -> tuple[Any, list[str]]:
    """peft 0.22's model from an adapter directory, and its own doubling warnings."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(TinyAttention(), directory).eval()
    return model, [str(w.message) for w in caught if "saved with PEFT < 0.22.0" in str(w.message)]


def output(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=expected()["input"])


def expected() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "expected.safetensors")


def with_peft_version(source: Path, version: Any, directory: Path) -> Path:
    """A copy of an adapter directory whose adapter_config.json has this peft_version (or none)."""
    shutil.copytree(source, directory)
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.pop("peft_version")
    path.write_text(json.dumps(config if version is MISSING else {**config, "peft_version": version}))
    return directory


def test_a_peft_0_21_2_attention_adapter_gives_its_outputs_and_warns_once_naming_the_file() -> None:
    model, warned = load(ADAPTER)
    assert max_diff(output(model), expected()["output"]) <= TOLERANCE
    assert len(warned) == 1
    assert warned[0].startswith(f"{ADAPTER / 'adapter_model.safetensors'}: written by peft 0.21.2,")
    assert "\n" not in warned[0]


def test_a_legacy_adapter_saved_again_is_written_as_peft_0_22_and_not_doubled_again(tmp_path: Path) -> None:
    model, _ = load(ADAPTER)
    model.save_adapter(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_version"] == "0.22.0"
    saved, original = (load_file(d / "adapter_model.safetensors") for d in (tmp_path, ADAPTER))
    assert torch.equal(saved[OUT_PROJ_B], 2 * original[OUT_PROJ_B])
    again, warned = load(tmp_path)
    assert warned == []
    assert max_diff(output(again), expected()["output"]) <= TOLERANCE


def test_peft_0_22_loads_the_peft_0_21_2_adapter_as_peftc_does() -> None:
    theirs, warned = load_in_peft(ADAPTER)
    assert len(warned) == 1
    assert max_diff(output(theirs), output(load(ADAPTER)[0])) <= TOLERANCE


@pytest.mark.parametrize(
    ("version", "doubled"),
    [
        (MISSING, True),
        (None, False),  # peft reads null as its own version
        ("0.17.1", True),
        ("0.21.0", True),
        ("0.21.1", True),
        ("0.21.2.post1", True),
        ("0.21.0.dev0", True),
        ("0.21.2rc1", True),  # a release candidate is no dev version
        ("0.21.1.dev0", False),  # main after the fix
        ("0.21.2.dev0@0123abcd", False),
        ("0.22.0rc1", False),
        ("0.22.0", False),
        ("0.23.1", False),
    ],
    ids=lambda value: "missing" if value is MISSING else str(value),
)
def test_peft_version_decides_the_doubling_by_peft_0_22_s_rule(version: Any, doubled: bool, tmp_path: Path) -> None:
    directory = with_peft_version(ADAPTER, version, tmp_path / "adapter")
    ours, warned = load(directory)
    theirs, peft_warned = load_in_peft(directory)
    original = load_file(ADAPTER / "adapter_model.safetensors")[OUT_PROJ_B]
    assert torch.equal(ours.adapter_state_dict("default")[OUT_PROJ_B], (2 if doubled else 1) * original)
    assert len(warned) == len(peft_warned) == int(doubled)
    assert max_diff(output(ours), output(theirs)) <= TOLERANCE


@pytest.mark.parametrize("version", ["latest", 0.21], ids=["word", "number"])
def test_a_peft_version_that_is_no_version_is_refused_by_name_on_an_attention_adapter(
    version: Any, tmp_path: Path
) -> None:
    directory = with_peft_version(ADAPTER, version, tmp_path / "adapter")
    with pytest.raises(AdapterFileError, match="peft_version") as info:
        load(directory)
    assert str(info.value).startswith(str(directory / "adapter_config.json"))


def test_an_adapter_without_attention_sites_loads_as_saved_whatever_its_peft_version(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(target_modules=["head"], init_lora_weights=False)  # B random: doubling it would show
    get_peft_model(TinyAttention(), config).save_pretrained(tmp_path / "head")
    directory = with_peft_version(tmp_path / "head", "0.21.2", tmp_path / "old")
    loaded, warned = load(directory)
    assert warned == []
    saved = load_file(directory / "adapter_model.safetensors")
    assert all(torch.equal(tensor, saved[key]) for key, tensor in loaded.adapter_state_dict("default").items())


def test_a_lenient_load_of_a_legacy_file_without_out_proj_b_doubles_nothing_and_loads_the_rest(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    directory = tmp_path / "adapter"
    shutil.copytree(ADAPTER, directory)
    saved = load_file(ADAPTER / "adapter_model.safetensors")
    save_file({k: v for k, v in saved.items() if k != OUT_PROJ_B}, directory / "adapter_model.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peftc.load_adapter(TinyAttention(), directory, strict=False)
    assert not any(DOUBLING in str(w.message) for w in caught)
    assert model.load_reports["default"].missing == (OUT_PROJ_B,)
    state = model.adapter_state_dict("default")
    assert all(torch.equal(state[key], tensor) for key, tensor in saved.items() if key != OUT_PROJ_B)
