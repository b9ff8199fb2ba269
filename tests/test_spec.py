"""Config errors: caught at compose/spec time, each naming the key, the value and a fix."""

from __future__ import annotations

import dataclasses

import pytest

import peftc
from peftc.config.compose import compose, to_spec
from peftc.config.spec import RunSpec
from peftc.errors import ConfigError, PlanError

BAD_OVERRIDES = [
    (["peft.rr=8"], "peft.rr", "did you mean 'r'"),
    (["+peft.rr=8"], "peft.rr", "did you mean 'r'"),
    (["peft.r=0"], "peft.r=0", "must be >= 1"),
    (["peft.r=-3"], "peft.r=-3", "must be >= 1"),
    (["peft.lora_dropout=1.5"], "peft.lora_dropout=1.5", "must be in [0.0, 1.0)"),
    (["peft.lora_alpha=0"], "peft.lora_alpha", "must be > 0"),
    (["peft.r=abc"], "peft.r='abc'", "expected int"),
    (["peft=lorra"], "peft='lorra'", "did you mean 'lora'"),
    (["task=causal"], "task='causal'", "did you mean 'causal_lm'"),
    (["trainer.scheduler=cosin"], "trainer.scheduler='cosin'", "did you mean 'cosine'"),
    (["trainer.max_steps=0"], "trainer.max_steps", "must be positive"),
    (["trainer.lr=-1"], "trainer.lr", "must be > 0"),
    (["data.batch_size=0"], "data.batch_size", "must be >= 1"),
    (["model=hf"], "model.name_or_path", "no model given; set model.name_or_path=<dir or hub id>"),
    (["adapter_name=my.adapter"], "adapter_name='my.adapter'", "no dots"),
    (["peft.init_lora_weights=pissa_fast"], "peft.init_lora_weights", "use true, false, gaussian, pissa"),
    (["peft.rank_pattern={q_proj: 0}"], "peft.rank_pattern.q_proj=0", ">= 1"),
    (["peft.rank_pattern={q_proj: two}"], "peft.rank_pattern", "mapping of names to ranks"),
    (["data.columns=[text]"], "data.columns", "mapping of names to column names"),
    (["trainer.betas=[0.9]"], "trainer.betas", "two numbers"),
]


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"), BAD_OVERRIDES, ids=[" ".join(o) for o, _, _ in BAD_OVERRIDES]
)
def test_bad_override_is_one_clear_config_error(overrides: list[str], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        to_spec(compose(overrides))
    message = str(info.value)
    assert message.startswith(key), message
    assert fragment in message, message


def test_missing_local_model_path_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model.name_or_path='/no/such/model': no such directory"):
        peftc.compile(["model=hf", "model.name_or_path=/no/such/model"])


def test_misspelled_target_module_suggests_the_real_name() -> None:
    with pytest.raises(
        PlanError,
        match=r"peft.target_modules='q_prj': no module named 'q_prj' in LlamaForCausalLM; did you mean 'q_proj'",
    ):
        peftc.compile(["peft.target_modules=[q_prj,v_proj]"])


def test_spec_is_sealed_after_compose() -> None:
    run = to_spec(compose([]))
    assert isinstance(run, RunSpec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.peft.r = 4
    assert run.peft.replace(r=4).r == 4 and run.peft.r == 8


def test_lists_become_tuples_in_the_spec() -> None:
    run = to_spec(compose(["peft.target_modules=[q_proj,v_proj]"]))
    assert run.peft.target_modules == ("q_proj", "v_proj")


def test_every_schema_field_has_a_description() -> None:
    from peftc.config.registry import import_registries
    from peftc.config.spec import _SCHEMAS

    import_registries()
    for (group, name), schema in _SCHEMAS.items():
        for field in dataclasses.fields(schema):
            if group == "run" or schema is RunSpec:
                continue
            assert field.metadata.get("help"), f"{group}/{name}.{field.name} has no description"
