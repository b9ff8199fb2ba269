"""Hydra idioms that users copy from Hydra's docs work in peftc as they do in Hydra, the checks
made before Hydra starts (preflight, explain) included."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftc.cli.main import check_job, search_options
from tests.helpers import run_cli

QUICK = ["trainer.max_steps=1", "predict_samples=0", "trainer.logger=none"]


def test_output_dir_under_hydras_run_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli([*QUICK, "output_dir=${hydra:runtime.output_dir}/x", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (run_dir / "x" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "x" / "plan.json").is_file()


def test_a_run_given_output_dir_keeps_hydras_record_there_and_leaves_nothing_under_outputs(tmp_path: Path) -> None:
    result = run_cli([*QUICK, "output_dir=runs/a", "peft.r=4"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "- peft.r=4" in (tmp_path / "runs" / "a" / ".hydra" / "overrides.yaml").read_text()
    assert not (tmp_path / "outputs").exists()


def test_a_sweep_job_resolves_the_idiom_to_its_own_directory(tmp_path: Path) -> None:
    job = check_job(["output_dir=${hydra:runtime.output_dir}/y", f"hydra.sweep.dir={tmp_path}"], job_num=3)
    assert job.error is None and job.spec is not None
    assert job.spec.output_dir == str(tmp_path / "3" / "y")


def test_the_preflight_resolves_the_idiom_in_a_process_that_has_not_started_hydra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh `python -m peftc` checks its job before Hydra runs (and registers its resolvers);
    `${hydra:...}` must not be refused there as an unknown resolver."""
    from omegaconf.basecontainer import BaseContainer

    for name in ("hydra", "now"):
        monkeypatch.delitem(BaseContainer._resolvers, name, raising=False)
    job = check_job(["output_dir=${hydra:runtime.output_dir}/y", f"hydra.run.dir={tmp_path}"])
    assert job.error is None, job.error
    assert job.spec is not None and job.spec.output_dir == str(tmp_path / "y")


def test_explain_composes_with_the_users_config_dir_and_config_name(tmp_path: Path) -> None:
    configs = tmp_path / "cfg"
    configs.mkdir()
    (configs / "experiment.yaml").write_text(
        "defaults:\n  - config\n  - override peft: ia3\n  - _self_\ntrainer:\n  max_steps: 7\n"
    )
    args = ["--config-dir", str(configs), "--config-name", "experiment", "explain=true"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") >= 3}
    assert "conf/peft/ia3.yaml" in rows["peft.target_modules"]
    max_steps = rows["trainer.max_steps"].split("│")
    assert max_steps[2].strip() == "7" and "cpu.yaml" not in max_steps[3]  # the experiment's, not the trainer's


@pytest.mark.parametrize("flag", ["--config-path", "-cp"])
def test_config_path_adds_the_users_directory_as_config_dir_does(flag: str, tmp_path: Path) -> None:
    """Hydra's --config-path would replace peftc's config directory: the user's YAML could not
    extend `config`, and Hydra failed with eight lines after the checks had passed."""
    configs = tmp_path / "cfg"
    configs.mkdir()
    (configs / "experiment.yaml").write_text("defaults:\n  - config\n  - _self_\npeft:\n  r: 4\n")
    result = run_cli([flag, "cfg", "--config-name", "experiment", "dry_run=true"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "lora_A.weight 4x64" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--config-dir", "cfg", "--config-name", "experiment"],
        ["-cd", "cfg", "-cn", "experiment"],
        ["--config-dir=cfg", "--config-name=experiment"],
        ["-cp", "cfg", "-cn", "experiment"],
    ],
)
def test_the_preflight_reads_hydras_short_and_inline_config_flags(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks before Hydra starts compose with the same config directory and primary config as
    Hydra will, however the flag is spelled (Hydra's docs use -cd and -cn)."""
    monkeypatch.chdir(tmp_path)
    assert search_options([*args, "peft.r=4"]) == ([f"hydra.searchpath=[file://{tmp_path / 'cfg'}]"], "experiment")
