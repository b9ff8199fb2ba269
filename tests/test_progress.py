"""A run shows progress wherever it runs: plain step lines when stderr is not a terminal (CI,
nohup, a log file), Rich's bar on a terminal, without 'Epoch 0/-2' for runs bounded by steps."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from peftc.training.progress import StepBar, format_seconds
from tests.helpers import run_cli

LINE = re.compile(r"^step (\d+)/12  loss \d+\.\d{4}  lr 3\.00e-03  [\d,]+ tok/s  eta \d:\d\d:\d\d$")


def test_without_a_terminal_a_run_prints_a_line_every_n_steps(tmp_path: Path) -> None:
    result = run_cli(["trainer.max_steps=12", "trainer.log_every_n_steps=4", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    steps = [int(m[1]) for line in result.stdout.splitlines() if (m := LINE.match(line))]
    assert steps == [4, 8, 12], result.stdout
    assert "step" not in result.stderr  # progress is not something to act on


def test_progress_off_prints_no_step_lines(tmp_path: Path) -> None:
    result = run_cli(["trainer.max_steps=4", "trainer.progress_bar=false", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stdout.splitlines() if line.startswith("step ")]


@pytest.mark.parametrize(("max_epochs", "description"), [(-1, "Epoch 0"), (3, "Epoch 0/2")])
def test_the_terminal_bar_names_the_epoch_without_a_negative_total(max_epochs: int, description: str) -> None:
    bar = StepBar()
    bar._trainer = SimpleNamespace(max_epochs=max_epochs)
    assert bar._get_train_description(0).strip() == description


def test_time_left_reads_as_a_clock() -> None:
    assert format_seconds(3725.4) == "1:02:05"


def test_a_resumed_runs_time_left_counts_only_the_steps_it_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resumed at step 50 of 100, two steps in 10 s: 48 steps left take 240 s (not 48 x 10/52 s)."""
    import io

    from peftc.training import progress

    clock = iter([1000.0, 1010.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    lines = progress.StepLines(every=2, stream=out)
    trainer = SimpleNamespace(global_step=50, max_steps=100, is_global_zero=True, optimizers=[])
    lines.on_train_start(trainer, None)
    trainer.global_step = 52
    lines.on_train_batch_end(trainer, None, {}, {"input_ids": torch.zeros(1, 4)}, 0)
    assert "step 52/100" in out.getvalue() and "eta 0:04:00" in out.getvalue(), out.getvalue()
