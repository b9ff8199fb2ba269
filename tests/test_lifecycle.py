"""The adapter lifecycle on PeftcModel against peft: combining adapters (add_weighted_adapter),
several adapters at once (merge, save, load), and the rules for adapters sharing a model."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import peftc
from peftc.files.load import fill
from peftc.methods.lora.method import LoraSpec
from peftc.planning.layout import config_to_write
from peftc.planning.plan import Plan
from tests.conv_model import TinyConvNet, images, plan_for
from tests.helpers import PISSA_ROUNDING, build_base, max_diff, token_batch

warnings.filterwarnings("ignore", message=r".*(already merged|Already unmerged|modify a model with PEFT).*")

ADAPTERS = {
    "a": ["peft.target_modules=[q_proj,v_proj]", "peft.r=4", "peft.lora_alpha=8"],
    "b": ["peft.target_modules=[q_proj,o_proj]", "peft.r=4", "peft.lora_alpha=4", "peft.use_rslora=true"],
    "c": ["peft.target_modules=[q_proj,v_proj]", "peft.r=2", "peft.lora_alpha=16"],
    "dora": ["peft.target_modules=[q_proj,o_proj]", "peft.r=2", "peft.use_dora=true"],
    "biased": ["peft.target_modules=[q_proj,v_proj]", "peft.r=4", "peft.lora_bias=true"],
    "biased_random": [
        "peft.target_modules=[q_proj,v_proj]",
        "peft.r=4",
        "peft.lora_bias=true",
        "peft.init_lora_weights=false",
    ],
    "embed": ["peft.target_modules=[embed_tokens,q_proj]", "peft.r=4"],
}


def plans(*names: str) -> dict[str, Plan]:
    return {n: peftc.compile(["model=tiny_llama", *ADAPTERS[n]]) for n in names}


def peft_config(plan: Plan) -> Any:
    from peft import get_peft_config

    return get_peft_config({**config_to_write(plan.adapter_config), "inference_mode": False})


def several(*names: str) -> tuple[dict[str, Plan], Any, Any]:
    """Ours and peft's with the same adapters (peft's perturbed weights copied into ours)."""
    from peft import get_peft_model, get_peft_model_state_dict

    chosen = plans(*names)
    base = build_base(next(iter(chosen.values())))
    theirs = get_peft_model(
        build_base(next(iter(chosen.values()))), peft_config(chosen[names[0]]), adapter_name=names[0]
    )
    ours = peftc.materialize(chosen[names[0]], base_model=base, adapter_name=names[0])
    for name in names[1:]:
        theirs.add_adapter(name, peft_config(chosen[name]))
        ours.add_adapter(name, chosen[name])
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for pname, param in sorted(theirs.named_parameters()):
            if any(f".{n}" in pname for n in names) and "lora_" in pname:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    for name in names:
        fill(ours, name, get_peft_model_state_dict(theirs, adapter_name=name))
    return chosen, ours.eval(), theirs.eval()


def logits(model: Any) -> torch.Tensor:
    return model(input_ids=token_batch()).logits


def activate(ours: Any, theirs: Any, names: str | list[str]) -> None:
    ours.set_adapter(names)
    theirs.base_model.set_adapter(names)


COMBINATIONS = [
    ("linear", ("a", "b"), [0.7, -0.4], {}),
    ("cat", ("a", "c"), [0.7, -0.4], {}),
    ("svd", ("a", "b", "c"), [0.5, 0.3, -1.2], {}),
    ("svd", ("b", "c"), [1.0, 1.0], {"svd_rank": 3}),
    ("svd", ("a", "b"), [1.0, 1.0], {"svd_clamp": 0.5}),  # U and V clamped at their median value
    ("linear", ("c",), [2.0], {}),
    ("linear", ("a", "biased"), [0.7, 0.5], {}),  # the result has lora_bias: w_i s_i b_i summed (peft 0.22)
    ("linear", ("biased_random", "biased"), [0.7, 0.5], {}),  # the new adapter's random bias is zeroed first
]


@pytest.mark.parametrize(("combination", "names", "weights", "options"), COMBINATIONS)
def test_weighted_adapter_matches_peft(
    combination: str, names: tuple[str, ...], weights: list[float], options: dict, tmp_path: Path
) -> None:
    from peft import PeftModel, get_peft_model_state_dict

    _, ours, theirs = several(*names)
    plan = ours.add_weighted_adapter(list(names), weights, "mix", combination, **options)
    theirs.add_weighted_adapter(list(names), weights, "mix", combination_type=combination, **options)
    expected = {k: v for k, v in get_peft_model_state_dict(theirs, adapter_name="mix").items()}
    mine = ours.adapter_state_dict("mix")
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert plan.trainable_params == sum(v.numel() for v in expected.values())
    assert not any(p.requires_grad for n, p in theirs.named_parameters() if ".mix" in n)
    assert not any(p.requires_grad for p in ours.adapter_state_dict("mix").values()), "added frozen, as peft"
    activate(ours, theirs, "mix")
    assert max_diff(logits(ours), logits(theirs)) <= 1e-5
    assert max_diff(logits(ours), logits(build_base(plan))) > 1e-4, "the combination must do something (sanity)"
    if combination != "svd":  # SVD factors are unique only up to signs; the logits above pin the product
        assert max(max_diff(mine[k], expected[k]) for k in mine) <= 1e-6
    ours.save_adapter(tmp_path, ["mix"])
    reloaded = PeftModel.from_pretrained(build_base(plan), tmp_path / "mix").eval()
    assert max_diff(logits(reloaded), logits(theirs)) <= 1e-5


def test_weighted_adapter_ranks_follow_peft() -> None:
    _, ours, _ = several("a", "c")
    assert ours.add_weighted_adapter(["a", "c"], [1, 1], "cat", "cat").spec.peft.r == 6
    assert ours.add_weighted_adapter(["a", "c"], [1, 1], "svd", "svd").spec.peft.r == 4
    assert ours.add_weighted_adapter(["a", "c"], [1, 1], "svd2", "svd", svd_rank=2).spec.peft.r == 2
    assert ours.plan_of("cat").spec.peft.target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize(
    ("names", "weights", "combination", "key"),
    [
        (["a", "c"], [1.0, 1.0], "linear", "combination_type"),  # unequal ranks
        (["a", "b"], [1.0, 1.0], "ties", "combination_type"),
        (["a", "nope"], [1.0, 1.0], "svd", "adapter_name"),
        (["a", "b"], [1.0], "svd", "weights"),
        (["a", "dora"], [1.0, 1.0], "svd", "adapters"),
        (["biased", "embed"], [1.0, 1.0], "cat", "adapters"),  # an embedding's update cannot carry a bias
    ],
)
def test_weighted_adapter_refusals_name_the_argument(
    names: list[str], weights: list[float], combination: str, key: str
) -> None:
    _, ours, _ = several(*dict.fromkeys(["a", "b", *(n for n in names if n in ADAPTERS)]))  # only those needed
    before = list(ours.adapter_names)
    with pytest.raises(peftc.ConfigError) as info:
        ours.add_weighted_adapter(names, weights, "mix", combination)
    assert str(info.value).startswith(key)
    assert ours.adapter_names == before


def test_weighted_adapter_needs_a_new_name_and_peft_refuses_unequal_linear_ranks() -> None:
    _, ours, theirs = several("a", "c")
    with pytest.raises(peftc.ConfigError, match="already exists"):
        ours.add_weighted_adapter(["a", "c"], [1, 1], "c", "cat")  # peft silently returns instead
    with pytest.raises(ValueError, match="same r value"):
        theirs.add_weighted_adapter(["a", "c"], [1, 1], "mix", combination_type="linear")


def test_several_active_adapters_with_dora_merge_like_peft() -> None:
    _, ours, theirs = several("a", "dora")
    activate(ours, theirs, ["a", "dora"])
    expected = logits(theirs)
    assert max_diff(logits(ours), expected) <= 1e-5
    weights = {n: p.detach().clone() for n, p in ours.base_model.named_parameters() if "lora" not in n}
    ours.merge_adapter()
    theirs.merge_adapter()
    assert max_diff(logits(ours), expected) <= 1e-5
    assert max_diff(logits(ours), logits(theirs)) <= 1e-5
    ours.unmerge_adapter()
    after = dict(ours.base_model.named_parameters())
    assert max(max_diff(weights[n], after[n]) for n in weights) <= 1e-6


def test_only_one_adapter_may_train_base_biases() -> None:
    from peft import get_peft_model

    first = peftc.compile(["model=tiny_gpt2", "peft.bias=all"])
    second = peftc.compile(["model=tiny_gpt2", "peft.bias=lora_only"])
    ours = peftc.materialize(first)
    with pytest.raises(peftc.ConfigError, match="peft.bias='lora_only': adapter 'default' already trains"):
        ours.add_adapter("second", second)
    assert ours.adapter_names == ["default"]
    theirs = get_peft_model(build_base(first), peft_config(first))
    with pytest.raises(ValueError, match="only 1 adapter with bias"):
        theirs.add_adapter("second", peft_config(second))


def with_a_bias_free_second_adapter(bias: str):
    """A gpt2 model whose default adapter trains biases (peft.bias) and an 'other' one that does not."""
    plan = peftc.compile(["model=tiny_gpt2", f"peft.bias={bias}"])
    other = peftc.compile(["model=tiny_gpt2", "peft.target_modules=[c_proj]"])
    model = peftc.materialize(plan)
    model.add_adapter("other", other)
    return plan, other, model


def test_deleting_an_adapter_freezes_the_biases_it_trained() -> None:
    plan, other, model = with_a_bias_free_second_adapter("lora_only")
    model.delete_adapter("default")
    model.set_adapter("other")
    assert model.trainable_parameters() == other.trainable_params


def test_several_adapters_round_trip_through_one_directory(tmp_path: Path) -> None:
    chosen, ours, theirs = several("a", "b")
    expected = {}
    for name in ("a", "b"):
        activate(ours, theirs, name)
        expected[name] = logits(theirs)
    ours.save_adapter(tmp_path / "ours", ["a", "b"])
    theirs.save_pretrained(tmp_path / "theirs")
    for source in ("ours", "theirs"):
        root = tmp_path / source  # peft: the first adapter at the root only if it is 'default'
        loaded = peftc.load_adapter(build_base(chosen["a"]), root / "a", adapter_name="a")
        loaded = peftc.load_adapter(loaded, root / "b", adapter_name="b")
        for name in ("a", "b"):
            loaded.set_adapter(name)
            assert max_diff(logits(loaded), expected[name]) <= 1e-5, (source, name)


def test_merge_refusal_in_one_layer_leaves_every_layer_unmerged() -> None:
    model_base = TinyConvNet()
    plan = plan_for(model_base, LoraSpec(target_modules=["conv", "grouped"], r=4, init_lora_weights=False))
    model = peftc.materialize(plan, base_model=model_base)
    before = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
    with pytest.raises(ValueError, match="groups"):
        model.merge_adapter()
    assert all(torch.equal(before[n], p) for n, p in model.base_model.named_parameters())
    assert not any(layer.merged_adapters for _, layer in model.adapter_layers())
    assert model(input_ids=images()).shape == (3, 5)


@pytest.mark.slow
def test_trained_pissa_dora_run_saves_an_adapter_and_merged_model_that_agree(tmp_path: Path) -> None:
    """The lifecycle from config: train, save the adapter and (save_merged) the merged model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.helpers import run_cli

    overrides = ["peft.use_dora=true", "peft.init_lora_weights=pissa", "trainer.max_steps=4"]
    result = run_cli([*overrides, "save_merged=true", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ours = peftc.load_adapter(tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(build_base(peftc.compile(overrides)), tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    expected = logits(theirs)
    assert max_diff(expected, logits(build_base(peftc.compile(overrides)))) > 1e-6, "training moved the adapter"
    # PiSSA's float32 SVD rounding (tests.helpers): torch 2.8's kernels put ours 1.6e-5 from peft's
    assert max_diff(logits(ours), expected) <= PISSA_ROUNDING
    assert max_diff(logits(merged), expected) <= PISSA_ROUNDING


@pytest.mark.parametrize(
    ("overrides", "broken"),
    [
        (["peft.use_dora=true"], "lora_magnitude_vector"),
        (["model=tiny_gpt2", "peft.lora_bias=true", "peft.init_lora_weights=false"], "lora_B.bias"),
    ],
)
def test_safe_merge_refuses_a_broken_variant_and_leaves_weights_bit_identical(
    overrides: list[str], broken: str
) -> None:
    plan = peftc.compile(overrides)
    model = peftc.materialize(plan)
    before = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if ".lora_" not in n}
    tensors = model.adapter_state_dict("default")
    victim = next(tensors[k] for k in sorted(tensors) if k.endswith(broken))
    with torch.no_grad():
        victim.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_adapter(safe_merge=True)
    assert all(torch.equal(before[n], p) for n, p in model.base_model.named_parameters() if ".lora_" not in n)


def test_set_adapter_switches_each_adapters_own_head_copy_like_peft() -> None:
    """seq_cls trains a copy of the classifier per adapter (modules_to_save): set_adapter must
    switch the copy in use with the LoRA factors, as peft's does."""
    from peft import get_peft_model, get_peft_model_state_dict

    plan = peftc.compile(["model=tiny_bert", "task=seq_cls", "task.labels=[a,b,c]"])
    theirs = get_peft_model(build_base(plan), peft_config(plan))
    theirs.add_adapter("other", peft_config(plan))
    ours = peftc.materialize(plan, base_model=build_base(plan))
    ours.add_adapter("other", plan)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # every adapter's tensors, heads included, away from their init
        for name, param in sorted(theirs.named_parameters()):
            if "lora_" in name or "modules_to_save" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    for name in ("default", "other"):
        fill(ours, name, get_peft_model_state_dict(theirs, adapter_name=name))
    ours.eval(), theirs.eval()
    x = token_batch()
    seen = []
    for name in ("other", "default", "other"):
        activate(ours, theirs, name)
        seen.append(ours(input_ids=x).logits)
        assert max_diff(seen[-1], theirs(input_ids=x).logits) <= 1e-5, name
    assert max_diff(seen[0], seen[1]) > 1e-3


def test_unload_gives_the_original_head_back_and_merge_and_unload_the_named_adapter_s_copy() -> None:
    """peft 0.22: unload() returns the modules_to_save originals; merge_and_unload(adapter_names)
    keeps the copy of the adapter it merges, and refuses two adapters that each have one."""
    from peft import get_peft_model, get_peft_model_state_dict

    plan = peftc.compile(["model=tiny_bert", "task=seq_cls"])
    base = build_base(plan)
    with torch.no_grad():
        reference = base(input_ids=token_batch()).logits

    def pair() -> tuple[Any, Any]:
        theirs = get_peft_model(build_base(plan), peft_config(plan))
        theirs.add_adapter("other", peft_config(plan))
        ours = peftc.materialize(plan, base_model=build_base(plan))
        ours.add_adapter("other", plan)
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, param in sorted(theirs.named_parameters()):
                if "lora_" in name or "modules_to_save" in name:
                    param.add_(0.3 * torch.randn(param.shape, generator=generator))
        for name in ("default", "other"):
            fill(ours, name, get_peft_model_state_dict(theirs, adapter_name=name))
        return ours.eval(), theirs.eval()

    ours, theirs = pair()
    with torch.no_grad():
        assert max_diff(ours.unload()(input_ids=token_batch()).logits, reference) <= 1e-6
    ours, theirs = pair()
    with pytest.raises(peftc.ConfigError, match="classifier"):
        ours.merge_and_unload(adapter_names=["default", "other"])
    merged, expected = ours.merge_and_unload(adapter_names=["other"]), theirs.merge_and_unload(adapter_names=["other"])
    with torch.no_grad():
        assert max_diff(merged(input_ids=token_batch()).logits, expected(input_ids=token_batch()).logits) <= 1e-5
    ours, theirs = pair()  # inside disable_adapter() too, the merged adapter's head copy is kept (peft 0.22)
    with ours.disable_adapter(), theirs.disable_adapter():
        merged, expected = ours.merge_and_unload(), theirs.merge_and_unload()
    with torch.no_grad():
        assert max_diff(merged(input_ids=token_batch()).logits, expected(input_ids=token_batch()).logits) <= 1e-5


def test_merging_all_active_adapters_after_one_was_merged_merges_the_others_like_peft() -> None:
    """'already merged' means every named adapter: merge_adapter(['a']) and then merge_adapter()
    with a and c active must still fold c in (peft merges what is not merged yet)."""
    _, ours, theirs = several("a", "c")  # the same targets: every layer has a merged one
    activate(ours, theirs, ["a", "c"])
    expected = logits(theirs)
    ours.merge_adapter(["a"])
    theirs.merge_adapter(["a"])
    ours.merge_adapter()
    theirs.merge_adapter()
    assert all(layer.merged_adapters == ["a", "c"] for _, layer in ours.adapter_layers())
    assert max_diff(logits(ours), expected) <= 1e-5
    assert max_diff(logits(ours), logits(theirs)) <= 1e-5


def test_an_inactive_adapter_s_base_biases_stay_frozen() -> None:
    plan, other, model = with_a_bias_free_second_adapter("all")
    model.set_adapter("other")
    assert model.trainable_parameters() == other.trainable_params
    model.set_adapter("default")
    assert model.trainable_parameters() == plan.trainable_params


def test_a_weighted_adapter_that_fails_while_combining_leaves_no_trace() -> None:
    """A failure inside the combination (here torch.quantile refusing svd_clamp=1.5) removes the
    half-made adapter: the name is free again and no layer keeps its tensors."""
    _, ours, _ = several("a", "b")
    with pytest.raises(RuntimeError, match="quantile"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", "svd", svd_clamp=1.5)
    assert ours.adapter_names == ["a", "b"]
    assert not any("mix" in layer.adapter_names for _, layer in ours.adapter_layers())
    ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", "svd")
    assert "mix" in ours.adapter_names


def test_replacing_a_plan_by_one_of_another_layout_is_refused_and_keeps_the_old_plan() -> None:
    plan = peftc.compile(["peft.r=4"])
    model = peftc.materialize(plan)
    with pytest.raises(RuntimeError, match="differ from the plan"):
        model.replace_plan("default", peftc.compile(["peft.r=2"]))
    assert model.plan_of("default") is plan


def test_several_active_adapters_run_the_first_one_s_head_copy_and_say_so() -> None:
    """modules_to_save holds one copy per adapter and only one can run (peft refuses several):
    with several active, the warning names the copy used, and it is the first adapter's."""
    plan = peftc.compile(["model=tiny_bert", "task=seq_cls", "task.labels=[a,b,c]"])
    model = peftc.materialize(plan)
    model.add_adapter("other", plan)
    with pytest.warns(UserWarning, match="one active adapter; using 'other'"):
        model.set_adapter(["other", "default"])
    ((_, wrapper),) = model.saved_modules()
    assert wrapper.current() is wrapper.modules_to_save["other"]


# The other methods whose merge multiplies the weight (additive updates commute, whatever the
# order); OFT's stacked merge has its own test in tests/test_methods.py.
MULTIPLYING_METHODS = [("ia3", []), ("hra", [])]
ADAPTER_PREFIXES = ("ia3_", "hra_")


@pytest.mark.parametrize(("method", "overrides"), MULTIPLYING_METHODS, ids=[m for m, _ in MULTIPLYING_METHODS])
def test_two_active_adapters_merge_to_what_they_compute_unmerged_like_peft(method: str, overrides: list[str]) -> None:
    """Multiplicative updates need the merge to compose as the forward does (HRA: W H_1 H_2 for
    the input reflected by H_2, then H_1), or merged and unmerged models differ."""
    from peft import get_peft_model, get_peft_model_state_dict

    plan = peftc.compile(["model=tiny_llama", f"peft={method}", *overrides])
    theirs = get_peft_model(build_base(plan), peft_config(plan))
    theirs.add_adapter("b", peft_config(plan))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in sorted(theirs.named_parameters()):
            if any(prefix in name for prefix in ADAPTER_PREFIXES):
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    ours = peftc.materialize(plan, base_model=build_base(plan))
    ours.add_adapter("b", plan)
    for name in ("default", "b"):
        fill(ours, name, get_peft_model_state_dict(theirs, adapter_name=name))
    ours.eval(), theirs.eval()
    activate(ours, theirs, ["default", "b"])
    with torch.no_grad():
        unmerged = logits(ours)
        assert max_diff(unmerged, logits(theirs)) <= 1e-5
        ours.merge_adapter(["default", "b"])
        assert max_diff(logits(ours), unmerged) <= 1e-5
        ours.unmerge_adapter()
        assert max_diff(logits(ours), unmerged) <= 1e-5
