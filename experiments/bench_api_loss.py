"""The Python API's loss beside the CLI's and peft's, side by side in one run (issue 17).

    python experiments/bench_api_loss.py [--config "lora all-linear"] [--warmup 5] [--steps 20]

Four sides train the same numbers (mini-Llama, bench_setup; peft's initial adapter tensors copied
into each peftc model), in turn, the first one alternating each round:
- "peftc API": `model(**batch).loss` on the materialized model, what a user of peft or the HF
  Trainer writes (chunked causal-LM loss, lm_loss.forward_with_chunked_loss);
- "peftc API, chunked_loss=False": the same call with transformers' full-logits loss (before issue 17);
- "peftc CLI": the task's loss as the CLI trains (`CausalLm.training_loss`);
- "peft": peft's `model(**batch).loss`.
Step time: median of the timed steps (wall clock); step MiB as in bench_train.py (RSS high-water
mark above the resident set before the step); ratios are against peft; the loss column is the
largest relative difference from peft's loss over all steps.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_setup as setup  # noqa: E402
from bench_train import median_ms, rotate_steps  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="lora all-linear", choices=list(setup.CONFIGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq", type=int, default=setup.SEQ)
    args = parser.parse_args()
    setup.ensure_malloc_env()

    import torch

    torch.set_num_threads(args.threads)
    plan = setup.compile_plan(args.config, total_steps=args.warmup + args.steps + 10)
    base = setup.build_base(plan)
    theirs = setup.peft_side(plan, copy.deepcopy(base))
    sides = {
        "peftc API `model(**batch).loss`": setup.peftc_api_side(plan, copy.deepcopy(base), theirs.model),
        "peftc API, chunked_loss=False (transformers' loss)": setup.peftc_api_side(
            plan, copy.deepcopy(base), theirs.model, chunked=False
        ),
        "peftc CLI (`CausalLm.training_loss`)": setup.peftc_side(plan, base, theirs.model),
        "peft `model(**batch).loss`": theirs,
    }
    batch = setup.token_batch(args.seq)
    load = os.getloadavg()[0]
    print(f"{args.config}, mini-Llama, batch {setup.BATCH} x {args.seq}, threads {args.threads}, load {load:.2f}")
    print(f"torch {torch.__version__}, warm-up {args.warmup}, timed steps {args.steps}\n", flush=True)
    times, peaks, losses = rotate_steps(list(sides.values()), batch, args.warmup, args.steps)
    peft_ms, peft_mib = median_ms(times[-1]), max(peaks[-1])
    print("| path | step ms | vs peft | step MiB | vs peft | max loss rel. diff vs peft |")
    print("|---|---|---|---|---|---|")
    for index, label in enumerate(sides):
        ms, mib = median_ms(times[index]), max(peaks[index])
        diff = max(abs(a - b) / abs(b) for a, b in zip(losses[index], losses[-1], strict=True))
        print(f"| {label} | {ms:.0f} | {ms / peft_ms:.3f} | {mib:.0f} | {mib / peft_mib:.3f} | {diff:.1e} |")
    print(f"\nload average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
