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
- QLoRA (bitsandbytes NF4 base, bf16 compute, LoRA all-linear) as `trainer=gpu` trains it:
  bf16 base, bf16 autocast; each side quantized by the same code and prepared its own library's
  way (bench_setup.quantized_base: unquantized weights in float32, no gradient checkpointing);
- compiled blocks (`trainer.compile=true`: each decoder block torch.compile'd, both sides, by
  the same function) for LoRA all-linear in the main precision and in trainer=gpu's, and for
  QLoRA. Each compiled row also says what compiling cost (its warm-up steps beyond as many steady
  steps, caches cold) and after how many steps that is repaid by what a compiled step saves
  against peftc's eager step of the same row, measured in the same run (the rule for making
  compilation trainer=gpu's default: repaid within ~50 steps), and dynamo's graph breaks;
- the methods the issue's table leaves out (OFT all-linear; VeRA, HRA, LN tuning, P-tuning and
  adaption prompt at their defaults), in the main precision, after the precision matrix: "no
  method slower than peft";
- the frozen floor per precision: every parameter frozen, gradients w.r.t. the input embeddings
  (QLoRA's is the unquantized bf16 base's).
--tiny (CPU): the same rows on a 2-layer, 64-wide Llama, the methods in 32-true instead (bf16
matrix products are slow on CPUs without bf16 units) and bf16-true in the matrix; 16-mixed is
skipped. Its timings say nothing about a GPU: it exists so the bench cannot rot (its test runs
the compiled rows with `--compile-backend eager`: Dynamo alone).

Columns: step time is the median of --steps timed steps after --warmup (wall clock around the
step, synchronised on CUDA); ratio = peftc / peft (below 1 is better); "floor / peftc" = frozen
floor ms / peftc ms (1 is the floor itself); step MiB = torch.cuda.max_memory_allocated during
the step minus what was allocated before it (CPU: the RSS high-water mark above the resident set
when run as a script with bench_setup.MALLOC_ENV, else n/a); loss diff = the largest relative
difference between the two sides' losses over all steps (they train the same numbers); ops =
the operators one training step dispatches that compute something (views left out: forward,
backward, optimizer, AdaLoRA's allocator; counted after the timed steps with a TorchDispatchMode):
on a GPU each is at least one kernel launch, the cost that small-op methods pay per layer
whatever the width, so the count is meaningful on a CPU too. In compiled rows a compiled
graph's kernels are not operators: there the count is what runs outside the compiled blocks
plus whatever AOT autograd still dispatches.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
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
SHAPES = {"1.1b": LLAMA_1B, "mini": setup.MINI_LLAMA, "tiny": TINY_LLAMA}
QLORA = "qlora nf4 all-linear"
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
# the issue's table has no row for these; they answer "no method slower than peft" (defaults: q_proj
# and v_proj, the norms; after the precision matrix, the first rows a time-boxed run gives up)
MORE_METHODS = ("oft all-linear", "vera", "hra", "ln tuning", "p-tuning", "adaption prompt")


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
# what `trainer=gpu model.dtype=bfloat16` trains: a bf16 base, float32 adapters, bf16 autocast
TRAINER_GPU = Precision("bf16-mixed, bf16 base", torch.bfloat16, None, torch.bfloat16)
PRECISIONS = (
    FLOAT32,
    BF16_TRUE,
    Precision("bf16-mixed", torch.float32, None, torch.bfloat16),
    TRAINER_GPU,
    Precision("16-mixed", torch.float32, None, torch.float16, needs_cuda=True),
)


@dataclass(frozen=True)
class Row:
    config: str  # a bench_setup.CONFIGS name
    precision: Precision
    api_call: bool = False  # peftc trains through model(**batch).loss instead of the CLI's loss
    compiled: bool = False  # each decoder block torch.compile'd on both sides (trainer.compile=true)

    @property
    def label(self) -> str:
        if self.api_call:
            return self.config + ", API call `model(**batch).loss`"
        return self.config + (", compiled blocks" if self.compiled else "")

    def eager(self) -> Row:
        """The same row without compilation: its step is what compiling must beat."""
        return Row(self.config, self.precision)


@dataclass
class Bench:
    """What every row shares: the device, the shape, the batch, the seeded base."""

    device: torch.device
    shape: dict[str, Any]
    seq: int
    batch: dict[str, torch.Tensor]
    warmup: int
    steps: int
    compile_backend: str = "inductor"
    pristine: torch.nn.Module | None = None  # the float32 base on the device, copied for every side

    def base(self, plan: Any, dtype: torch.dtype) -> torch.nn.Module:
        if self.pristine is None:
            self.pristine = setup.build_base(plan).to(self.device)
        return copy.deepcopy(self.pristine).to(dtype)


def rows_to_run(main_precision: Precision) -> list[Row]:
    """Most telling first (a device run is time-boxed and keeps the rows it finished): LoRA in
    the main precision and as trainer=gpu trains it, QLoRA, the other methods, LoRA's API call and
    every other precision, then the compiled rows (each after its eager row: its break-even step
    count needs that row's step)."""
    rows = [Row("lora all-linear", main_precision), Row("lora all-linear", TRAINER_GPU), Row(QLORA, TRAINER_GPU)]
    rows += [Row(name, main_precision) for name in METHODS if name != "lora all-linear"]
    rows.append(Row("lora all-linear", main_precision, api_call=True))
    rows += [Row("lora all-linear", p) for p in PRECISIONS if p not in (main_precision, TRAINER_GPU)]
    rows += [Row(name, main_precision) for name in MORE_METHODS]
    compiled = [("lora all-linear", main_precision), ("lora all-linear", TRAINER_GPU), (QLORA, TRAINER_GPU)]
    return rows + [Row(config, precision, compiled=True) for config, precision in compiled]


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


def graph_breaks() -> int:
    """Dynamo's graph breaks so far in this process (all reasons)."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def profile_table(side: setup.Side, batch: dict[str, torch.Tensor], device: torch.device) -> str:
    """One training step under torch.profiler: the operators (and on CUDA the kernels) that took
    its time, by self time, longest first."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as profiler:
        side.step(batch)
        if cuda:
            torch.cuda.synchronize(device)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60)


