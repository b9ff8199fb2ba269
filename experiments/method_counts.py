"""IA3, LoHa, LoKr, OFT and AdaLoRA beside peft: trainable-parameter counts, and merge -> unmerge.

    python experiments/method_counts.py [--skip-7b] [--size 4096]

Table 1: for each method and option set, the plan's trainable count, the count materialization
creates, and peft's count for the same config (peft's config is built by peft from OUR
adapter_config.json); tiny models with weights, the conv test model, a 7B-shaped Llama on the
meta device. Table 2: max |W - W'| after merge -> unmerge of one size x size layer
(W ~ N(0, 0.02)) holding a trained-like adapter (peft's random init), peftc vs peft.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEVEN_B = (
    "model.config={hidden_size: 4096, intermediate_size: 11008, num_hidden_layers: 32, num_attention_heads: 32,"
    " num_key_value_heads: 32, vocab_size: 32000, max_position_embeddings: 4096, tie_word_embeddings: false}"
)
VARIANTS = [
    ("ia3", "tiny_llama", []),
    ("ia3", "tiny_gpt2", []),
    ("ia3", "tiny_llama", ["peft.target_modules=all-linear", "peft.feedforward_modules=[down_proj,up_proj]"]),
    ("ia3", "conv", {"target_modules": ["conv", "grouped"], "feedforward_modules": ["grouped"]}),
    ("loha", "tiny_llama", []),
    ("loha", "tiny_llama", ["peft.target_modules=all-linear", "peft.r=4", "peft.rank_pattern={down_proj: 2}"]),
    ("loha", "conv", {"target_modules": ["conv", "seq", "head"], "r": 2}),
    ("loha", "conv", {"target_modules": ["conv", "seq"], "r": 2, "use_effective_conv2d": True}),
    ("lokr", "tiny_llama", []),
    ("lokr", "tiny_llama", ["peft.target_modules=all-linear", "peft.r=2", "peft.decompose_both=true"]),
    ("lokr", "tiny_llama", ["peft.decompose_factor=4", "peft.r=1"]),
    ("lokr", "conv", {"target_modules": ["conv", "pointwise", "grouped"], "r": 1, "use_effective_conv2d": True}),
    ("oft", "tiny_llama", []),
    ("oft", "tiny_llama", ["peft.oft_block_size=0", "peft.r=8", "peft.target_modules=all-linear"]),
    ("oft", "tiny_llama", ["peft.block_share=true", "peft.oft_block_size=16"]),
    ("oft", "tiny_llama", ["peft.oft_block_size=24", "peft.adjust_block_size=true", "peft.target_modules=all-linear"]),
    ("adalora", "tiny_llama", []),
    ("adalora", "tiny_gpt2", ["peft.init_r=6", "peft.target_r=2"]),
    ("adalora", "conv", {"target_modules": ["conv", "pointwise", "head"], "init_r": 4, "target_r": 2}),
]
VARIANTS_7B = [
    ("ia3", ["peft.target_modules=all-linear", "peft.feedforward_modules=[down_proj]"]),
    ("loha", ["peft.r=16", "peft.alpha=16"]),
    ("lokr", ["peft.r=16", "peft.alpha=16", "peft.target_modules=all-linear"]),
    ("oft", ["peft.target_modules=all-linear"]),
    ("adalora", ["peft.init_r=16", "peft.target_r=8", "peft.target_modules=all-linear"]),
]


def count_row(method: str, model: str, overrides: list[str] | dict, label: str | None = None) -> str:
    """One table row: plan, materialized and peft trainable counts for a method and options
    (`model`: a model= option, "conv" for the conv test model, "7B" for a meta 7B Llama)."""
    import torch
    from peft import get_peft_config, get_peft_model

    import peftc
    from peftc import methods
    from peftc.planning.layout import config_to_write
    from tests.conv_model import TinyConvNet, plan_for
    from tests.helpers import build_base

    if model == "conv":
        plan, base = plan_for(TinyConvNet(), methods.get(method).schema(**overrides)), TinyConvNet()
    elif model == "7B":
        plan = peftc.compile([f"peft={method}", "model=tiny_llama", "model.name=llama-7b-shape", SEVEN_B, *overrides])
        with torch.device("meta"):
            base = build_base_meta(plan)
    else:
        plan = peftc.compile([f"peft={method}", f"model={model}", *overrides])
        base = build_base(plan)
    config = {**config_to_write(plan.adapter_config), "inference_mode": False}
    if model == "conv":
        config["task_type"] = None
    theirs = get_peft_model(copy.deepcopy(base), get_peft_config(config))
    ours = peftc.materialize(plan, base_model=base)
    peft_count = theirs.get_nb_trainable_parameters()[0]
    # peft leaves AdaLoRA's frozen `ranknum` (one value per site) trainable on the meta device
    quirk = sum(p.numel() for n, p in theirs.named_parameters() if ".ranknum." in n and p.requires_grad)
    same = "yes" if plan.trainable_params == ours.trainable_parameters() == peft_count - quirk else "NO"
    shown_peft = f"{peft_count:,}" + (f" ({peft_count - quirk:,} without ranknum)" if quirk else "")
    shown = " ".join(overrides) if isinstance(overrides, list) else ", ".join(f"{k}={v}" for k, v in overrides.items())
    return f"| {label or method} | {model} | `{shown}` | {len(plan.sites)} | {plan.trainable_params:,} | {ours.trainable_parameters():,} | {shown_peft} | {same} |"


def build_base_meta(plan: object) -> object:
    from transformers import AutoModelForCausalLM

    from peftc.planning.model_source import hf_config

    return AutoModelForCausalLM.from_config(hf_config(plan.spec.model))


ROUND_TRIP = {  # label -> (method, spec fields with a non-identity init, factor on peft's random adapter)
    "ia3": ("ia3", {"init_ia3_weights": False, "feedforward_modules": []}, 1.0),
    "loha": ("loha", {"init_weights": False, "r": 8}, 1.0),
    "lokr": ("lokr", {"init_weights": False, "r": 8}, 1.0),
    "oft": ("oft", {"init_weights": False}, 1.0),  # Q ~ N(0, 0.1): far from orthogonal
    "oft, Q x 0.1": ("oft", {"init_weights": False}, 0.1),  # Q ~ N(0, 0.01): trained-like
    "adalora": ("adalora", {"init_lora_weights": False, "init_r": 8, "target_r": 4, "lora_alpha": 0.01}, 1.0),
}


def linear_base(size: int, dtype_name: str) -> object:
    """One size x size bias-free layer named `lin`, W ~ N(0, 0.02), in the given dtype."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(size, size, bias=False))
    with torch.no_grad():
        base.lin.weight.normal_(0, 0.02)
    return base.to(getattr(torch, dtype_name))


