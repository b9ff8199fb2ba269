"""peftc against the peft package on the same work, side by side in one run (issue 8).

    python experiments/bench_train.py                  # everything (about 1 h on 2 busy cores)
    python experiments/bench_train.py --quick          # a smoke run of every section (< 2 min)
    python experiments/bench_train.py --sections train --configs "lora all-linear" ia3

Model: mini-Llama (bench_setup.MINI_LLAMA, float32), batch 4 x sequence 256 (--quick: 64), torch
threads 2 (--threads). Every ratio is peftc / peft: below 1 is better. The process re-executes
itself with glibc's mmap threshold pinned (bench_setup.MALLOC_ENV), so that the resident set
follows live memory.

Sections
- train: per configuration, peftc's step and peft's step in turn, the first one alternating each
  round (the frozen floor, every parameter frozen and gradients w.r.t. the input embeddings,
  joins the rotation of --floor-with, and every efficiency T_floor / T_step uses it); medians of
  --steps timed steps after --warmup, wall clock. "Step MiB": the most memory a timed step
  needed above what was resident before it (activations, gradients, optimizer-state growth:
  the kernel's RSS high-water mark, reset before each step). The two sides' losses are
  compared at every step (max relative difference): both train the same numbers.
- inference: base vs merged forward (merge_and_unload), base vs unmerged LoRA all-linear for a
  4 x 256 prefill and a batch-1 decode step on a 256-token KV cache, peft beside peftc.
- merge: merge_and_unload time on mini-Llama, LoRA all-linear (fresh models every repeat).
- plan: compose + plan + meta injection for 7B/70B shapes (bench_plan.py).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_setup as setup  # noqa: E402

SECTIONS = ("train", "inference", "merge", "plan")


def median_ms(times: Sequence[float]) -> float:
    return statistics.median(times) * 1e3


def rotate(runners: Sequence[Callable[[], object]], warmup: int, steps: int) -> list[list[float]]:
    """Run each runner once per round, the starting runner rotating; timed rounds after warm-up."""
    times: list[list[float]] = [[] for _ in runners]
    count = len(runners)
    for round_index in range(warmup + steps):
        for offset in range(count):
            index = (round_index + offset) % count
            start = time.perf_counter()
            runners[index]()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[index].append(elapsed)
    return times


# ----------------------------------------------------------------------------------- train
def train_section(configs: Sequence[str], warmup: int, steps: int, seq: int, floor_with: str | None) -> list[str]:
    rows = [
        "| configuration | trainable | peftc ms | peft ms | ratio | peftc eff. | peft eff. "
        "| peftc step MiB | peft step MiB | ratio | max loss rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    batch = setup.token_batch(seq)
    floor_ms = float("nan")
    for name in configs:
        plan, ours, theirs = setup.twin_sides(name, total_steps=warmup + steps + 10)
        sides = [ours, theirs]
        if name == floor_with:
            sides.append(setup.floor_side(setup.build_base(plan)))
        times, peaks, losses = rotate_steps(sides, batch, warmup, steps)
        ours_ms, theirs_ms = median_ms(times[0]), median_ms(times[1])
        if len(sides) == 3:
            floor_ms = median_ms(times[2])
            rows.insert(2, f"| frozen floor | 0 | {floor_ms:.0f} | | | | | {max(peaks[2]):.0f} | | | |")
            print(rows[2], file=sys.stderr, flush=True)
        diff = max(abs(a - b) / abs(b) for a, b in zip(losses[0], losses[1], strict=True))
        peak_ours, peak_theirs = max(peaks[0]), max(peaks[1])
        rows.append(
            f"| {name} | {plan.trainable_params:,} | {ours_ms:.0f} | {theirs_ms:.0f} | {ours_ms / theirs_ms:.3f} "
            f"| {floor_ms / ours_ms:.3f} | {floor_ms / theirs_ms:.3f} "
            f"| {peak_ours:.0f} | {peak_theirs:.0f} | {peak_ours / peak_theirs:.3f} | {diff:.1e} |"
        )
        print(rows[-1], file=sys.stderr, flush=True)  # progress; the table follows at the end
        del plan, ours, theirs, sides
    return rows


def rotate_steps(
    sides: Sequence[setup.Side], batch: dict, warmup: int, steps: int
) -> tuple[list[list[float]], list[list[float]], list[list[float]]]:
    """Training steps of each side in turn, the first side rotating every round: per side the
    timed steps' seconds and step memory (MiB), and every step's loss."""
    count = len(sides)
    times: list[list[float]] = [[] for _ in sides]
    peaks: list[list[float]] = [[] for _ in sides]
    losses: list[list[float]] = [[] for _ in sides]
    for round_index in range(warmup + steps):
        for offset in range(count):
            index = (round_index + offset) % count
            seconds, peak, loss = setup.measured_step(sides[index], batch)
            losses[index].append(loss)
            if round_index >= warmup:
                times[index].append(seconds)
                peaks[index].append(peak)
    return times, peaks, losses


# ------------------------------------------------------------------------------- inference
def inference_section(seq: int, prefill_reps: int, decode_reps: int) -> list[str]:
    import torch

    plan, ours, theirs = setup.twin_sides("lora all-linear")
    base = setup.build_base(plan).eval()
    setup.perturb(theirs.model)
    from peft import get_peft_model_state_dict

    from peftc.files.load import fill

    fill(ours.model, plan.adapter_name, get_peft_model_state_dict(theirs.model))
    models = {"base": base, "peftc": ours.model.eval(), "peft": theirs.model.eval()}
    batch = setup.token_batch(seq)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    rows = ["| measurement | base ms | peftc ms | peft ms | peftc / base | peft / base |", "|---|---|---|---|---|---|"]

    def report(label: str, times: list[list[float]]) -> None:
        b, o, t = (median_ms(x) for x in times)
        rows.append(f"| {label} | {b:.1f} | {o:.1f} | {t:.1f} | {o / b:.3f} | {t / b:.3f} |")
        print(rows[-1], file=sys.stderr, flush=True)  # progress; the table follows at the end

    with torch.no_grad():
        prefill = [lambda m=m: m(**inputs) for m in models.values()]
        report(f"unmerged prefill {setup.BATCH}x{seq}", rotate(prefill, 2, prefill_reps))
        report(f"unmerged decode step (batch 1, {seq} cached)", rotate(_decoders(models, batch), 3, decode_reps))
        merged = {
            "base": base,
            "peftc": ours.model.merge_and_unload(),
            "peft": theirs.model.merge_and_unload(),
        }
        forward = [lambda m=m: m(**inputs) for m in merged.values()]
        report(f"merged forward {setup.BATCH}x{seq}", rotate(forward, 2, prefill_reps))
        logits = [m(**inputs).logits for m in merged.values()]
        rows.append(f"\nmerged logits, peftc vs peft: max abs diff {(logits[1] - logits[2]).abs().max().item():.1e}")
    return rows


def _decoders(models: dict, batch: dict) -> list[Callable[[], object]]:
    """One decode step per model: a batch-1 token after a 256-token prompt already in the cache."""
    import torch

    prompt = batch["input_ids"][:1]
    runners = []
    for model in models.values():
        out = model(input_ids=prompt, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        mask = torch.ones(1, prompt.shape[1] + 1, dtype=torch.long)

        def step(model=model, cache=cache, token=token, mask=mask) -> object:
            result = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # drop the decoded token: the next repeat decodes the same position again
            return result

        runners.append(step)
    return runners


# ----------------------------------------------------------------------------------- merge
def merge_section(repeats: int) -> list[str]:
    plan = setup.compile_plan("lora all-linear")
    base = setup.build_base(plan)
    theirs_template = setup.peft_model(plan, copy.deepcopy(base))
    setup.perturb(theirs_template)
    ours_template = setup.peftc_side(plan, copy.deepcopy(base), theirs_template).model
    times: dict[str, list[float]] = {"peftc": [], "peft": []}
    for _ in range(repeats + 1):
        for label, template in (("peftc", ours_template), ("peft", theirs_template)):
            model = copy.deepcopy(template)
            start = time.perf_counter()
            model.merge_and_unload()
            times[label].append(time.perf_counter() - start)
    ours_ms, theirs_ms = (median_ms(times[k][1:]) for k in ("peftc", "peft"))
    return [
        "| model | adapted layers | peftc ms | peft ms | ratio |",
        "|---|---|---|---|---|",
        f"| mini-Llama, LoRA all-linear r=8 | {len(plan.sites)} | {ours_ms:.1f} | {theirs_ms:.1f} | {ours_ms / theirs_ms:.3f} |",
    ]


# ------------------------------------------------------------------------------------ plan
def plan_section(repeats: int, targets: Sequence[str]) -> list[str]:
    import bench_plan

    rows = [
        "| method | shape | targets | sites | plan trainable | peft trainable | compose s | plan s | inject s "
        "| total s | peft s | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape_name, shape in bench_plan.SHAPES.items():
        for target in targets:
            cells = bench_plan.measure(shape_name, shape, target, repeats, 16).split()
            rows.append("| " + " | ".join(cells) + " |")
            print(rows[-1], file=sys.stderr, flush=True)  # progress; the table follows at the end
    return rows


# ------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run of every section, shorter sequences (< 2 min)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq", type=int, default=setup.SEQ, help="sequence length of the batch (batch size 4)")
    parser.add_argument("--configs", nargs="+", default=None, choices=list(setup.CONFIGS))
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--floor-with", default="lora all-linear", help="configuration whose rotation runs the floor")
    args = parser.parse_args(argv)
    setup.ensure_malloc_env()

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    quick = args.quick
    configs = args.configs or list(setup.QUICK_CONFIGS if quick else setup.CONFIGS)
    warmup, steps = (1, 2) if quick else (args.warmup, args.steps)
    seq = 64 if quick else args.seq
    load = os.getloadavg()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {load[0]:.2f} {load[1]:.2f}")
    print(f"mini-Llama, batch {setup.BATCH} x seq {seq}, warm-up {warmup}, timed steps {steps}\n", flush=True)
    started = time.perf_counter()
    for section in args.sections:
        print(f"## {section}", flush=True)
        if section == "train":
            rows = train_section(configs, warmup, steps, seq, args.floor_with)
        elif section == "inference":
            rows = inference_section(seq, 1 if quick else 10, 3 if quick else 30)
        elif section == "merge":
            rows = merge_section(1 if quick else 5)
        else:
            rows = plan_section(1 if quick else 5, ["all-linear"] if quick else ["all-linear", "q_proj,v_proj"])
        print("\n".join(rows) + "\n", flush=True)
    load = os.getloadavg()
    print(f"done in {time.perf_counter() - started:.0f} s; load average now {load[0]:.2f} {load[1]:.2f}")


if __name__ == "__main__":
    main()
