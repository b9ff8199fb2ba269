"""Reliability figures (issue 9): the bad-input catalogue by kind, and a kill/resume experiment.

    python experiments/reliability.py [--steps 40] [--every 5] [--catalogue-only]

The experiment trains the default tiny Llama (lora_dropout=0.1, deterministic, one thread) three
times through the CLI: uninterrupted; SIGKILLed right after its first checkpoint and resumed;
SIGTERMed at the same point (checkpoint at the next step boundary) and resumed. It reports the
largest difference between the final adapters (0 means bit-identical), the checkpoint size
against the adapter and the base model, and what the interruption cost in wall time.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# What each kind of the catalogue feeds peftc (tests/test_bad_inputs.py).
KINDS = {
    "override": "command-line overrides",
    "yaml": "YAML files in a user --config-dir",
    "code": "code execution and secrets: _target_ in hydra.*, Hydra's pickle rerun, environment reads",
    "non_finite": "inf/nan in float settings",
    "environment": "what this machine cannot run: accelerator, devices, precision, logger package, seed",
    "model_dir": "model directories",
    "dataset": "dataset files",
    "adapter_file": "adapter directories and their files",
    "api": "adapter names and the model API",
    "write": "writes that fail over a previous adapter",
    "resume": "resuming from checkpoints",
}


def catalogue() -> None:
    from tests.test_bad_inputs import CASES

    kinds = collections.Counter(case.kind for case in CASES)
    errors = collections.Counter(case.error.__name__ for case in CASES)
    print(f"bad-input catalogue: {len(CASES)} cases")
    print("| kind | what | cases |\n|---|---|---|")
    for kind, count in sorted(kinds.items()):
        print(f"| {kind} | {KINDS.get(kind, '')} | {count} |")
    print("\nexpected errors: " + ", ".join(f"{name} {count}" for name, count in errors.most_common()))


def cli(args: list[str], run_dir: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "peftc", *args, f"hydra.run.dir={run_dir}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def timed(args: list[str], run_dir: Path) -> float:
    started = time.perf_counter()
    process = cli(args, run_dir)
    _, stderr = process.communicate()
    assert process.returncode == 0, stderr[-2000:]
    return time.perf_counter() - started


def interrupted(args: list[str], run_dir: Path, sig: signal.Signals) -> float:
    started = time.perf_counter()
    process = cli(args, run_dir)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    while not checkpoint.exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.005)
    process.send_signal(sig)
    process.communicate()
    return time.perf_counter() - started


def difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    left = load_file(a / "adapter" / "adapter_model.safetensors")
    right = load_file(b / "adapter" / "adapter_model.safetensors")
    assert set(left) == set(right)
    return max((left[k] - right[k]).abs().max().item() for k in left)


def resume_experiment(steps: int, every: int) -> None:
    import torch

    import peftc

    args = [
        f"trainer.max_steps={steps}",
        "data.limit_examples=40",
        "peft.lora_dropout=0.1",
        f"trainer.checkpoint_every_n_steps={every}",
        "trainer.deterministic=true",
        "predict_samples=0",
        "trainer.logger=none",
    ]
    plan = peftc.compile(args)
    root = Path(tempfile.mkdtemp(prefix="peftc-reliability-"))
    full = timed(args, root / "full")
    rows = []
    for sig in (signal.SIGKILL, signal.SIGTERM):
        first = interrupted(args, root / sig.name, sig)
        ckpt = root / sig.name / "checkpoints" / "last.ckpt"
        step = torch.load(ckpt, weights_only=True)["global_step"]
        second = timed([*args, f"resume={root / sig.name}"], root / f"{sig.name}-resumed")
        rows.append(
            (
                sig.name,
                step,
                ckpt.stat().st_size,
                first,
                second,
                difference(root / "full", root / f"{sig.name}-resumed"),
            )
        )
    print(f"\nresume: {steps} steps, checkpoint every {every}, uninterrupted run {full:.1f} s")
    print("| signal | checkpoint step | checkpoint bytes | killed run s | resumed run s | extra s | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for name, step, size, first, second, diff in rows:
        print(f"| {name} | {step} | {size:,} | {first:.1f} | {second:.1f} | {first + second - full:.1f} | {diff:.1e} |")
    print(
        f"\nadapter file {plan.adapter_bytes:,} B; base weights {plan.model.base_bytes:,} B; "
        f"checkpoint / base = {rows[0][2] / plan.model.base_bytes:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--catalogue-only", action="store_true", help="print the catalogue table and stop")
    options = parser.parse_args()
    catalogue()
    if not options.catalogue_only:
        resume_experiment(options.steps, options.every)


if __name__ == "__main__":
    main()
