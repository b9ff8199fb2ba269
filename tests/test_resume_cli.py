"""resume=RUN as users use it: the run's config comes back, the run continues in its own
directory, and only what does not change what is trained may differ."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import run_cli

pytestmark = pytest.mark.slow

RUN = [
    "peft.r=4",
    "peft.lora_dropout=0.1",
    "trainer.checkpoint_every_n_steps=3",
    "predict_samples=0",
    "trainer.log_every_n_steps=2",
    "trainer.val_check_interval=3",
]


@pytest.fixture(scope="module")
def seven_steps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of 7 steps, checkpointed at 3, 6 and after its last step."""
    run = tmp_path_factory.mktemp("resume") / "run"
    result = run_cli([*RUN, "trainer.max_steps=7", f"hydra.run.dir={run}"], cwd=run.parent)
    assert result.returncode == 0, result.stderr
    return run


def test_resume_with_more_steps_continues_the_run_as_if_it_had_been_longer(seven_steps: Path, tmp_path: Path) -> None:
    last = torch.load(seven_steps / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 7, "a finished run keeps a checkpoint of its last step, not only of step 6"
    result = run_cli(
        ["resume=" + str(seven_steps), "trainer.max_steps=9", f"hydra.run.dir={tmp_path / 'job'}"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "with the run's overrides: peft.r=4 peft.lora_dropout=0.1" in result.stdout
    plan = json.loads((seven_steps / "plan.json").read_text())  # the same run directory, its config restored
    assert plan["spec"]["peft"]["r"] == 4 and plan["spec"]["trainer"]["max_steps"] == 9
    assert json.loads((seven_steps / "metrics.json").read_text())["steps"] == 9
    longer = tmp_path / "nine"
    result = run_cli([*RUN, "trainer.max_steps=9", f"hydra.run.dir={longer}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    resumed = load_file(seven_steps / "adapter" / "adapter_model.safetensors")
    uninterrupted = load_file(longer / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), "bit-identical to a 9-step run"
    # The metrics log continues too: the first 7 steps' rows are kept (Lightning's CSV logger
    # would delete them), and the whole log reads as the 9-step run's.
    logged, expected = (csv_rows(run / "logs" / "metrics.csv") for run in (seven_steps, longer))
    assert logged == expected and any(row["step"] == "1" for row in logged)


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("peft.r=8", "was written by a different plan (peft.r: 4 -> 8)"),
        ("trainer.max_steps=2", "trains no further than the checkpoint"),
    ],
)
def test_resume_refuses_what_changes_the_run_in_one_line(
    seven_steps: Path, tmp_path: Path, change: str, message: str
) -> None:
    before = {p: p.stat().st_mtime_ns for p in seven_steps.rglob("*") if p.is_file()}
    result = run_cli(["resume=" + str(seven_steps), change, f"hydra.run.dir={tmp_path / 'job'}"], cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
    assert {p: p.stat().st_mtime_ns for p in seven_steps.rglob("*") if p.is_file()} == before


def test_resume_refuses_max_steps_equal_to_the_checkpoints_step(seven_steps: Path, tmp_path: Path) -> None:
    """A run that would train no step: refused at the boundary too, not only below it."""
    step = torch.load(seven_steps / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    change = f"trainer.max_steps={step}"
    result = run_cli(["resume=" + str(seven_steps), change, f"hydra.run.dir={tmp_path / 'job'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"trains no further than the checkpoint, which is at step {step}" in result.stderr
