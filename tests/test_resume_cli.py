"""resume=RUN as users use it: the run's config comes back, the run continues in its own
directory, and only what does not change what is trained may differ."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftc
from tests.helpers import run_cli

pytestmark = pytest.mark.slow

RUN = [
    "peft.r=4",
    "peft.lora_dropout=0.1",
    "trainer.checkpoint_every_n_steps=3",
    "predict_samples=0",
    "trainer.log_every_n_steps=2",
    "trainer.val_check_interval=3",
    "data=instructions",  # answers of different lengths: a step's tokens are counted over its 2 batches
    "trainer.accumulate_grad_batches=2",
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


def test_a_checkpoint_moved_out_of_its_run_still_brings_back_the_runs_overrides(
    seven_steps: Path, tmp_path: Path
) -> None:
    """Away from the run's .hydra record, the overrides come from the checkpoint itself."""
    from peftc.cli.resume import resume_overrides

    moved = tmp_path / "last.ckpt"
    shutil.copy(seven_steps / "checkpoints" / "last.ckpt", moved)
    overrides = resume_overrides([f"resume={moved}", "trainer.max_steps=20"])
    assert overrides[: len(RUN)] == RUN and overrides[-2:] == [f"resume={moved}", "trainer.max_steps=20"]


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


def fake_checkpoint(path: Path, spec: dict, step: int = 4, **extra: object) -> Path:
    """A checkpoint's header as check_resumable reads it (no tensors needed)."""
    torch.save({"peftc_fingerprint": "f" * 16, "peftc_spec": spec, "global_step": step, **extra}, path)
    return path


def test_resume_accepts_what_does_not_change_what_is_trained(tmp_path: Path) -> None:
    from peftc.files.checkpoints import check_resumable

    spec = peftc.compile(["trainer.max_steps=4"]).spec.to_dict()
    checkpoint = fake_checkpoint(tmp_path / "last.ckpt", spec)
    changes = {"checkpoint_every_n_steps": 2, "logger": "tensorboard", "log_every_n_steps": 1, "progress_bar": False}
    for key, value in changes.items():
        check_resumable(checkpoint, {**spec, "trainer": {**spec["trainer"], "max_steps": 8, key: value}})
    with pytest.raises(peftc.ConfigError, match=r"different plan \(trainer.lr: 0.003 -> 0.001\)"):
        check_resumable(checkpoint, {**spec, "trainer": {**spec["trainer"], "max_steps": 8, "lr": 0.001}})


def test_an_epoch_bounded_run_resumes(tmp_path: Path) -> None:
    """trainer.max_steps=-1 (max_epochs bounds the run) is no step limit the checkpoint is past."""
    from peftc.files.checkpoints import check_resumable

    spec = peftc.compile(["trainer.max_steps=-1", "trainer.max_epochs=2"]).spec.to_dict()
    check_resumable(fake_checkpoint(tmp_path / "last.ckpt", spec, step=30), spec)


def test_resume_finds_the_checkpoint_in_a_run_or_its_checkpoints_directory(tmp_path: Path) -> None:
    from peftc.files.checkpoints import find_checkpoint

    (tmp_path / "checkpoints").mkdir()
    last = fake_checkpoint(tmp_path / "checkpoints" / "last.ckpt", {})
    assert [find_checkpoint(str(p)) for p in (tmp_path, tmp_path / "checkpoints", last)] == [last] * 3
    with pytest.raises(peftc.ConfigError, match="no checkpoint there"):
        find_checkpoint(str(tmp_path / "adapter"))


def test_resume_refuses_a_checkpoint_peftc_did_not_write(tmp_path: Path) -> None:
    """Lightning's own checkpoint, or any torch file: named as such, not as a plan difference."""
    from peftc.files.checkpoints import check_resumable

    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "global_step": 3}, path)
    with pytest.raises(peftc.ConfigError, match=r"is not a peftc checkpoint \(no peftc_fingerprint\)"):
        check_resumable(path, peftc.compile([]).spec.to_dict())


class _RunsCode:
    """What a malicious checkpoint would hold: unpickling it calls os.mkdir(marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return (os.mkdir, (str(self.marker),))


def test_resume_never_unpickles_code_from_a_checkpoint(tmp_path: Path) -> None:
    from peftc.files.checkpoints import check_resumable

    marker = tmp_path / "code-ran"
    path = fake_checkpoint(tmp_path / "last.ckpt", {}, payload=_RunsCode(marker))
    with pytest.raises(peftc.ConfigError, match="cannot be read as a checkpoint"):
        check_resumable(path, peftc.compile([]).spec.to_dict())
    assert not marker.exists()
