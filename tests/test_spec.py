"""Config errors: caught at compose/spec time, each naming the key, the value and a fix."""

from __future__ import annotations

import dataclasses
import math

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
    (["peft.lora_dropout=1.0"], "peft.lora_dropout=1.0", "must be in [0.0, 1.0)"),  # would drop every input
    (["data.val_fraction=1.0"], "data.val_fraction=1.0", "must be in [0.0, 1.0)"),  # would leave nothing to train on
    (["peft.lora_alpha=0"], "peft.lora_alpha", "must be > 0"),
    (["peft.r=abc"], "peft.r='abc'", "expected int"),
    (["peft=lorra"], "peft='lorra'", "did you mean 'lora'"),
    (["task=causal"], "task='causal'", "did you mean 'causal_lm'"),
    (["trainer.scheduler=cosin"], "trainer.scheduler='cosin'", "did you mean 'cosine'"),
    (["trainer.max_steps=0"], "trainer.max_steps", "must be positive"),
    (["trainer.max_steps=-1"], "trainer.max_steps", "training would never stop"),  # -1 needs max_epochs
    (["trainer.lr=-1"], "trainer.lr", "must be > 0"),
    (["data.batch_size=0"], "data.batch_size", "must be >= 1"),
    (["model=hf"], "model.name_or_path", "no model given; set model.name_or_path=<dir or hub id>"),
    (["model=hf", "model.name_or_path=' '"], "model.name_or_path=' '", "is empty"),
    (["adapter_name=my.adapter"], "adapter_name='my.adapter'", "no dots"),
    (["peft.init_lora_weights=pissa_fast"], "peft.init_lora_weights", "use true, false, gaussian, pissa"),
    (["peft.rank_pattern={q_proj: 0}"], "peft.rank_pattern.q_proj=0", ">= 1"),
    (["peft.rank_pattern={q_proj: two}"], "peft.rank_pattern", "mapping of names to ranks"),
    (["peft.rank_pattern={q_proj: true}"], "peft.rank_pattern", "mapping of names to ranks"),  # a bool is no rank
    (["data.columns=[text]"], "data.columns", "mapping of names to column names"),
    (["trainer.betas=[0.9]"], "trainer.betas", "two numbers"),
    (["trainer.betas=[0.9,1.0]"], "trainer.betas", "two numbers in [0, 1)"),  # beta2 = 1: no second moment decay
    (
        ["trainer.betas=[-0.1,0.999]"],
        "trainer.betas",
        "two numbers in [0, 1)",
    ),  # torch's AdamW refuses it only once training starts
    (["data.eval_batch_size=0"], "data.eval_batch_size=0", "must be >= 1"),
    (["data.max_length=4"], "data.max_length=4", "must be >= 8"),
    (["input_file=rows.txt"], "input_file='rows.txt'", "is only read by action=predict"),
    (["input=hello"], "input='hello'", "is only read by action=predict"),
    (
        ["+model.config.auto_map={AutoConfig: evil.EvilConfig}"],
        "model.config.auto_map",
        "would let the model's files run code",
    ),
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


OTHER_TOOLS_SPELLINGS = [
    ("peft.lora_r=8", "peft.lora_r", "peft.r"),  # axolotl's name; the nearest spelling would be lora_bias
    ("peft.rank=8", "peft.rank", "peft.r"),
    ("+lora_r=8", "lora_r", "peft.r"),
    ("trainer.learning_rate=1e-4", "trainer.learning_rate", "trainer.lr"),  # the HF Trainer's
    ("trainer.gradient_accumulation_steps=4", "trainer.gradient_accumulation_steps", "trainer.accumulate_grad_batches"),
    ("data.max_seq_length=128", "data.max_seq_length", "data.max_length"),  # TRL's
    ("r=8", "r", "peft.r"),  # a group's key at the top level
    ("+lr=1e-4", "lr", "trainer.lr"),
]


