"""DDP on 2 CPU processes, and accumulated micro-batches, vs one process: the same adapter (issue #7).

One process with data.batch_size=8, `trainer=ddp_cpu` (2 ranks, gloo) with batch 4 each, and one
process with batch 2 accumulated 4 times see the same examples per step; the script trains all
three through the CLI and prints the largest absolute difference between their saved adapter
tensors and the batch-8 run's, and the wall times. `--data instructions` trains on answers only,
whose token counts differ from batch to batch (the case where a step's loss must count its
tokens over every micro-batch and rank, peftc/training/step_loss.py).

    python experiments/ddp_equivalence.py [--steps 10] [--data causal_lm|instructions]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train(args: list[str], run_dir: Path) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "peftc", *args, f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=run_dir.parent,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return time.perf_counter() - started


def main() -> None:
    from safetensors.torch import load_file

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--data", default="causal_lm", help="the built-in dataset (data=...)")
    args = parser.parse_args()
    common = [f"trainer.max_steps={args.steps}", "trainer.limit_val_batches=2", f"data={args.data}"]
    runs = {
        "single": ["data.batch_size=8"],
        "ddp": ["trainer=ddp_cpu", "data.batch_size=4"],
        "accumulated": ["data.batch_size=2", "trainer.accumulate_grad_batches=4"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        wall = {name: train([*common, *extra], Path(tmp) / name) for name, extra in runs.items()}
        adapters = {name: load_file(Path(tmp) / name / "adapter" / "adapter_model.safetensors") for name in runs}
    single = adapters["single"]
    scale = max(single[k].abs().max().item() for k in single)
    print(f"data={args.data} steps={args.steps} tensors={len(single)} (max|tensor|={scale:.3f})")
    for name in ("ddp", "accumulated"):
        worst = max((single[k] - adapters[name][k]).abs().max().item() for k in single)
        print(f"max|single-{name}|={worst:.2e}")
    print("wall: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in wall.items()))


if __name__ == "__main__":
    main()
