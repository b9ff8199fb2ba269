"""peftc beside peft on the hardware people train on: one command, every method, every precision.

    python experiments/bench_gpu.py                    # one GPU: 1.1B Llama shape, 8 x 1024 tokens (< 8 min on an H200)
    python experiments/bench_gpu.py --json gpu.json    # the same, and the rows as JSON
    python experiments/bench_gpu.py --tiny             # CPU smoke run (a 2-layer Llama, seconds; tests/test_bench_gpu.py)
    python experiments/bench_gpu.py --tiny --layers 22 --steps 1 --warmup 0   # ops per step at 1.1B's depth, on CPU

Model: a config-built Llama of TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 22 layers,
32 heads, 4 kv heads, vocab 32000), seeded, built once and copied for every side. Each row builds
peft's model and peftc's from identical copies, copies peft's initial adapter tensors into
peftc's (bench_setup), and runs one training step per side in turn, the first side alternating
each round: zero_grad, loss, backward, AdamW (AdaLoRA: its rank allocator after the step).
peftc's loss is the CLI's (`CausalLm.training_loss`), except the "API call" row, which trains
through `model(**batch).loss` as a Python user would; peft's is `model(**batch).loss`.

Rows
- every method (LoRA all-linear and q,v; DoRA; IA3; LoHa; LoKr; AdaLoRA; prompt and prefix
  tuning, 20 virtual tokens) in bf16-true: base and adapters bfloat16, no autocast;
- the precision matrix for LoRA all-linear: 32-true (float32), bf16-mixed (float32 model under
  bf16 autocast, Lightning's meaning), bf16-mixed over a bf16 base (float32 adapters, what a
  `model.dtype=bfloat16 trainer.precision=bf16-mixed` user trains), 16-mixed (CUDA only; no
  GradScaler, which costs both sides the same); bf16-true is the LoRA all-linear row above;
- the frozen floor per precision: every parameter frozen, gradients w.r.t. the input embeddings.
--tiny (CPU): the same rows on a 2-layer, 64-wide Llama, the methods in 32-true instead (bf16
matrix products are slow on CPUs without bf16 units) and bf16-true in the matrix; 16-mixed is
skipped. Its timings say nothing about a GPU: it exists so the bench cannot rot.

Columns: step time is the median of --steps timed steps after --warmup (wall clock around the
step, synchronised on CUDA); ratio = peftc / peft (below 1 is better); "floor / peftc" = frozen
floor ms / peftc ms (1 is the floor itself); step MiB = torch.cuda.max_memory_allocated during
the step minus what was allocated before it (CPU: the RSS high-water mark above the resident set
when run as a script with bench_setup.MALLOC_ENV, else n/a); loss diff = the largest relative
difference between the two sides' losses over all steps (they train the same numbers); ops =
the operators one training step dispatches that compute something (views left out: forward,
backward, optimizer, AdaLoRA's allocator; counted after the timed steps with a TorchDispatchMode):
on a GPU each is at least one kernel launch, the cost that small-op methods pay per layer
whatever the width, so the count is meaningful on a CPU too.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_setup as setup  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

LLAMA_1B = {
    **setup.MINI_LLAMA,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
TINY_LLAMA = {
    **setup.MINI_LLAMA,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
}
METHODS = (
    "lora all-linear",
    "lora q,v",
    "dora all-linear",
    "ia3",
    "loha all-linear",
    "lokr all-linear",
    "adalora all-linear",
    "prompt tuning",
    "prefix tuning",
)


@dataclass(frozen=True)
class Precision:
    """How a row's models hold and compute their numbers."""

    name: str
    base_dtype: torch.dtype  # the base weights' dtype when the adapters are added
    cast_after: torch.dtype | None  # the whole model (adapters too) cast after wrapping (x-true)
    autocast: torch.dtype | None  # the step runs under torch.autocast in this dtype
    needs_cuda: bool = False


BF16_TRUE = Precision("bf16-true", torch.float32, torch.bfloat16, None)
FLOAT32 = Precision("32-true", torch.float32, None, None)
PRECISIONS = (
    FLOAT32,
    BF16_TRUE,
    Precision("bf16-mixed", torch.float32, None, torch.bfloat16),
    Precision("bf16-mixed, bf16 base", torch.bfloat16, None, torch.bfloat16),
    Precision("16-mixed", torch.float32, None, torch.float16, needs_cuda=True),
)


@dataclass(frozen=True)
class Row:
    config: str  # a bench_setup.CONFIGS name
    precision: Precision
    api_call: bool = False  # peftc trains through model(**batch).loss instead of the CLI's loss

    @property
    def label(self) -> str:
        return self.config + (", API call `model(**batch).loss`" if self.api_call else "")


