"""Target resolution: peft's semantics (checked against peft itself), stricter on mistakes."""

from __future__ import annotations

import pytest

import peftc
from peftc.errors import ConfigError, PlanError
from peftc.planning.graph import layer_index
from tests.helpers import build_base, peft_lora_config

# (model, overrides) whose resolved sites must equal the modules peft injects into.
PEFT_CASES = [
    ("tiny_llama", []),
    ("tiny_llama", ["peft.target_modules=all-linear"]),
    ("tiny_llama", ["peft.target_modules=[q_proj,k_proj,down_proj]"]),
    ("tiny_llama", ["peft.target_modules=[self_attn.q_proj,mlp.up_proj]"]),
    ("tiny_llama", [r"peft.target_modules='.*\.(q|k)_proj'"]),
    ("tiny_llama", ["peft.target_modules=all-linear", "peft.exclude_modules=[o_proj,gate_proj]"]),
    (
        "tiny_llama",
        ["peft.target_modules=[q_proj,v_proj]", "peft.layers_to_transform=[1]", "peft.layers_pattern=layers"],
    ),
    ("tiny_llama", ["peft.target_modules=[q_proj,v_proj]", "peft.layers_to_transform=0"]),
    ("tiny_llama", ["peft.target_modules=[embed_tokens,q_proj]"]),
    ("tiny_gpt2", []),
    ("tiny_gpt2", ["peft.target_modules=all-linear"]),
    ("tiny_gpt2", ["peft.target_modules=[c_attn,mlp.c_proj]"]),
    ("tiny_gpt2", ["peft.target_modules=ALL-LINEAR"]),  # peft reads the shorthand in any case
    # an exclude regex must match the whole path too: this one excludes nothing
    ("tiny_llama", ["peft.target_modules=all-linear", r"peft.exclude_modules='layers\.0\..*'"]),
    ("tiny_llama", ["task=seq_cls", "peft.target_modules=all-linear"]),  # the head is trained, not adapted
    # T5's paths hold two integers (encoder.block.1.layer.0.SelfAttention.q): the layer is the first
    ("tiny_t5", ["task=seq2seq_lm", "peft.target_modules=[q,v]", "peft.layers_to_transform=[1]"]),
    # with layers_pattern the index after that name counts (layer.0 is self-attention in every block)
    (
        "tiny_t5",
        ["task=seq2seq_lm", "peft.target_modules=[q,v]", "peft.layers_to_transform=[0]", "peft.layers_pattern=layer"],
    ),
]


