"""DDP on 2 CPU processes vs one process: the same adapter (issue #7).

One process with data.batch_size=8 and `trainer=ddp_cpu` (2 ranks, gloo) with batch 4 each see
the same examples per step; the script trains both through the CLI and prints the largest
absolute difference between their saved adapter tensors, and both wall times.

    python experiments/ddp_equivalence.py [--steps 10]
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
    args = parser.parse_args()
    common = [f"trainer.max_steps={args.steps}", "trainer.limit_val_batches=2"]
    with tempfile.TemporaryDirectory() as tmp:
        single_s = train([*common, "data.batch_size=8"], Path(tmp) / "single")
        ddp_s = train([*common, "trainer=ddp_cpu", "data.batch_size=4"], Path(tmp) / "ddp")
        single, ddp = (
            load_file(Path(tmp) / name / "adapter" / "adapter_model.safetensors") for name in ("single", "ddp")
        )
    worst = max((single[k] - ddp[k]).abs().max().item() for k in single)
    scale = max(single[k].abs().max().item() for k in single)
    print(f"steps={args.steps} tensors={len(single)} max|single-ddp|={worst:.2e} (max|tensor|={scale:.3f})")
    print(f"wall: 1 process {single_s:.1f} s, 2 DDP processes {ddp_s:.1f} s")


if __name__ == "__main__":
    main()
