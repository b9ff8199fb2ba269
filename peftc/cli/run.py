"""One job: spec -> plan -> (dry run | materialize, train, save), or an eval/predict action
(peftc.cli.actions). The CLI and sweeps call this.

Everything that can fail on bad input (the resume checkpoint, the data files, the model
directory, memory) is checked before the first file is written, so a failed job leaves its
output directory as it found it.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftc.config.spec import RunSpec
from peftc.files.atomic import remove_dead_temps, write_text_atomic
from peftc.files.run_dir import ADAPTER_DIR, MERGED_DIR, METRICS_FILE, PLAN_FILE
from peftc.files.run_lock import run_lock
from peftc.planning.plan import Plan
from peftc.planning.render import print_plan

__all__ = ["TrainResult", "execute", "is_global_zero", "train"]


@dataclass(frozen=True)
class TrainResult:
    """What `peftc.train` leaves: where, the adapter, the plan it executed, the final metrics."""

    output_dir: Path
    adapter_dir: Path
    plan: Plan
    metrics: dict[str, float]


def execute(run: RunSpec, output_dir: Path) -> dict[str, Any]:
    """Run one job; returns a summary row (plan facts, final metrics, wall time)."""
    started = time.perf_counter()
    if run.action != "train":
        from peftc.cli.actions import run_action

        summary = run_action(run, output_dir)
        return {**summary, "wall_time_s": round(time.perf_counter() - started, 3)}
    from peftc.files.load import plan_run

    plan = plan_run(run)
    # Under a multi-process strategy every rank runs this job; only rank 0 prints and writes.
    lead = is_global_zero()
    if lead:
        print_plan(plan)
        if run.adapter is not None:
            print(f"training continues from the adapter in {run.adapter}")
    summary: dict[str, Any] = {
        "fingerprint": plan.fingerprint,
        "trainable_params": plan.trainable_params,
        "total_params": plan.total_params,
        "memory_estimate_bytes": plan.memory.total,
    }
    if run.dry_run:
        return {**summary, "status": "planned"}
    # plan.json, the adapter and metrics.json all come from this run: it holds the directory's
    # lock from its first write (train takes it) to its last.
    with ExitStack() as writing:
        metrics = train(plan, output_dir, writing)
        summary.update(status="trained", wall_time_s=round(time.perf_counter() - started, 3), **metrics)
        if not is_global_zero():
            return summary
        write_text_atomic(output_dir / METRICS_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if isinstance(v, float))
    print(f"done in {summary['wall_time_s']:.1f}s: {shown}\nadapter saved to {output_dir / ADAPTER_DIR}")
    return summary


def train(plan: Plan, output_dir: Path, writing: ExitStack) -> dict[str, float]:
    """Materialize, fit and save; the output directory's lock joins `writing` before the first
    file is written (so a run refused or failing earlier writes nothing)."""
    import lightning as L

    from peftc.cli.actions import sample_predictions, write_predictions
    from peftc.files.checkpoints import check_resumable, find_checkpoint
    from peftc.planning.model_source import load_tokenizer
    from peftc.runtime.materialize import materialize
    from peftc.training.lightning import fit
    from peftc.training.loaders import dataloaders

    run = plan.spec
    resume = find_checkpoint(run.resume) if run.resume else None
    if resume is not None:
        check_resumable(resume, run.to_dict())
        remove_dead_temps(resume.parent)  # a checkpoint save killed mid-write left its temp file
    L.seed_everything(run.seed, workers=True, verbose=False)
    tokenizer = load_tokenizer(run.model)
    loaders = dataloaders(plan, tokenizer)
    model = materialize(plan)
    if run.adapter is not None:  # continuing a saved adapter: its tensors, not the method's init
        from peftc.files.load import fill, initial_tensors

        fill(model, plan.adapter_name, initial_tensors(plan))
    if is_global_zero():  # under a multi-process strategy only rank 0 writes
        writing.enter_context(run_lock(output_dir))
        write_text_atomic(output_dir / PLAN_FILE, plan.to_json() + "\n")
        show_text_sample("before training", model, run, tokenizer)
    metrics = fit(model, plan, output_dir, loaders, resume, tokenizer)
    if not is_global_zero():
        return metrics
    if run.predict_samples:
        # what the trained model predicts before saving: a reloaded adapter must predict the same
        predictions = sample_predictions(model, run, tokenizer, run.predict_samples)
        write_predictions(output_dir, predictions)
        show_text_sample("after training", model, run, tokenizer, predictions[:1])
    check_finite_adapter(model, plan)
    model.save_adapter(output_dir / ADAPTER_DIR, [plan.adapter_name])
    if run.save_merged:
        from peftc.cli.export import merged_model
        from peftc.planning.model_source import without_progress_bars

        merged = merged_model(model, plan)
        with without_progress_bars():
            merged.save_pretrained(output_dir / MERGED_DIR)
        tokenizer.save_pretrained(output_dir / MERGED_DIR)
    return metrics


def show_text_sample(when: str, model: Any, run: Any, tokenizer: Any, predictions: list[dict] | None = None) -> None:
    """Print how the model continues the first validation prompt, before and after training, so a
    run shows what it learned in words as well as in loss (text-generating tasks only; off with
    predict_samples=0)."""
    from peftc import tasks
    from peftc.cli.actions import sample_predictions

    if not run.predict_samples or not tasks.for_spec(run.task).generates_text:
        return
    if predictions is None:
        predictions = sample_predictions(model, run, tokenizer, 1)
    for prediction in predictions:
        prompt = next(v for k, v in prediction.items() if k != "generated")
        print(f"sample {when}: {prompt!r} -> {prediction['generated']!r}", flush=True)


def check_finite_adapter(model: Any, plan: Plan) -> None:
    """Never save NaN or inf tensors (over a good adapter, in the worst case)."""
    import torch

    from peftc.errors import TrainingDiverged

    for name, tensor in model.adapter_state_dict(plan.adapter_name).items():
        if not torch.isfinite(tensor).all():
            raise TrainingDiverged(f"the trained tensor {name} holds non-finite values")


def is_global_zero() -> bool:
    """Whether this process is rank 0 of its job (always, without a multi-process strategy).

    Lightning's rank (set by the strategy once processes are connected) wins; before that, the
    launcher's environment: RANK (torchrun, SLURM setups) or NODE_RANK/LOCAL_RANK (Lightning's
    own subprocess launcher starts ranks > 0 with LOCAL_RANK set)."""
    import os
    import sys

    if "lightning" in sys.modules:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        if getattr(rank_zero_only, "rank", 0) != 0:
            return False
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "NODE_RANK", "LOCAL_RANK"))
