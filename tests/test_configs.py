"""Every shipped config composes and compiles; the plans of shipped configs match golden files.

Update the golden files after an intended plan change with PEFTC_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import torch

import peftc
from peftc.config.compose import CONFIG_MODULE
from peftc.errors import ConfigError

# Wherever the config package is installed from (conf/ at the top of a checkout).
CONF = Path(importlib.import_module(CONFIG_MODULE).__file__).parent
GOLDEN = Path(__file__).parent / "golden"
GROUPS = ("peft", "task", "quant", "model", "data", "trainer")
# Options that need a value no config can know (a user's path) get it here.
NEEDS = {("model", "hf"): ["model.name_or_path={tiny_llama_dir}"]}
# Each model is compiled with a task it supports, each task with a model it supports
# (the defaults are task=causal_lm, model=tiny_llama).
TASK_OF_MODEL = {"tiny_t5": "seq2seq_lm", "tiny_bert": "seq_cls", "minilm": "seq_cls"}
MODEL_OF_TASK = {"seq2seq_lm": "tiny_t5"}
# Options for hardware this machine may lack.
NEEDS_CUDA = {("trainer", "gpu"), ("trainer", "ddp"), ("trainer", "fsdp")}


def with_partner(group: str, option: str) -> list[str]:
    if group == "model" and option in TASK_OF_MODEL:
        return [f"task={TASK_OF_MODEL[option]}"]
    if group in ("task", "data") and option in MODEL_OF_TASK:
        return [f"model={MODEL_OF_TASK[option]}"]
    return []


def shipped_options() -> list[tuple[str, str]]:
    return [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]


def test_the_shipped_options_are_found() -> None:
    # An empty list would turn the parametrized tests below into one silent skip.
    assert {group for group, _ in shipped_options()} == set(GROUPS)


@pytest.mark.parametrize(("group", "option"), shipped_options(), ids=lambda x: x)
def test_every_shipped_option_compiles(group: str, option: str, tiny_llama_dir: str) -> None:
    overrides = [f"{group}={option}", *with_partner(group, option)] + [
        o.format(tiny_llama_dir=tiny_llama_dir) for o in NEEDS.get((group, option), [])
    ]
    if group == "data":
        overrides.append(f"task={option}" if (CONF / "task" / f"{option}.yaml").exists() else "task=causal_lm")
    if (group, option) in NEEDS_CUDA and not torch.cuda.is_available():
        # The GPU presets on a machine without one: refused in one line when compiled.
        with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
            peftc.compile(overrides)
        return
    plan = peftc.compile(overrides)
    assert plan.trainable_params > 0


def golden_cases() -> list[tuple[str, list[str]]]:
    cases = [("default", [])]
    cases += [
        (f"{group}-{option}", [f"{group}={option}", *with_partner(group, option)])
        for group, option in shipped_options()
        if (group, option) not in NEEDS and group in ("peft", "model", "quant")
    ]
    return cases


@pytest.mark.parametrize(("name", "overrides"), golden_cases(), ids=lambda x: x if isinstance(x, str) else None)
def test_plan_matches_golden(name: str, overrides: list[str]) -> None:
    plan = peftc.compile(overrides).to_dict()
    path = GOLDEN / f"{name}.json"
    if os.environ.get("PEFTC_UPDATE_GOLDEN") == "1":
        path.write_text(json.dumps(plan, indent=1, sort_keys=True) + "\n")
    assert path.exists(), f"no golden plan for {name}: run the tests once with PEFTC_UPDATE_GOLDEN=1"
    assert plan == json.loads(path.read_text()), (
        f"plan of {name} changed; if intended, regenerate with PEFTC_UPDATE_GOLDEN=1"
    )


def test_config_module_is_importable_as_package_data() -> None:
    import importlib

    module = importlib.import_module(CONFIG_MODULE)
    assert (Path(module.__file__).parent / "config.yaml").exists()
