"""Config and plan errors of the non-LoRA methods: each names the key to fix, and where peft
refuses the same thing, peft refuses it too."""

from __future__ import annotations

import warnings

import pytest

import peftc
from peftc.errors import ConfigError, MergeError, PlanError
from peftc.planning.layout import config_to_write
from tests.helpers import build_base, run_cli
from tests.method_cases import oracle_config


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["peft=oft", "peft.r=4"], "peft.r"),  # r and oft_block_size both set
        (["peft=oft", "peft.oft_block_size=0"], "peft.r"),  # neither set
        (["peft=oft", "peft.oft_block_size=24"], "peft.oft_block_size"),  # 24 does not divide 64
        (["peft=oft", "peft.oft_block_size=0", "peft.r=3"], "peft.r"),
        (
            ["peft=ia3", "peft.target_modules=[q_proj]", "peft.feedforward_modules=[down_proj]"],
            "peft.feedforward_modules",
        ),
        (["peft=ia3", "peft.feedforward_modules='(down'"], "peft.feedforward_modules"),  # not a regex
        (["peft=lokr", "peft.decompose_factor=0"], "peft.decompose_factor"),
        (["peft=lokr", "peft.init_weights=gaussian"], "peft.init_weights"),
        (["peft=loha", "peft.rank_pattern={q_proj: 0}"], "peft.rank_pattern.q_proj"),
        (["peft=loha", "peft.alpha_pattern={q_proj: -1}"], "peft.alpha_pattern.q_proj"),
        (["peft=adalora", "peft.target_modules=[q_proj]", "peft.exclude_modules=[q_prj]"], "peft.exclude_modules"),
        (["peft=hra", "peft.r=7"], "peft.r"),  # odd: the default init cannot pair the reflections
        (["peft=hra", "peft.r=66", "peft.apply_GS=true", "peft.init_weights=false"], "peft.r"),  # > 64 inputs
        (["peft=hra", "peft.bias=lora_only"], "peft.bias"),
        (["peft=hra", "peft.target_modules=[embed_tokens]"], "peft.target_modules"),  # Linear and Conv2d only
        (["peft=ln_tuning", "peft.target_modules=[q_proj]"], "peft.target_modules"),  # norms only
        (["peft=vera", "peft.exclude_modules=[q_proj]"], "peft.exclude_modules"),  # not a VeraConfig field
        (["peft=vera", "peft.projection_prng_key=1.5"], "peft.projection_prng_key"),
        (["peft=vera", "peft.vera_dropout=1.0"], "peft.vera_dropout"),
        (["peft=vera", "peft.bias=lora_only"], "peft.bias"),
        (["peft=vera", "peft.target_modules=[embed_tokens]"], "peft.target_modules"),  # Linear and Conv1D only
        (["peft=ln_tuning", "model=tiny_bert"], "peft.target_modules"),  # no default table entry for bert
    ],
)
def test_config_errors_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        peftc.compile(overrides)
    assert error.value.key == key


def test_an_oft_block_size_that_does_not_divide_a_layer_suggests_divisors() -> None:
    with pytest.raises(PlanError, match=r"use a divisor of 64 such as 16 or 32, or peft.adjust_block_size=true"):
        peftc.compile(["peft=oft", "peft.oft_block_size=24"])


@pytest.mark.parametrize(
    ("conv", "fragment"),
    [
        ({"kernel_size": (3, 1), "padding": (1, 0)}, "square kernels only"),
        ({"kernel_size": 3, "padding": 2, "dilation": 2}, "dilated Conv2d"),
    ],
)
def test_oft_s_patch_transform_refuses_the_conv2d_peft_0_21_cannot_rotate(
    conv: dict[str, object], fragment: str
) -> None:
    """peft < 0.22's conv transform (kept for the adapters it trained) sized the rotation as
    C*k[0]*k[0] and refused dilation; peft 0.22's weight rotation takes both (tests/test_methods.py)."""
    from torch import nn

    from peftc.methods.oft.method import OFTSpec
    from tests.conv_model import TinyConvNet, plan_for

    model = TinyConvNet()
    model.conv = nn.Conv2d(4, 8, **conv)
    with pytest.raises(PlanError, match=fragment) as error:
        plan_for(model, OFTSpec(target_modules=["conv"], oft_block_size=4, conv_transform="patches"))
    assert "peft.exclude_modules=[conv], or peft.conv_transform=weight" in str(error.value)
    plan_for(model, OFTSpec(target_modules=["conv"], oft_block_size=4))  # rotating the weight


