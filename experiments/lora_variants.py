"""LoRA variants beside peft: trainable-parameter counts, and how exactly merge -> unmerge round-trips.

    python experiments/lora_variants.py [--skip-7b] [--size 4096]

Table 1: for each variant, the plan's trainable count, the count materialization creates, and
peft's count for the same config (peft's LoraConfig is built from OUR adapter_config.json);
tiny models with weights, 7B-shaped Llama on the meta device. Table 2: max |W - W'| after
merge -> unmerge of one realistic layer (size x size, W ~ N(0, 0.02), a trained-like adapter
r=16, alpha=32) for peftc and peft, in float32 and bfloat16.
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

from method_counts import count_row, linear_base, round_trip_errors  # noqa: E402 (shared with the other methods)

VARIANTS = [
    ("lora", "tiny_llama", []),
    ("dora", "tiny_llama", ["peft.use_dora=true"]),
    ("dora all-linear", "tiny_llama", ["peft.use_dora=true", "peft.target_modules=all-linear"]),
    ("dora + embedding", "tiny_llama", ["peft.use_dora=true", "peft.target_modules=[embed_tokens,q_proj,v_proj]"]),
    (
        "dora rank/alpha pattern",
        "tiny_llama",
        ["peft.use_dora=true", "peft.target_modules=all-linear", "peft.rank_pattern={down_proj: 2}"],
    ),
    ("pissa", "tiny_llama", ["peft.init_lora_weights=pissa"]),
    ("olora", "tiny_llama", ["peft.init_lora_weights=olora"]),
    ("orthogonal", "tiny_llama", ["peft.init_lora_weights=orthogonal"]),
    ("dora", "tiny_gpt2", ["peft.use_dora=true"]),
    ("bias=all", "tiny_gpt2", ["peft.bias=all"]),
    ("bias=all + modules_to_save", "tiny_gpt2", ["peft.bias=all", "peft.modules_to_save=[ln_f]"]),
    ("bias=lora_only all-linear", "tiny_gpt2", ["peft.bias=lora_only", "peft.target_modules=all-linear"]),
    ("lora_bias all-linear", "tiny_gpt2", ["peft.lora_bias=true", "peft.target_modules=all-linear"]),
    ("dora", "conv", {"target_modules": ["conv", "pointwise", "seq"], "use_dora": True}),
    ("lora_bias + bias=all", "conv", {"target_modules": ["conv", "seq"], "lora_bias": True, "bias": "all"}),
    ("grouped conv", "conv", {"target_modules": ["grouped"], "r": 4}),
]
VARIANTS_7B = [
    ("dora r=16 all-linear", ["peft.use_dora=true", "peft.target_modules=all-linear", "peft.r=16"]),
    ("dora r=16 q,v + rank_pattern", ["peft.use_dora=true", "peft.r=16", "peft.rank_pattern={v_proj: 8}"]),
]


def round_trip_row(variant: str, dtype_name: str, size: int) -> str:
    """Max |W - W'| after merge -> unmerge, peftc vs peft, on one size x size layer."""
    import torch
    from peft import LoraConfig, get_peft_model

    import peftc
    from tests.conv_model import plan_for

    base = linear_base(size, dtype_name)
    original = base.lin.weight.detach().clone()
    use_dora = variant == "dora"
    from peftc.methods.lora.method import LoraSpec

    plan = plan_for(
        base, LoraSpec(target_modules=["lin"], r=16, lora_alpha=32, use_dora=use_dora, init_lora_weights=False)
    )
    theirs = get_peft_model(
        copy.deepcopy(base), LoraConfig(target_modules=["lin"], r=16, lora_alpha=32, use_dora=use_dora)
    )
    ours = peftc.materialize(plan, base_model=base)
    with torch.no_grad():  # trained-like adapter: B no longer zero, magnitude moved
        for model in (ours, theirs):
            generator = torch.Generator().manual_seed(1)
            for name, param in sorted(model.named_parameters()):
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
                if "lora_magnitude" in name:
                    param.mul_(1.05)
    errors = round_trip_errors(ours, theirs, original)
    return f"| {variant} | {dtype_name} | {size}x{size} | {errors[0]:.2e} | {errors[1]:.2e} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-7b", action="store_true")
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    print("| variant | model | options | sites | plan trainable | materialized | peft trainable | equal |")
    print("|---|---|---|---|---|---|---|---|")
    for label, model, overrides in VARIANTS:
        print(count_row("lora", model, overrides, label), flush=True)
    if not args.skip_7b:
        for label, overrides in VARIANTS_7B:
            print(count_row("lora", "7B", overrides, label), flush=True)
    print("\n| variant | dtype | layer | peftc max abs error | peft max abs error |")
    print("|---|---|---|---|---|")
    for variant in ("lora", "dora"):
        for dtype_name in ("float32", "bfloat16"):
            print(round_trip_row(variant, dtype_name, args.size), flush=True)


if __name__ == "__main__":
    main()
