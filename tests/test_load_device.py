"""Where the base model is loaded: onto the one GPU a single-device run trains on (quantized there
while transformers reads the checkpoint), else on the CPU for Lightning to place.

No GPU here: the choice is tested from the run spec with a CUDA device count patched in, and the
load is stopped at transformers' `from_pretrained` to read what it was asked to do."""

from __future__ import annotations

from typing import Any

import pytest

import peftc
from peftc.config.spec import TrainerSpec
from peftc.runtime.materialize import load_base_model, load_device


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("peftc.planning.compat.cuda_device_count", lambda: 2)
    monkeypatch.setattr("peftc.planning.compat._mps_available", lambda: False)


@pytest.mark.parametrize(
    ("trainer", "device"),
    [
        ({"accelerator": "gpu", "devices": 1}, "cuda:0"),
        ({"accelerator": "cuda", "devices": "1"}, "cuda:0"),
        ({"accelerator": "gpu", "devices": [1]}, "cuda:1"),
        ({"accelerator": "gpu", "devices": "1,"}, "cuda:1"),
        ({"accelerator": "auto", "devices": 1}, "cuda:0"),
        ({"accelerator": "gpu", "devices": 1, "strategy": "single_device"}, "cuda:0"),
        ({"accelerator": "cpu", "devices": 1}, "cpu"),
        ({"accelerator": "gpu", "devices": 2}, "cpu"),
        ({"accelerator": "gpu", "devices": -1}, "cpu"),
        ({"accelerator": "gpu", "devices": "auto"}, "cpu"),
        ({"accelerator": "gpu", "devices": [0, 1]}, "cpu"),
        ({"accelerator": "gpu", "devices": 1, "strategy": "ddp"}, "cpu"),
        ({"accelerator": "gpu", "devices": 1, "strategy": "fsdp"}, "cpu"),
        ({"accelerator": "gpu", "devices": 1, "num_nodes": 2}, "cpu"),
    ],
)
def test_only_a_single_gpu_run_loads_its_base_onto_that_gpu(
    two_gpus: None, trainer: dict[str, Any], device: str
) -> None:
    assert load_device(TrainerSpec(**trainer)) == device


def test_a_gpu_plan_loads_on_the_cpu_where_there_is_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("peftc.planning.compat.cuda_device_count", lambda: 0)
    monkeypatch.setattr("peftc.planning.compat._mps_available", lambda: False)
    assert load_device(TrainerSpec(accelerator="gpu", devices=1)) == "cpu"


class StoppedLoading(Exception):
    """Raised by the spy in place of loading onto a GPU this machine does not have."""


def asked_to_load(monkeypatch: pytest.MonkeyPatch, overrides: list[str]) -> dict[str, Any]:
    """The keyword arguments load_base_model hands transformers' from_pretrained."""
    from transformers import AutoModelForCausalLM

    plan = peftc.compile(overrides)
    asked: dict[str, Any] = {}

    def spy(*args: object, **kwargs: Any) -> None:
        asked.update(kwargs)
        raise StoppedLoading

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    with pytest.raises(StoppedLoading):
        load_base_model(plan)
    return asked


@pytest.mark.parametrize("option", ["none", "bnb_nf4", "quanto_int8"])
def test_a_single_gpu_run_loads_the_checkpoint_straight_onto_the_gpu(
    two_gpus: None, option: str, tiny_llama_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = [f"quant={option}", "model=hf", f"model.name_or_path={tiny_llama_dir}", "trainer=gpu"]
    asked = asked_to_load(monkeypatch, overrides)
    assert asked["device_map"] == {"": "cuda:0"}
    assert (asked.get("quantization_config") is not None) == (option != "none")


def test_a_cpu_run_loads_an_unquantized_checkpoint_as_before(tiny_llama_dir: str, monkeypatch) -> None:
    asked = asked_to_load(monkeypatch, ["model=hf", f"model.name_or_path={tiny_llama_dir}"])
    assert "device_map" not in asked and "quantization_config" not in asked


def test_a_config_built_base_is_built_on_the_training_device(two_gpus: None, monkeypatch) -> None:
    from peftc.planning import model_source

    plan = peftc.compile(["quant=bnb_int8", "trainer=gpu"])
    asked: dict[str, Any] = {}

    def spy(*args: object, **kwargs: Any) -> None:
        asked.update(kwargs)
        raise StoppedLoading

    monkeypatch.setattr(model_source, "build_model", spy)
    with pytest.raises(StoppedLoading):
        load_base_model(plan)
    assert asked["device"] == "cuda:0"  # then quantized there: bnb int8 weights cannot move later


def test_a_base_bound_for_the_gpu_is_held_against_the_gpus_memory(two_gpus: None, monkeypatch) -> None:
    """Not the host's: a 70B QLoRA base fits a GPU on a host with less RAM, and the other way round."""
    from types import SimpleNamespace

    from peftc.planning import model_source
    from peftc.runtime import materialize

    plan = peftc.compile(["trainer=gpu"])
    need = plan.memory.base_weights + plan.memory.adapter_weights

    def fake_gpu(total: int) -> None:
        monkeypatch.setattr("torch.cuda.get_device_properties", lambda index: SimpleNamespace(total_memory=total))

    def never_built(*args: object, **kwargs: object) -> None:
        raise StoppedLoading

    monkeypatch.setattr(model_source, "build_model", never_built)
    monkeypatch.setattr(materialize, "physical_memory", lambda: need // 2)  # the host alone would refuse
    fake_gpu(need * 2)
    with pytest.raises(StoppedLoading):
        peftc.materialize(plan)
    fake_gpu(need // 2)
    with pytest.raises(peftc.PlanError, match=r"more than GPU 0's 0.0 GiB of memory"):
        peftc.materialize(plan)
