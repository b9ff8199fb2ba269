"""Training that continues a saved adapter (`adapter=DIR` in a training run): peft's
`is_trainable=True`, axolotl's `lora_model_dir`. The method, its settings and the base model
are the adapter's; training starts from its tensors, not from the method's initialization."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftc
from peftc.errors import ConfigError
from tests.helpers import run_cli

pytestmark = pytest.mark.slow

WEIGHTS = "adapter_model.safetensors"
# A step this small moves no float32 value: the saved adapter is then the one training began from.
NO_STEP = ["trainer.max_steps=1", "trainer.lr=1e-30", "predict_samples=0", "data.limit_val_examples=4"]


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter the peft package saved (random B, so not a no-op) on a tiny Llama
    transformers directory its base_model_name_or_path names."""
    import peft
    from transformers import AutoModelForCausalLM

    from peftc.planning.model_source import load_tokenizer
    from tests.helpers import build_base

    root = tmp_path_factory.mktemp("continued")
    plan = peftc.compile(["model=tiny_llama"])
    build_base(plan).save_pretrained(root / "base")
    load_tokenizer(plan.spec.model).save_pretrained(root / "base")
    config = peft.LoraConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False
    )
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base"), config).save_pretrained(root / "adapter")
    return root / "adapter"


def test_training_starts_from_the_saved_tensors_of_an_adapter_peft_wrote(peft_adapter: Path, tmp_path: Path) -> None:
    result = run_cli([f"adapter={peft_adapter}", *NO_STEP, f"output_dir={tmp_path}"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"training continues from the adapter in {peft_adapter}" in result.stdout
    before, after = load_file(peft_adapter / WEIGHTS), load_file(tmp_path / "adapter" / WEIGHTS)
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[name], before[name]) for name in before)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["r"], saved["lora_alpha"]) == ("LORA", 4, 8)
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]