@pytest.mark.parametrize(("model", "overrides"), PEFT_CASES, ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_resolved_sites_equal_the_modules_peft_adapts(model: str, overrides: list[str]) -> None:
    from peft import get_peft_model

    plan = peftc.compile([f"model={model}", *overrides])
    peft_model = get_peft_model(build_base(plan), peft_lora_config(plan))
    prefix = "base_model.model."
    adapted = sorted(
        name[len(prefix) :]
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A")
        and module.lora_A
        or hasattr(module, "lora_embedding_A")
        and module.lora_embedding_A
    )
    assert sorted(s.path for s in plan.sites) == adapted


def test_all_linear_skips_the_output_head() -> None:
    plan = peftc.compile(["peft.target_modules=all-linear"])
    paths = {s.path for s in plan.sites}
    assert "lm_head" not in paths
    assert len(paths) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers


def test_one_unmatched_list_entry_is_an_error_not_a_silent_skip() -> None:
    # peft trains q_proj alone here and says nothing (peft#1959).
    with pytest.raises(PlanError, match=r"no module named 'v_prj'.*did you mean 'v_proj'"):
        peftc.compile(["peft.target_modules=[q_proj,v_prj]"])


def test_a_container_module_is_refused_with_its_adaptable_children() -> None:
    with pytest.raises(
        PlanError,
        match=r"matches model.layers.0.mlp \(LlamaMLP\), which lora cannot adapt.*down_proj, gate_proj, up_proj",
    ):
        peftc.compile(["peft.target_modules=[mlp]"])


# peft matches a regex against the whole module path (re.fullmatch): one that matches only part
# of every path (a prefix of a name, a path without its leading "model.") matches nothing.
@pytest.mark.parametrize("pattern", [r".*\.query", r".*\.q", r"layers\.0\.self_attn\.q_proj"])
def test_regex_matching_no_whole_path_is_an_error(pattern: str) -> None:
    with pytest.raises(PlanError, match="the regex matches no module path"):
        peftc.compile([f"peft.target_modules='{pattern}'"])


@pytest.mark.parametrize(
    ("value", "names"), [("q_proj,v_proj", "[q_proj,v_proj]"), ("q_proj", "[q_proj] (or the regex '.*q_proj')")]
)
def test_module_names_given_as_one_string_are_told_how_to_give_a_list(value: str, names: str) -> None:
    """peft's and axolotl's habit, `target_modules: "q_proj,v_proj"`, is one regex to peft too."""
    with pytest.raises(PlanError) as info:
        peftc.compile([f"peft.target_modules='{value}'"])
    assert str(info.value).endswith(f"for module names write peft.target_modules={names}")


def test_invalid_regex_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        peftc.compile([r"peft.target_modules='.*(q_proj'"])


def test_exclude_entry_matching_nothing_is_an_error() -> None:
    with pytest.raises(PlanError, match=r"peft.exclude_modules='o_prj': matches no module.*did you mean 'o_proj'"):
        peftc.compile(["peft.target_modules=all-linear", "peft.exclude_modules=[o_prj]"])


def test_layer_out_of_range_is_an_error() -> None:
    with pytest.raises(
        PlanError, match=r"peft.layers_to_transform=5: no such layer among the targeted modules \(layers 0-1\)"
    ):
        peftc.compile(["peft.target_modules=[q_proj]", "peft.layers_to_transform=[5]"])


def test_layers_pattern_without_layer_indices_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs peft.layers_to_transform"):
        peftc.compile(["peft.target_modules=[q_proj]", "peft.layers_pattern=layers"])


def test_layers_with_a_regex_target_is_refused() -> None:
    with pytest.raises(ConfigError, match="only works with a list of target_modules"):
        peftc.compile(["peft.target_modules=all-linear", "peft.layers_to_transform=[0]"])


def test_everything_excluded_is_an_error() -> None:
    with pytest.raises(PlanError, match="no module is left to adapt"):
        peftc.compile(["peft.target_modules=[q_proj]", "peft.exclude_modules=[q_proj]"])


def test_unknown_model_type_without_targets_names_the_key() -> None:
    from peftc.config.compose import compose, to_spec
    from peftc.planning.planner import plan as make_plan

    run = to_spec(
        compose(
            [
                "model=tiny_llama",
                "model.model_type=mamba",
                "+model.config.state_size=4",
            ]
        )
    )
    with pytest.raises(
        PlanError,
        match=r"peft.target_modules: lora has no default target modules for model_type 'mamba'; set peft.target_modules=\[...\]; adaptable here:",
    ):
        make_plan(run)


@pytest.mark.parametrize(
    ("path", "pattern", "expected"),
    [
        ("model.layers.3.self_attn.q_proj", None, 3),
        ("transformer.h.11.attn.c_attn", None, 11),
        ("layers.2.mlp", None, 2),  # a bare ModuleList at the root (peft#3610)
        ("model.layers.3.experts.7.w1", ("layers",), 3),  # the expert index is not the layer (peft#3016)
        ("encoder.block.1.layer.0.SelfAttention.q", ("block",), 1),
        ("lm_head", None, None),
        ("model.layers.3.mlp", ("h",), None),
    ],
)
def test_layer_index(path: str, pattern: tuple[str, ...] | None, expected: int | None) -> None:
    assert layer_index(path, pattern) == expected


def test_a_module_registered_twice_is_one_graph_module_as_in_named_modules() -> None:
    """A module shared by two parents (T5-style shared embeddings) is one module, at its first
    path, as torch's named_modules() (which peft walks to inject) lists it: planned and adapted once."""
    from torch import nn

    from peftc.planning.graph import graph_of

    shared = nn.Linear(4, 4)
    model = nn.Module()
    model.encoder, model.decoder, model.out = nn.Sequential(shared), nn.Sequential(shared), nn.Linear(4, 2)
    assert [m.path for m in graph_of(model).modules] == [name for name, _ in model.named_modules()]


def test_a_list_entry_matches_whole_names_not_the_end_of_one() -> None:
    """peft matches an entry as the full path or a dotted suffix: 'proj' is no q_proj."""
    with pytest.raises(PlanError, match="no module named 'proj'"):
        peftc.compile(["peft.target_modules=[proj]"])


def test_a_default_name_the_model_lacks_is_skipped_as_peft_skips_it() -> None:
    """IA3's Mixtral default is (k_proj, v_proj, w2), but transformers 5 fuses Mixtral's experts
    (no `w2` module): peft adapts the names that exist, and so does the plan. A name the user
    writes that matches nothing stays an error (test above)."""
    from peft import IA3Config, get_peft_model

    plan = peftc.compile(
        ["model=tiny_llama", "model.model_type=mixtral", "+model.config.num_local_experts=2", "peft=ia3"]
    )
    ours = sorted(s.path for s in plan.sites)
    assert ours == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("k_proj", "v_proj")]
    theirs = get_peft_model(build_base(plan), IA3Config(task_type="CAUSAL_LM"))
    assert sorted(theirs.base_model.targeted_module_names) == ours
    with pytest.raises(PlanError, match="no module named 'w2'"):
        peftc.compile(["model=tiny_llama", "model.model_type=mixtral", "peft=ia3", "peft.target_modules=[k_proj,w2]"])
