"""How a model's compiled blocks run in training, without grad and in inference mode: the frames
Dynamo compiled and the ones it gave up on (each given-up frame runs eagerly, and Dynamo then
compiles the functions inside it one by one).

    python experiments/compile_frames.py [--backend inductor] [overrides ...]   e.g. quant=bnb_nf4 peft=loha

The blocks are compiled as trainer.compile=true compiles them (`compile_blocks`), by default with
the aot_eager backend (the frames are Dynamo's; no code is generated), on a tiny config-built
Llama. The last rows are two greedy generate() calls of 16 tokens with a KV cache, timed (the
first includes any compilation).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(overrides: list[str], backend: str) -> None:
    from torch._dynamo.utils import counters

    import peftc
    from peftc.training.lightning import compile_blocks
    from tests.helpers import build_base

    plan = peftc.compile(["model=tiny_llama", *overrides])
    model = peftc.materialize(plan, base_model=build_base(plan))
    compile_blocks(model, backend)
    tokens = torch.randint(0, 100, (2, 8))
    modes = [("training", True, torch.enable_grad), ("eval, no_grad", False, torch.no_grad)]
    modes.append(("eval, inference_mode", False, torch.inference_mode))
    print(f"torch {torch.__version__}; {backend}; {' '.join(overrides) or 'defaults'}")
    for label, training, context in modes:
        model.train(training)
        counters.clear()
        with context():
            model(input_ids=tokens, use_cache=False)
        frames = counters["frames"]
        print(f"{label:22} frames compiled {frames['ok']:3}  given up {frames['total'] - frames['ok']:3}")
    model.eval()
    for call in ("first", "second"):
        counters.clear()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=tokens[:1], max_new_tokens=16, do_sample=False, pad_token_id=0)
        seconds = time.perf_counter() - start
        frames = counters["frames"]
        label = f"generate(), {call}"
        print(
            f"{label:22} frames compiled {frames['ok']:3}  given up {frames['total'] - frames['ok']:3}  {seconds:.2f} s"
        )


if __name__ == "__main__":
    args = sys.argv[1:]
    backend = args.pop(args.index("--backend") + 1) if "--backend" in args else "aot_eager"
    main([a for a in args if a != "--backend"], backend)
