"""Checkpoints saved quantized (config.json with a `quantization_config`, like the hub's
`*-bnb-4bit` repos): a bitsandbytes one trains as it is stored, with the quant option that matches
it, its plan describing the layers transformers reads; any other quant, and a format peftc has no
backend for, is refused in one line at compile time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import peftc
from peftc.errors import ConfigError, PlanError
from peftc.quant.base import add_bytes, backend_of
from tests.helpers import max_diff, token_batch

pytest.importorskip("bitsandbytes")

# How transformers' BitsAndBytesConfig saves them; the model dtype of the save where it matters.
SAVED = {
    "nf4": ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "float32"),
    "nf4_double_quant": (
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
        "bfloat16",
    ),
    "int8": ({"load_in_8bit": True}, "float32"),
    "fp4": ({"load_in_4bit": True}, "float32"),  # transformers' default 4-bit code
}
QUANT_OF = {"nf4": "bnb_nf4", "nf4_double_quant": "bnb_nf4", "int8": "bnb_int8", "fp4": "bnb_fp4"}


@pytest.fixture(scope="module")
def saved_quantized(tiny_llama_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny Llama saved quantized by transformers + bitsandbytes, with its tokenizer."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    directories = {}
    for name, (settings, dtype) in SAVED.items():
        model = AutoModelForCausalLM.from_pretrained(
            tiny_llama_dir, quantization_config=BitsAndBytesConfig(**settings), dtype=getattr(torch, dtype)
        )
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        for tokenizer_file in Path(tiny_llama_dir).glob("tokenizer*"):
            shutil.copy(tokenizer_file, path / tokenizer_file.name)
        directories[name] = str(path)
    return directories


def stored_base_bytes(model: torch.nn.Module) -> dict[str, int]:
    """What the live base occupies by dtype: quantized weights as stored, every other parameter."""
    sizes: dict[str, int] = {}
    quantized = {id(m.weight) for m in model.modules() if backend_of(m) is not None}
    for module in model.modules():
        if backend_of(module) is not None:
            sizes = add_bytes(sizes, backend_of(module).stored_bytes(module))
    for param in model.parameters():
        if id(param) not in quantized and not param.requires_grad:
            dtype = str(param.dtype).replace("torch.", "")
            sizes[dtype] = sizes.get(dtype, 0) + param.numel() * param.element_size()
    return dict(sorted(sizes.items()))


@pytest.mark.parametrize("saved", list(SAVED))
def test_a_checkpoint_saved_quantized_is_planned_and_loaded_as_it_is_stored(
    saved_quantized: dict[str, str], saved: str
) -> None:
    """The plan (made on the meta device from config.json) names the layers transformers reads
    quantized, their format (double quantization from the checkpoint) and their exact bytes."""
    plan = peftc.compile(["model=hf", f"model.name_or_path={saved_quantized[saved]}", f"quant={QUANT_OF[saved]}"])
    assert plan.quantization.from_checkpoint and len(plan.quantization.modules) == 14
    if saved.startswith("nf4"):
        assert plan.spec.quant.double_quant is (saved == "nf4_double_quant")
    model = peftc.materialize(plan)
    live = {path.removesuffix(".base_layer") for path, m in model.base_model.named_modules() if backend_of(m)}
    assert live == set(plan.quantization.modules)
    assert stored_base_bytes(model) == plan.quantization.bytes_by_dtype


# llm_int8_skip_modules a checkpoint may be saved with: none (transformers' default: the output
# embedding and the last module), none at all, a module name, a prefix that ends inside a name, prefixes
SKIP_LISTS = {
    "default": None,
    "empty": [],
    "name": ["o_proj"],
    "not-a-module-boundary": ["model.layers.0.self_attn.k"],
    "prefixes": ["lm_head", "model.layers.0.mlp"],
}


@pytest.fixture(scope="module")
def saved_with_skip_lists(tiny_llama_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    directories = {}
    for name, skip in SKIP_LISTS.items():
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=skip)
        path = tmp_path_factory.mktemp(f"skip_{name}")
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config).save_pretrained(path)
        for tokenizer_file in Path(tiny_llama_dir).glob("tokenizer*"):
            shutil.copy(tokenizer_file, path / tokenizer_file.name)
        directories[name] = str(path)
    return directories


@pytest.mark.parametrize(("skip", "task"), [*((s, "causal_lm") for s in SKIP_LISTS), ("default", "seq_cls")])
def test_the_planned_quantized_modules_are_those_transformers_reads_quantized(
    saved_with_skip_lists: dict[str, str], skip: str, task: str
) -> None:
    """transformers' rules for a checkpoint's skip list, the oracle: names match from the start up
    to a module boundary or as a suffix; without a list, the output embedding and the module of
    the last parameter (a classifier's new head) stay unquantized."""
    import transformers

    directory = saved_with_skip_lists[skip]
    plan = peftc.compile(["model=hf", f"model.name_or_path={directory}", "quant=bnb_nf4", f"task={task}"])
    auto = transformers.AutoModelForSequenceClassification if task == "seq_cls" else transformers.AutoModelForCausalLM
    live = {path for path, module in auto.from_pretrained(directory).named_modules() if backend_of(module)}
    assert set(plan.quantization.modules) == live


def test_a_head_the_checkpoint_would_store_quantized_is_refused(saved_with_skip_lists: dict[str, str]) -> None:
    # its skip list names o_proj only: transformers reads seq_cls's new head `score` quantized
    overrides = ["model=hf", f"model.name_or_path={saved_with_skip_lists['name']}", "quant=bnb_nf4", "task=seq_cls"]
    with pytest.raises(PlanError, match="is trained in full, but the checkpoint stores score quantized") as caught:
        peftc.compile(overrides)
    assert caught.value.key == "peft.modules_to_save"


def test_a_checkpoint_saved_quantized_is_loaded_in_model_dtype_and_the_planned_compute_dtype(
    saved_quantized: dict[str, str],
) -> None:
    """transformers keeps the saved dtype and compute dtype of such a checkpoint whatever it is
    asked; the base is still the plan's: model.dtype, the matmul in quant.compute_dtype."""
    plan = peftc.compile(
        [
            "model=hf",
            f"model.name_or_path={saved_quantized['nf4_double_quant']}",  # saved in bfloat16
            "model.dtype=float16",
            "quant=bnb_nf4",
            "quant.float32_unquantized=false",
            "quant.compute_dtype=float32",
        ]
    )
    model = peftc.materialize(plan)
    assert {p.dtype for p in model.parameters() if p.dtype.is_floating_point and not p.requires_grad} == {torch.float16}
    assert {m.compute_dtype for m in model.modules() if backend_of(m) is not None} == {torch.float32}
    assert stored_base_bytes(model) == plan.quantization.bytes_by_dtype


@pytest.mark.parametrize("threshold", [0.0, 2.5])
def test_an_int8_checkpoint_runs_with_the_planned_outlier_threshold(
    saved_quantized: dict[str, str], threshold: float
) -> None:
    """The checkpoint stores transformers' threshold (6.0); the run's is quant.threshold, with the
    outlier pool Linear8bitLt's constructor sets for it."""
    quant = ["quant=bnb_int8", f"quant.threshold={threshold}"]
    model = peftc.materialize(peftc.compile(["model=hf", f"model.name_or_path={saved_quantized['int8']}", *quant]))
    states = [m.state for m in model.modules() if backend_of(m) is not None]
    assert {(state.threshold, state.use_pool) for state in states} == {(threshold, threshold > 0)}


@pytest.mark.parametrize("quant", ["none", "bnb_fp4", "bnb_int8", "quanto_int8", "torchao_int8"])
def test_another_quant_on_a_checkpoint_saved_quantized_is_refused_naming_the_one_that_fits(
    saved_quantized: dict[str, str], quant: str
) -> None:
    with pytest.raises(ConfigError, match=r"is saved quantized as bitsandbytes nf4 .*; set quant=bnb_nf4") as caught:
        peftc.compile(["model=hf", f"model.name_or_path={saved_quantized['nf4']}", f"quant={quant}", "dry_run=true"])
    assert caught.value.key == "quant"


@pytest.mark.parametrize("names_its_code", [True, False], ids=["fp4", "no-bnb_4bit_quant_type"])
def test_a_4bit_checkpoint_trains_with_the_quant_of_its_code(
    saved_quantized: dict[str, str], tmp_path: Path, names_its_code: bool
) -> None:
    """A quantization_config without bnb_4bit_quant_type is fp4, as transformers reads it."""
    directory = Path(saved_quantized["fp4"])
    if not names_its_code:
        directory = Path(shutil.copytree(directory, tmp_path / "model"))
        config = json.loads((directory / "config.json").read_text())
        del config["quantization_config"]["bnb_4bit_quant_type"]
        (directory / "config.json").write_text(json.dumps(config))
    assert peftc.compile(["model=hf", f"model.name_or_path={directory}", "quant=bnb_fp4"]).quantization.from_checkpoint
    with pytest.raises(ConfigError, match=r"is saved quantized as bitsandbytes fp4 .*; set quant=bnb_fp4"):
        peftc.compile(["model=hf", f"model.name_or_path={directory}", "quant=bnb_nf4"])


@pytest.mark.parametrize("saved", ["nf4", "int8"])
def test_a_bitsandbytes_checkpoint_without_quant_method_is_read_as_transformers_reads_it(
    saved_quantized: dict[str, str], tmp_path: Path, saved: str
) -> None:
    """transformers wrote no quant_method before 4.32 and reads load_in_4bit / load_in_8bit as
    bitsandbytes whatever quant_method says: so does the plan."""
    from transformers import AutoModelForCausalLM

    directory = shutil.copytree(saved_quantized[saved], tmp_path / "model")
    config = json.loads((directory / "config.json").read_text())
    del config["quantization_config"]["quant_method"]
    (directory / "config.json").write_text(json.dumps(config))
    plan = peftc.compile(["model=hf", f"model.name_or_path={directory}", f"quant={QUANT_OF[saved]}"])
    live = {
        path for path, module in AutoModelForCausalLM.from_pretrained(directory).named_modules() if backend_of(module)
    }
    assert plan.quantization.from_checkpoint and set(plan.quantization.modules) == live
    with pytest.raises(
        ConfigError, match=f"is saved quantized as bitsandbytes {saved} .*; set quant={QUANT_OF[saved]}"
    ):
        peftc.compile(["model=hf", f"model.name_or_path={directory}", "quant=bnb_fp4"])


def test_a_checkpoint_saved_quantized_fixes_which_modules_are_quantized(saved_quantized: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="the checkpoint fixes which modules are") as caught:
        peftc.compile(
            ["model=hf", f"model.name_or_path={saved_quantized['nf4']}", "quant=bnb_nf4", "quant.skip_modules=[o_proj]"]
        )
    assert caught.value.key == "quant.skip_modules"


@pytest.mark.parametrize(
    ("stored", "named"),
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptq 4-bit"),
        ({"quant_method": "awq", "bits": 4, "version": "gemm"}, "awq 4-bit"),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "compressed-tensors"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "fp8"),
        ({"quant_method": "no_such_method"}, "no_such_method"),
    ],
)
def test_a_quantization_format_without_a_backend_is_refused_in_one_line(
    config_only_dir: str, tmp_path: Path, stored: dict, named: str
) -> None:
    """transformers would raise an ImportError (gptq, awq, compressed-tensors), dequantize on a
    CPU and not on a GPU (fp8), or load the stored codes as weights (an unknown method)."""
    directory = tmp_path / "model"
    shutil.copytree(config_only_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "quantization_config": stored}))
    with pytest.raises(ConfigError, match=f"is saved quantized as {named} .*which peftc cannot train") as caught:
        peftc.compile(["model=hf", f"model.name_or_path={directory}", "dry_run=true"])
    assert caught.value.key == "model.name_or_path"
    assert "quant=bnb_nf4" in str(caught.value) and "\n" not in str(caught.value)


