"""A run whose loss or adapter turns non-finite stops with one clear error and saves nothing, so
the good adapter already in its output directory (a resumed run continues there) survives."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from peftc.tasks.causal_lm import CausalLm
from tests.helpers import run_cli


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture
def good_run(tmp_path: Path) -> Path:
    output = tmp_path / "run"
    result = run_cli(["trainer.max_steps=2", "trainer.log_every_n_steps=2", f"output_dir={output}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return output


def test_a_loss_that_turns_nan_stops_the_run_and_keeps_the_previous_adapter(
    good_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = digests(good_run / "adapter")
    original = CausalLm.training_loss

    def diverging(self, model, batch, spec=None):  # noqa: ANN001, ANN202
        return original(self, model, batch, spec) * float("nan")

    monkeypatch.setattr(CausalLm, "training_loss", diverging)
    result = run_cli(["trainer.max_steps=6", f"resume={good_run}"], cwd=tmp_path)  # resumed at step 2, logs at 4
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: training diverged: the training loss is nan at step 4; nothing was saved; "
        "lower trainer.lr, or set trainer.gradient_clip_val"
    ]
    assert "Traceback" not in result.stderr
    assert digests(good_run / "adapter") == before


def test_non_finite_adapter_tensors_are_never_saved(good_run: Path, tmp_path: Path, monkeypatch) -> None:
    """The last line of defence: a finite loss can still leave inf in a tensor the loss never read."""
    from peftc.runtime.model import PeftcModel

    before = digests(good_run / "adapter")
    original = PeftcModel.adapter_state_dict

    def poisoned(self, name):  # noqa: ANN001, ANN202
        tensors = original(self, name)
        first = next(iter(tensors))
        tensors[first] = torch.full_like(tensors[first], float("inf"))
        return tensors

    monkeypatch.setattr(PeftcModel, "adapter_state_dict", poisoned)
    result = run_cli(["trainer.max_steps=4", f"resume={good_run}"], cwd=tmp_path)
    assert result.returncode == 1
    assert "training diverged: the trained tensor" in result.stderr and "holds non-finite values" in result.stderr
    assert digests(good_run / "adapter") == before


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_loss_at_a_logging_step_is_divergence(value: float) -> None:
    """inf is divergence as nan is (the next step's gradients are nan): the run stops at once."""
    from types import SimpleNamespace

    import peftc
    from peftc import tasks
    from peftc.errors import TrainingDiverged
    from peftc.training.lightning import PeftcLightningModule

    plan = peftc.compile(["model=tiny_llama"])
    module = PeftcLightningModule(peftc.materialize(plan), tasks.get(plan.task), plan)
    module._trainer = SimpleNamespace(global_step=4, log_every_n_steps=2)
    module.on_train_batch_end(torch.tensor(1.5), {}, 0)  # finite: training goes on
    with pytest.raises(TrainingDiverged, match=f"the training loss is {value} at step 4"):
        module.on_train_batch_end(torch.tensor(value), {}, 0)
