"""`--help` is peftc's page, written from the schemas (groups, options, each key's help), and
`--help peft=lora` lists one option's keys with their values; `--version` prints peftc's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import peftc
from tests.helpers import REPO, run_cli


def test_help_lists_the_groups_with_their_options_and_the_run_keys_with_their_help(tmp_path: Path) -> None:
    result = run_cli(["--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "  peft     adalora," in text and "lora*" in text and "  model    demo_llama*, hf, minilm," in text
    assert "  data     causal_lm*, feature_extraction, instructions," in text  # data follows the default task
    assert "schema" not in text  # Hydra's internal schema groups stay internal
    assert "  dry_run = False\n      Print the plan and exit without loading weights." in text
    assert "  budget.memory_gb = null" in text
    assert not list(tmp_path.iterdir())  # help writes nothing


def test_help_for_an_option_lists_its_keys_with_the_values_they_would_take(tmp_path: Path) -> None:
    result = run_cli(["--help", "peft=lora", "peft.r=16"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("peft=lora (LoraSpec):")
    assert "  peft.r = 16\n      Rank of the update B A." in result.stdout


def test_help_for_an_unknown_option_is_one_error_line(tmp_path: Path) -> None:
    result = run_cli(["--help", "peft=lorra"], cwd=tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.startswith("error: peft='lorra': no such peft option") and "did you mean 'lora'" in result.stderr
    )


def test_version_is_peftcs(tmp_path: Path) -> None:
    result = run_cli(["--version"], cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"peftc {peftc.__version__}"


@pytest.mark.parametrize("args", [["--help"], ["--cfg", "job"]], ids=["peftc-help", "hydra-cfg"])
def test_a_page_piped_into_a_reader_that_stops_early_ends_quietly(args: list[str], tmp_path: Path) -> None:
    """`python -m peftc --help | head`: the reader closes the pipe before the page is written; the
    command ends as other tools do there (status 141, SIGPIPE's), with no traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", "peftc", *args]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    process.stdout.close()  # the reader is gone before the interpreter has started
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 141, stderr
    assert stderr == ""
