"""LoRA on an unquantized vs quantized mini-Llama: resident base, peak memory and step time per backend.

    python experiments/bench_quant.py [--steps 5] [--warmup 1] [--threads 2]

Each backend runs in its own fresh process (one after the other), so no run inherits another's
allocations. A run compiles the plan (quant=<backend>, LoRA r=16 on all linear layers), builds
and quantizes the base, then times full training steps (forward, backward, AdamW) on a fixed
random batch. Memory is the process's resident set from /proc: `base RSS` is the growth after
materializing (weights as stored, after freeing the float32 copy), `peak` is the highest RSS
during the training steps above the pre-model baseline (the kernel's high-water mark is reset
just before training, so building the float32 model first does not count). After the timed
steps the adapter is merged to measure how much of its effect a requantizing merge keeps.
Prints a markdown table (and one JSON line per backend).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BACKENDS = ["none", "bnb_int8", "bnb_nf4", "bnb_fp4", "quanto_int8", "quanto_int4", "torchao_int8"]
MODEL = [
    "model.config.hidden_size=512",
    "model.config.intermediate_size=1376",
    "model.config.num_hidden_layers=4",
    "model.config.num_attention_heads=8",
    "model.config.num_key_value_heads=8",
    "model.config.vocab_size=2048",
]
LORA = ["peft.r=16", "peft.lora_alpha=32", "peft.target_modules=all-linear"]
BATCH, SEQ = 4, 64


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def release_freed_memory() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_one(backend: str, steps: int, warmup: int, threads: int) -> dict:
    import gc

    import torch

    torch.set_num_threads(threads)
    import peftc
    from peftc.materializer import materialize

    plan = peftc.compile([f"quant={backend}", *MODEL, *LORA])
    gc.collect()
    release_freed_memory()
    baseline = rss_bytes()
    model = materialize(plan)
    gc.collect()
    release_freed_memory()
    resident = rss_bytes() - baseline
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(4, 2048, (BATCH, SEQ), generator=generator)
    model.train()
    reset_peak()
    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    peak = rss_bytes("VmHWM") - baseline
    return {
        "backend": backend,
        "planned_base_bytes": plan.model.base_bytes,
        "planned_memory_bytes": plan.memory.total,
        "base_rss_bytes": resident,
        "peak_rss_bytes": peak,
        "step_ms_median": 1000 * statistics.median(times),
        "step_ms_min": 1000 * min(times),
        "final_loss": float(loss),
        "trainable": plan.trainable_params,
        "merge_kept": merge_kept(model, batch[:2]),
    }


def merge_kept(model, batch) -> str:
    """1 - |merged - adapted| / |adapted - base| (mean over logits): how much of the adapter's
    effect survives a merge; or why no merge happened."""
    import torch

    import peftc

    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=batch).logits
        adapted = model(input_ids=batch).logits
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.merge_adapter()
        except peftc.PeftcError:
            return "refused"
        merged = model(input_ids=batch).logits
    effect = (adapted - base).abs().mean().item()
    return f"{1 - (merged - adapted).abs().mean().item() / effect:.3f}"


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.warmup, args.threads)))
        return
    started = time.time()
    load = os.getloadavg()
    rows = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for backend in BACKENDS:
        command = [sys.executable, __file__, "--one", backend, "--steps", str(args.steps)]
        command += ["--warmup", str(args.warmup), "--threads", str(args.threads)]
        out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    print(
        f"mini-Llama hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 2048; LoRA r=16 all-linear; "
        f"batch {BATCH} x seq {SEQ}; {args.threads} threads; {args.warmup} warm-up + {args.steps} timed steps; "
        f"load average before {load[0]:.2f} / after {os.getloadavg()[0]:.2f}; {time.time() - started:.0f} s"
    )
    print()
    print(
        "| quant | planned base MiB | base RSS MiB | peak RSS MiB (training) | planned training MiB "
        "| step ms (median) | step ms (min) | vs none | merge keeps |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    reference = rows[0]["step_ms_median"]
    for row in rows:
        print(
            f"| {row['backend']} | {mib(row['planned_base_bytes'])} | {mib(row['base_rss_bytes'])} "
            f"| {mib(row['peak_rss_bytes'])} | {mib(row['planned_memory_bytes'])} | {row['step_ms_median']:.0f} "
            f"| {row['step_ms_min']:.0f} | {row['step_ms_median'] / reference:.2f}x | {row['merge_kept']} |"
        )


if __name__ == "__main__":
    main()
