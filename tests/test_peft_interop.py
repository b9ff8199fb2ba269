"""Adapters the peft package writes in the wild load in peftc, and peftc's load back (peft 0.21.2
is the oracle; outputs agree to 1e-5 loaded, saved back and merged):

- saved without a task type (`get_peft_model(model, config)`, `"task_type": null`): the model as
  it is, on a plain nn.Module or rebuilt from its directory; predict infers the task from the
  base model's class, or asks for `task=`;
- AdaLoRA with base biases trained (bias='all' / 'lora_only');
- a lenient load names every tensor it could not use; a refused merge is a PeftcError;
- adapter_model.bin is refused with a conversion line that works and never runs a payload;
- an adapter loaded onto a base other than the one it names warns, naming both.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftc
from peftc.errors import AdapterFileError, MergeError, PeftcError
from tests.catalogue import edit_config, edit_tensors, write_pickle_adapter
from tests.helpers import max_diff, run_cli, token_batch

TOLERANCE = 1e-5
ASSETS = Path(peftc.__file__).resolve().parent / "assets"


class MLP(nn.Module):
    """peft's custom-model test MLP (tests/test_custom_models.py), smaller; seeded weights."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2, bias=bias)
        torch.random.set_rng_state(generator_state)

    def forward(self, X: torch.Tensor) -> torch.Tensor:  # noqa: N803 (peft's test models call the input X)
        return self.lin1(self.relu(self.lin0(X)))


X = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))


def out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def peft_config(name: str, **extra: Any) -> Any:
    """A peft config with a non-identity init and no task type, as peft's docs make them."""
    import peft

    configs: dict[str, Callable[[], Any]] = {
        "lora": lambda: peft.LoraConfig(target_modules=["lin0"], init_lora_weights=False, **extra),
        "adalora": lambda: peft.AdaLoraConfig(target_modules=["lin0"], init_lora_weights=False, total_step=10, **extra),
        "ia3": lambda: peft.IA3Config(
            target_modules=["lin0", "lin1"], feedforward_modules=["lin1"], init_ia3_weights=False
        ),
        "loha": lambda: peft.LoHaConfig(target_modules=["lin0"], init_weights=False),
        "lokr": lambda: peft.LoKrConfig(target_modules=["lin0"], init_weights=False),
    }
    return configs[name]()


def saved_by_peft(config: Any, directory: Path, **save: Any) -> Any:
    """peft's model for `config` on the MLP, its trainable biases moved as training would, saved."""
    import peft

    theirs = peft.get_peft_model(MLP(), config)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if param.requires_grad and name.endswith(".bias"):
                param.add_(0.5)
    theirs.save_pretrained(directory, **save)
    return theirs.eval()


CASES = [
    ("lora", {}),
    ("adalora", {}),
    ("ia3", {}),
    ("loha", {}),
    ("lokr", {}),
    ("lora", {"bias": "all"}),
    ("adalora", {"bias": "all"}),
    ("adalora", {"bias": "lora_only"}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in extra.items()) for name, extra in CASES]


