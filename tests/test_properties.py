"""Property-based tests (hypothesis): spec validation and target resolution.

- Any value for any config key either compiles or fails with a ConfigError/PlanError naming the
  problem; never another exception (no TypeError from deep inside, no crash).
- Valid LoRA settings always compile, and the plan agrees with itself.
- Target resolution on generated module trees: the resolved sites are modules of the graph, every
  list entry matches one of them, and the set is exactly what peft's matching rules select.
"""

from __future__ import annotations

import contextlib
import math
import re
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

import peftc
from peftc.config.spec import DataSpec, ModelSpec, RunSpec, TrainerSpec, describe
from peftc.errors import AdapterFileError, ConfigError
from peftc.methods import get as get_method
from peftc.planning.graph import graph_of
from peftc.planning.targets import TargetRequest, resolve_targets

# Derandomized: the same examples every run, so a CI run fails only on a change, never on a new
# draw (CI failed twice on examples that earlier runs had not drawn). experiments/explore_properties.py
# runs these properties with many random examples to look for new failures.
QUICK = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------ spec validation
def schema_keys() -> list[str]:
    from peftc.methods.lora.method import LoraSpec

    keys = [f"peft.{name}" for name, _, _ in describe(LoraSpec)]
    for group, schema in (("trainer", TrainerSpec), ("data", DataSpec), ("model", ModelSpec)):
        keys += [f"{group}.{name}" for name, _, _ in describe(schema) if (group, name) != ("model", "config")]
    keys += [
        name for name, _, _ in describe(RunSpec) if name not in ("peft", "task", "quant", "model", "data", "trainer")
    ]
    # the groups themselves (an option by name) and the nested budget node, which a scalar or an
    # interpolation may be written over
    return [*keys, "peft", "task", "quant", "model", "data", "trainer", "budget"]


NAME = st.text(alphabet=string.ascii_letters + "_", min_size=1, max_size=6)
SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.sampled_from(["q_proj", "all-linear", ".*", "(", "${seed}", "${trainer}", "${oc.env:HOME}", "_target_", "lora"]),
)
VALUE = st.one_of(
    SCALAR,
    st.lists(st.one_of(st.integers(-3, 40), st.sampled_from(["q_proj", "v_proj", "nope", ""])), max_size=4),
    st.dictionaries(NAME, st.one_of(st.integers(-3, 40), st.floats(-2, 2), st.text(max_size=4)), max_size=3),
)


