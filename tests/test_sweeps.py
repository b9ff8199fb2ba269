"""Sweeps from the command line (slow: each job trains a few steps)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

import peftc
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


def test_two_axis_sweep_writes_one_summary_row_per_job_and_survives_a_failing_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(
        [
            "-m",
            "peft.r=4,8",
            "peft.target_modules=[q_proj,v_proj],[q_prj]",
            "trainer.max_steps=2",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        timeout=600,
    )
    # The [q_prj] points fail in planning: rows with their error; the others train.
    assert result.returncode == 1, result.stderr
    assert "2 sweep job(s) failed" in result.stderr
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert [(r["peft.r"], r["peft.target_modules"], r["status"]) for r in rows] == [
        ("4", "[q_proj,v_proj]", "trained"),
        ("4", "[q_prj]", "failed"),
        ("8", "[q_proj,v_proj]", "trained"),
        ("8", "[q_prj]", "failed"),
    ]
    for row in rows:
        if row["status"] == "trained":
            plan = peftc.compile([f"peft.r={row['peft.r']}", "trainer.max_steps=2"])
            assert int(row["trainable_params"]) == plan.trainable_params
            assert row["fingerprint"] == plan.fingerprint
            assert float(row["val_loss"]) > 0 and float(row["train_loss"]) > 0 and float(row["wall_time_s"]) > 0
            assert float(row["steps"]) == 2
        else:
            assert "no module named 'q_prj'" in row["error"]
    assert (sweep / "sweep_summary.png").stat().st_size > 1000
    assert "sweep: 4 jobs" in result.stdout and "sweep_summary.csv" in result.stdout


def test_sweep_preview_flags_duplicates_and_invalid_points_and_trains_nothing(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(
        ["-m", "peft.target_modules=null,[q_proj,v_proj]", "peft.r=4,0", "dry_run=true", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "sweep preview: 4 jobs" in result.stdout
    assert "DUPLICATE of job 0 (same plan)" in result.stdout
    assert "4 jobs: 1 distinct plans, 1 duplicates, 2 invalid" in result.stdout
    assert "peft.r=0: must be >= 1" in result.stdout
    assert not sweep.exists()


def test_sweep_with_the_joblib_launcher(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    result = run_cli(
        [
            "-m",
            "hydra/launcher=peftc_joblib",
            "hydra.launcher.n_jobs=2",
            "peft.r=2,4",
            "trainer.max_steps=2",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert sorted((r["peft.r"], r["status"]) for r in rows) == [("2", "trained"), ("4", "trained")]


@pytest.mark.parametrize(
    ("preset", "base", "package"),
    [("peftc_slurm", "submitit_slurm", "hydra-submitit-launcher"), ("peftc_ray", "ray", "hydra-ray-launcher")],
)
def test_a_launcher_preset_whose_plugin_is_missing_names_the_package_to_install(
    preset: str, base: str, package: str
) -> None:
    import importlib.util

    from peftc.cli.main import check_job

    if importlib.util.find_spec(f"hydra_plugins.{package.replace('-', '_')}"):
        pytest.skip(f"{package} is installed")
    error = check_job([f"hydra/launcher={preset}"], job_num=0).error
    assert str(error) == (
        f"hydra/launcher='{preset}': extends Hydra's {base} launcher, whose plugin is not installed; "
        f"pip install {package}"
    )


def test_the_summary_columns_are_the_overrides_that_vary_between_jobs() -> None:
    """The table and the plot's axes: a key every job sets to the same value is not an axis."""
    from peftc.cli.sweep import swept_keys

    jobs = [
        ["peft.r=4", "trainer.max_steps=2", "peft.target_modules=[q_proj,v_proj]"],
        ["peft.r=8", "trainer.max_steps=2", "peft.target_modules=[q_proj,v_proj]"],
        ["peft.r=8", "trainer.max_steps=2", "peft.target_modules=all-linear"],
    ]
    assert swept_keys(jobs) == ["peft.r", "peft.target_modules"]
    assert swept_keys(jobs[:1]) == []


def test_the_summary_rows_are_in_job_order_past_ten_jobs(tmp_path: Path) -> None:
    """Job directories 0..10 sort as text (0, 1, 10, 2, ...); the rows follow the job number."""
    import json

    from peftc.cli.sweep import JOB_FILE, collect_rows

    for job in range(11):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / JOB_FILE).write_text(json.dumps({"job": job, "overrides": f"seed={job}"}))
    assert [row["job"] for row in collect_rows(tmp_path)] == list(range(11))


def test_only_failed_jobs_make_the_sweep_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Jobs of an eval or predict sweep end as evaluated or predicted, not trained: not failures."""
    from peftc.cli import sweep

    rows = [
        {"job": 0, "overrides": "adapter=a", "status": "evaluated"},
        {"job": 1, "overrides": "adapter=b", "status": "failed", "error": "ConfigError: no"},
        {"job": 2, "overrides": "adapter=c", "status": "predicted"},
    ]
    sweep.write_summary(rows, tmp_path, "val_loss", plot=False)
    assert [row["job"] for row in sweep.last_failures] == [1]
    sweep.last_failures = []


def test_a_sweep_over_training_settings_has_no_duplicates(tmp_path: Path) -> None:
    """Jobs that differ only in how they train (lr, seed) train different adapters of one layout:
    distinct plans, not duplicates (the adapter fingerprint alone would call them duplicates)."""
    sweep = tmp_path / "sweep"
    result = run_cli(
        ["-m", "trainer.lr=0.01,0.001", "seed=1,2", "dry_run=true", f"hydra.sweep.dir={sweep}"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "4 jobs: 4 distinct plans, 0 duplicates, 0 invalid" in result.stdout
    assert "DUPLICATE" not in result.stdout
