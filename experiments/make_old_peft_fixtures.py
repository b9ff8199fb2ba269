"""Write the adapters of tests/fixtures/peft_<version>/ with an OLD peft release (run it in a venv
that has that peft, its era's transformers 4 and torch; tests/fixtures/old_peft_bases/README.md
says which). For every method the release has, on tiny config-built models whose module names
are the same under transformers 4 and 5:

- the base's weights come from tests/fixtures/old_peft_bases/<model>.safetensors (written by the
  first run, from the config in <model>.json), so every release and the test use one base;
- every trainable adapter parameter gets seeded noise added before saving (a load that drops
  the adapter, or one tensor of it, cannot reproduce the outputs);
- the adapter is saved as safetensors, and expected.safetensors beside it holds the token batch
  and the logits the old release computes with it (eval mode, float32).

    python experiments/make_old_peft_fixtures.py tests/fixtures            # all cases
    python experiments/make_old_peft_fixtures.py tests/fixtures lora_llama # some
    python experiments/make_old_peft_fixtures.py --convert tests/fixtures  # peftc's venv, after
                                                                           # a peft < 0.6 wrote pickles

A case the release cannot write (no such config class or field) is skipped and listed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from safetensors.torch import load_file, save_file

MODELS: dict[str, dict[str, Any]] = {
    "llama": {
        "class": "LlamaForCausalLM",
        "config_class": "LlamaConfig",
        "config": {
            "vocab_size": 64,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 256,  # prompt methods plan data.max_length (128) + tokens
            "tie_word_embeddings": False,
        },
    },
    "gpt2": {
        "class": "GPT2LMHeadModel",
        "config_class": "GPT2Config",
        "config": {"vocab_size": 64, "n_positions": 32, "n_embd": 16, "n_layer": 2, "n_head": 2},
    },
    "bert": {
        "class": "BertForSequenceClassification",
        "config_class": "BertConfig",
        "config": {
            "vocab_size": 64,
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 32,
            "num_labels": 2,
        },
    },
    "t5": {
        "class": "T5ForConditionalGeneration",
        "config_class": "T5Config",
        "config": {
            "vocab_size": 64,
            "d_model": 16,
            "d_kv": 4,
            "d_ff": 32,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 4,
            "relative_attention_num_buckets": 8,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
            "eos_token_id": 1,
        },
    },
}
# peft before 0.6 had no safetensors (0.4/0.5: only when asked); their files were pickles
RELEASE = tuple(int(part) for part in peft.__version__.split(".")[:2])
PICKLE_ONLY = RELEASE < (0, 6)
TOKENS = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
DECODER_TOKENS = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(3))
TASK_IDS = torch.tensor([0, 1])  # multitask prompt tuning: one task per row
NOISE = 0.2


def inputs_of(name: str) -> dict[str, torch.Tensor]:
    """The batch a case runs (recorded beside its logits): seq2seq cases also take decoder
    tokens, multitask prompt tuning a task id per row."""
    inputs = {"input_ids": TOKENS}
    if CASES[name][0] == "t5":
        inputs["decoder_input_ids"] = DECODER_TOKENS
    if name.startswith("multitask_"):
        inputs["task_ids"] = TASK_IDS
    return inputs


def base_model(name: str, bases: Path) -> torch.nn.Module:
    """The tiny model, its weights those of bases/<name>.safetensors (written on first use)."""
    spec = MODELS[name]
    config = getattr(transformers, spec["config_class"])(**spec["config"])
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, spec["class"])(config).eval()
    weights = bases / f"{name}.safetensors"
    if not weights.exists():
        bases.mkdir(parents=True, exist_ok=True)
        seen: dict[int, str] = {}
        state = {}
        for key, param in model.named_parameters(remove_duplicate=False):
            if id(param) not in seen:  # tied weights (GPT-2's head) are saved once
                seen[id(param)] = key
                state[key] = param.detach().clone().contiguous()
        save_file(state, weights)
        (bases / f"{name}.json").write_text(json.dumps(spec, indent=2) + "\n")
    missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
    assert not unexpected and not [k for k in missing if k in dict(model.named_parameters())], missing
    if name == "gpt2":
        model.tie_weights()
    return model


def has(config_class: str, *fields: str) -> bool:
    cls = getattr(peft, config_class, None)
    return cls is not None and set(fields) <= {f.name for f in dataclasses.fields(cls)}


def case(config_class: str, *fields: str) -> Callable[..., Callable[[], Any] | None]:
    """A config maker if this peft has the class and fields, else None (can't write it)."""

    def make(**kwargs: Any) -> Callable[[], Any] | None:
        if not has(config_class, *fields, *kwargs):
            return None
        if has(config_class, "lora_dropout") and RELEASE < (0, 5):
            # peft 0.2/0.3 had no default (None fails), 0.4's AdaLoRA fails with 0; eval ignores it
            kwargs.setdefault("lora_dropout", 0.05)
        return lambda: getattr(peft, config_class)(**kwargs)

    return make


LLAMA_ATTENTION = ["q_proj", "v_proj"]
CASES: dict[str, tuple[str, Callable[[], Any] | None]] = {
    "lora_llama": (
        "llama",
        case("LoraConfig")(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=LLAMA_ATTENTION),
    ),
    "lora_llama_patterns": (
        "llama",
        case("LoraConfig")(
            task_type="CAUSAL_LM",
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"down_proj": 2},
            alpha_pattern={"v_proj": 3},
        ),
    ),
    "lora_llama_embed_head": (
        "llama",
        case("LoraConfig")(
            task_type="CAUSAL_LM",
            r=4,
            lora_alpha=8,
            target_modules=["embed_tokens", "o_proj"],
            modules_to_save=["lm_head"],
        ),
    ),
    "lora_llama_head": (  # before LoRA on embeddings (peft 0.4): a trained head beside the adapter
        "llama",
        case("LoraConfig")(
            task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=LLAMA_ATTENTION, modules_to_save=["lm_head"]
        ),
    ),
    "lora_llama_rslora": (
        "llama",
        case("LoraConfig")(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=LLAMA_ATTENTION, use_rslora=True),
    ),
    "lora_llama_dora": (
        "llama",
        case("LoraConfig")(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=LLAMA_ATTENTION, use_dora=True),
    ),
    "lora_gpt2": (
        "gpt2",
        case("LoraConfig")(
            task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True
        ),
    ),
    "lora_bert_seq_cls": ("bert", case("LoraConfig")(task_type="SEQ_CLS", r=4, lora_alpha=8)),
    "ia3_llama": (
        "llama",
        case("IA3Config")(
            task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
    ),
    "ia3_gpt2": ("gpt2", case("IA3Config")(task_type="CAUSAL_LM")),
    "loha_llama": ("llama", case("LoHaConfig")(task_type="CAUSAL_LM", r=4, alpha=8, target_modules=LLAMA_ATTENTION)),
    "lokr_llama": ("llama", case("LoKrConfig")(task_type="CAUSAL_LM", r=4, alpha=8, target_modules=LLAMA_ATTENTION)),
    "lokr_llama_decompose_both": (
        "llama",
        case("LoKrConfig")(
            task_type="CAUSAL_LM", r=2, alpha=4, target_modules=["gate_proj", "down_proj"], decompose_both=True
        ),
    ),
    "adalora_llama": (
        "llama",
        case("AdaLoraConfig")(
            task_type="CAUSAL_LM",
            init_r=6,
            target_r=2,
            lora_alpha=8,
            target_modules=LLAMA_ATTENTION,
            tinit=1,
            tfinal=1,
            deltaT=1,
            total_step=4,
        ),
    ),
    "oft_llama": (  # r blocks; from peft 0.15 on, oft_block_size=0 must say so
        "llama",
        case("OFTConfig")(
            task_type="CAUSAL_LM",
            r=4,
            target_modules=LLAMA_ATTENTION,
            **({"oft_block_size": 0} if has("OFTConfig", "oft_block_size") else {}),
        ),
    ),
    "oft_llama_block_size": (
        "llama",
        case("OFTConfig", "oft_block_size")(
            task_type="CAUSAL_LM", r=0, oft_block_size=4, target_modules=LLAMA_ATTENTION, coft=True
        ),
    ),
    "vera_llama": ("llama", case("VeraConfig")(task_type="CAUSAL_LM", r=4, target_modules=LLAMA_ATTENTION)),
    "vera_llama_no_projection": (
        "llama",
        case("VeraConfig")(task_type="CAUSAL_LM", r=4, target_modules=LLAMA_ATTENTION, save_projection=False),
    ),
    "hra_llama": ("llama", case("HRAConfig")(task_type="CAUSAL_LM", r=4, target_modules=LLAMA_ATTENTION)),
    "ln_tuning_llama": ("llama", case("LNTuningConfig")(task_type="CAUSAL_LM")),
    "prompt_tuning_llama": ("llama", case("PromptTuningConfig")(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "prefix_tuning_llama": ("llama", case("PrefixTuningConfig")(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "prefix_tuning_llama_projection": (
        "llama",
        case("PrefixTuningConfig")(
            task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8
        ),
    ),
    "p_tuning_llama_mlp": (
        "llama",
        case("PromptEncoderConfig")(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=8),
    ),
    "p_tuning_llama_lstm": (
        "llama",
        case("PromptEncoderConfig")(
            task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=8, encoder_reparameterization_type="LSTM"
        ),
    ),
    "adaption_prompt_llama": (
        "llama",
        case("AdaptionPromptConfig")(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=1),
    ),
    # peft 0.2's MergedLinear: one LoRA on GPT-2's fused c_attn for its query and value thirds
    "lora_gpt2_enable_lora": (
        "gpt2",
        case("LoraConfig", "enable_lora")(
            task_type="CAUSAL_LM",
            r=4,
            lora_alpha=8,
            target_modules=["c_attn"],
            enable_lora=[True, False, True],
            fan_in_fan_out=True,
        ),
    ),
    "multitask_prompt_tuning_llama": (
        "llama",
        case("MultitaskPromptTuningConfig")(task_type="CAUSAL_LM", num_virtual_tokens=3, num_tasks=2, num_ranks=1),
    ),
    "lora_t5": ("t5", case("LoraConfig")(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, target_modules=["q", "v"])),
    "prompt_tuning_t5": ("t5", case("PromptTuningConfig")(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)),
    "prefix_tuning_t5": ("t5", case("PrefixTuningConfig")(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)),
}


def train_adalora(model: Any, name: str) -> None:
    """A few steps of AdaLoRA's allocator (tinit=1, tfinal=1, total_step=4), so the file has the
    rank_pattern and the rank-pruned tensors a trained AdaLoRA adapter has."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    inputs = inputs_of(name)
    model.train()
    for step in range(5):
        loss = model(**inputs, labels=inputs.get("decoder_input_ids", TOKENS)).loss
        loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.eval()


def write(name: str, root: Path) -> str:
    model_name, make = CASES[name]
    if make is None:
        return "can't write"
    bases = root / "old_peft_bases"
    torch.manual_seed(1)
    config = make()
    try:
        model = peft.get_peft_model(base_model(model_name, bases), config)
    except Exception as exc:  # noqa: BLE001 (e.g. no LoRA for embeddings or GPT-2's Conv1D yet)
        return f"can't write ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})"
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(NOISE * torch.randn(param.shape, generator=generator))
    if name.startswith("adalora"):
        train_adalora(model, name)
    model.eval()
    target = root / f"peft_{peft.__version__.replace('.', '_')}" / name
    shutil.rmtree(target, ignore_errors=True)
    if PICKLE_ONLY:  # as the release saved it; `--convert` runs peftc's conversion line on it
        model.save_pretrained(target)
    else:
        model.save_pretrained(target, safe_serialization=True)  # peft 0.6 wrote adapter_model.bin by default
    (target / "README.md").unlink(missing_ok=True)  # peft's model card template, not part of the adapter
    inputs = inputs_of(name)
    try:
        # peft 0.3/0.4's AdaLoRA adds its orthogonality penalty to the loss even in eval: give it one
        labels = {"labels": TOKENS} if name.startswith("adalora") and RELEASE < (0, 5) else {}
        with torch.no_grad():
            logits = model(**inputs, **labels).logits
    except Exception as exc:  # noqa: BLE001 (e.g. peft 0.3's seq2seq prompt tuning without decoder embeds)
        shutil.rmtree(target)
        return f"can't run ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})"
    save_file({**inputs, "logits": logits.contiguous()}, target / "expected.safetensors")
    return "written"


def convert(root: Path) -> None:
    """Run, for every adapter_model.bin under root, the one-line conversion that peftc's refusal
    of it prints (in peftc's venv), then remove the pickle: the fixture is what that advice
    makes of the release's own file."""
    import subprocess

    import peftc
    from peftc.errors import AdapterFileError

    for pickle_file in sorted(root.glob("peft_*/*/adapter_model.bin")):
        line = ""
        try:
            peftc.load_adapter(torch.nn.Linear(1, 1), pickle_file.parent)
        except AdapterFileError as exc:
            line = str(exc).partition("if you trust the file: ")[2]
        if not line.startswith("python -c "):
            raise SystemExit(f"{pickle_file}: peftc gave no conversion line")
        subprocess.run(line, shell=True, check=True)  # the line exactly as printed
        pickle_file.unlink()
        print(f"converted {pickle_file}")


def main() -> None:
    if sys.argv[1] == "--convert":
        convert(Path(sys.argv[2]))
        return
    root = Path(sys.argv[1])
    names = sys.argv[2:] or list(CASES)
    for name in names:
        print(f"peft {peft.__version__} {name}: {write(name, root)}")


if __name__ == "__main__":
    main()