def trained(saved_dir: str, quant: str) -> peftc.PeftcModel:
    """LoRA on every Linear of the checkpoint, its factors drawn at random (a stand-in for training)."""
    model = peftc.materialize(
        peftc.compile(
            ["model=hf", f"model.name_or_path={saved_dir}", f"quant={quant}", "peft.target_modules=all-linear"]
        )
    )
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.05)
    return model


def as_planned(base: torch.nn.Module) -> torch.nn.Module:
    """A base transformers loaded, set up as the plan runs it: float32 (model.dtype) for its plain
    weights and the 4-bit matmul, LLM.int8() threshold 0, no CPU inference repacking."""
    for param in base.parameters():
        if param.dtype.is_floating_point:
            param.data = param.data.float()
    for module in base.modules():
        if hasattr(module, "compute_dtype"):
            module.compute_dtype, module.support_avx512bf16_for_cpu = torch.float32, False
        if hasattr(module, "state") and hasattr(module.state, "threshold"):
            module.state.threshold, module.state.use_pool = 0.0, False
    return base


@pytest.mark.parametrize("saved", ["nf4_double_quant", "int8"])
def test_its_adapter_loads_back_and_in_peft_with_the_same_outputs(
    saved_quantized: dict[str, str], saved: str, tmp_path: Path
) -> None:
    """load_adapter rebuilds the base from the saved plan and reads it as stored (quantizing it
    again failed for 4-bit and gave NaN for 8-bit); peft over the same checkpoint agrees."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = trained(saved_quantized[saved], QUANT_OF[saved])
    model.save_adapter(tmp_path / "adapter")
    x = token_batch()
    with torch.no_grad():
        ours = model(input_ids=x).logits
        loaded = peftc.load_adapter(tmp_path / "adapter")(input_ids=x).logits
        base = as_planned(AutoModelForCausalLM.from_pretrained(saved_quantized[saved], dtype=torch.float32))
        theirs = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(input_ids=x).logits
    assert max_diff(loaded, ours) == 0.0
    assert max_diff(theirs, ours) <= 1e-6 * ours.abs().max().item()


def test_an_adapter_peft_trained_on_it_loads_with_peft_outputs(saved_quantized: dict[str, str], tmp_path: Path) -> None:
    """peft's adapter names the checkpoint as its base; peftc rebuilds it as stored and keeps
    bitsandbytes from repacking it for CPU inference on the first forward (~5e-3 off)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = as_planned(AutoModelForCausalLM.from_pretrained(saved_quantized["nf4"], dtype=torch.float32))
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    theirs = get_peft_model(base, config).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    x = token_batch()
    with torch.no_grad():
        expected = theirs(input_ids=x).logits
        ours = peftc.load_adapter(tmp_path / "adapter")(input_ids=x).logits
    assert max_diff(ours, expected) <= 1e-6 * expected.abs().max().item()


# Not nf4_double_quant: saved from bfloat16, its 4-bit product rounds activations too (bitsandbytes).
@pytest.mark.parametrize("saved", ["nf4", "int8"])
def test_merging_writes_its_dequantized_weights_with_the_adapter_folded_in(
    saved_quantized: dict[str, str], saved: str
) -> None:
    """A checkpoint saved quantized has no unquantized weights: action=merge and save_merged fold
    the adapter into the weights it was trained over, dequantized, and save a plain model."""
    from peftc.cli.export import merged_model

    model = trained(saved_quantized[saved], QUANT_OF[saved])
    merged = merged_model(model, model.plan_of("default"))
    assert not any(backend_of(m) for m in merged.modules())
    assert "quantization_config" not in merged.config.to_dict()
    x = token_batch()
    model.train()  # bnb int8's eval forward also rounds the activations; its training forward is exact
    with torch.no_grad():
        ours, folded = model(input_ids=x).logits, merged(input_ids=x).logits
    assert max_diff(folded, ours) <= 1e-5 * ours.abs().max().item()
