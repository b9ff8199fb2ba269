"""Default target modules per transformers model_type, as in peft 0.21.2 and 0.22.0 (peft.utils.constants).

Used when `peft.target_modules` is null. LoRA's table is shared by LoHa, LoKr and OFT.
"""

from __future__ import annotations

LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "gpt2": ("c_attn",),
    "gpt_bigcode": ("c_attn",),
    "gpt_neox": ("query_key_value",),
    "gptj": ("q_proj", "v_proj"),
    "gpt_neo": ("q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "falcon": ("query_key_value",),
    "bloom": ("query_key_value",),
    "stablelm": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"),
    "deberta-v2": ("query_proj", "value_proj"),
    "deberta": ("in_proj",),
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "bart": ("q_proj", "v_proj"),
    "mpt": ("Wqkv",),
    "codegen": ("qkv_proj",),
}

IA3_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("k_proj", "v_proj", "down_proj"),
    "mistral": ("k_proj", "v_proj", "down_proj"),
    "mixtral": ("k_proj", "v_proj", "w2"),
    "qwen2": ("q_proj", "v_proj", "down_proj"),
    "gemma": ("q_proj", "v_proj", "down_proj"),
    "phi": ("q_proj", "v_proj", "fc2"),
    "gpt2": ("c_attn", "mlp.c_proj"),
    "gpt_neox": ("query_key_value", "dense_4h_to_h"),
    "gptj": ("q_proj", "v_proj", "fc_out"),
    "opt": ("q_proj", "k_proj", "fc2"),
    "falcon": ("query_key_value", "dense_4h_to_h"),
    "bloom": ("query_key_value", "mlp.dense_4h_to_h"),
    "bert": ("key", "value", "output.dense"),
    "roberta": ("key", "value", "output.dense"),
    "t5": ("k", "v", "wo"),
    "mt5": ("k", "v", "wi_1"),
    "bart": ("q_proj", "v_proj", "fc2"),
}

IA3_FEEDFORWARD: dict[str, tuple[str, ...]] = {
    "llama": ("down_proj",),
    "mistral": ("down_proj",),
    "mixtral": ("w2",),
    "qwen2": ("down_proj",),
    "gemma": ("down_proj",),
    "phi": ("fc2",),
    "gpt2": ("mlp.c_proj",),
    "gpt_neox": ("dense_4h_to_h",),
    "gptj": ("fc_out",),
    "opt": ("fc2",),
    "falcon": ("dense_4h_to_h",),
    "bloom": ("mlp.dense_4h_to_h",),
    "bert": ("output.dense",),
    "roberta": ("output.dense",),
    "t5": ("wo",),
    "mt5": (),
    "bart": ("fc2",),
}

ADALORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "bert": ("query", "value"),
    "roberta": ("query", "key", "value", "dense"),
    "t5": ("q", "k", "v", "o", "wi", "wo"),
    "bart": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "gpt_neox": ("query_key_value",),
}