@dataclass
class Bench:
    """What every row shares: the device, the shape, the batch, the seeded base."""

    device: torch.device
    shape: dict[str, Any]
    seq: int
    batch: dict[str, torch.Tensor]
    warmup: int
    steps: int
    pristine: torch.nn.Module | None = None  # the float32 base on the device, copied for every side

    def base(self, plan: Any, dtype: torch.dtype) -> torch.nn.Module:
        if self.pristine is None:
            self.pristine = setup.build_base(plan).to(self.device)
        return copy.deepcopy(self.pristine).to(dtype)


def rows_to_run(main_precision: Precision) -> list[Row]:
    """Every method in the main precision, LoRA's API call, then LoRA in every other precision."""
    rows = [Row(name, main_precision) for name in METHODS]
    rows.insert(1, Row("lora all-linear", main_precision, api_call=True))
    return rows + [Row("lora all-linear", p) for p in PRECISIONS if p != main_precision]


# ------------------------------------------------------------------------------- measuring
def timed_step(side: setup.Side, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[float, float, float]:
    """(seconds, step MiB, loss) of one training step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        loss = side.step(batch)
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return seconds, (torch.cuda.max_memory_allocated(device) - before) / 2**20, loss
    if all(os.environ.get(k) == v for k, v in setup.MALLOC_ENV.items()):
        return setup.measured_step(side, batch)
    start = time.perf_counter()
    loss = side.step(batch)
    return time.perf_counter() - start, math.nan, loss


class OpCounter(TorchDispatchMode):
    """Counts the operators dispatched below autograd while it is active, views left out."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def ops_per_step(side: setup.Side, batch: dict[str, torch.Tensor]) -> int:
    with OpCounter() as counter:
        side.step(batch)
    return counter.count


def rotate(sides: Sequence[setup.Side], bench: Bench) -> list[dict[str, list[float]]]:
    """Each side's step times, step memory and losses, the first side alternating every round."""
    results = [{"seconds": [], "mib": [], "losses": []} for _ in sides]
    for round_index in range(bench.warmup + bench.steps):
        for offset in range(len(sides)):
            index = (round_index + offset) % len(sides)
            seconds, mib, loss = timed_step(sides[index], bench.batch, bench.device)
            results[index]["losses"].append(loss)
            if round_index >= bench.warmup:
                results[index]["seconds"].append(seconds)
                results[index]["mib"].append(mib)
    return results


def under_autocast(side: setup.Side, device: torch.device, dtype: torch.dtype | None) -> setup.Side:
    if dtype is not None:
        loss = side.loss

        def autocast_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.autocast(device.type, dtype=dtype):
                return loss(batch)

        side.loss = autocast_loss
    return side


def twin_sides(row: Row, bench: Bench) -> tuple[Any, setup.Side, setup.Side]:
    """(plan, peftc side, peft side) on identical copies of the base, in the row's precision."""
    total = bench.warmup + bench.steps + 10
    plan = setup.compile_plan(row.config, total, bench.shape, bench.seq)
    precision = row.precision
    theirs = setup.peft_side(plan, bench.base(plan, precision.base_dtype))
    make = setup.peftc_api_side if row.api_call else setup.peftc_side
    ours = make(plan, bench.base(plan, precision.base_dtype), theirs.model)
    for side in (ours, theirs):
        if precision.cast_after is not None:
            side.model.to(precision.cast_after)  # parameters keep their identity: the optimizers still hold them
        under_autocast(side, bench.device, precision.autocast)
    return plan, ours, theirs


def floor_side(plan: Any, precision: Precision, bench: Bench) -> setup.Side:
    base = bench.base(plan, precision.cast_after or precision.base_dtype)
    return under_autocast(setup.floor_side(base), bench.device, precision.autocast)


def median_ms(values: Sequence[float]) -> float:
    return statistics.median(values) * 1e3


def measure(row: Row, bench: Bench, floors: dict[str, float]) -> dict[str, Any]:
    """One row: both sides (and the precision's floor, the first time it is needed) in rotation."""
    plan, ours, theirs = twin_sides(row, bench)
    sides = [ours, theirs]
    if row.precision.name not in floors:
        sides.append(floor_side(plan, row.precision, bench))
    results = rotate(sides, bench)
    if len(sides) == 3:
        floors[row.precision.name] = median_ms(results[2]["seconds"])
    ours_ms, theirs_ms = median_ms(results[0]["seconds"]), median_ms(results[1]["seconds"])
    ours_mib, theirs_mib = max(results[0]["mib"]), max(results[1]["mib"])
    pairs = zip(results[0]["losses"], results[1]["losses"], strict=True)
    ours_ops, theirs_ops = ops_per_step(ours, bench.batch), ops_per_step(theirs, bench.batch)
    return {
        "configuration": row.label,
        "precision": row.precision.name,
        "trainable": plan.trainable_params,
        "peftc_ms": ours_ms,
        "peft_ms": theirs_ms,
        "ratio": ours_ms / theirs_ms,
        "floor_ms": floors[row.precision.name],
        "floor_over_peftc": floors[row.precision.name] / ours_ms,
        "peftc_step_mib": ours_mib,
        "peft_step_mib": theirs_mib,
        "memory_ratio": ours_mib / theirs_mib if theirs_mib > 0 else math.nan,
        "max_loss_rel_diff": max(abs(a - b) / abs(b) for a, b in pairs),
        "peftc_ops": ours_ops,
        "peft_ops": theirs_ops,
    }


# --------------------------------------------------------------------------------- output
HEADER = (
    "| configuration | precision | trainable | peftc ms | peft ms | ratio | floor / peftc "
    "| peftc step MiB | peft step MiB | memory ratio | max loss rel. diff | peftc ops | peft ops |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def table_row(result: dict[str, Any]) -> str:
    def mib(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:.0f}"

    memory_ratio = "n/a" if not math.isfinite(result["memory_ratio"]) else f"{result['memory_ratio']:.3f}"
    return (
        f"| {result['configuration']} | {result['precision']} | {result['trainable']:,} "
        f"| {result['peftc_ms']:.1f} | {result['peft_ms']:.1f} | {result['ratio']:.3f} "
        f"| {result['floor_over_peftc']:.3f} | {mib(result['peftc_step_mib'])} | {mib(result['peft_step_mib'])} "
        f"| {memory_ratio} | {result['max_loss_rel_diff']:.1e} | {result['peftc_ops']:,} | {result['peft_ops']:,} |"
    )


def floor_lines(floors: dict[str, float]) -> list[str]:
    return [f"| frozen floor | {name} | 0 | {ms:.1f} | | | 1.000 | | | | | | |" for name, ms in floors.items()]


# ----------------------------------------------------------------------------------- main
def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny", action="store_true", help="CPU smoke run: a 2-layer Llama, 2 x 32 tokens, 1 + 2 steps"
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per side (default 3; --tiny 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side (default 10; --tiny 2)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per batch (default 8; --tiny 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; --tiny 32)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's, 22 or 2)")
    parser.add_argument("--configs", nargs="+", default=None, help="only rows whose configuration is one of these")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; --tiny 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and the setup here")
    return parser.parse_args(argv)


def make_bench(args: argparse.Namespace) -> Bench:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    shape = TINY_LLAMA if args.tiny else LLAMA_1B
    if args.layers is not None:
        shape = {**shape, "num_hidden_layers": args.layers}
    batch, seq = args.batch or (2 if args.tiny else 8), args.seq or (32 if args.tiny else 1024)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    steps = args.steps or (2 if args.tiny else 10)
    tokens = setup.token_batch(seq, shape["vocab_size"], batch=batch)
    return Bench(device, shape, seq, {k: v.to(device) for k, v in tokens.items()}, warmup, steps)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the rows, print the table (and write --json); returns the rows."""
    args = parse(argv)
    threads_before = torch.get_num_threads()
    # the smoke run's tiny products only lose to thread start-up and contention
    torch.set_num_threads(args.threads or (1 if args.tiny else threads_before))
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads_before)  # a test calls main() in its own process


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    bench = make_bench(args)
    torch.manual_seed(0)
    # bf16 matrix products are slow on CPUs without bf16 units: the CPU smoke run's methods run in float32
    main_precision = FLOAT32 if args.tiny else BF16_TRUE
    rows = [r for r in rows_to_run(main_precision) if args.configs is None or r.config in args.configs]
    started = time.perf_counter()
    name = torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else "cpu"
    batch, seq = bench.batch["input_ids"].shape
    print(f"torch {torch.__version__} on {name}; Llama {bench.shape['hidden_size']}x{bench.shape['num_hidden_layers']}")
    threads = torch.get_num_threads()
    print(f"batch {batch} x {seq} tokens, warm-up {bench.warmup}, timed steps {bench.steps}, threads {threads}\n")
    results, floors, skipped = [], {}, []
    for row in rows:
        if row.precision.needs_cuda and bench.device.type != "cuda":
            skipped.append(f"{row.label}, {row.precision.name}: needs CUDA")
            continue
        results.append(measure(row, bench, floors))
        print(table_row(results[-1]), f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n".join([HEADER, *floor_lines(floors), *map(table_row, results)]))
    for line in skipped:
        print(f"skipped: {line}")
    wall = time.perf_counter() - started
    print(f"\ndone in {wall:.0f} s")
    if args.json is not None:
        setup_info = {"device": name, "torch": torch.__version__, "shape": bench.shape, "batch": batch, "seq": seq}
        setup_info |= {"warmup": bench.warmup, "steps": bench.steps, "wall_s": wall, "floors_ms": floors}
        args.json.write_text(json.dumps({"setup": setup_info, "rows": results, "skipped": skipped}, indent=1))
    return results


if __name__ == "__main__":
    if "--tiny" in sys.argv or not torch.cuda.is_available():
        setup.ensure_malloc_env()  # CPU: RSS follows live memory (bench_setup.MALLOC_ENV)
    main()