def test_oft_adjust_block_size_follows_peft_per_layer() -> None:
    from peft import get_peft_model

    plan = peftc.compile(
        ["peft=oft", "peft.oft_block_size=24", "peft.target_modules=[q_proj,down_proj]"]
        + ["peft.adjust_block_size=true"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(build_base(plan), oracle_config(plan, _LM))
    for site in plan.sites:
        layer = theirs.base_model.model.get_submodule(site.path)
        assert (site.options["blocks"], site.options["block_size"]) == (
            layer.r["default"],
            layer.oft_block_size["default"],
        )
    assert plan.trainable_params == theirs.get_nb_trainable_parameters()[0]


class _Lm:
    custom = False


_LM = _Lm()


@pytest.mark.parametrize("method", ["loha", "lokr", "oft"])
def test_gpt2_conv1d_is_refused_like_peft(method: str) -> None:
    """GPT-2's attention is transformers' Conv1D, which peft's LoHa/LoKr/OFT cannot wrap."""
    from peft import get_peft_config, get_peft_model

    with pytest.raises(PlanError, match="cannot adapt") as error:
        peftc.compile([f"peft={method}", "model=tiny_gpt2"])
    assert error.value.key == "peft.target_modules"
    plan = peftc.compile([f"peft={method}", "model=tiny_gpt2", "peft.target_modules=[lm_head]"])
    config = {**config_to_write(plan.adapter_config), "inference_mode": False, "target_modules": ["c_attn"]}
    with pytest.raises((TypeError, ValueError)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(build_base(plan), get_peft_config(config))


def test_the_cli_refuses_adalora_without_a_step_count(tmp_path) -> None:
    result = run_cli(["peft=adalora", "trainer.max_steps=-1", "trainer.max_epochs=1", "dry_run=true"], cwd=tmp_path)
    assert result.returncode == 2
    assert "trainer.max_steps" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("target", ["grouped", "seq"])
def test_hra_refuses_convolutions_peft_cannot_run(target: str) -> None:
    """A grouped Conv2d (peft raises) and a Conv1d (peft: not supported) are refused by name."""
    from peftc import methods
    from tests.conv_model import TinyConvNet, plan_for

    spec = methods.get("hra").schema(target_modules=(target,), r=2)
    with pytest.raises(PlanError, match=target) as error:
        plan_for(TinyConvNet(), spec)
    assert error.value.key == "peft.target_modules"


def test_adalora_refuses_a_grouped_conv2d_by_name_as_peft_raises_on_it() -> None:
    from peft import AdaLoraConfig, get_peft_model

    from peftc import methods
    from tests.conv_model import TinyConvNet, plan_for

    spec = methods.get("adalora").schema(target_modules=("conv", "grouped"))
    with pytest.raises(PlanError, match="grouped Conv2d") as error:
        plan_for(TinyConvNet(), spec)
    assert error.value.key == "peft.target_modules" and error.value.value == "grouped"
    assert "peft.exclude_modules=[grouped]" in str(error.value)
    with pytest.raises(ValueError, match="groups > 1"):
        get_peft_model(TinyConvNet(), AdaLoraConfig(target_modules=["grouped"], total_step=10))


def test_ln_tuning_merges_one_adapter_at_a_time_like_peft() -> None:
    plan = peftc.compile(["peft=ln_tuning"])
    model = peftc.materialize(plan, base_model=build_base(plan))
    model.add_adapter("other", plan)
    with pytest.raises(MergeError, match="one adapter at a time"):
        model.merge_adapter(["default", "other"])
    assert not any(layer.merged_adapters for _, layer in model.adapter_layers())


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("peft.projection_prng_key=1", "peft.projection_prng_key"),
        ("peft.save_projection=false", "peft.save_projection"),
    ],
)
def test_vera_adapters_beside_each_other_share_key_and_saving_like_peft(override: str, key: str) -> None:
    from peft import get_peft_model

    first = peftc.compile(["peft=vera", "peft.r=4"])
    second = peftc.compile(["peft=vera", "peft.r=4", override, "adapter_name=other"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(build_base(first), oracle_config(first, _LM))
        with pytest.raises(ValueError, match="PRNG initialisation key must be the same|saved for all adapters or none"):
            theirs.add_adapter("other", oracle_config(second, _LM))
    ours = peftc.materialize(first, base_model=build_base(first))
    with pytest.raises(ConfigError) as refused:
        ours.add_adapter("other", second)
    assert refused.value.key == key


def test_default_target_tables_are_peft_s() -> None:
    """peft.target_modules=null resolves through these tables, which are peft 0.22.0's own, every
    model type peft knows (a missing one refused a config peft accepts; the peft oracle tests pass
    the resolved lists to peft, so only this compares the defaults themselves)."""
    from peft.utils import constants

    from peftc.methods import defaults
    from peftc.methods.ln_tuning import LN_TUNING_TARGETS
    from peftc.methods.vera import VERA_TARGETS

    def peft_s(mapping: str) -> dict[str, defaults.Targets]:
        table = getattr(constants, f"TRANSFORMERS_MODELS_TO_{mapping}")
        return {model: m if isinstance(m, str) else tuple(m) for model, m in table.items()}

    def assert_copied(ours: dict[str, defaults.Targets], mapping: str) -> None:
        theirs = peft_s(mapping)
        if mapping.startswith("LNTUNING"):
            theirs.pop("llava")  # its entry copies the projector, embeddings and head in full too
        assert ours == theirs, mapping

    for mapping in ("LORA", "LOHA", "LOKR", "OFT", "HRA"):
        assert_copied(defaults.LORA_TARGETS, f"{mapping}_TARGET_MODULES_MAPPING")
    assert_copied(defaults.IA3_TARGETS, "IA3_TARGET_MODULES_MAPPING")
    assert_copied(defaults.IA3_FEEDFORWARD, "IA3_FEEDFORWARD_MODULES_MAPPING")
    assert_copied(defaults.ADALORA_TARGETS, "ADALORA_TARGET_MODULES_MAPPING")
    assert_copied(VERA_TARGETS, "VERA_TARGET_MODULES_MAPPING")
    assert_copied(LN_TUNING_TARGETS, "LNTUNING_TARGET_MODULES_MAPPING")
    assert "llava" in peft_s("LNTUNING_TARGET_MODULES_MAPPING") and "llava" not in LN_TUNING_TARGETS


@pytest.mark.parametrize("method", ["lora", "loha", "adalora"])
def test_a_default_that_is_a_regex_selects_by_regex_and_is_written_as_one(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """peft's Gemma 4 default is a regex over module paths (its language model's projections), not a
    list of names: planned as a regex, and written as the string peft reads as one, by LoRA and by
    the methods that share its table (LoHa) or have their own with the entry (AdaLoRA)."""
    from peftc.methods import defaults

    for table in (defaults.LORA_TARGETS, defaults.ADALORA_TARGETS):
        monkeypatch.setitem(table, "llama", r".*layers\.1\.self_attn\.(q_proj|v_proj)")
    plan = peftc.compile(["model=tiny_llama", f"peft={method}"])
    assert [s.path for s in plan.sites] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert plan.adapter_config["target_modules"] == r".*layers\.1\.self_attn\.(q_proj|v_proj)"