def rotate(sides: Sequence[setup.Side], bench: Bench) -> list[dict[str, Any]]:
    """Each side's step times (warm-up steps apart), step memory, losses and graph breaks, the
    first side alternating every round."""
    results = [{"seconds": [], "warmup_seconds": [], "mib": [], "losses": [], "graph_breaks": 0} for _ in sides]
    for round_index in range(bench.warmup + bench.steps):
        for offset in range(len(sides)):
            index = (round_index + offset) % len(sides)
            breaks = graph_breaks()
            seconds, mib, loss = timed_step(sides[index], bench.batch, bench.device)
            results[index]["graph_breaks"] += graph_breaks() - breaks
            results[index]["losses"].append(loss)
            if round_index >= bench.warmup:
                results[index]["seconds"].append(seconds)
                results[index]["mib"].append(mib)
            else:
                results[index]["warmup_seconds"].append(seconds)
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

    def base(library: str) -> torch.nn.Module:
        return setup.quantized_base(plan, bench.base(plan, precision.base_dtype), library)

    theirs = setup.peft_side(plan, base("peft"))
    make = setup.peftc_api_side if row.api_call else setup.peftc_side
    ours = make(plan, base("peftc"), theirs.model)
    from peftc.training.lightning import compile_blocks

    if row.compiled:
        # Dynamo keeps compiled code per code object, and every row's blocks share one (the decoder
        # layer's forward): without a reset a row would reuse an earlier row's compilations or,
        # past the recompile limit, silently run eager.
        torch._dynamo.reset()
    for side in (ours, theirs):
        if precision.cast_after is not None:
            side.model.to(precision.cast_after)  # parameters keep their identity: the optimizers still hold them
        if row.compiled:  # what trainer.compile=true does (the same function), to either library's model
            compile_blocks(side.model, bench.compile_backend)
        under_autocast(side, bench.device, precision.autocast)
    return plan, ours, theirs


def floor_side(plan: Any, precision: Precision, bench: Bench) -> setup.Side:
    base = bench.base(plan, precision.cast_after or precision.base_dtype)
    return under_autocast(setup.floor_side(base), bench.device, precision.autocast)


def median_ms(values: Sequence[float]) -> float:
    return statistics.median(values) * 1e3


def compile_seconds(side: dict[str, Any]) -> float:
    """What the warm-up steps cost beyond as many steady steps: compilation (nan without warm-up)."""
    warmup = side["warmup_seconds"]
    if not warmup:
        return math.nan
    return sum(warmup) - len(warmup) * statistics.median(side["seconds"])


