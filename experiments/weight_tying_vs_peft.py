"""LoRA's ensure_weight_tying beside peft 0.22 on tied tiny models: where the two agree (the
adapter's logits) and where peftc follows the math instead (merging, trainable counts, GPT-2's
reload; with DoRA peftc refuses the merge). Each adapter is peft's, moved off its init with a
seeded step, saved by peft and loaded by both.

    PYTHONPATH=. python experiments/weight_tying_vs_peft.py

Printed per case: the largest |logit| difference of peftc's loaded adapter from peft's model,
each side's merged-vs-unmerged difference, the trainable counts, and for peft reloading its own
file the difference from the model it saved.
"""

from __future__ import annotations

import copy
import tempfile
import warnings

import torch

import peftc
from peftc.errors import MergeError
from tests.helpers import build_base, token_batch

CASES = {
    "llama lora embed_tokens+q_proj": (
        ["model=tiny_llama", "++model.config.tie_word_embeddings=true"],
        {"target_modules": ["embed_tokens", "q_proj"]},
    ),
    "llama copy of embed_tokens": (
        ["model=tiny_llama", "++model.config.tie_word_embeddings=true"],
        {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]},
    ),
    "gpt2 lora lm_head+c_attn": (["model=tiny_gpt2"], {"target_modules": ["lm_head", "c_attn"]}),
    "llama dora embed_tokens+q_proj": (
        ["model=tiny_llama", "++model.config.tie_word_embeddings=true", "peft.use_dora=true"],
        {"target_modules": ["embed_tokens", "q_proj"], "use_dora": True},
    ),
}


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_batch()).logits


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def row(name: str, overrides: list[str], fields: dict) -> str:
    import peft
    from peft import PeftModel

    torch.manual_seed(0)  # peft's init draws
    plan = peftc.compile(overrides)
    theirs = peft.get_peft_model(
        build_base(plan), peft.LoraConfig(r=4, lora_alpha=8, ensure_weight_tying=True, **fields)
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in {p.data_ptr(): p for p in theirs.parameters() if p.requires_grad}.values():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    theirs.eval()
    directory = tempfile.mkdtemp()
    theirs.save_pretrained(directory)
    expected, counts = logits(theirs), (trainable(theirs),)
    ours = peftc.load_adapter(build_base(plan), directory, is_trainable=True).eval()
    counts = (trainable(ours), *counts)
    reloaded = PeftModel.from_pretrained(build_base(plan), directory).eval()
    try:
        merged = f"{(logits(copy.deepcopy(ours).merge_and_unload()) - logits(ours)).abs().max():.2e}"
    except MergeError:  # a tied head with a DoRA magnitude of its own
        merged = "refused"
    theirs_merged = logits(theirs.merge_and_unload())  # last: peft's tied model cannot be deep-copied
    return (
        f"| {name} | {(logits(ours) - expected).abs().max():.2e} | {merged} | "
        f"{(theirs_merged - expected).abs().max():.2e} | {counts[0]:,} | {counts[1]:,} | "
        f"{(logits(reloaded) - expected).abs().max():.2e} |"
    )


def main() -> None:
    warnings.simplefilter("ignore")
    print(
        "| case | peftc vs peft | peftc merged vs unmerged | peft merged vs unmerged | peftc trainable | peft trainable | peft reloading its file |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (overrides, fields) in CASES.items():
        print(row(name, overrides, fields))


if __name__ == "__main__":
    main()