@pytest.mark.parametrize(
    ("override", "key", "meant"), OTHER_TOOLS_SPELLINGS, ids=[o for o, _, _ in OTHER_TOOLS_SPELLINGS]
)
def test_a_key_spelled_as_other_tools_spell_it_is_answered_with_peftcs_key(override: str, key: str, meant: str) -> None:
    with pytest.raises(ConfigError) as info:
        to_spec(compose([override]))
    assert str(info.value).startswith(f"{key}: unknown key") and f"did you mean {meant}?" in str(info.value)


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


def _float_fields() -> list[tuple[str, str, str]]:
    """(group, option, field) for every float field of every registered schema."""
    from peftc.config.registry import import_registries
    from peftc.config.spec import GROUPS, schemas

    import_registries()
    return sorted(
        (group, option, f.name)
        for group in GROUPS
        for option, schema in schemas(group).items()
        for f in dataclasses.fields(schema)
        if "float" in str(f.type) and "list" not in str(f.type)
    )


FLOAT_FIELDS = _float_fields()


def test_the_schemas_have_float_fields_to_guard() -> None:
    assert len(FLOAT_FIELDS) >= 15 and ("trainer", "base", "lr") in FLOAT_FIELDS


@pytest.mark.parametrize("number", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize(("group", "option", "name"), FLOAT_FIELDS, ids=["/".join(f) for f in FLOAT_FIELDS])
def test_every_float_of_every_schema_refuses_non_finite_numbers(
    group: str, option: str, name: str, number: float
) -> None:
    from peftc.config.spec import schemas, validate

    schema = schemas(group)[option]
    node = schema(**{name: number}) if group != "model" else schema(model_type="llama", **{name: number})
    with pytest.raises(ConfigError, match="must be a finite number") as info:
        validate(node, group, cross=False)
    assert info.value.key == f"{group}.{name}"


@pytest.mark.parametrize(
    "override",
    ["trainer.lr=inf", "peft.lora_alpha=nan", "trainer.betas=[0.9,inf]", "peft.alpha_pattern={q_proj: -inf}"],
)
def test_non_finite_numbers_are_refused_in_scalars_lists_and_mappings(override: str) -> None:
    with pytest.raises(ConfigError, match="must be a finite number"):
        to_spec(compose([override]))


@pytest.mark.parametrize("name", ["default\n", "default\r\n", "a\nb", " default"])
def test_adapter_names_must_match_entirely(name: str) -> None:
    from peftc.config.spec import check_adapter_name

    with pytest.raises(ConfigError, match="not a valid adapter name"):
        check_adapter_name("adapter_name", name)


def test_accelerator_names_are_lightnings() -> None:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    from peftc.config.lightning_values import ACCELERATORS

    assert set(ACCELERATORS) == set(AcceleratorRegistry.available_accelerators()) | {"auto", "gpu"}


def test_precision_names_are_lightnings() -> None:
    import typing

    from lightning.fabric.plugins.precision import precision as lightning_precision

    from peftc.config.lightning_values import PRECISION_ALIASES, PRECISIONS

    assert set(PRECISIONS) == set(typing.get_args(lightning_precision._PRECISION_INPUT_STR))
    assert PRECISION_ALIASES == lightning_precision._PRECISION_INPUT_STR_ALIAS_CONVERSION


@pytest.mark.parametrize(
    ("devices", "accepted"),
    [(1, True), (-1, True), ("auto", True), ("2", True), ("0,1", True), ([0, 1], True)]
    + [(0, False), ("0", False), ([], False), ("abc", False), (True, False), ([0, 0], False), (1.5, False)],
)
def test_devices_accept_what_lightning_accepts(devices: object, accepted: bool) -> None:
    from peftc.config.lightning_values import lightning_devices

    assert (lightning_devices(devices) is None) is accepted


def test_a_first_beta_of_zero_is_accepted() -> None:
    """beta1 = 0 (no first-moment averaging) is a valid AdamW setting; only [0, 1) is required."""
    assert to_spec(compose(["trainer.betas=[0.0,0.999]"])).trainer.betas == (0.0, 0.999)


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seeds_outside_numpys_range_are_refused(seed: int) -> None:
    with pytest.raises(ConfigError, match=r"seed=.*must be in \[0, 4294967295\]"):
        to_spec(compose([f"seed={seed}"]))
