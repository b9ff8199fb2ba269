"""Peak RSS of real training steps vs the plan's memory estimate (issue #7).

Each configuration runs in a fresh subprocess: imports, planning, the tokenizer and the first
batch happen first and set the baseline; the kernel's peak-RSS counter (VmHWM) is then reset
(`/proc/self/clear_refs` = 5), and the base model is built, adapters injected and `--steps`
AdamW steps taken. Measured = VmHWM - baseline; it is compared with `plan.memory.total`.

glibc keeps freed heap memory mapped (its mmap threshold grows to the size of the largest
freed block, up to 32 MiB, so activation-sized tensors end up on the heap), so by default RSS
counts memory that no tensor holds. `MALLOC_MMAP_THRESHOLD_=131072` fixes the threshold:
every tensor over 128 KiB is its own mapping, returned on free, and RSS tracks live memory.
The table reports both.

    python experiments/measure_memory.py                 # the table in experiments/RESULTS.md
    python experiments/measure_memory.py --json -- peft.r=8 data.batch_size=4   # one config
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# A Llama big enough that the measured memory is the model's, not the allocator's noise.
MEDIUM_LLAMA = [
    "model=tiny_llama",
    "model.config.hidden_size=512",
    "model.config.intermediate_size=1376",
    "model.config.num_hidden_layers=4",
    "model.config.num_attention_heads=8",
    "model.config.num_key_value_heads=8",
    "model.config.vocab_size=8192",
    "data.max_length=256",
]
CONFIGS: dict[str, list[str]] = {
    "lora q,v r=8 b=8": [*MEDIUM_LLAMA, "data.batch_size=8"],
    "lora all-linear r=16 b=8": [*MEDIUM_LLAMA, "data.batch_size=8", "peft.r=16", "peft.target_modules=all-linear"],
    "lora q,v b=8 grad-ckpt": [*MEDIUM_LLAMA, "data.batch_size=8", "trainer.gradient_checkpointing=true"],
    "lora q,v b=16 dropout 0.1": [*MEDIUM_LLAMA, "data.batch_size=16", "peft.lora_dropout=0.1"],
    "lora q,v b=4 bf16 base": [*MEDIUM_LLAMA, "data.batch_size=4", "model.dtype=bfloat16"],
}
# The two configurations tests/test_memory.py measures (a smaller Llama, to keep CI quick).
SMALL_LLAMA = [
    "model=tiny_llama",
    "model.config.hidden_size=256",
    "model.config.intermediate_size=688",
    "model.config.num_hidden_layers=4",
    "model.config.num_attention_heads=4",
    "model.config.num_key_value_heads=4",
    "model.config.vocab_size=4096",
    "data.max_length=128",
    "data.batch_size=8",
]
CONFIGS["test: small lora q,v b=8"] = SMALL_LLAMA
CONFIGS["test: small all-linear grad-ckpt"] = [
    *SMALL_LLAMA,
    "peft.target_modules=all-linear",
    "trainer.gradient_checkpointing=true",
]
MIB = 1024**2


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(overrides: list[str], steps: int = 2) -> dict[str, float]:
    """Run in a fresh process: peak RSS growth of building + training vs the estimate (bytes)."""
    import torch

    import peftc
    from peftc import tasks
    from peftc.planning.model_source import load_tokenizer
    from peftc.runtime.materialize import materialize
    from peftc.training.loaders import dataloaders

    torch.set_num_threads(2)
    plan = peftc.compile(overrides)
    tokenizer = load_tokenizer(plan.spec.model)
    batch = next(iter(dataloaders(plan, tokenizer)[0]))
    _warm_up()
    baseline = _status_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    model = materialize(plan)
    model.train()
    task = tasks.get(plan.task)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):
        loss = task.training_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = _status_kib("VmHWM") * 1024
    memory = plan.memory
    return {
        "measured": peak - baseline,
        "estimated": memory.total,
        "base_weights": memory.base_weights,
        "activations": memory.activations,
        "trainable_state": memory.adapter_weights + memory.gradients + memory.optimizer_state,
        "error": (memory.total - (peak - baseline)) / (peak - baseline),
    }


def _warm_up() -> None:
    """Load the kernels a training step uses so their one-time buffers are in the baseline."""
    import torch

    layer = torch.nn.Linear(64, 64)
    x = torch.randn(4, 8, 64, requires_grad=True)
    out = torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
    loss = torch.nn.functional.cross_entropy(layer(out).flatten(0, 1), torch.zeros(32, dtype=torch.long))
    loss.backward()
    torch.optim.AdamW(layer.parameters()).step()


LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def measure_in_subprocess(overrides: list[str], steps: int = 2, live: bool = True) -> dict[str, float]:
    """`live`: fixed mmap threshold, so RSS is live memory (see the module docstring)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.update(LIVE_MEMORY_ENV if live else {})
    result = subprocess.run(
        [sys.executable, __file__, "--json", "--steps", str(steps), "--", *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="measure the given overrides here, print JSON")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.json:
        print(json.dumps(measure(args.overrides, args.steps)))
        return
    print(
        "| config | estimate MiB | live peak MiB | error | default-malloc peak MiB | error "
        "| base | activations | adapter+grads+AdamW |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, overrides in CONFIGS.items():
        live = measure_in_subprocess(overrides, args.steps, live=True)
        default = measure_in_subprocess(overrides, args.steps, live=False)
        print(
            f"| {name} | {live['estimated'] / MIB:.1f} | {live['measured'] / MIB:.1f} | {100 * live['error']:+.1f}% "
            f"| {default['measured'] / MIB:.1f} | {100 * default['error']:+.1f}% "
            f"| {live['base_weights'] / MIB:.1f} | {live['activations'] / MIB:.1f} "
            f"| {live['trainable_state'] / MIB:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
