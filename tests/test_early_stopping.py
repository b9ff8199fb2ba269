"""trainer.early_stopping_patience stops on the task's primary validation metric;
trainer.save_best saves the adapter of the best validation check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
    best = metrics_of(tmp_path, "trainer.save_best=true")
    assert best["steps"] < 80, "stopped before max_steps"
    assert best["best_step"] == best["steps"] - 2 * 5, "two checks without improvement after the best"
    # the final validation runs on the restored adapter: it is the best check's
    assert best["val_perplexity"] == pytest.approx(best["best_val_perplexity"], rel=1e-6)
    last = metrics_of(tmp_path)
    assert last["steps"] == best["steps"] and "best_step" not in last
    assert last["val_perplexity"] > best["val_perplexity"], "the last step's adapter is worse"
