"""'Nothing is written' is true: a dry run, a plan error and a data error leave no run directory
(no `.hydra/`, no empty `peftc.log`); a run that trains keeps its directory, and its log exists
only when something was logged."""

from __future__ import annotations

from pathlib import Path

import pytest

import peftc
from peftc.errors import ConfigError
from tests.helpers import run_cli


def everything_in(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (["dry_run=true"], 0),
        (["peft.target_modules=[q_prj]"], 2),
        (["data.source=csv", "data.path=empty.csv"], 2),
    ],
    ids=["dry-run", "plan-error", "data-error"],
)
def test_a_run_that_writes_nothing_leaves_no_run_directory(tmp_path: Path, args: list[str], status: int) -> None:
    (tmp_path / "empty.csv").write_text("text\n")
    before = everything_in(tmp_path)
    result = run_cli(args, cwd=tmp_path)  # Hydra's default outputs/<date>/<time>/
    assert result.returncode == status, result.stderr
    assert everything_in(tmp_path) == before


def test_a_plan_error_leaves_a_reused_run_directory_as_it_was(tmp_path: Path) -> None:
    """The plan is checked before Hydra starts: Hydra writes its .hydra/ record as it starts, over a
    previous run's record when hydra.run.dir names that run's directory."""
    previous = tmp_path / "run"
    (previous / ".hydra").mkdir(parents=True)
    (previous / ".hydra" / "config.yaml").write_text("seed: 7\n")
    before = everything_in(tmp_path)
    result = run_cli(["peft.target_modules=[q_prj]", f"hydra.run.dir={previous}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert everything_in(tmp_path) == before
    assert (previous / ".hydra" / "config.yaml").read_text() == "seed: 7\n"


@pytest.mark.parametrize("earlier", ["adapter", "checkpoints"])
def test_training_into_an_earlier_run_s_directory_is_refused_and_changes_nothing(tmp_path: Path, earlier: str) -> None:
    """output_dir= naming an earlier run's directory would replace its adapter (or the checkpoint
    an interrupted run left), as transformers' example scripts refuse to; resume= continues it."""
    previous = tmp_path / "run"
    (previous / earlier).mkdir(parents=True)
    (previous / earlier / "kept").write_text("x")
    before = everything_in(tmp_path)
    result = run_cli(["trainer.max_steps=1", f"output_dir={previous}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: output_dir='{previous}': already holds an earlier run ({earlier}/), which this run would replace; "
        f"give a new output_dir, resume={previous} to continue that run, or remove it first"
    ]
    with pytest.raises(ConfigError, match="already holds an earlier run"):
        peftc.train(["trainer.max_steps=1"], output_dir=previous)
    assert everything_in(tmp_path) == before


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["hydra.run.dir={run}"], "hydra.run.dir='{run}'"),
        (
            ["-m", "peft.r=2,4", "hydra.sweep.dir={sweep}"],
            "sweep job (trainer.max_steps=1 peft.r=2): hydra.sweep.dir='{run}'",
        ),
    ],
    ids=["run-dir", "sweep-job-dir"],
)
def test_a_run_directory_hydra_would_make_over_an_earlier_run_is_refused(
    tmp_path: Path, args: list[str], named: str
) -> None:
    """The same for the directory Hydra makes when no output_dir is given: a hydra.run.dir, or a
    sweep's job directory, that an earlier run used."""
    sweep = tmp_path / "sweep"
    run = sweep / "0" if "-m" in args else tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    before = everything_in(tmp_path)
    result = run_cli(["trainer.max_steps=1", *(a.format(run=run, sweep=sweep) for a in args)], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"error: {named.format(run=run)}: already holds an earlier run")
    assert everything_in(tmp_path) == before


def test_a_trained_run_keeps_its_directory_and_no_empty_log(tmp_path: Path) -> None:
    result = run_cli(["trainer.max_steps=2"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file() and (run_dir / ".hydra").is_dir()
    log = run_dir / "peftc.log"
    assert not log.exists() or log.stat().st_size > 0


@pytest.mark.parametrize(("log", "kept"), [("", False), ("WARNING the data has 3 rows\n", True)])
def test_a_run_directory_with_a_log_to_read_is_kept(tmp_path: Path, log: str, kept: bool) -> None:
    """A job that wrote nothing but Hydra's record and an empty log leaves no directory; one whose
    log has lines (a warning before it failed) keeps its directory, so the log can be read."""
    from peftc.cli.main import discard_unused_run_dir

    run_dir = tmp_path / "outputs" / "2026-12-07" / "01-59-00"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run_dir / "peftc.log").write_text(log)
    discard_unused_run_dir(run_dir)
    assert run_dir.is_dir() == kept
    assert (run_dir / "peftc.log").is_file() == kept


def test_discarding_a_run_directory_stops_at_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dry run started in an empty directory removes Hydra's outputs/<date>/<time>/, never the
    directory the user ran it from."""
    from peftc.cli.main import discard_unused_run_dir

    (tmp_path / "keep").write_text("")  # (were the working directory removed, this would stop the walk)
    work = tmp_path / "work"
    run_dir = work / "outputs" / "2026-12-07" / "01-59-00"
    (run_dir / ".hydra").mkdir(parents=True)
    monkeypatch.chdir(work)
    discard_unused_run_dir(run_dir)
    assert work.is_dir() and list(work.iterdir()) == []