@pytest.mark.parametrize(("method", "extra"), CASES, ids=IDS)
def test_peft_adapters_without_a_task_type_load_save_and_merge_like_peft(
    tmp_path: Path, method: str, extra: dict[str, Any]
) -> None:
    from peft import PeftModel

    theirs = saved_by_peft(peft_config(method, **extra), tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"] is None
    assert max_diff(out(theirs), out(MLP())) > 1e-3, (
        "the adapter must change the outputs for the test to mean something"
    )
    ours = peftc.load_adapter(MLP(), tmp_path / "peft")  # strict: every tensor of peft's file is used
    assert ours.plan_of("default").task_type is None
    assert ours.plan_of("default").trainable_params == theirs.get_nb_trainable_parameters()[0]
    assert max_diff(out(ours), out(theirs)) <= TOLERANCE

    ours.save_adapter(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["task_type"] is None and written.get("bias", "none") == extra.get("bias", "none")
    back = PeftModel.from_pretrained(MLP(), tmp_path / "ours").eval()
    assert max_diff(out(back), out(theirs)) <= TOLERANCE

    assert max_diff(out(ours.merge_and_unload()), out(theirs.merge_and_unload())) <= TOLERANCE


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_adalora_trains_the_same_base_biases_as_lora(bias: str) -> None:
    overrides = ["model=tiny_gpt2", "peft.target_modules=[c_attn]", f"peft.bias={bias}", "trainer.max_steps=10"]
    adalora, lora = (peftc.compile([f"peft={method}", *overrides]) for method in ("adalora", "lora"))
    assert adalora.unfrozen and adalora.unfrozen == lora.unfrozen


# ------------------------------------------------------------------------------ lenient loads
def test_a_lenient_load_warns_with_the_name_of_every_tensor_it_could_not_use(tmp_path: Path) -> None:
    """The issue's case: peft's AdaLoRA bias='all' file under the config peftc used to write."""
    theirs = saved_by_peft(peft_config("adalora", bias="all"), tmp_path)
    biases = ["base_model.model.lin0.base_layer.bias", "base_model.model.lin1.bias"]
    edit_config(bias="none")(tmp_path)
    edit_tensors(lambda tensors: tensors.pop("base_model.model.lin0.lora_E"))(tmp_path)
    with pytest.raises(AdapterFileError, match="missing"):
        peftc.load_adapter(MLP(), tmp_path)
    with pytest.warns(UserWarning, match="loaded leniently") as caught:
        ours = peftc.load_adapter(MLP(), tmp_path, strict=False)
    message = " ".join(str(w.message) for w in caught)
    for name in [*biases, "base_model.model.lin0.lora_E"]:
        assert name in message
    assert max_diff(out(ours), out(theirs)) > 1e-3, "the outputs really differ: the warning is all that says so"


# ------------------------------------------------------------------------------------ merging
def _grouped_conv() -> tuple[nn.Module, Any]:
    from peftc.methods.lora.method import LoraSpec
    from tests.conv_model import TinyConvNet

    return TinyConvNet(), LoraSpec(target_modules=["grouped"], r=4, init_lora_weights=False)


def _lora_bias_without_base_bias() -> tuple[nn.Module, Any]:
    from peftc.methods.lora.method import LoraSpec

    return MLP(bias=False), LoraSpec(target_modules=["lin0"], lora_bias=True, init_lora_weights=False)


@pytest.mark.parametrize("make", [_grouped_conv, _lora_bias_without_base_bias], ids=["grouped-conv", "lora-bias"])
def test_a_refused_merge_is_a_peftc_error(make: Callable[[], tuple[nn.Module, Any]]) -> None:
    from tests.conv_model import plan_for

    base, spec = make()
    model = peftc.materialize(plan_for(base, spec), base_model=base)
    with pytest.raises(MergeError, match="cannot be merged") as error:
        model.merge_adapter()
    assert isinstance(error.value, PeftcError) and isinstance(error.value, ValueError)  # peft raises ValueError


# ------------------------------------------------------------------------------------- pickle
def _conversion_code(error: AdapterFileError) -> str:
    match = re.search(r'python -c "(.*)"$', str(error))
    assert match, f"no conversion line in: {error}"
    return match.group(1)


def test_a_pickle_adapter_is_refused_with_a_conversion_line_that_works(tmp_path: Path) -> None:
    theirs = saved_by_peft(peft_config("lora"), tmp_path, safe_serialization=False)
    assert not (tmp_path / "adapter_model.safetensors").exists()
    with pytest.raises(AdapterFileError, match="convert to safetensors") as error:
        peftc.load_adapter(MLP(), tmp_path)
    exec(_conversion_code(error.value), {})  # what the user runs in a shell
    assert max_diff(out(peftc.load_adapter(MLP(), tmp_path)), out(theirs)) <= TOLERANCE


def test_the_conversion_line_never_runs_a_pickled_payload(tmp_path: Path) -> None:
    sentinel = tmp_path / "SENTINEL"
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": None}))
    write_pickle_adapter(tmp_path, sentinel)
    with pytest.raises(AdapterFileError, match="never loaded") as error:
        peftc.load_adapter(MLP(), tmp_path)
    with pytest.raises(Exception, match="Weights only load failed"):
        exec(_conversion_code(error.value), {})
    assert not sentinel.exists()


# ---------------------------------------------------------------------------- the named base
@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("lora")
    saved_by_peft(peft_config("lora"), directory)
    return directory


@pytest.mark.parametrize(
    ("named", "loaded_onto", "warns"),
    [
        ("org/model-a", "org/model-b", True),
        ("org/model-a", "org/model-a", False),
        ("org/model-a", "/cache/hub/models--org--model-a/snapshots/0123abc", False),
        ("pkg:peftc/assets", str(ASSETS), False),
        ("pkg:peftc/assets", str(ASSETS / "data"), True),
        (None, "org/model-b", False),  # peft names no base for a plain nn.Module
    ],
)
def test_loading_onto_a_base_other_than_the_named_one_warns_naming_both(
    lora_dir: Path, tmp_path: Path, named: str | None, loaded_onto: str, warns: bool
) -> None:
    directory = shutil.copytree(lora_dir, tmp_path / "adapter")
    edit_config(base_model_name_or_path=named)(directory)
    base = MLP()
    base.name_or_path = loaded_onto
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peftc.load_adapter(base, directory)
    named_both = [w for w in caught if str(named) in str(w.message) and loaded_onto in str(w.message)]
    assert bool(named_both) is warns, [str(w.message) for w in caught]


# ------------------------------------------------------------ task-less adapters of HF models
@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A tiny LlamaForCausalLM saved as a transformers directory, and a task-less peft LoRA on
    it (base_model_name_or_path is that directory), with peft's logits."""
    import peft
    from transformers import AutoModelForCausalLM

    from peftc.planning.model_source import load_tokenizer
    from tests.helpers import build_base

    root = tmp_path_factory.mktemp("llama")
    plan = peftc.compile(["model=tiny_llama"])
    build_base(plan).save_pretrained(root / "base")
    load_tokenizer(plan.spec.model).save_pretrained(root / "base")
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    theirs = peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    theirs.save_pretrained(root / "adapter")
    with torch.no_grad():
        return root / "adapter", theirs.eval()(input_ids=token_batch()).logits


def test_a_task_less_adapter_alone_rebuilds_its_base_as_the_class_it_is(llama_adapter) -> None:
    directory, expected = llama_adapter
    ours = peftc.load_adapter(directory)
    assert type(ours.base_model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert max_diff(ours(input_ids=token_batch()).logits, expected) <= TOLERANCE


def _with_base_class(adapter: Path, target: Path, architecture: str) -> Path:
    """A copy of the adapter whose base model's config names another class."""
    base = Path(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    shutil.copytree(base, target / "base")
    config = json.loads((target / "base" / "config.json").read_text())
    (target / "base" / "config.json").write_text(json.dumps({**config, "architectures": [architecture]}))
    shutil.copytree(adapter, target / "adapter")
    edit_config(base_model_name_or_path=str(target / "base"))(target / "adapter")
    return target / "adapter"


def test_predict_with_a_task_less_adapter_infers_the_task_from_the_base_class(llama_adapter, tmp_path: Path) -> None:
    directory, _ = llama_adapter
    result = run_cli(["action=predict", f"adapter={directory}", "input=hi", "task.max_new_tokens=2"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "task=causal_lm" in result.stdout and "1 predictions written" in result.stdout


def test_predict_asks_for_the_task_when_the_base_class_names_none(llama_adapter, tmp_path: Path) -> None:
    directory = _with_base_class(llama_adapter[0], tmp_path, "MyOwnLlama")
    with pytest.raises(AdapterFileError, match="cannot tell which class"):
        peftc.load_adapter(directory)
    refused = run_cli(["action=predict", f"adapter={directory}", "input=hi"], tmp_path)
    assert refused.returncode == 2 and "pass the task, e.g. task=causal_lm" in refused.stderr
    assert "Traceback" not in refused.stderr
    given = run_cli(["action=predict", f"adapter={directory}", "task=causal_lm", "input=hi"], tmp_path)
    assert given.returncode == 0, given.stderr


def test_a_task_that_does_not_fit_the_base_class_is_refused(llama_adapter, tmp_path: Path) -> None:
    directory, _ = llama_adapter
    with pytest.raises(AdapterFileError, match="LlamaForCausalLM, which has no seq_cls head; use task=causal_lm"):
        peftc.load_adapter(directory, task="seq_cls")


def test_a_label_set_that_does_not_fit_a_task_less_adapter_s_head_is_refused(tmp_path: Path) -> None:
    """A task-less peft adapter on a classifier keeps its base's head: task.labels must have as
    many labels as the head has rows, or the labels would name the wrong classes."""
    import peft
    from transformers import AutoModelForSequenceClassification

    from peftc.planning.model_source import load_tokenizer
    from tests.helpers import build_base

    plan = peftc.compile(["task=seq_cls", "model=tiny_bert", "task.labels=[bad,good]"])
    build_base(plan).save_pretrained(tmp_path / "base")
    load_tokenizer(plan.spec.model).save_pretrained(tmp_path / "base")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    peft.get_peft_model(base, peft.LoraConfig(target_modules=["query"])).save_pretrained(tmp_path / "adapter")
    args = ["action=predict", f"adapter={tmp_path / 'adapter'}", "input=fine", f"hydra.run.dir={tmp_path / 'run'}"]
    refused = run_cli([*args, "task.labels=[bad,ok,good]"], tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert "has 3 labels but the head of the adapter's base model has 2" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_prompt_adapter_without_a_task_type_is_refused(llama_adapter, tmp_path: Path) -> None:
    """peft's task-less PeftModel would run the base without the prompt: nothing to match."""
    directory = tmp_path / "prompt"
    directory.mkdir()
    config = {"peft_type": "PROMPT_TUNING", "task_type": None, "num_virtual_tokens": 2, "token_dim": 64}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    shutil.copy(llama_adapter[0] / "adapter_model.safetensors", directory)
    with pytest.raises(AdapterFileError, match="PROMPT_TUNING adapter with task_type null"):
        peftc.load_adapter(copy.deepcopy(MLP()), directory)


def bf16_configs() -> dict[str, Any]:
    from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig

    targets = ["q_proj", "v_proj", "down_proj"]
    return {
        "lora": LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
        "dora": LoraConfig(r=4, target_modules=targets, use_dora=True, init_lora_weights=False),
        "loha": LoHaConfig(r=4, target_modules=targets, init_weights=False),
        "lokr": LoKrConfig(r=4, target_modules=targets, init_weights=False),
        "adalora": AdaLoraConfig(init_r=4, target_modules=targets, total_step=10, init_lora_weights=False),
    }


# LoRA, LoHa and AdaLoRA compute as peft does, operation for operation; DoRA and LoKr in another
# order (DoRA's norm, LoKr's Kronecker product applied factor by factor), so as close, not equal.
BIT_EQUAL = {"lora", "loha", "adalora"}


@pytest.mark.parametrize("method", ["lora", "dora", "loha", "lokr", "adalora"])
def test_a_bfloat16_adapter_written_by_peft_loads_with_its_values_and_peft_s_logits(
    method: str, tmp_path: Path
) -> None:
    """peft saves an adapter in its tensors' dtype: a model cast to bfloat16 writes BF16 tensors.
    Loaded onto a bfloat16 base they keep their values in float32 adapters, as peft's own
    from_pretrained loads them (autocast_adapter_dtype), and the model gives peft's logits bit for
    bit: each float32 update is added to the bfloat16 base output in float32 and the sum rounded
    once, as peft does (rounding the update first cost up to 1.34x peft's error). Where the
    operations differ in order, the logits are as close to the float32 model's as peft's."""
    from peft import PeftModel, get_peft_model
    from safetensors.torch import load_file

    from tests.helpers import build_base

    plan = peftc.compile([])
    torch.manual_seed(0)  # the adapter's random init
    get_peft_model(build_base(plan), bf16_configs()[method]).to(torch.bfloat16).save_pretrained(tmp_path)
    written = load_file(tmp_path / "adapter_model.safetensors")
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    ours = peftc.load_adapter(build_base(plan).to(torch.bfloat16), tmp_path)
    loaded = ours.adapter_state_dict("default")
    assert loaded.keys() == written.keys()
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], written[k].float()) for k in written)
    theirs = PeftModel.from_pretrained(build_base(plan).to(torch.bfloat16), tmp_path).eval()
    x = token_batch()
    if method in BIT_EQUAL:
        assert torch.equal(ours(input_ids=x).logits, theirs(input_ids=x).logits)
        return
    exact = PeftModel.from_pretrained(build_base(plan), tmp_path).eval()(input_ids=x).logits

    def error(model: nn.Module) -> float:  # relative to the float32 model's logits: bf16 rounding
        return ((model(input_ids=x).logits.float() - exact).norm() / exact.norm()).item()

    assert 0 < error(ours) <= 1.25 * error(theirs)


def test_a_lenient_load_starts_a_missing_tensor_as_peft_initialises_it(tmp_path: Path) -> None:
    """A tensor the file lacks keeps the method's initial value, as in peft's own lenient load:
    a missing lora_B is zero (default init_lora_weights), so that module is left as the base."""
    from peft import LoraConfig, PeftModel

    saved_by_peft(LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False), tmp_path)
    edit_config(init_lora_weights=True)(tmp_path)  # what a trained adapter's config says
    edit_tensors(lambda tensors: tensors.pop("base_model.model.lin1.lora_B.weight"))(tmp_path)
    with pytest.warns(UserWarning, match="loaded leniently"):
        ours = peftc.load_adapter(MLP(), tmp_path, strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about the missing key too
        theirs = PeftModel.from_pretrained(MLP(), tmp_path).eval()
    assert not ours.adapter_state_dict("default")["base_model.model.lin1.lora_B.weight"].any()
    assert max_diff(out(ours), out(theirs)) <= TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_an_adapter_written_by_peft_in_another_float_dtype_loads_with_its_values(
    dtype: torch.dtype, tmp_path: Path
) -> None:
    """peft saves an adapter in its tensors' dtype (a model cast with .half() or .double());
    every floating dtype safetensors has is an adapter peftc loads, into float32 adapters."""
    from peft import PeftModel
    from safetensors.torch import load_file

    saved_by_peft(peft_config("lora"), tmp_path).to(dtype).save_pretrained(tmp_path)
    written = load_file(tmp_path / "adapter_model.safetensors")
    assert {t.dtype for t in written.values()} == {dtype}
    ours = peftc.load_adapter(MLP(), tmp_path)
    loaded = ours.adapter_state_dict("default")
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], written[k].float()) for k in written)
    assert max_diff(out(ours), out(PeftModel.from_pretrained(MLP(), tmp_path).eval())) <= TOLERANCE


def test_target_and_exclude_names_absent_from_the_base_are_tolerated_on_load_as_in_peft(tmp_path: Path) -> None:
    """peft adapts what its lists match and saves the lists as written (a shared recipe names
    modules of several families): an entry that matches nothing refuses a training config, but
    never a file peft wrote and loads."""
    from peft import LoraConfig, PeftModel

    config = LoraConfig(target_modules=["lin0", "lin9"], exclude_modules=["lin7"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "no modules were excluded"
        saved_by_peft(config, tmp_path)
        theirs = PeftModel.from_pretrained(MLP(), tmp_path).eval()
    ours = peftc.load_adapter(MLP(), tmp_path)
    assert [site.path for site in ours.plan_of("default").sites] == ["lin0"]
    assert max_diff(out(ours), out(theirs)) <= TOLERANCE
