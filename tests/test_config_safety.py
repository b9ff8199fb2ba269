"""Config safety: no config value names code to run, and environment values never reach disk."""

from __future__ import annotations

from pathlib import Path

import pytest

import peftc
from peftc.config.compose import compose, to_spec
from peftc.config.safety import ALLOWED_RESOLVERS, ENV_RESOLVERS
from tests.helpers import run_cli

CANARY = "canary-7f3a9c-do-not-write"
GADGETS = ["os.system", "subprocess.Popen", "builtins.eval", "logging.os.system", "itertools.accumulate"]


def test_registered_resolvers_are_the_known_non_evaluating_ones() -> None:
    from omegaconf.basecontainer import BaseContainer

    compose([])
    registered = set(BaseContainer._resolvers)
    assert registered <= ALLOWED_RESOLVERS | ENV_RESOLVERS, f"unexpected resolvers: {registered - ALLOWED_RESOLVERS}"


@pytest.mark.parametrize("target", GADGETS)
@pytest.mark.parametrize("where", ["+_target_", "+peft._target_", "+model.config._target_", "+trainer._target_"])
def test_no_target_anywhere_is_accepted(where: str, target: str) -> None:
    with pytest.raises(peftc.ConfigError, match="never instantiates"):
        to_spec(compose([f"{where}={target}"]))


@pytest.mark.parametrize("key", ["_partial_", "_args_", "_recursive_", "_convert_"])
def test_other_instantiate_keys_are_refused_too(key: str) -> None:
    with pytest.raises(peftc.ConfigError, match="never instantiates"):
        to_spec(compose([f"+model.config.{key}=true"]))


def test_env_interpolation_is_refused_without_reading_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTC_CANARY", CANARY)
    with pytest.raises(peftc.ConfigError, match="environment variable") as info:
        peftc.compile(["model.name=${oc.env:PEFTC_CANARY}"])
    assert CANARY not in str(info.value)


def test_other_resolvers_still_work_and_are_plain_values() -> None:
    plan = peftc.compile(["model.name=tiny-${model.model_type}"])
    assert plan.spec.model.name == "tiny-llama"


@pytest.mark.slow
def test_a_training_run_writes_the_environment_nowhere(tmp_path: Path) -> None:
    """A secret in the environment must appear in no file the run writes (adapter, plan.json,
    metrics, Lightning logs, Hydra's .hydra/ and log file); a config that tries to read it is
    refused before anything is written."""
    env = {"PEFTC_CANARY": CANARY, "HF_TOKEN": CANARY}
    run = tmp_path / "run"
    result = run_cli(["trainer.max_steps=2", f"hydra.run.dir={run}"], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    written = [p for p in run.rglob("*") if p.is_file()]
    assert {"adapter_config.json", "adapter_model.safetensors", "plan.json", "config.yaml"} <= {p.name for p in written}
    assert [p for p in written if CANARY.encode() in p.read_bytes()] == []

    refused = tmp_path / "refused"
    result = run_cli(["model.name=${oc.env:PEFTC_CANARY}", f"hydra.run.dir={refused}"], cwd=tmp_path, env=env)
    assert result.returncode == 2 and "environment variable" in result.stderr
    assert CANARY not in result.stdout + result.stderr
    assert not refused.exists()