def measure(row: Row, bench: Bench, floors: dict[str, float], profile: Path | None = None) -> dict[str, Any]:
    """One row: both sides (and the precision's floor, the first time it is needed) in rotation;
    with `profile`, then one profiled step of each side appended to that file."""
    from peftc.training.lightning import without_kv_cache

    plan, ours, theirs = twin_sides(row, bench)
    sides = [ours, theirs]
    if row.precision.name not in floors:
        sides.append(floor_side(plan, row.precision, bench))
    with contextlib.ExitStack() as stack:
        if row.compiled:  # as trainer.compile's fit runs: a cache object would recompile the blocks every step
            for side in (ours, theirs):
                stack.enter_context(without_kv_cache(side.model))
        results = rotate(sides, bench)
        if profile is not None:
            with profile.open("a") as out:
                for side in sides:
                    out.write(f"\n## {row.label}, {row.precision.name}: {side.label}\n")
                    out.write(profile_table(side, bench.batch, bench.device) + "\n")
        ours_ops, theirs_ops = ops_per_step(ours, bench.batch), ops_per_step(theirs, bench.batch)
    if len(sides) == 3:
        floors[row.precision.name] = median_ms(results[2]["seconds"])
    ours_ms, theirs_ms = median_ms(results[0]["seconds"]), median_ms(results[1]["seconds"])
    ours_mib, theirs_mib = max(results[0]["mib"]), max(results[1]["mib"])
    pairs = zip(results[0]["losses"], results[1]["losses"], strict=True)
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
    } | (compile_fields(results[0], results[1]) if row.compiled else {})


def compile_fields(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    return {
        "peftc_compile_s": compile_seconds(ours),
        "peft_compile_s": compile_seconds(theirs),
        "peftc_graph_breaks": ours["graph_breaks"],
        "peft_graph_breaks": theirs["graph_breaks"],
    }


def add_break_even(rows: Sequence[Row], results: Sequence[dict[str, Any]]) -> None:
    """Give each compiled row the steps after which compiling has paid for itself: its compile
    seconds over what one compiled step saves against peftc's eager step in the same run
    (inf where it saves nothing; nan where the eager row was not run)."""
    eager = {(row.label, row.precision.name): result for row, result in zip(rows, results, strict=True)}
    for row, result in zip(rows, results, strict=True):
        if not row.compiled:
            continue
        twin = eager.get((row.eager().label, row.precision.name))
        if twin is None:
            result |= {"eager_peftc_ms": math.nan, "break_even_steps": math.nan}
            continue
        saved_ms = twin["peftc_ms"] - result["peftc_ms"]
        result["eager_peftc_ms"] = twin["peftc_ms"]
        result["break_even_steps"] = result["peftc_compile_s"] * 1e3 / saved_ms if saved_ms > 0 else math.inf


def compile_line(result: dict[str, Any]) -> str:
    return (
        f"{result['configuration']}, {result['precision']}: compiling cost peftc {result['peftc_compile_s']:.1f} s "
        f"over the warm-up steps (peft {result['peft_compile_s']:.1f} s); a compiled step is "
        f"{result['peftc_ms']:.1f} ms against {result['eager_peftc_ms']:.1f} ms eager, so it is repaid after "
        f"{result['break_even_steps']:.0f} steps; graph breaks: peftc {result['peftc_graph_breaks']}, "
        f"peft {result['peft_graph_breaks']}"
    )


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
    parser.add_argument(
        "--shape",
        choices=tuple(SHAPES),
        default=None,
        help="the Llama's shape (default 1.1b; --tiny: tiny); mini: bench_train's 1024-wide, 4-layer model",
    )
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's, 22 or 2)")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=None,
        choices=sorted(setup.CONFIGS),
        help="only rows whose configuration is one of these (one no row has: an eager row in the main precision)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; --tiny 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and the setup here")
    parser.add_argument(
        "--profile", type=Path, default=None, help="append one profiled step per side and row to this file"
    )
    parser.add_argument(
        "--part",
        choices=("all", "eager", "compiled"),
        default="all",
        help="eager: no compiled rows; compiled: the compiled rows and their eager twins (default all)",
    )
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend of the compiled rows (default inductor)"
    )
    return parser.parse_args(argv)


