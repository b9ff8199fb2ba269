"""The command line end to end, in subprocesses (slow: each starts Python, torch, Lightning)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import peftc
from tests.helpers import build_base, max_diff, run_cli, token_batch

pytestmark = pytest.mark.slow


def test_default_run_trains_and_leaves_a_peft_adapter(tmp_path: Path) -> None:
    """The README's command exactly: the pretrained demo base learns the stories' plot, and the run
    shows it in words (the same prompt continued before and after training)."""
    from peft import PeftModel

    result = run_cli(["peft=lora", "task=causal_lm", f"hydra.run.dir={tmp_path}"], cwd=tmp_path, fresh_process=True)
    assert result.returncode == 0, result.stderr
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    plan = json.loads((tmp_path / "plan.json").read_text())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 100 and metrics["trainable_params"] == plan["trainable_params"]
    samples = dict(line.split(": ", 1) for line in result.stdout.splitlines() if line.startswith("sample "))
    prompt = "'The golden goat walked to the lake in the evening.' -> "
    before, after = samples["sample before training"], samples["sample after training"]
    assert before.startswith(prompt) and after.startswith(prompt)
    # the base continues with a sentence about another animal; the adapter has learned what comes next
    assert after.removeprefix(prompt).startswith("' There it found") and not before.removeprefix(prompt).startswith(
        "' There"
    )
    ours = peftc.load_adapter(adapter)  # base rebuilt from the plan saved beside the adapter
    theirs = PeftModel.from_pretrained(build_base(peftc.compile([])), adapter).eval()
    x = token_batch()
    assert max_diff(ours(input_ids=x).logits, theirs(input_ids=x).logits) <= 1e-5
    with ours.disable_adapter():
        assert max_diff(ours(input_ids=x).logits, theirs(input_ids=x).logits) > 1e-6, (
            "training must have moved the adapter"
        )


def test_dry_run_prints_the_plan_and_loads_no_weights(tmp_path: Path, config_only_dir: str) -> None:
    result = run_cli(
        ["model=hf", f"model.name_or_path={config_only_dir}", "dry_run=true", f"hydra.run.dir={tmp_path}"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "model.layers.{0-1}.self_attn.q_proj" in result.stdout and "trainable params" in result.stdout
    assert not (tmp_path / "adapter").exists()


def test_multirun_gives_each_job_its_own_adapter(tmp_path: Path) -> None:
    result = run_cli(["-m", "peft.r=4,8", "trainer.max_steps=2", f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ranks = sorted(
        json.loads((tmp_path / job / "adapter" / "adapter_config.json").read_text())["r"] for job in ("0", "1")
    )
    assert ranks == [4, 8]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["peft.rr=8"], "error: peft.rr: unknown key for peft (LoraSpec); did you mean 'r'?"),
        (["peft.r=0"], "error: peft.r=0: must be >= 1"),
        (["peft.lora_dropout=1.5"], "error: peft.lora_dropout=1.5: must be in [0.0, 1.0)"),
        (["peft.target_modules=[q_prj]"], "did you mean 'q_proj'?"),
        (
            ["model=hf", "model.name_or_path=/no/such/dir"],
            "error: model.name_or_path='/no/such/dir': no such directory",
        ),
        (["-m", "peft.r=4,0"], "error: sweep job (peft.r=0): peft.r=0: must be >= 1"),
    ],
)
def test_bad_input_is_one_message_and_exit_status_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli([*args, f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["trainer=gpu"],
            "error: trainer.accelerator='gpu': no CUDA GPU is visible on this machine (torch.cuda.device_count() is 0); use trainer=cpu here",
        ),
        (
            ["trainer.precision=16-mixed"],
            "error: trainer.precision='16-mixed': fp16 mixed precision does not run on CPU",
        ),
        (["trainer.devices=abc"], "error: trainer.devices='abc': must be a device count"),
        (["seed=-1"], "error: seed=-1: must be in [0, 4294967295]"),
    ],
)
def test_what_this_machine_cannot_run_is_one_line_and_writes_nothing(
    overrides: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("peftc.planning.compat.cuda_device_count", lambda: 0)
    result = run_cli(overrides, cwd=tmp_path)  # in this process: the patch applies
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/<date>/<time>/.hydra, no plan.json


def test_a_primary_config_in_a_user_config_dir_runs_as_in_hydra(tmp_path: Path) -> None:
    """`--config-dir D --config-name experiment`, experiment.yaml extending peftc's config."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "experiment.yaml").write_text(
        "defaults:\n  - config\n  - _self_\ntrainer:\n  max_steps: 2\npeft:\n  r: 4\n"
    )
    run = tmp_path / "run"
    result = run_cli(["--config-dir", str(conf), "--config-name", "experiment", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plan = json.loads((run / "plan.json").read_text())
    assert plan["spec"]["trainer"]["max_steps"] == 2 and plan["spec"]["peft"]["r"] == 4


def test_the_cli_shows_a_data_warning_once_as_one_plain_line(tmp_path: Path) -> None:
    """The labels are read before Hydra runs and again in the job: a user sees the warning
    once, as `warning: ...` like an error, not peftc's file, line and source text."""
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = run_cli(
        ["task=seq_cls", "model=tiny_bert", "data.source=jsonl", "data.path=d.jsonl", "dry_run=true"], tmp_path
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    warned = [line for line in lines if "the validation split has only" in line]
    assert warned == [
        "warning: d.jsonl: the validation split has only 2 examples, so its metrics are coarse (each example "
        "weighs 50% of them); use more (data.val_fraction or data.val_path)"
    ], done.stderr
    assert not any("UserWarning" in line or "peftc/" in line for line in lines), done.stderr


def test_a_training_run_shows_a_data_warning_once(tmp_path: Path) -> None:
    """Read before Hydra, for the labels and for training, the data warns three times."""
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["task=seq_cls", "model=tiny_bert", "data.source=jsonl", "data.path=d.jsonl", "trainer.max_steps=1"]
    done = run_cli([*args, "predict_samples=0", f"output_dir={tmp_path / 'out'}"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("the validation split has only 2 examples") == 1, done.stderr


def test_other_libraries_warnings_keep_their_display_naming_their_source(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only peftc's own warnings become plain lines: another library's keeps Python's display
    (its file and line say which library), and the display is restored afterwards."""
    import warnings

    from peftc.cli.main import plain_own_warnings

    displayed: list[tuple[str, str, int]] = []
    monkeypatch.setattr(warnings, "showwarning", lambda m, c, f, n, *rest: displayed.append((str(m), f, n)))
    before = warnings.showwarning
    with plain_own_warnings(), warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn_explicit("deprecated thing", FutureWarning, "/site-packages/somelib/x.py", 7)
    assert displayed == [("deprecated thing", "/site-packages/somelib/x.py", 7)]
    assert "warning: deprecated thing" not in capsys.readouterr().err
    assert warnings.showwarning is before


def test_relative_and_home_paths_mean_what_the_checks_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """output_dir='~/run' is the home directory's run (not a directory named '~'), and with
    hydra.job.chdir=true the job still reads relative paths from where peftc was started."""
    seen: dict[str, str] = {}

    def execute(run: object, output_dir: Path) -> dict:
        seen.update(cwd=os.getcwd(), output_dir=str(output_dir))
        return {"status": "planned"}

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr("peftc.cli.run.execute", execute)
    result = run_cli(["output_dir='~/run'", "hydra.job.chdir=true", f"hydra.run.dir={tmp_path}/hydra"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert seen == {"cwd": str(tmp_path), "output_dir": str(tmp_path / "home" / "run")}
