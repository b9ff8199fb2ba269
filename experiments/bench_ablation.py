"""Which change bought what: peftc's LoRA train step with each fast path switched off in turn.

    python experiments/bench_ablation.py [--config "lora all-linear"] [--warmup 2] [--steps 10]
    python experiments/bench_ablation.py --profile      # torch.profiler table of one step per variant

One peftc model (bench_setup, mini-Llama, batch 4 x 256, 2 threads) trains under four variants,
in turn, the first one alternating each round; a variant only chooses the code path, so all do
the same work on the same weights:
- "peftc": the fused LoRA node (methods/lowrank.py) and the chunked loss (tasks/lm_loss.py);
- "no fused LoRA": LoraLayer takes the general module-by-module path;
- "no chunked loss": the loss is transformers' own (model(**batch).loss with model.chunked_loss=False, full logits);
- "neither": both off, i.e. what the code computed before issue 8.
Step time is the median over the timed steps; step MiB as in bench_train.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_setup as setup  # noqa: E402


@contextmanager
def no_fused_lora() -> Iterator[None]:
    from peftc.methods.lora.layer import LoraLayer

    original = LoraLayer._fused_forward
    LoraLayer._fused_forward = lambda self, x: None
    try:
        yield
    finally:
        LoraLayer._fused_forward = original


@contextmanager
def no_chunked_loss() -> Iterator[None]:
    from peftc.tasks.causal_lm import CausalLm

    original = CausalLm.training_loss
    CausalLm.training_loss = lambda self, model, batch: _full_logits_loss(model, batch)
    try:
        yield
    finally:
        CausalLm.training_loss = original


def _full_logits_loss(model: object, batch: dict) -> object:
    """transformers' own loss: since issue 17 model(**batch).loss is chunked unless switched off."""
    model.chunked_loss = False
    try:
        return model(**batch).loss
    finally:
        model.chunked_loss = True


VARIANTS: dict[str, tuple[Callable[[], object], ...]] = {
    "peftc": (),
    "no fused LoRA": (no_fused_lora,),
    "no chunked loss": (no_chunked_loss,),
    "neither": (no_fused_lora, no_chunked_loss),
}


def under(variant: str, step: Callable[[], object]) -> object:
    with ExitStack() as stack:
        for switch in VARIANTS[variant]:
            stack.enter_context(switch())
        return step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="lora all-linear", choices=list(setup.CONFIGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq", type=int, default=setup.SEQ)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per variant")
    args = parser.parse_args()
    setup.ensure_malloc_env()

    import torch

    torch.set_num_threads(args.threads)
    plan = setup.compile_plan(args.config)
    side = setup.peftc_side(plan, setup.build_base(plan))
    batch = setup.token_batch(args.seq)
    load = os.getloadavg()
    print(f"{args.config}, batch {setup.BATCH} x {args.seq}, threads {args.threads}, load average {load[0]:.2f}")
    if args.profile:
        profile(side, batch)
        return
    names = list(VARIANTS)
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in names}
    for round_index in range(args.warmup + args.steps):
        for offset in range(len(names)):
            name = names[(round_index + offset) % len(names)]
            measured = under(name, lambda: setup.measured_step(side, batch))
            if round_index >= args.warmup:
                results[name].append(measured)
    base_ms = statistics.median(t for t, _, _ in results["neither"]) * 1e3
    print("| variant | step ms | vs neither | step MiB |\n|---|---|---|---|")
    for name in names:
        ms = statistics.median(t for t, _, _ in results[name]) * 1e3
        peak = max(p for _, p, _ in results[name])
        print(f"| {name} | {ms:.0f} | {ms / base_ms:.3f} | {peak:.0f} |")
    print(f"load average now {os.getloadavg()[0]:.2f}")


def profile(side: setup.Side, batch: dict) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name in VARIANTS:
        under(name, lambda: side.step(batch))  # warm-up
        with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            under(name, lambda: side.step(batch))
        print(f"\n### {name}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


if __name__ == "__main__":
    main()
