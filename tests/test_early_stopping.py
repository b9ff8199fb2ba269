"""trainer.early_stopping_patience stops on the task's primary validation metric;
trainer.save_best saves the adapter of the best validation check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import run_cli

pytestmark = pytest.mark.slow

# A learning rate high enough that validation gets worse after a while.
RUN = ["trainer.lr=0.05", "trainer.max_steps=80", "trainer.val_check_interval=5", "trainer.early_stopping_patience=2"]


def metrics_of(tmp_path: Path, *extra: str) -> dict[str, float]:
    run = tmp_path / "_".join(extra or ("last",)).replace("=", "-")
    result = run_cli([*RUN, *extra, "predict_samples=0", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return json.loads((run / "metrics.json").read_text())


def test_training_stops_early_and_saves_the_best_checks_adapter(tmp_path: Path) -> None:
    best = metrics_of(tmp_path, "trainer.save_best=true", "trainer.checkpoint_every_n_steps=60")
    assert best["steps"] < 80, "stopped before max_steps"
    assert best["best_step"] == best["steps"] - 2 * 5, "two checks without improvement after the best"
    # the final validation runs on the restored adapter: it is the best check's
    assert best["val_perplexity"] == pytest.approx(best["best_val_perplexity"], rel=1e-6)
    # Resumed from its checkpoint at step 60, a validation step after the best check (55): that
    # check's adapter and step 60's count towards patience are in the checkpoint, so the resumed
    # run stops at the same step and saves the same adapter.
    run = tmp_path / "trainer.save_best-true_trainer.checkpoint_every_n_steps-60"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 60 < best["steps"]
    uninterrupted = load_file(run / "adapter" / "adapter_model.safetensors")
    result = run_cli([f"resume={run}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    resumed = json.loads((run / "metrics.json").read_text())
    assert (resumed["best_step"], resumed["steps"]) == (best["best_step"], best["steps"])
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(saved[k], uninterrupted[k]) for k in uninterrupted), "the uninterrupted run's best adapter"
    last = metrics_of(tmp_path)
    assert last["steps"] == best["steps"] and "best_step" not in last
    assert last["val_perplexity"] > best["val_perplexity"], "the last step's adapter is worse"
