"""The plan: deterministic data, fingerprints, exact counts and file sizes, readable output."""

from __future__ import annotations

import json
import os

import pytest

import peftc
from peftc.files import adapter_files


def test_plan_json_is_deterministic_and_complete() -> None:
    first, second = peftc.compile(["peft.r=4"]), peftc.compile(["peft.r=4"])
    assert first.to_json() == second.to_json()
    data = json.loads(first.to_json())
    assert data["trainable_params"] == first.trainable_params == sum(s.params for s in first.sites)
    assert data["sites"][0]["tensors"]["lora_A.weight"] == [4, 64]
    assert data["fingerprint"] == first.fingerprint


def test_fingerprint_tracks_what_is_trained() -> None:
    base = peftc.compile([])
    assert peftc.compile(["peft.r=4"]).fingerprint != base.fingerprint
    assert peftc.compile(["trainer.lr=0.1"]).fingerprint != base.fingerprint
    # the seed draws the adapter's init, dropout and data order: another seed trains another adapter
    # (a seed sweep's jobs are not duplicates; a resume under another seed is refused)
    assert peftc.compile(["seed=3"]).fingerprint != base.fingerprint
    # what adapter_config.json says, where the sites do not show it (no biases to train here)
    assert peftc.compile(["peft.bias=lora_only"]).fingerprint != base.fingerprint
    assert peftc.compile(["dry_run=true"]).fingerprint == base.fingerprint
    assert peftc.compile(["output_dir=/tmp/elsewhere"]).fingerprint == base.fingerprint


def test_adapter_fingerprint_ignores_training_settings_but_not_shapes() -> None:
    base = peftc.compile([])
    assert peftc.compile(["trainer.lr=0.1", "seed=3"]).adapter_fingerprint == base.adapter_fingerprint
    assert peftc.compile(["peft.r=4"]).adapter_fingerprint != base.adapter_fingerprint


def test_plan_counts_equal_materialized_counts() -> None:
    for overrides in ([], ["peft.target_modules=all-linear", "peft.rank_pattern={o_proj: 2}"], ["model=tiny_gpt2"]):
        plan = peftc.compile(overrides)
        model = peftc.materialize(plan)
        assert model.trainable_parameters() == plan.trainable_params
        assert model.total_parameters() == plan.total_params
        for site in plan.sites:
            layer = model.base_model.get_submodule(site.path)
            assert {k: tuple(v.shape) for k, v in layer.adapter_tensors("default").items()} == site.tensors


def test_adapter_bytes_is_the_exact_file_size(tmp_path) -> None:
    for overrides in (
        [],
        ["peft.target_modules=[embed_tokens,q_proj]"],
        ["model=tiny_gpt2", "peft.target_modules=all-linear"],
    ):
        plan = peftc.compile(overrides)
        peftc.materialize(plan).save_adapter(tmp_path / "a")
        assert os.path.getsize(tmp_path / "a" / adapter_files.WEIGHTS_NAME) == plan.adapter_bytes


def test_printed_plan_groups_layers_and_shows_totals() -> None:
    text = str(peftc.compile(["peft.target_modules=all-linear"]))
    assert "model.layers.{0-1}.self_attn.q_proj" in text
    assert "model.layers.{0-1}.mlp.down_proj" in text
    assert "trainable params" in text and "fingerprint" in text


def test_printed_trainable_count_is_peft_s() -> None:
    """The plan's "trainable params X of Y (Z%)" line gives the numbers peft's
    print_trainable_parameters gives for the same model and config."""
    from peft import get_peft_model

    from tests.helpers import build_base, peft_lora_config

    plan = peftc.compile(["peft.target_modules=all-linear"])
    trainable, total = get_peft_model(build_base(plan), peft_lora_config(plan)).get_nb_trainable_parameters()
    (line,) = [line.split() for line in str(plan).splitlines() if line.startswith("trainable params")]
    assert line[2:] == [f"{trainable:,}", "of", f"{total:,}", f"({100 * trainable / total:.4f}%)"]


def test_planning_loads_no_weights(config_only_dir: str) -> None:
    # The directory has config.json only: any attempt to read weights would fail.
    plan = peftc.compile(["model=hf", f"model.name_or_path={config_only_dir}"])
    assert plan.model.model_class == "LlamaForCausalLM" and plan.trainable_params == 3584


