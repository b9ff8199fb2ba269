"""LoRA configs written for transformers 4's mixture-of-experts layout (per-expert nn.Linear
projections, a Linear router, or `all-linear` that reached them) on transformers 5's fused experts:
peftc rewrites them against the model as peft 0.22 does, so both adapt the same tensors with the
same ranks and give the same logits, and the rewritten config is what both save and read back."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import peftc
from peftc.errors import ConfigError
from peftc.files.load import fill
from tests.helpers import build_base, max_diff, token_batch

QWEN3_MOE = (
    "model=tiny_llama",
    "model.model_type=qwen3_moe",
    "+model.config.num_experts=4",
    "+model.config.num_experts_per_tok=2",
    "+model.config.moe_intermediate_size=32",
    "+model.config.head_dim=16",
)
MIXTRAL = ("model=tiny_llama", "model.model_type=mixtral", "+model.config.num_local_experts=4")
# Qwen2-MoE keeps a shared expert of nn.Linear gate_proj/up_proj/down_proj beside the fused experts
QWEN2_MOE = (
    "model=tiny_llama",
    "model.model_type=qwen2_moe",
    "+model.config.num_experts=4",
    "+model.config.num_experts_per_tok=2",
    "+model.config.moe_intermediate_size=32",
    "+model.config.shared_expert_intermediate_size=32",
)


@pytest.mark.parametrize(
    ("model", "targets"),
    [
        (QWEN3_MOE, "all-linear"),
        (QWEN3_MOE, ["q_proj", "gate_proj", "up_proj", "down_proj"]),
        (QWEN3_MOE, r".*layers\.1\..*(v_proj|gate)"),  # the router of layer 1 only, as peft reads the regex
        (MIXTRAL, ["q_proj", "w1", "w2", "w3", "gate"]),
        # the shared expert's Linear projections stay modules, and the fused experts beside them are targeted too
        (QWEN2_MOE, ["q_proj", "gate_proj", "up_proj", "down_proj"]),
        # a dotted name keeps its prefix: layer 1's experts only
        (QWEN3_MOE, ["q_proj", "layers.1.mlp.experts.gate_proj", "layers.1.mlp.experts.up_proj"]),
        # a regex naming only old expert paths (no key of today's model matches them)
        (QWEN3_MOE, r".*(q_proj|experts\.(gate_proj|up_proj))"),
    ],
    ids=[
        "qwen3_moe all-linear",
        "qwen3_moe v4 names",
        "qwen3_moe regex",
        "mixtral v4 names",
        "qwen2_moe shared expert",
        "qwen3_moe dotted names",
        "qwen3_moe regex of old expert paths",
    ],
)
def test_old_expert_names_adapt_what_peft_adapts_with_its_logits(model: tuple[str, ...], targets: object) -> None:
    _assert_rewritten_as_peft_rewrites(model, targets)


def test_target_parameters_and_rank_pattern_written_beside_old_names_are_kept_as_peft_keeps_them() -> None:
    """peft's rewrite adds to the user's own target_parameters and rank_pattern; dropping them would
    leave the router (here) unadapted and q_proj at the default rank."""
    extra = ("peft.target_parameters=[gate.weight]", "+peft.rank_pattern={q_proj: 2}")
    _assert_rewritten_as_peft_rewrites(
        MIXTRAL, ["q_proj", "w2"], extra, target_parameters=["gate.weight"], rank_pattern={"q_proj": 2}
    )


def test_default_targets_on_a_moe_model_are_not_rewritten() -> None:
    """target_modules=null on Mixtral is LoRA's default table entry (q_proj, v_proj): no old name to
    rewrite. (peft 0.22 itself refuses it: its rewrite turns the null into an empty set before its
    default applies; the resolved names peftc writes load in peft.)"""
    plan = peftc.compile([*MIXTRAL])
    assert {s.path.rsplit(".", 1)[-1] for s in plan.sites} == {"q_proj", "v_proj"}
    assert sorted(plan.adapter_config["target_modules"]) == ["q_proj", "v_proj"]
    assert plan.adapter_config["target_parameters"] is None


def test_conversion_families_are_transformers_moe_families_that_peft_converts() -> None:
    """Only model types transformers converts with Mixtral's or Qwen2-MoE's pattern are rewritten
    (peft's _MOE_TARGET_MODULE_MAPPING); others in transformers' table (llava, CLIP, ...) are left
    alone rather than looked up in tables they are not in."""
    from peft.utils.transformers_weight_conversion import _MOE_TARGET_MODULE_MAPPING
    from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN

    from peftc.methods.lora.moe_layout import conversion_family

    for model_type, pattern in _MODEL_TO_CONVERSION_PATTERN.items():
        expected = pattern if pattern in _MOE_TARGET_MODULE_MAPPING else None
        assert conversion_family(model_type) == expected, model_type
    assert conversion_family("llama") is None


def _assert_rewritten_as_peft_rewrites(
    model: tuple[str, ...], targets: object, extra: tuple[str, ...] = (), **peft_fields: object
) -> None:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    shown = f"'{targets}'" if isinstance(targets, str) else f"[{','.join(targets)}]"
    plan = peftc.compile([*model, f"peft.target_modules={shown}", "peft.init_lora_weights=false", "peft.r=4", *extra])
    base = build_base(plan)
    asked = LoraConfig(
        task_type="CAUSAL_LM", target_modules=targets, r=4, lora_alpha=8, init_lora_weights=False, **peft_fields
    )
    torch.manual_seed(0)
    theirs = get_peft_model(copy.deepcopy(base), asked).eval()
    rewritten = theirs.peft_config["default"]  # peft rewrites its config in place
    ours = plan.adapter_config
    assert set(ours["target_modules"]) == set(rewritten.target_modules)
    assert set(ours["target_parameters"]) == set(rewritten.target_parameters)
    assert (ours["rank_pattern"], ours["alpha_pattern"]) == (rewritten.rank_pattern, rewritten.alpha_pattern)
    model_ours = peftc.materialize(plan, base_model=base).eval()
    fill(model_ours, "default", get_peft_model_state_dict(theirs))
    x = token_batch()
    assert max_diff(model_ours(input_ids=x).logits, theirs(input_ids=x).logits) <= 1e-5


def test_half_of_a_fused_pair_and_dropout_on_the_experts_are_refused_by_the_names_written() -> None:
    with pytest.raises(ConfigError, match=r"names gate_proj but not up_proj, which transformers 5 stores in one"):
        peftc.compile([*QWEN3_MOE, "peft.target_modules=[q_proj,gate_proj]"])
    # peft raises "lora.ParamWrapper does not work with lora_dropout != 0" from inside get_peft_model
    with pytest.raises(ConfigError, match=r"peft.lora_dropout=0.05: does not work on the expert weights"):
        peftc.compile([*MIXTRAL, "peft.target_modules=all-linear", "peft.lora_dropout=0.05"])
    # peft's ParamWrapper refuses DoRA and lora_bias as it refuses dropout
    for option in ("use_dora", "lora_bias"):
        with pytest.raises(ConfigError, match=rf"peft.{option}=True: does not work on the expert weights"):
            peftc.compile([*MIXTRAL, "peft.target_modules=[q_proj,w2]", f"peft.{option}=true"])
    plain = peftc.compile([*MIXTRAL, "peft.target_modules=[q_proj,v_proj]", "peft.lora_dropout=0.05"])
    assert plain.adapter_config["target_parameters"] is None  # names of today's layout are left alone


def _transformers_4_adapter(directory: Path, model: tuple[str, ...], block: str, projections: tuple[str, ...]) -> None:
    """A LoRA adapter in the layout peft wrote on transformers 4: one Linear per expert and
    projection, a Linear router, under `block` (Mixtral's block_sparse_moe, Qwen's mlp)."""
    from safetensors.torch import save_file

    config = build_base(peftc.compile([*model, "peft.target_modules=[q_proj]"])).config
    hidden, ffn = config.hidden_size, getattr(config, "moe_intermediate_size", config.intermediate_size)
    experts = getattr(config, "num_local_experts", getattr(config, "num_experts", None))
    generator, r, tensors = torch.Generator().manual_seed(0), 4, {}

    def lora(path: str, fan_in: int, fan_out: int) -> None:
        tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(r, fan_in, generator=generator) / 4
        tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(fan_out, r, generator=generator) / 4

    for layer in range(config.num_hidden_layers):
        lora(f"model.layers.{layer}.self_attn.q_proj", hidden, hidden)
        lora(f"model.layers.{layer}.{block}.gate", hidden, experts)
        for e in range(experts):
            for name in projections[:2]:  # gate and up
                lora(f"model.layers.{layer}.{block}.experts.{e}.{name}", hidden, ffn)
            lora(f"model.layers.{layer}.{block}.experts.{e}.{projections[2]}", ffn, hidden)
    directory.mkdir()
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    fields = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 8, "peft_version": "0.13.2"}
    fields["target_modules"] = ["q_proj", "gate", *projections]
    (directory / "adapter_config.json").write_text(json.dumps(fields))


@pytest.mark.parametrize(
    ("model", "block", "projections"),
    [(MIXTRAL, "block_sparse_moe", ("w1", "w3", "w2")), (QWEN3_MOE, "mlp", ("gate_proj", "up_proj", "down_proj"))],
    ids=["mixtral", "qwen3_moe"],
)
def test_a_transformers_4_moe_adapter_loads_with_the_outputs_peft_gives_it_and_saves_in_today_s_layout(
    model: tuple[str, ...], block: str, projections: tuple[str, ...], tmp_path: Path
) -> None:
    """Mixtral and Qwen-MoE adapters on the hub were mostly trained on transformers 4, experts
    included (axolotl's lora_target_linear); peft 0.22 fuses their factors on load, and so does
    peftc. Saved again, the adapter is in today's layout, which peft reads to the same outputs."""
    from peft import PeftModel

    _transformers_4_adapter(tmp_path / "old", model, block, projections)
    base = build_base(peftc.compile([*model, "peft.target_modules=[q_proj]"]))
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "old").eval()
    ours = peftc.load_adapter(copy.deepcopy(base), tmp_path / "old").eval()
    x = token_batch()
    with torch.no_grad():
        expected = theirs(input_ids=x).logits
        assert max_diff(ours(input_ids=x).logits, expected) <= 1e-5
        with ours.disable_adapter():
            assert max_diff(ours(input_ids=x).logits, expected) > 1e-3  # the experts' factors did something
    ours.save_adapter(tmp_path / "new")
    assert "experts.0." not in (tmp_path / "new" / "adapter_config.json").read_text()
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "new").eval()
    with torch.no_grad():
        assert max_diff(again(input_ids=x).logits, expected) <= 1e-5