def test_a_continued_run_trains_the_adapter_further(peft_adapter: Path, tmp_path: Path) -> None:
    """With a real learning rate the adapter moves from where it was, and peft loads the result."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    result = run_cli(
        [
            f"adapter={peft_adapter}",
            "trainer.max_steps=1",
            "predict_samples=0",
            "data.limit_val_examples=4",
            f"output_dir={tmp_path}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    before, after = load_file(peft_adapter / WEIGHTS), load_file(tmp_path / "adapter" / WEIGHTS)
    assert all(not torch.equal(after[name], before[name]) for name in before)
    base = AutoModelForCausalLM.from_pretrained(peft_adapter.parent / "base")
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(base, tmp_path / "adapter"))
    assert all(torch.equal(loaded[name], after[name]) for name in after)


def test_the_plan_is_the_adapters_and_settings_that_differ_are_refused(peft_adapter: Path) -> None:
    plan = peftc.compile([f"adapter={peft_adapter}", "task=causal_lm"])
    assert (plan.method, plan.spec.peft.r, plan.spec.peft.lora_alpha) == ("lora", 4, 8)
    assert plan.spec.model.name_or_path == str(peft_adapter.parent / "base")
    # what the adapter has may be repeated; anything else would be ignored, so it is refused
    assert peftc.compile([f"adapter={peft_adapter}", "task=causal_lm", "peft=lora", "peft.r=4"]).spec.peft.r == 4
    for override, key in (
        ("peft.r=16", "peft.r='16'"),
        ("peft=ia3", "peft='ia3'"),
        ("model=tiny_gpt2", "model='tiny_gpt2'"),
    ):
        with pytest.raises(ConfigError, match=rf"^{key}: differs from the adapter's, which a run continuing it"):
            peftc.compile([f"adapter={peft_adapter}", "task=causal_lm", override])


def trained_then_continued(run: list[str], tmp_path: Path) -> tuple[dict, dict]:
    """Train `run` for a step, continue its adapter with the same overrides for a step that
    moves nothing; the tensors saved by each."""
    trained = run_cli([*run, "trainer.max_steps=1", f"output_dir={tmp_path / 'first'}"], tmp_path)
    assert trained.returncode == 0, trained.stderr
    adapter = tmp_path / "first" / "adapter"
    again = run_cli([*run, f"adapter={adapter}", *NO_STEP, f"output_dir={tmp_path / 'again'}"], tmp_path)
    assert again.returncode == 0, again.stderr
    return load_file(adapter / WEIGHTS), load_file(tmp_path / "again" / "adapter" / WEIGHTS)


def test_a_peftc_adapter_continues_with_the_command_line_that_trained_it(tmp_path: Path) -> None:
    """The first run's overrides, repeated with adapter=, continue it (its method settings and
    model included); the trained head (modules_to_save) starts from the saved one too."""
    run = ["task=seq_cls", "model=tiny_bert", "peft.r=4", "task.labels=[negative,positive]", "predict_samples=0"]
    before, after = trained_then_continued([*run, "data.limit_val_examples=4"], tmp_path)
    assert any("classifier" in name for name in before)
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_a_prompt_encoders_saved_table_is_where_a_continued_run_starts(tmp_path: Path) -> None:
    """p_tuning saves its encoder's output (the prompt table), not the encoder: a continued run
    starts from that table and trains it (peft would feed it into a fresh encoder instead)."""
    run = ["peft=p_tuning", "model=tiny_llama", "predict_samples=0", "data.limit_val_examples=4"]
    before, after = trained_then_continued(run, tmp_path)
    assert torch.equal(after["prompt_embeddings"], before["prompt_embeddings"])


def test_a_quantized_adapter_continues_on_its_quantized_base(tmp_path: Path) -> None:
    """QLoRA: peftc's plan beside the adapter records the base's quantization, which a continued
    run keeps; dropping it (quant=none) would be ignored, so it is refused."""
    plan = peftc.compile(["model=tiny_llama", "quant=bnb_nf4"])
    peftc.materialize(plan).save_adapter(tmp_path)
    continued = peftc.compile([f"adapter={tmp_path}", "task=causal_lm"])
    assert continued.spec.quant == plan.spec.quant and continued.quantization == plan.quantization
    assert peftc.compile([f"adapter={tmp_path}", "task=causal_lm", "quant=bnb_nf4"]).spec.quant == plan.spec.quant
    with pytest.raises(ConfigError, match="^quant='none': differs from the adapter's"):
        peftc.compile([f"adapter={tmp_path}", "task=causal_lm", "quant=none"])


def _copy_adapter(adapter: Path, to: Path, *, drop: str | None = None, **config: object) -> Path:
    """A copy of `adapter` with `config` fields changed in adapter_config.json and the tensor
    whose name contains `drop` left out of its file."""
    from safetensors.torch import save_file

    to.mkdir()
    saved = json.loads((adapter / "adapter_config.json").read_text())
    (to / "adapter_config.json").write_text(json.dumps({**saved, **config}))
    tensors = load_file(adapter / WEIGHTS)
    save_file({name: t for name, t in tensors.items() if drop is None or drop not in name}, to / WEIGHTS)
    return to


def test_an_adapter_file_that_does_not_fit_its_config_is_refused_by_the_plan(
    peft_adapter: Path, tmp_path: Path
) -> None:
    """Checked from the file's header when the run is planned, before any base model loads."""
    from peftc.errors import AdapterFileError

    broken = _copy_adapter(peft_adapter, tmp_path / "broken", drop="layers.0.self_attn.q_proj.lora_A")
    with pytest.raises(AdapterFileError, match=r"1 tensors the adapter config implies are missing, e\.g\. .*q_proj"):
        peftc.compile([f"adapter={broken}", "task=causal_lm"])


def test_a_task_other_than_the_adapters_is_refused_by_name(peft_adapter: Path) -> None:
    with pytest.raises(ConfigError, match=r"^task='seq_cls': the adapter in .* was trained for task=causal_lm"):
        peftc.compile([f"adapter={peft_adapter}", "task=seq_cls"])


def test_a_forced_override_of_the_adapters_settings_is_refused_too(peft_adapter: Path) -> None:
    """`++key=value` (Hydra's add-or-override) sets the key like `key=value` does."""
    with pytest.raises(ConfigError, match=r"^peft\.r='16': differs from the adapter's"):
        peftc.compile([f"adapter={peft_adapter}", "task=causal_lm", "++peft.r=16"])


def test_target_names_the_base_model_lacks_are_tolerated_as_when_loading(peft_adapter: Path, tmp_path: Path) -> None:
    """An adapter config may list names for several architectures (peft matches those present)."""
    wider = _copy_adapter(peft_adapter, tmp_path / "wider", target_modules=["q_proj", "v_proj", "c_attn"])
    plan = peftc.compile([f"adapter={wider}", "task=causal_lm"])
    assert {site.path.rsplit(".", 1)[-1] for site in plan.sites} == {"q_proj", "v_proj"}


def test_the_cli_refuses_a_setting_that_differs_from_the_adapters(peft_adapter: Path, tmp_path: Path) -> None:
    """Ignored silently, a user's peft.r=16 would train (and save) the adapter's r=4."""
    result = run_cli([f"adapter={peft_adapter}", "peft.r=16", "dry_run=true"], tmp_path)
    assert result.returncode == 2
    assert "peft.r='16': differs from the adapter's" in result.stderr
