"""Every config field peft 0.21.2 has for the six injectable methods, classified and checked.

The matrix is generated from peft's own config dataclasses (`dataclasses.fields(LoraConfig)`, ...),
so a field a later peft adds fails `test_every_peft_field_is_classified` until someone decides
what it is. Each field is exactly one of:

- a training setting peftc supports: at least one `FieldCase` sets it to a non-default value;
  the adapter peft saves loads in peftc with peft's outputs, peftc's save loads in peft with
  the same outputs, peftc writes the value back, and both merge to the same model (1e-5);
  fields that act only in training (dropouts) also give peft's training outputs from one seed;
- refused: peftc raises a named `PeftcError` (one line, naming the field, saying peftc does not
  implement it) for an adapter_config.json that sets it (`REFUSED`);
- not a training setting (`NOT_TRAINING_SETTINGS`): bookkeeping of the file itself.

Fields peft itself ignores for a method are cases too (`peft_ignores` says why): the check is
then that peftc ignores them the same way. The README's "Supported peft fields" table is
rendered from these tables (`readme_table`), so it cannot drift from what is tested.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftc
from peftc import methods
from peftc.errors import ConfigError, PeftcError
from tests.catalogue import edit_config
from tests.conv_model import TinyConvNet, images
from tests.helpers import REPO, max_diff
from tests.method_cases import perturb
from tests.moe_model import TinyMoE, features
from tests.test_peft_interop import MLP, X

TOLERANCE = 1e-5
PEFT_CONFIGS = {
    "lora": "LoraConfig",
    "adalora": "AdaLoraConfig",
    "ia3": "IA3Config",
    "loha": "LoHaConfig",
    "lokr": "LoKrConfig",
    "oft": "OFTConfig",
}
TITLES = {"lora": "LoRA", "adalora": "AdaLoRA", "ia3": "IA3", "loha": "LoHa", "lokr": "LoKr", "oft": "OFT"}

# Fields that describe the file or peft's runtime, not the adapter: no value changes its numbers.
NOT_TRAINING_SETTINGS = {
    "peft_type": "names the method: selects peftc's method, checked by every load",
    "task_type": "selects peft's model wrapper (the head); the matrix runs task-less models (null)",
    "auto_mapping": "the class AutoPeftModel instantiates; peftc never instantiates from a file",
    "peft_version": "the peft release that wrote the file",
    "base_model_name_or_path": "which base the adapter was trained on (a mismatch warns, tests/test_peft_interop.py)",
    "revision": "the hub revision of that base",
    "inference_mode": "whether peft loads the adapter frozen; peftc's load_adapter takes is_trainable",
    "runtime_config": "peft's runtime-only settings (ephemeral GPU offload); peft does not save it",
}


# ------------------------------------------------------------------------------------- models
def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return _seeded(lambda: LlamaForCausalLM(config)).eval()


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    return _seeded(lambda: GPT2LMHeadModel(config)).eval()


# tokens 3 and 7 are the trainable-token case's rows: the batch uses them
TOKENS = torch.tensor([[3, 7, 12, 40, 5, 9], [7, 3, 63, 20, 8, 1]])


@dataclass(frozen=True)
class Model:
    build: Callable[[], nn.Module]
    inputs: Callable[[], torch.Tensor]
    language_model: bool = False  # called with input_ids=, its output is .logits

    def output(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            if self.language_model:
                return model(input_ids=self.inputs()).logits
            return model(self.inputs())


MODELS = {
    "mlp": Model(MLP, lambda: X),
    "llama": Model(tiny_llama, lambda: TOKENS, language_model=True),
    "gpt2": Model(tiny_gpt2, lambda: TOKENS, language_model=True),
    "conv": Model(TinyConvNet, images),
    "moe": Model(TinyMoE, features),
}

# What each method adapts on each model unless a case says otherwise.
TARGETS: dict[str, dict[str, Any]] = {
    "mlp": {"target_modules": ["lin0", "lin1"]},
    "llama": {"target_modules": ["q_proj", "v_proj"]},
    "gpt2": {"target_modules": ["c_attn"]},
    "conv": {"target_modules": ["conv", "pointwise"]},
    "moe": {"target_modules": ["router"]},
}
# Settings a method needs to be valid on the matrix's small models (not what a case tests).
METHOD_BASE: dict[str, dict[str, Any]] = {
    # total_step: peft requires it. A random init (A, E, B ~ N(0, 1)) with a small lora_alpha:
    # the default init is E = 0, too close to the base for the moves of training (`perturb`).
    "adalora": {"total_step": 10, "init_lora_weights": False, "lora_alpha": 0.01},
    "ia3": {"feedforward_modules": []},
    "oft": {"r": 0, "oft_block_size": 4},  # divides every input size of the small models
}


# -------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class FieldCase:
    """peft fields set together on one model; they must be independent of each other."""

    method: str
    fields: Mapping[str, Any]
    model: str = "mlp"
    peft_ignores: str = ""  # why peft leaves these values out (peftc must too; it need not write them back)
    readme_note: str = ""  # how the README qualifies the fields (peft_ignores: "ignored, as peft does")
    training_differs: str = ""  # why peftc trains with these fields unlike peft (a strict xfail)
    prepare: Callable[[Any], None] | None = None  # runs on peft's model before it saves (e.g. AdaLoRA pruning)
    tolerance: float = TOLERANCE

    @property
    def id(self) -> str:
        shown = ",".join(f"{k}={v}" for k, v in self.fields.items())
        return f"{self.method}-{self.model}-{shown}"

    def peft_config(self) -> Any:
        import peft

        fields = {**TARGETS[self.model], **METHOD_BASE.get(self.method, {}), **self.fields}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's notes on ignored fields are what some cases test
            return getattr(peft, PEFT_CONFIGS[self.method])(**fields)


# What AdaLoRA's allocator leaves when training ends: a keep-mask per module (peft's names, as
# update_and_allocate writes them), from which peft saves only the kept triplets.
PRUNED = {"lin0.lora_E.default": [True, False, True, False], "lin1.lora_E.default": [False, True, True, True]}


def _mask_pruned_triplets(theirs: Any) -> None:
    """The masked triplets' singular values are zero in the live model (E = 0), as after pruning."""
    with torch.no_grad():
        for key, keep in PRUNED.items():
            layer = theirs.base_model.model.get_submodule(key.removesuffix(".lora_E.default"))
            layer.lora_E["default"][~torch.tensor(keep)] = 0.0