def make_bench(args: argparse.Namespace) -> Bench:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    shape = SHAPES[args.shape or ("tiny" if args.tiny else "1.1b")]
    if args.layers is not None:
        shape = {**shape, "num_hidden_layers": args.layers}
    batch, seq = args.batch or (2 if args.tiny else 8), args.seq or (32 if args.tiny else 1024)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    steps = args.steps or (2 if args.tiny else 10)
    tokens = setup.token_batch(seq, shape["vocab_size"], batch=batch)
    batch_on_device = {k: v.to(device) for k, v in tokens.items()}
    return Bench(device, shape, seq, batch_on_device, warmup, steps, args.compile_backend)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the rows, print the table (and write --json); returns the rows."""
    args = parse(argv)
    threads_before = torch.get_num_threads()
    # the smoke run's tiny products only lose to thread start-up and contention
    torch.set_num_threads(args.threads or (1 if args.tiny else threads_before))
    try:
        with cold_compile_caches():
            return run(args)
    finally:
        torch.set_num_threads(threads_before)  # tests call main() in their own process


COMPILE_CACHES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


@contextlib.contextmanager
def cold_compile_caches() -> Iterator[None]:
    """Compile times as a first run pays them: inductor's and Triton's caches in a new directory,
    removed afterwards with the variables that named it (caches the caller named are used as they are)."""
    unset = [variable for variable in COMPILE_CACHES if variable not in os.environ]
    with tempfile.TemporaryDirectory(prefix="bench_gpu_cache_") as cold:
        os.environ.update({variable: os.path.join(cold, variable.lower()) for variable in unset})
        try:
            yield
        finally:
            for variable in unset:
                os.environ.pop(variable, None)


def selected_rows(args: argparse.Namespace, main_precision: Precision) -> list[Row]:
    """The rows of --part (compiled: the compiled rows and the eager rows they are measured
    against) whose configuration is one of --configs; a --configs name of bench_setup.CONFIGS
    that no row has gets an eager row in the main precision."""
    rows = rows_to_run(main_precision)
    extra = [Row(name, main_precision) for name in args.configs or () if name not in {r.config for r in rows}]
    if args.part == "eager":
        rows = [r for r in rows if not r.compiled]
    elif args.part == "compiled":
        twins = {(r.eager().label, r.precision.name) for r in rows if r.compiled}
        rows = [r for r in rows if r.compiled or (r.label, r.precision.name) in twins]
    rows = [r for r in rows if args.configs is None or r.config in args.configs]
    return rows + (extra if args.part != "compiled" else [])


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    bench = make_bench(args)
    torch.manual_seed(0)
    # bf16 matrix products are slow on CPUs without bf16 units: the CPU smoke run's methods run in float32
    main_precision = FLOAT32 if args.tiny else BF16_TRUE
    rows = selected_rows(args, main_precision)
    started = time.perf_counter()
    name = torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else "cpu"
    batch, seq = bench.batch["input_ids"].shape
    print(f"torch {torch.__version__} on {name}; Llama {bench.shape['hidden_size']}x{bench.shape['num_hidden_layers']}")
    threads = torch.get_num_threads()
    print(f"batch {batch} x {seq} tokens, warm-up {bench.warmup}, timed steps {bench.steps}, threads {threads}\n")
    setup_info = {"device": name, "torch": torch.__version__, "shape": bench.shape, "batch": batch, "seq": seq}
    setup_info |= {"warmup": bench.warmup, "steps": bench.steps, "compile_backend": bench.compile_backend}
    results, floors, skipped, measured = [], {}, [], []
    for row in rows:
        if row.precision.needs_cuda and bench.device.type != "cuda":
            skipped.append(f"{row.label}, {row.precision.name}: needs CUDA")
            continue
        results.append(measure(row, bench, floors, args.profile))
        measured.append(row)
        add_break_even(measured, results)
        print(table_row(results[-1]), f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        if args.json is not None:  # after every row: a run stopped at a time limit keeps what it measured
            write_json(args.json, setup_info | {"wall_s": time.perf_counter() - started, "floors_ms": floors}, results)
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n".join([HEADER, *floor_lines(floors), *map(table_row, results)]))
    compiled = [compile_line(r) for r in results if "break_even_steps" in r]
    print("\n".join(["", "compiled blocks (trainer.compile=true):", *compiled] if compiled else []))
    for line in skipped:
        print(f"skipped: {line}")
    wall = time.perf_counter() - started
    print(f"\ndone in {wall:.0f} s")
    if args.json is not None:
        write_json(args.json, setup_info | {"wall_s": wall, "floors_ms": floors}, results, skipped)
    return results


def write_json(path: Path, setup_info: dict[str, Any], rows: list[dict[str, Any]], skipped: Sequence[str] = ()) -> None:
    path.write_text(json.dumps({"setup": setup_info, "rows": rows, "skipped": list(skipped)}, indent=1))


if __name__ == "__main__":
    if "--tiny" in sys.argv or not torch.cuda.is_available():
        setup.ensure_malloc_env()  # CPU: RSS follows live memory (bench_setup.MALLOC_ENV)
    main()
