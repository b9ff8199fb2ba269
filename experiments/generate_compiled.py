"""generate() on a model whose blocks trainer.compile compiled: eager decoding (what peftc does)
beside compiled decoding, alternately, on one compiled model.

    python experiments/generate_compiled.py [--calls 6] [--tokens 16]

Tiny config-built Llama, LoRA q,v, inductor, one thread; prints each call's seconds (a mode's
first compiled call includes the compilation of its cache-state variants).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import peftc
    from peftc.training.lightning import compile_blocks
    from tests.helpers import build_base

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    plan = peftc.compile(["model=tiny_llama"])
    model = peftc.materialize(plan, base_model=build_base(plan)).eval()
    compile_blocks(model, "inductor")
    prompt = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}; {args.calls} greedy calls of {args.tokens} tokens per row")
    for eager in (True, False, True, False):
        model.blocks_compiled_for_training = eager  # False: the blocks' compiled code decodes
        seconds = []
        for _ in range(args.calls):
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(input_ids=prompt, max_new_tokens=args.tokens, do_sample=False, pad_token_id=0)
            seconds.append(time.perf_counter() - start)
        print(f"{'eager' if eager else 'compiled':9}", " ".join(f"{s:.3f}" for s in seconds))


if __name__ == "__main__":
    main()