IGNORED_BY_ADALORA = "peft's AdaLoRA layer never reads it (its scaling is lora_alpha / init_r, no bias or variants)"

CASES = [
    # --------------------------------------------------------------------------------- LoRA
    FieldCase("lora", {"r": 4, "lora_alpha": 16, "lora_dropout": 0.1}),
    FieldCase("lora", {"target_modules": ".*lin[01]", "use_rslora": True}),
    FieldCase("lora", {"exclude_modules": ["lin1"], "rank_pattern": {"lin0": 2}, "alpha_pattern": {"lin0": 3}}),
    FieldCase("lora", {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "bias": "all"}),
    FieldCase("lora", {"bias": "lora_only", "lora_bias": True}),
    FieldCase("lora", {"use_dora": True}),
    FieldCase("lora", {"init_lora_weights": False}),
    FieldCase("lora", {"init_lora_weights": "gaussian"}),
    FieldCase("lora", {"init_lora_weights": "pissa", "target_modules": ["lin0"]}),  # r <= min(in, out)
    FieldCase("lora", {"init_lora_weights": "olora", "target_modules": ["lin0"]}),
    FieldCase("lora", {"init_lora_weights": "orthogonal", "r": 4}),
    FieldCase("lora", {"init_lora_weights": "nora"}),
    FieldCase(
        "lora",
        {"init_lora_weights": "eva", "eva_config": {"rho": 1.5}},
        peft_ignores="EVA only chooses the initial weights: a trained EVA adapter is a plain LoRA",
        readme_note="EVA's init: loaded as the plain LoRA it is after training",
    ),
    FieldCase("lora", {"layers_to_transform": [1], "layers_pattern": "layers"}, model="llama"),
    FieldCase("lora", {"trainable_token_indices": [3, 7]}, model="llama"),
    FieldCase("lora", {"trainable_token_indices": {"wte": [3, 7]}}, model="gpt2"),  # tied to lm_head
    FieldCase("lora", {"fan_in_fan_out": True}, model="gpt2"),
    # the head's weight is the embedding's trained copy (tests/test_weight_tying.py: every case)
    FieldCase("lora", {"ensure_weight_tying": True, "modules_to_save": ["lm_head"]}, model="gpt2"),
    FieldCase(
        "lora",
        {"target_modules": [], "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]},
        model="moe",
    ),
    # ------------------------------------------------------------------------------ AdaLoRA
    FieldCase("adalora", {"init_r": 4, "target_r": 2, "lora_alpha": 0.02, "lora_dropout": 0.1}),
    FieldCase("adalora", {"tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 20}),
    FieldCase("adalora", {"beta1": 0.5, "beta2": 0.6, "orth_reg_weight": 0.1, "init_lora_weights": False}),
    FieldCase("adalora", {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "bias": "all"}),
    FieldCase("adalora", {"exclude_modules": ["lin1"], "bias": "lora_only"}),
    FieldCase("adalora", {"init_r": 4, "rank_pattern": PRUNED}, prepare=_mask_pruned_triplets),
    FieldCase(
        "adalora",
        {"r": 4, "use_rslora": True, "alpha_pattern": {"lin0": 3}, "lora_bias": True},
        peft_ignores=IGNORED_BY_ADALORA,
    ),
    FieldCase(
        "adalora",
        {"eva_config": {"rho": 1.5}, "corda_config": {}, "lora_ga_config": {}, "astra_config": {}},
        peft_ignores="AdaLoRA's init is true or false: these LoRA inits' settings are never read",
    ),
    FieldCase("adalora", {"layers_to_transform": [1], "layers_pattern": "layers"}, model="llama"),
    FieldCase("adalora", {"fan_in_fan_out": True}, model="gpt2"),
    # ---------------------------------------------------------------------------------- IA3
    FieldCase("ia3", {"target_modules": ".*lin[01]", "feedforward_modules": ".*lin1"}),
    FieldCase("ia3", {"exclude_modules": ["lin0"], "feedforward_modules": ["lin1"], "init_ia3_weights": False}),
    FieldCase("ia3", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    FieldCase(
        "ia3",
        {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"], "fan_in_fan_out": True},
        model="gpt2",
    ),
]


def _lycoris_cases(method: str) -> list[FieldCase]:
    return [
        FieldCase(method, {"r": 2, "alpha": 3, "rank_dropout": 0.1, "module_dropout": 0.1}),
        FieldCase(method, {"target_modules": ".*lin[01]", "init_weights": False}),
        FieldCase(method, {"exclude_modules": ["lin1"], "rank_pattern": {"lin0": 2}, "alpha_pattern": {"lin0": 5}}),
        FieldCase(method, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
        FieldCase(method, {"layers_to_transform": [0], "layers_pattern": "layers"}, model="llama"),
        FieldCase(method, {"use_effective_conv2d": True, "r": 2, "init_weights": False}, model="conv"),
    ]


CASES += [
    *_lycoris_cases("loha"),
    *_lycoris_cases("lokr"),
    FieldCase("lokr", {"decompose_both": True, "r": 1, "decompose_factor": 2}),
    FieldCase("lokr", {"rank_dropout_scale": True, "rank_dropout": 0.2, "init_weights": "lycoris"}),
    # ---------------------------------------------------------------------------------- OFT
    FieldCase("oft", {"r": 2, "oft_block_size": 0}),
    FieldCase(
        "oft",
        {"module_dropout": 0.5},
        readme_note="applied in training; peft (0.21, 0.22) never applies it",
        training_differs="peft (0.21, 0.22) builds OFT's MultiplicativeDropoutLayer but never calls it; peftc applies it",
    ),
    FieldCase("oft", {"oft_block_size": 5, "coft": True, "eps": 0.05}),
    FieldCase("oft", {"block_share": True, "use_cayley_neumann": False, "init_weights": False}),
    FieldCase("oft", {"num_cayley_neumann_terms": 3, "target_modules": ".*lin[01]", "exclude_modules": ["lin1"]}),
    FieldCase("oft", {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "bias": "all"}),
    FieldCase("oft", {"bias": "oft_only"}),
    FieldCase(
        "oft",
        {"fan_in_fan_out": True},
        peft_ignores="peft's OFT has no Conv1D layer and resets it to false on nn.Linear",
    ),
    FieldCase("oft", {"layers_to_transform": [1], "layers_pattern": "layers"}, model="llama"),
]
CASE_IDS = [case.id for case in CASES]


# ---------------------------------------------------------------------------------- refusals
@dataclass(frozen=True)
class Refusal:
    """A field peftc refuses: `trigger` are the adapter_config.json values that use it; the
    error must name `names` (the field, or the option it only works with)."""

    method: str
    field: str
    trigger: Mapping[str, Any]
    reason: str
    names: str = ""

    @property
    def named(self) -> str:
        return self.names or self.field


# field -> (the adapter_config.json values that use it, what it is, what the error must name)
LORA_REFUSED: dict[str, tuple[dict[str, Any], str, str]] = {
    "layer_replication": ({"layer_replication": [[0, 1]]}, "duplicates base layers before adapting them", ""),
    "use_qalora": ({"use_qalora": True}, "QA-LoRA pools the input for quantized (GPTQ) bases", ""),
    "qalora_group_size": ({"use_qalora": True, "qalora_group_size": 8}, "QA-LoRA's pooling size", "use_qalora"),
    "alora_invocation_tokens": ({"alora_invocation_tokens": [5, 6]}, "activated LoRA: starts at a token", ""),
    "use_bdlora": ({"use_bdlora": {"nblocks": 2}}, "block-diagonal LoRA for sharded serving", ""),
    "arrow_config": ({"arrow_config": {"top_k": 2}}, "routes between a library of LoRA experts", ""),
    "kasa_config": ({"kasa_config": {"beta": 1e-4}}, "KaSA: SVD-based knowledge-aware adaptation", ""),
    "velora_config": ({"velora_config": {"rank": 4}}, "VeLoRA: compresses the activations kept for backward", ""),
    "monteclora_config": ({"monteclora_config": {"num_samples": 2}}, "MonteCLoRA: Monte Carlo sampled weights", ""),
    "megatron_config": ({"megatron_config": {"tensor_model_parallel_size": 2}}, "Megatron tensor-parallel layers", ""),
    "megatron_core": (
        {"megatron_config": {"tensor_model_parallel_size": 2}, "megatron_core": "megatron.core"},
        "the Megatron module to import",
        "megatron_config",
    ),
    "loftq_config": (
        {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}},
        "LoftQ's quantization-aware init",
        "loftq",
    ),
    "corda_config": ({"init_lora_weights": "corda", "corda_config": {}}, "CorDA rewrites the base", "corda"),
    "astra_config": ({"init_lora_weights": "astra", "astra_config": {}}, "Astra rewrites the base", "astra"),
    "lora_ga_config": ({"init_lora_weights": "lora_ga", "lora_ga_config": {}}, "LoRA-GA rewrites the base", "lora_ga"),
}
# AdaLoRA inherits every LoRA field. peft's AdaLoRA honours some through the LoRA model code it
# inherits (layer replication, trainable tokens, target parameters, weight tying), refuses
# others itself (DoRA, LoftQ), and its layer has none of LoRA's variants; peftc implements none
# of these for AdaLoRA.
ADALORA_REFUSED: dict[str, tuple[dict[str, Any], str, str]] = {
    **{
        k: v
        for k, v in LORA_REFUSED.items()
        if k not in ("loftq_config", "corda_config", "lora_ga_config", "astra_config")
    },
    "use_dora": ({"use_dora": True}, "peft refuses DoRA for AdaLoRA too", ""),
    "loftq_config": ({"loftq_config": {"loftq_bits": 4}}, "peft refuses LoftQ for AdaLoRA too", ""),
    "trainable_token_indices": ({"trainable_token_indices": [3, 7]}, "peft trains those rows; peftc: LoRA only", ""),
    "target_parameters": ({"target_parameters": ["lin0.weight"]}, "raw parameters; peftc: LoRA only", ""),
    "ensure_weight_tying": ({"ensure_weight_tying": True}, "ties tied embeddings' adapters; peftc: LoRA only", ""),
}

REFUSED = [
    Refusal(method, field, trigger, reason, names)
    for method, table in (("lora", LORA_REFUSED), ("adalora", ADALORA_REFUSED))
    for field, (trigger, reason, names) in table.items()
]
REFUSED_IDS = [f"{r.method}-{r.field}" for r in REFUSED]


# ------------------------------------------------------------------------------ the matrix
def peft_fields(method: str) -> list[str]:
    import peft

    return [field.name for field in dataclasses.fields(getattr(peft, PEFT_CONFIGS[method]))]


def peft_default(method: str, field: str) -> Any:
    import peft

    (spec,) = [f for f in dataclasses.fields(getattr(peft, PEFT_CONFIGS[method])) if f.name == field]
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default


def covered(method: str) -> set[str]:
    return {field for case in CASES if case.method == method for field in case.fields}


def refused(method: str) -> set[str]:
    return {r.field for r in REFUSED if r.method == method}


def classification(method: str, field: str) -> str:
    kinds = [
        kind
        for kind, fields in (
            ("case", covered(method)),
            ("refused", refused(method)),
            ("not a training setting", set(NOT_TRAINING_SETTINGS)),
        )
        if field in fields
    ]
    return " and ".join(kinds)


@pytest.mark.parametrize("method", sorted(PEFT_CONFIGS))
def test_every_peft_field_is_classified(method: str) -> None:
    unclassified = [f for f in peft_fields(method) if not classification(method, f)]
    assert not unclassified, (
        f"peft's {PEFT_CONFIGS[method]} has fields the matrix does not know: {unclassified}; classify each in "
        "tests/test_peft_field_matrix.py: a FieldCase (peftc supports it), REFUSED (peftc raises a named "
        "error) or NOT_TRAINING_SETTINGS"
    )
    twice = {f: classification(method, f) for f in peft_fields(method) if " and " in classification(method, f)}
    assert not twice, f"classified more than one way: {twice}"


@pytest.mark.parametrize("method", sorted(PEFT_CONFIGS))
def test_the_matrix_names_only_fields_peft_has(method: str) -> None:
    stale = (covered(method) | refused(method)) - set(peft_fields(method))
    assert not stale, f"{method}: not fields of peft's {PEFT_CONFIGS[method]}: {sorted(stale)}"
    every_field = {f for m in PEFT_CONFIGS for f in peft_fields(m)}
    assert set(NOT_TRAINING_SETTINGS) <= every_field


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_values_differ_from_peft_defaults(case: FieldCase) -> None:
    defaults = {field: value for field, value in case.fields.items() if value == peft_default(case.method, field)}
    assert not defaults, f"{defaults} are peft's defaults: the case would not exercise them"


# ------------------------------------------------------------------------------ the checks
def saved_by_peft(case: FieldCase, directory: Path) -> Any:
    """peft's model for the case, its trainable tensors moved as training would, saved."""
    import peft

    model = MODELS[case.model]
    # peft draws its init from the global RNG: the same numbers whichever cases ran before
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        theirs = peft.get_peft_model(model.build(), case.peft_config())
    perturb(theirs)
    if case.prepare is not None:
        case.prepare(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft takes lora_bias's 1-D lora_B.bias for an unsharded ZeRO-3 tensor
        theirs.save_pretrained(directory)
    return theirs.eval()


def _comparable(value: Any) -> Any:
    """Field values as peft and peftc write them: target lists in any order are the same."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return sorted(value)
    return value


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_peft_fields_load_save_and_merge_like_peft(case: FieldCase, tmp_path: Path) -> None:
    from peft import PeftModel

    model = MODELS[case.model]
    theirs = saved_by_peft(case, tmp_path / "peft")
    expected = model.output(theirs)
    # as in tests/test_methods.py: the adapter moves the outputs far beyond the parity tolerance
    assert max_diff(expected, model.output(model.build())) > 10 * case.tolerance, "the adapter must change the outputs"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes, e.g. on fields it ignores
        ours = peftc.load_adapter(model.build(), tmp_path / "peft")
    assert max_diff(model.output(ours), expected) <= case.tolerance, "saved by peft, loaded by peftc"

    ours.save_adapter(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(model.build(), tmp_path / "ours").eval()
    assert max_diff(model.output(back), expected) <= case.tolerance, "saved by peftc, loaded by peft"
    if not case.peft_ignores:
        theirs_file, ours_file = (
            json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours")
        )
        for field in case.fields:
            assert _comparable(ours_file.get(field)) == _comparable(theirs_file[field]), f"{field} written back"

    merged = model.output(ours.merge_and_unload())
    assert max_diff(merged, model.output(theirs.merge_and_unload())) <= case.tolerance, "merged"


# Fields that act only while training: eval outputs cannot tell whether they are applied.
TRAINING_ONLY = {"lora_dropout", "rank_dropout", "module_dropout", "rank_dropout_scale"}
TRAINING_CASES = [case for case in CASES if TRAINING_ONLY & set(case.fields)]


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(case, marks=pytest.mark.xfail(strict=True, reason=case.training_differs))
        if case.training_differs
        else case
        for case in TRAINING_CASES
    ],
    ids=[case.id for case in TRAINING_CASES],
)
def test_training_only_fields_act_like_peft(case: FieldCase, tmp_path: Path) -> None:
    """Training-mode outputs draw the same dropout masks as peft's from the same seed."""
    model = MODELS[case.model]
    theirs = saved_by_peft(case, tmp_path)
    ours = peftc.load_adapter(model.build(), tmp_path)
    outputs = []
    for adapted in (ours.train(), theirs.train()):
        torch.manual_seed(3)
        outputs.append(torch.stack([model.output(adapted) for _ in range(4)]))
    assert max_diff(*outputs) <= case.tolerance
    assert max_diff(outputs[0], model.output(ours.eval())) > 10 * case.tolerance, "the fields act in training"


@pytest.fixture(scope="module")
def plain_adapter(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A method's adapter as peft saves it on the MLP, saved once per module."""

    @functools.cache
    def saved(method: str) -> Path:
        directory = tmp_path_factory.mktemp(method)
        saved_by_peft(FieldCase(method, {}), directory)
        return directory

    return saved


@pytest.mark.parametrize("refusal", REFUSED, ids=REFUSED_IDS)
def test_refused_fields_are_named_errors_on_load(
    refusal: Refusal, plain_adapter: Callable[[str], Path], tmp_path: Path
) -> None:
    """peft's file with the refused field set (several need hardware or packages to build in
    peft, so it is set in the saved adapter_config.json: that file is all peftc reads)."""
    directory = shutil.copytree(plain_adapter(refusal.method), tmp_path / "adapter")
    edit_config(**refusal.trigger)(directory)
    with pytest.raises(PeftcError) as error:
        peftc.load_adapter(MLP(), directory)
    message = str(error.value)
    assert "\n" not in message and refusal.named in message and "does not implement" in message, message


@pytest.mark.parametrize("refusal", REFUSED, ids=REFUSED_IDS)
def test_refused_fields_cannot_be_configured(refusal: Refusal) -> None:
    """A trigger key peftc's schema has is refused by value; the others are not keys at all."""
    schema = {f.name for f in dataclasses.fields(methods.get(refusal.method).schema)}
    own = {key: value for key, value in refusal.trigger.items() if key in schema}
    assert refusal.field not in schema or own, f"{refusal.field} is a peftc key: its refusal needs a test"
    for key, value in own.items():
        with pytest.raises(ConfigError, match=re.escape(f"peft.{key}")):
            peftc.compile([f"peft={refusal.method}", f"peft.{key}={value}"])


# ------------------------------------------------------------------------------------ README
def _readme_note(case: FieldCase) -> str:
    return case.readme_note or ("ignored, as peft does" if case.peft_ignores else "")


def _readme_notes(method: str) -> dict[str, str]:
    """Fields whose every case qualifies them, with how the README does."""
    cases = [case for case in CASES if case.method == method]
    plain = {f for case in cases if not _readme_note(case) for f in case.fields}
    return {f: _readme_note(case) for case in cases for f in case.fields if _readme_note(case) and f not in plain}


def readme_table() -> str:
    """The README's "Supported peft fields" table, rendered from the matrix."""
    rows = [
        "| method | supported (loaded from peft, saved for peft, merged: same outputs) | refused by name |",
        "|---|---|---|",
    ]
    for method, config in PEFT_CONFIGS.items():
        notes = _readme_notes(method)
        supported = [f"`{f}`" + (f" ({notes[f]})" if f in notes else "") for f in sorted(covered(method))]
        refusals = [f"`{f}`" for f in sorted(refused(method))]
        rows.append(f"| {TITLES[method]} (`{config}`) | {', '.join(supported)} | {', '.join(refusals) or '-'} |")
    return "\n".join(rows)


def test_the_readme_states_the_matrix() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme_table()
    assert table in readme, f"README.md's 'Supported peft fields' table is out of date; it should read:\n{table}"
    for name in NOT_TRAINING_SETTINGS:
        assert f"`{name}`" in readme, f"README.md should list {name} among the fields that are not settings"


if __name__ == "__main__":  # print the README table: python -m tests.test_peft_field_matrix
    print(readme_table())