def render(value: Any) -> str:
    """A Python value as Hydra override syntax."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ",".join(render(v) for v in value) + "]"
    return "{" + ",".join(f"{k}: {render(v)}" for k, v in value.items()) + "}"


@QUICK
@given(key=st.sampled_from(schema_keys()), value=VALUE)
# what random draws found once (CI, 2026-12-07), kept as every run's examples
@example(key="adapter", value=False)
@example(key="budget", value="${seed}")
@example(key="trainer.betas", value="${seed}")
@example(key="peft.rank_pattern", value="${trainer}")
@example(key="model", value=1)
@example(key="quant", value=None)
def test_any_value_for_any_key_compiles_or_is_a_config_error(key: str, value: Any) -> None:
    try:
        peftc.compile([f"{key}={render(value)}"])
    except ConfigError as exc:  # PlanError is a ConfigError
        assert str(exc).strip() and "\n" not in str(exc).split(";")[0]
    except AdapterFileError as exc:  # `adapter=DIR` (train: continue it) is read when the plan compiles
        assert key == "adapter" and str(exc).strip() and "\n" not in str(exc)


@QUICK
@given(raw=st.text(max_size=20))
def test_any_raw_override_text_compiles_or_is_a_config_error(raw: str) -> None:
    with contextlib.suppress(ConfigError):
        peftc.compile([f"peft.target_modules={raw}"])


LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@st.composite
def valid_lora(draw: Any) -> list[str]:
    targets = draw(st.lists(st.sampled_from(LLAMA_LINEARS), min_size=1, max_size=7, unique=True))
    overrides = [
        f"peft.r={draw(st.integers(1, 64))}",
        f"peft.lora_alpha={draw(st.floats(0.01, 512))!r}",
        f"peft.lora_dropout={draw(st.floats(0, 0.99))!r}",
        f"peft.use_rslora={str(draw(st.booleans())).lower()}",
        f"peft.target_modules=[{','.join(targets)}]",
    ]
    if draw(st.booleans()):
        layers = draw(st.lists(st.integers(0, 1), min_size=1, max_size=2, unique=True))
        overrides.append(f"peft.layers_to_transform=[{','.join(map(str, layers))}]")
    pattern = draw(st.dictionaries(st.sampled_from(targets), st.integers(1, 32), max_size=2))
    if pattern:
        overrides.append("peft.rank_pattern={" + ",".join(f"{k}: {v}" for k, v in pattern.items()) + "}")
    return overrides


@QUICK
@given(overrides=valid_lora())
def test_valid_lora_settings_always_compile_to_a_consistent_plan(overrides: list[str]) -> None:
    plan = peftc.compile(overrides)
    spec = plan.spec.peft
    layers = set(spec.layers_to_transform) if spec.layers_to_transform is not None else {0, 1}
    assert len(plan.sites) == len(spec.target_modules) * len(layers)
    assert plan.trainable_params == sum(site.params for site in plan.sites)
    for site in plan.sites:
        leaf = site.path.rsplit(".", 1)[-1]
        assert site.options["r"] == (spec.rank_pattern or {}).get(leaf, spec.r)
        assert site.tensors["lora_A.weight"] == (site.options["r"], site.in_features)


# ---------------------------------------------------------------------- target resolution
SEGMENT = st.sampled_from(["q", "k", "proj", "mlp", "attn", "layer", "block", "0", "1", "out", "lin"])
TREE = st.recursive(
    st.just("linear"),
    lambda children: st.dictionaries(SEGMENT, children, min_size=1, max_size=3),
    max_leaves=10,
)


def build(tree: Any) -> nn.Module:
    if tree == "linear":
        return nn.Linear(4, 4)
    module = nn.Module()
    for name, child in tree.items():
        module.add_module(name, build(child))
    return module


def peft_selects(targets: Any, exclude: Any, paths: list[str]) -> set[str]:
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    config = LoraConfig(target_modules=targets, exclude_modules=exclude)
    chosen = set()
    for path in paths:
        found = check_target_module_exists(config, path)
        if found and not isinstance(found, _ExcludedModule):
            chosen.add(path)
    return chosen


@st.composite
def model_and_request(draw: Any) -> tuple[nn.Module, Any, Any]:
    tree = draw(TREE.filter(lambda t: isinstance(t, dict)))
    model = build(tree)
    paths = [name for name, _ in model.named_modules() if name]
    suffixes = sorted({".".join(p.split(".")[-k:]) for p in paths for k in (1, 2)})
    if draw(st.booleans()):
        targets: Any = draw(st.lists(st.sampled_from(suffixes), min_size=1, max_size=4, unique=True))
    else:
        names = draw(st.lists(st.sampled_from(sorted({p.split(".")[-1] for p in paths})), min_size=1, max_size=3))
        targets = r"(.*\.)?(" + "|".join(re.escape(n) for n in names) + ")"
    exclude = draw(st.none() | st.lists(st.sampled_from(suffixes), min_size=1, max_size=2, unique=True))
    return model, targets, exclude


@settings(max_examples=120, deadline=None, derandomize=True)
@given(case=model_and_request())
def test_target_resolution_agrees_with_peft_on_generated_models(case: tuple[nn.Module, Any, Any]) -> None:
    model, targets, exclude = case
    graph = graph_of(model)
    paths = [m.path for m in graph.modules if m.path]
    expected = peft_selects(targets, exclude, paths)
    linear = {m.path for m in graph.modules if m.kind == "linear"}
    request = TargetRequest(target_modules=targets, exclude_modules=exclude)
    matched_before_exclude = peft_selects(targets, None, paths)
    if not matched_before_exclude <= linear or not expected:
        # nothing left: peft fails too; a container matched: peft fails when it tries to wrap it,
        # peftc refuses up front (even when exclude_modules would drop it again: stricter)
        with pytest.raises(ConfigError):
            resolve_targets(request, get_method("lora"), graph, strict=False)
        return
    resolved = resolve_targets(request, get_method("lora"), graph, strict=False)
    chosen = [m.path for m in resolved]
    assert set(chosen) <= set(paths), "resolved sites are modules of the graph"
    assert len(chosen) == len(set(chosen)), "each module once"
    assert set(chosen) == expected, "the same modules peft adapts"


@settings(max_examples=80, deadline=None, derandomize=True)
@given(case=model_and_request())
def test_every_list_entry_matches_something_or_is_named_in_the_error(case: tuple[nn.Module, Any, Any]) -> None:
    model, targets, _ = case
    assume(isinstance(targets, list))
    graph = graph_of(model)
    request = TargetRequest(target_modules=[*targets, "zz_missing"])
    with pytest.raises(ConfigError, match="zz_missing"):
        resolve_targets(request, get_method("lora"), graph, strict=True)
    try:
        resolved = resolve_targets(TargetRequest(target_modules=targets), get_method("lora"), graph, strict=True)
    except ConfigError:
        return  # an entry names a container (e.g. 'mlp'): refused, as peft refuses it
    for entry in targets:
        assert any(m.path == entry or m.path.endswith("." + entry) for m in resolved), entry
