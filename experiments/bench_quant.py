"""LoRA on an unquantized vs quantized mini-Llama: stored base, memory and step time per backend.

    python experiments/bench_quant.py [--steps 5] [--warmup 1] [--threads 2] [--backends none,bnb_nf4]

Each backend runs in its own fresh process (one after the other), so no run inherits another's
allocations. A run compiles the plan (quant=<backend>, LoRA r=16 on all linear layers), builds
and quantizes the base through peftc's own path (`materialize`: the float32 model is built
first, then each planned Linear is replaced by its quantized layer), then times full training
steps (forward, backward, AdamW) on a fixed random batch.

Memory, all above the pre-model baseline of the process:
- `base tensors`: bytes of the live frozen base's parameters, quantized weights counted as their
  backend stores them (data, scales, code tables), read from the model after materializing;
- `build peak`: highest RSS while materializing (the float32 model exists before quantizing);
- `base RSS`: RSS after materializing; `training peak`: highest RSS during the steps.
The children run with MALLOC_MMAP_THRESHOLD_=131072: every allocation over 128 KiB is its own
mapping, returned to the kernel when freed, so RSS tracks live tensors (glibc's default
threshold grows up to 32 MiB and keeps freed float32 weights in its arenas, hiding the saving).
Prints a markdown table (and one JSON line per backend on stderr).
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
    "model=tiny_llama",
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
    from peftc.runtime.materialize import materialize

    plan = peftc.compile([f"quant={backend}", *MODEL, *LORA])
    warm_up(plan)
    gc.collect()
    release_freed_memory()
    baseline = rss_bytes()
    reset_peak()
    model = materialize(plan)
    build_peak = rss_bytes("VmHWM") - baseline
    gc.collect()
    release_freed_memory()
    resident = rss_bytes() - baseline
    stored = base_tensor_bytes(model)
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
        "base_tensor_bytes": stored,
        "build_peak_rss_bytes": build_peak,
        "base_rss_bytes": resident,
        "peak_rss_bytes": peak,
        "step_ms_median": 1000 * statistics.median(times),
        "step_ms_min": 1000 * min(times),
        "final_loss": float(loss),
        "trainable": plan.trainable_params,
    }


def warm_up(plan) -> None:
    """Import the backend and run its kernels once on a tiny layer, so the library and its one-time
    buffers are in the baseline rather than in the model's memory."""
    import torch

    from peftc import quant

    layer = torch.nn.Sequential(torch.nn.Linear(128, 128))
    if plan.quantization is not None and plan.quantization.modules:
        layer = quant.for_spec(plan.spec.quant).quantize(plan.spec.quant, layer, ("0",))
    adapter = torch.nn.Linear(128, 128)
    x = torch.randn(4, 8, 128)
    out = torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
    (layer(out) + adapter(out)).square().mean().backward()
    torch.optim.AdamW(adapter.parameters()).step()


def base_tensor_bytes(model) -> int:
    """Bytes of the frozen base's parameters as stored: a quantized layer's weight as its backend
    stores it (what the plan's base bytes predict), every other frozen parameter once (tied ones too)."""
    from peftc.quant.base import backend_of

    total, seen = 0, set()
    for module in model.modules():
        backend = backend_of(module)
        if backend is not None:
            seen.add(id(module.weight))
            total += sum(backend.stored_bytes(module).values())
        for param in module.parameters(recurse=False):
            if id(param) not in seen and not param.requires_grad:
                seen.add(id(param))
                total += param.numel() * param.element_size()
    return total


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated; the first is the reference")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.warmup, args.threads)))
        return
    started = time.time()
    load = os.getloadavg()
    rows = []
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "MALLOC_MMAP_THRESHOLD_": "131072",  # RSS tracks live tensors (see the docstring)
    }
    for backend in args.backends.split(","):
        command = [sys.executable, __file__, "--one", backend, "--steps", str(args.steps)]
        command += ["--warmup", str(args.warmup), "--threads", str(args.threads)]
        out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    after = os.getloadavg()
    print(
        f"mini-Llama hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 2048; LoRA r=16 all-linear; "
        f"batch {BATCH} x seq {SEQ}; {args.threads} threads; {args.warmup} warm-up + {args.steps} timed steps; "
        f"load average (1/5/15 min) before {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, "
        f"after {after[0]:.2f}/{after[1]:.2f}/{after[2]:.2f}; {time.time() - started:.0f} s"
    )
    print()
    print(
        "| quant | planned base MiB | base tensors MiB | build peak RSS MiB | base RSS MiB | training peak RSS MiB "
        "| planned training MiB | step ms (median) | step ms (min) | vs none |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    reference = rows[0]["step_ms_median"]
    for row in rows:
        print(
            f"| {row['backend']} | {mib(row['planned_base_bytes'])} | {mib(row['base_tensor_bytes'])} "
            f"| {mib(row['build_peak_rss_bytes'])} | {mib(row['base_rss_bytes'])} | {mib(row['peak_rss_bytes'])} "
            f"| {mib(row['planned_memory_bytes'])} | {row['step_ms_median']:,.0f} | {row['step_ms_min']:,.0f} "
            f"| {row['step_ms_median'] / reference:.2f}x |"
        )


if __name__ == "__main__":
    main()