def test_a_transformers_4_moe_file_missing_a_piece_or_with_a_non_float_one_is_refused_by_name(tmp_path: Path) -> None:
    """A fused factor is built only from a complete set of pieces of one shape and dtype; a file
    lacking one expert's factor, or holding one of another shape or dtype, is the file that does not
    fit that it is (the fused tensor is reported missing; a lenient load starts it fresh and skips
    the pieces), not a crash while stacking, and pieces that are not floating point are refused as
    any such tensor is."""
    from safetensors.torch import load_file, save_file

    from peftc.errors import AdapterFileError

    _transformers_4_adapter(tmp_path / "old", MIXTRAL, "block_sparse_moe", ("w1", "w3", "w2"))
    base = build_base(peftc.compile([*MIXTRAL, "peft.target_modules=[q_proj]"]))
    tensors = load_file(tmp_path / "old" / "adapter_model.safetensors")
    piece = "base_model.model.model.layers.0.block_sparse_moe.experts.{}.lora_A.weight"

    def altered(name: str, change: dict[str, torch.Tensor | None]) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        (directory / "adapter_config.json").write_text((tmp_path / "old" / "adapter_config.json").read_text())
        kept = {k: change.get(k, t) for k, t in tensors.items() if change.get(k, t) is not None}
        save_file(kept, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        return directory

    narrow = piece.format("2.w3").replace("lora_A", "lora_B")
    for name, change in (
        ("incomplete", {piece.format("2.w3"): None}),
        ("mixed-dtype", {piece.format("1.w1"): tensors[piece.format("1.w1")].long()}),
        ("narrow", {narrow: tensors[narrow][:, :2].contiguous()}),
    ):
        directory = altered(name, change)
        with pytest.raises(
            AdapterFileError, match=r"1 tensors the adapter config implies are missing, e\.g\. .*experts"
        ):
            peftc.load_adapter(copy.deepcopy(base), directory)
        lenient = peftc.load_adapter(copy.deepcopy(base), directory, strict=False)
        assert any(".experts." in key for key in lenient.load_reports["default"].missing), name
    integer = altered(
        "integer", {name: t.long() for name, t in tensors.items() if ".0.block_sparse_moe.experts." in name}
    )
    with pytest.raises(AdapterFileError, match=r"has dtype I64; adapter tensors are floating point"):
        peftc.load_adapter(copy.deepcopy(base), integer)


def test_training_continues_from_a_transformers_4_moe_adapter(tmp_path: Path) -> None:
    """`adapter=DIR` plans from the file's header as load_adapter reads it: the per-expert pieces
    stand in for the fused factors, so a transformers-4 adapter is continued, not refused."""
    from peftc.planning.model_source import load_tokenizer

    plan = peftc.compile([*MIXTRAL, "peft.target_modules=[q_proj]"])
    build_base(plan).save_pretrained(tmp_path / "base")
    load_tokenizer(plan.spec.model).save_pretrained(tmp_path / "base")
    _transformers_4_adapter(tmp_path / "old", MIXTRAL, "block_sparse_moe", ("w1", "w3", "w2"))
    config = json.loads((tmp_path / "old" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "base")
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(config))
    continued = peftc.compile([f"adapter={tmp_path / 'old'}", "task=causal_lm"])
    assert set(continued.adapter_config["target_parameters"]) == {"gate.weight", "gate_up_proj", "down_proj"}


def test_an_init_peftc_does_not_implement_on_expert_weights_is_refused_after_the_rewrite() -> None:
    """`peft.target_parameters` with PiSSA is refused when the config is checked; names that the
    rewrite turns into target parameters must be refused too, not left at the default init while
    q_proj gets PiSSA (peft 0.22 crashes on it)."""
    with pytest.raises(ConfigError, match=r"init_lora_weights='pissa': is not implemented on the expert weights"):
        peftc.compile([*MIXTRAL, "peft.target_modules=[q_proj,w1,w3,w2]", "peft.init_lora_weights=pissa"])
    assert peftc.compile([*MIXTRAL, "peft.target_modules=[q_proj]", "peft.init_lora_weights=pissa"]).sites
