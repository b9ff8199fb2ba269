"""Default target modules per transformers model_type: peft 0.22.0's tables (peft.utils.constants),
entry for entry, so `peft.target_modules=null` selects what peft selects for every model type peft
knows (tests/test_method_configs.py compares them).

Used when `peft.target_modules` is null. LoRA's table is shared by LoHa, LoKr, OFT and HRA, as in
peft. An entry is a list of module names, or a regex (peft's Gemma 4 entry: its language model's
projections only, not the vision tower's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias

# module names, or one regex over module paths
Targets: TypeAlias = "tuple[str, ...] | str"


def targets_for(table: Mapping[str, Targets], model_type: str) -> list[str] | str:
    """A model type's entry as target_modules takes it: a list of names, or the regex; [] if none."""
    entry = table.get(model_type, ())
    return entry if isinstance(entry, str) else list(entry)


LORA_TARGETS: dict[str, Targets] = {
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "bart": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "bloom": ("query_key_value",),
    "blip-2": ("q", "v", "q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "gptj": ("q_proj", "v_proj"),
    "gpt_neox": ("query_key_value",),
    "gpt_neo": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"),
    "deberta-v2": ("query_proj", "value_proj"),
    "deberta": ("in_proj",),
    "layoutlm": ("query", "value"),
    "llama": ("q_proj", "v_proj"),
    "llama4": ("q_proj", "v_proj"),
    "chatglm": ("query_key_value",),
    "gpt_bigcode": ("c_attn",),
    "mpt": ("Wqkv",),
    "RefinedWebModel": ("query_key_value",),
    "RefinedWeb": ("query_key_value",),
    "falcon": ("query_key_value",),
    "btlm": ("c_proj", "c_attn"),
    "codegen": ("qkv_proj",),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "stablelm": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "gemma4": ".*language_model\\..*\\.(q_proj|v_proj)",
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
}

IA3_TARGETS: dict[str, Targets] = {
    "t5": ("k", "v", "wo"),
    "mt5": ("k", "v", "wi_1"),
    "gpt2": ("c_attn", "mlp.c_proj"),
    "bloom": ("query_key_value", "mlp.dense_4h_to_h"),
    "roberta": ("key", "value", "output.dense"),
    "opt": ("q_proj", "k_proj", "fc2"),
    "gptj": ("q_proj", "v_proj", "fc_out"),
    "gpt_neox": ("query_key_value", "dense_4h_to_h"),
    "gpt_neo": ("q_proj", "v_proj", "c_proj"),
    "bart": ("q_proj", "v_proj", "fc2"),
    "gpt_bigcode": ("c_attn", "mlp.c_proj"),
    "llama": ("k_proj", "v_proj", "down_proj"),
    "llama4": ("q_proj", "v_proj", "down_proj"),
    "mistral": ("k_proj", "v_proj", "down_proj"),
    "mixtral": ("k_proj", "v_proj", "w2"),
    "bert": ("key", "value", "output.dense"),
    "deberta-v2": ("key_proj", "value_proj", "output.dense"),
    "deberta": ("in_proj", "output.dense"),
    "RefinedWebModel": ("query_key_value", "dense_4h_to_h"),
    "RefinedWeb": ("query_key_value", "dense_4h_to_h"),
    "falcon": ("query_key_value", "dense_4h_to_h"),
    "phi": ("q_proj", "v_proj", "fc2"),
    "gemma": ("q_proj", "v_proj", "down_proj"),
    "gemma2": ("q_proj", "v_proj", "down_proj"),
    "gemma3_text": ("q_proj", "v_proj", "down_proj"),
    "qwen2": ("q_proj", "v_proj", "down_proj"),
    "qwen3": ("q_proj", "v_proj", "down_proj"),
}

IA3_FEEDFORWARD: dict[str, Targets] = {
    "t5": ("wo",),
    "mt5": (),
    "gpt2": ("mlp.c_proj",),
    "bloom": ("mlp.dense_4h_to_h",),
    "roberta": ("output.dense",),
    "opt": ("fc2",),
    "gptj": ("fc_out",),
    "gpt_neox": ("dense_4h_to_h",),
    "gpt_neo": ("c_proj",),
    "bart": ("fc2",),
    "gpt_bigcode": ("mlp.c_proj",),
    "llama": ("down_proj",),
    "llama4": ("down_proj",),
    "mistral": ("down_proj",),
    "mixtral": ("w2",),
    "bert": ("output.dense",),
    "deberta-v2": ("output.dense",),
    "deberta": ("output.dense",),
    "RefinedWeb": ("dense_4h_to_h",),
    "RefinedWebModel": ("dense_4h_to_h",),
    "falcon": ("dense_4h_to_h",),
    "phi": ("fc2",),
    "gemma": ("down_proj",),
    "gemma2": ("down_proj",),
    "gemma3_text": ("down_proj",),
    "qwen2": ("down_proj",),
    "qwen3": ("down_proj",),
}

ADALORA_TARGETS: dict[str, Targets] = {
    "t5": ("q", "k", "v", "o", "wi", "wo"),
    "mt5": ("q", "k", "v", "o", "wi_0", "wi_1", "wo"),
    "bart": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "gpt2": ("c_attn",),
    "bloom": ("query_key_value",),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "gptj": ("q_proj", "v_proj"),
    "gpt_neox": ("query_key_value",),
    "gpt_neo": ("q_proj", "v_proj"),
    "llama": ("q_proj", "v_proj"),
    "llama4": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
    "roberta": ("query", "key", "value", "dense"),
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "dense"),
    "gpt_bigcode": ("c_attn",),
    "deberta": ("in_proj",),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "gemma4": ".*language_model\\..*\\.(q_proj|v_proj)",
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