def round_trip_errors(ours: object, theirs: object, original: object) -> list[float]:
    """Max |W - W'| after merge -> unmerge of `lin`, for peftc's model and peft's."""
    errors = []
    for model, weight in (
        (ours, lambda: ours.base_model.lin.weight),
        (theirs, lambda: theirs.base_model.model.lin.base_layer.weight),
    ):
        model.merge_adapter()
        model.unmerge_adapter()
        errors.append((weight().float() - original.float()).abs().max().item())
    return errors


def round_trip_row(label: str, dtype_name: str, size: int) -> str:
    """Max |W - W'| after merge -> unmerge, peftc vs peft, on one size x size layer."""
    import torch
    from peft import get_peft_config, get_peft_model, get_peft_model_state_dict

    import peftc
    from peftc import methods
    from peftc.files.load import fill
    from peftc.planning.layout import config_to_write
    from tests.conv_model import plan_for

    base = linear_base(size, dtype_name)
    original = base.lin.weight.detach().clone()
    method, fields, factor = ROUND_TRIP[label]
    plan = plan_for(base, methods.get(method).schema(target_modules=["lin"], **fields))
    config = {**config_to_write(plan.adapter_config), "inference_mode": False, "task_type": None}
    theirs = get_peft_model(copy.deepcopy(base), get_peft_config(config))
    with torch.no_grad():
        for _, param in theirs.named_parameters():
            if param.requires_grad:
                param.mul_(factor)
    ours = peftc.materialize(plan, base_model=base)
    fill(ours, "default", get_peft_model_state_dict(theirs))  # the same adapter numbers in both
    errors = round_trip_errors(ours, theirs, original)
    return f"| {label} | {dtype_name} | {size}x{size} | {errors[0]:.2e} | {errors[1]:.2e} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-7b", action="store_true")
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    print("| method | model | options | sites | plan trainable | materialized | peft trainable | equal |")
    print("|---|---|---|---|---|---|---|---|")
    for method, model, overrides in VARIANTS:
        print(count_row(method, model, overrides), flush=True)
    if not args.skip_7b:
        for method, overrides in VARIANTS_7B:
            print(count_row(method, "7B", overrides), flush=True)
    print("\n| method | dtype | layer | peftc max abs error | peft max abs error |")
    print("|---|---|---|---|---|")
    for label in ROUND_TRIP:
        for dtype_name in ("float32", "bfloat16"):
            print(round_trip_row(label, dtype_name, args.size), flush=True)


if __name__ == "__main__":
    main()