def test_the_plan_is_the_truth_saving_and_fingerprinting_call_no_method_code(tmp_path, monkeypatch) -> None:
    """adapter_config.json is resolved once, by the planner: afterwards the plan's data alone
    fingerprints, renders and saves it, and the file written is the plan's config."""
    from peftc import methods
    from peftc.planning.layout import config_to_write

    plan = peftc.compile(["peft.target_modules=null", "budget.memory_gb=8"])
    model = peftc.materialize(plan)
    fingerprint = plan.fingerprint

    def no_more_calls(*args, **kwargs):
        raise AssertionError("method code called after planning")

    monkeypatch.setattr(type(methods.get("lora")), "peft_config", no_more_calls)
    assert plan.fingerprint == fingerprint and json.loads(plan.to_json())["memory"]["budget"]["fits"] is True
    assert "fits in budget.memory_gb=8" in str(plan)
    model.save_adapter(tmp_path / "a")
    written = json.loads((tmp_path / "a" / adapter_files.CONFIG_NAME).read_text())
    assert written == json.loads(json.dumps(config_to_write(plan.adapter_config)))
    # resolved (null became the names the planner chose) and portable (the plan names the
    # packaged base `pkg:`; only the file on disk names this machine's directory)
    assert plan.adapter_config["target_modules"] == written["target_modules"] == ["q_proj", "v_proj"]
    assert plan.adapter_config["base_model_name_or_path"].startswith("pkg:")
    assert os.path.isdir(written["base_model_name_or_path"])
    # a prompt method's saved tensor names are planned too (the file holds encoder outputs)
    prompt_plan = peftc.compile(["peft=prefix_tuning"])
    prompt_model = peftc.materialize(prompt_plan)
    monkeypatch.setattr(type(methods.get("prefix_tuning")), "saved_prompt_tensors", no_more_calls)
    monkeypatch.setattr(type(methods.get("prefix_tuning")), "peft_config", no_more_calls)
    prompt_model.save_adapter(tmp_path / "p")
    assert prompt_plan.prompt.saved == {"prompt_embeddings": (8, 128)}
    assert os.path.getsize(tmp_path / "p" / adapter_files.WEIGHTS_NAME) == prompt_plan.adapter_bytes


def test_generic_settings_are_typed_site_fields_the_method_options_only_its_own() -> None:
    plan = peftc.compile(["peft.lora_dropout=0.1", "peft.target_modules=[embed_tokens,q_proj]"])
    embed, query = plan.site("model.embed_tokens"), plan.site("model.layers.0.self_attn.q_proj")
    assert query.dropout == 0.1 and not query.save_base_weight and embed.save_base_weight
    assert not {"dropout", "save_base_weight", "base_quant", "shares_with"} & set(query.options)
    assert peftc.compile(["quant=quanto_int8"]).sites[0].base_quant == "int8"
    tied = peftc.compile(["model=tiny_gpt2", "peft.trainable_token_indices=[1, 2]"])
    assert tied.site("lm_head").shares_with == "transformer.wte" and tied.site("transformer.wte").shares_with is None
    parameters = peftc.compile(["model=tiny_gpt2", "peft.target_modules=[]", "peft.target_parameters=[c_attn.weight]"])
    target = parameters.sites[0].parameter
    assert (target.module, target.name, target.shape) == ("transformer.h.0.attn.c_attn", "weight", (64, 192))
    prompt = peftc.compile(["peft=prefix_tuning"]).prompt
    assert prompt.prefix_kv and "key/value positions" in prompt.injection and "injection" not in prompt.options


def test_decoder_layers_count_toward_the_layer_limit() -> None:
    """An encoder-decoder's decoder layers are layers too: 2 + 20,000 is refused from the
    config alone, before a meta graph with 20,000 blocks is built."""
    from transformers import T5Config

    from peftc.planning.graph import check_buildable, facts_of

    with pytest.raises(peftc.ConfigError, match="asks for more than 10,000 layers"):
        check_buildable(facts_of(T5Config(num_layers=2, num_decoder_layers=20_000, d_model=8, d_ff=16)))


def test_adapting_a_tied_embedding_warns_that_its_head_does_not_follow_as_peft_warns() -> None:
    """GPT-2's head shares the input embedding's weight: an adapter on one reaches the other only
    once merged (the merged model then gives other logits), and a trained copy is not shared. The
    plan says so, naming both; trainable tokens tie the head's rows and say nothing."""
    import torch

    from tests.helpers import build_base, max_diff, token_batch

    plan = peftc.compile(["model=tiny_gpt2", "peft.target_modules=[wte]", "peft.init_lora_weights=false"])
    (warning,) = plan.warnings
    assert "adapts transformer.wte, whose weight lm_head shares" in warning and "merg" in warning
    assert "does not reach lm_head, and merging it changes lm_head too" in warning  # the other module, by name
    model = peftc.materialize(plan, base_model=build_base(plan)).eval()
    x = token_batch()
    with torch.no_grad():
        unmerged = model(input_ids=x).logits
        assert max_diff(model.merge_and_unload()(input_ids=x).logits, unmerged) > 1e-3  # what the warning says
    (copied,) = peftc.compile(["model=tiny_gpt2", "peft.modules_to_save=[lm_head]"]).warnings
    assert "copy of lm_head, whose weight transformer.wte shares" in copied
    assert "transformer.wte keeps the base weight" in copied  # the module left behind, not the copied one
    assert peftc.compile(["model=tiny_gpt2", "peft.trainable_token_indices=[5]"]).warnings == ()
    assert peftc.compile(["model=tiny_llama", "peft.target_modules=[embed_tokens]"]).warnings == ()  # untied
