"""float32 adapters over a bfloat16 base, outside autocast (an adapter loaded for bf16 inference):
each method's logits beside peft's, relative to the float32 model's.

    python experiments/bf16_adapter_fidelity.py [--seeds 5] [--methods lora,dora,loha,lokr,adalora]

Per seed: peft writes a random adapter as BF16 tensors (tiny Llama), peftc and peft each load it
onto a bfloat16 base (float32 adapters: peft's autocast_adapter_dtype), and a float32 model loads
it as the reference. Prints ||logits - reference|| / ||reference|| for both, their ratio, and
whether the two libraries' logits are bit-identical.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from peft import PeftModel, get_peft_model

    import peftc
    from tests.helpers import build_base, token_batch
    from tests.test_peft_interop import bf16_configs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--methods", default="lora,dora,loha,lokr,adalora")
    args = parser.parse_args()
    plan = peftc.compile([])
    x = token_batch()
    print(f"torch {torch.__version__}")
    print("| method | seed | peftc error | peft error | ratio | bit-identical |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for seed in range(args.seeds):
            directory = tempfile.mkdtemp()
            torch.manual_seed(seed)
            get_peft_model(build_base(plan), bf16_configs()[method]).to(torch.bfloat16).save_pretrained(directory)
            ours = peftc.load_adapter(build_base(plan).to(torch.bfloat16), directory)
            theirs = PeftModel.from_pretrained(build_base(plan).to(torch.bfloat16), directory).eval()
            with torch.no_grad():
                exact = PeftModel.from_pretrained(build_base(plan), directory).eval()(input_ids=x).logits
                ours_logits, theirs_logits = ours(input_ids=x).logits, theirs(input_ids=x).logits
            ours_error, theirs_error = ((t.float() - exact).norm() / exact.norm() for t in (ours_logits, theirs_logits))
            same = torch.equal(ours_logits, theirs_logits)
            ratio = ours_error / theirs_error
            print(f"| {method} | {seed} | {ours_error:.5f} | {theirs_error:.5f} | {ratio:.3f} | {same} |")


if __name__ == "__main__":
    main()
