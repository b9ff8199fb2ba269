"""The README's walkthrough, run as written: chat data from a parquet file, training interrupted
by Ctrl-C and resumed to more steps, evaluation, merge and export. A command added to the
walkthrough that this test does not know fails it, so the README cannot drift. The README's
Python API block runs as written too."""

from __future__ import annotations

import re
import shlex
import signal
from pathlib import Path

import pytest

from peftc.files.checkpoints import StepCheckpoint
from tests.helpers import REPO, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*the validation split has only:UserWarning")]

INTERRUPTED_AT = 10  # the step at which the test presses Ctrl-C during the first training command


def walkthrough() -> tuple[str, list[list[str]]]:
    """The walkthrough's Python snippet and its peftc commands (argument lists), in order."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- walkthrough -->\n```bash\n(.*?)\n```", readme, re.S)
    assert block, "README.md lost its walkthrough block"
    snippet = re.search(r"python - <<'EOF'\n(.*?)\nEOF\n", block.group(1), re.S)
    assert snippet, "the walkthrough starts by writing its data with a Python snippet"
    rest = block.group(1)[snippet.end() :]
    commands = [shlex.split(line) for line in rest.splitlines() if line.strip() and not line.startswith("#")]
    assert all(c[:3] == ["python", "-m", "peftc"] for c in commands), commands
    return snippet.group(1), [c[3:] for c in commands]


def press_ctrl_c_at(step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deliver SIGINT to this process once training has finished `step`, as a user's Ctrl-C would."""
    original = StepCheckpoint.on_train_batch_end

    def at_step(self, trainer, *args):  # type: ignore[no-untyped-def]
        if trainer.global_step == step and self.stop_signal is None:
            signal.raise_signal(signal.SIGINT)
        return original(self, trainer, *args)

    monkeypatch.setattr(StepCheckpoint, "on_train_batch_end", at_step)


def test_the_readme_walkthrough_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    snippet, (train, resume, evaluate, merge, export) = walkthrough()
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README walkthrough", "exec"), {})
    assert (tmp_path / "chat.parquet").is_file()

    with monkeypatch.context() as interrupted:
        press_ctrl_c_at(INTERRUPTED_AT, interrupted)
        result = run_cli(train, cwd=tmp_path)
    assert result.returncode == 130, result.stderr
    assert f"training stopped by Ctrl-C after step {INTERRUPTED_AT}; checkpoint saved" in result.stderr
    run = tmp_path / "runs" / "chat"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == INTERRUPTED_AT
    assert not (run / "adapter").exists(), "an interrupted run must not look finished"

    result = run_cli(resume, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = (run / "metrics.json").read_text()
    assert '"steps": 60' in metrics and (run / "adapter" / "adapter_model.safetensors").is_file()

    result = run_cli(evaluate, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "data: hf chat.parquet (as trained)" in result.stdout and "val_loss=" in result.stdout

    result = run_cli(merge, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "chat-merged" / "merged")
    assert merged.config.model_type == "llama"

    result = run_cli(export, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    exported = {p.name for p in (tmp_path / "runs" / "chat-export" / "export").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= exported


def test_the_readme_python_api_block_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Copied into a file and run, as a reader would (it once used a `base_model` it never made)."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)\n```", readme, re.S)
    assert block, "README.md lost its Python API block"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.group(1), "README Python API", "exec"), namespace)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert namespace["result"].adapter_dir == Path("runs/r8/adapter") and "val_loss" in namespace["result"].metrics
