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


def test_a_target_set_on_a_schema_key_path_is_refused_as_code() -> None:
    """Without `+`, Hydra's struct mode refuses the key first; the message still says why it is refused."""
    with pytest.raises(peftc.ConfigError, match="never instantiates") as info:
        to_spec(compose(["peft._target_=os.system"]))
    assert info.value.key == "peft._target_"


@pytest.mark.parametrize(
    "override",
    [
        "model.name='tiny-${oc.env:PEFTC_CANARY}'",  # inside a longer text
        "model.config='${oc.env:PEFTC_CANARY}'",  # a whole mapping
        "trainer.betas='${oc.env:PEFTC_CANARY}'",  # a whole list
    ],
)
def test_an_environment_read_is_refused_before_anything_resolves(
    override: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check_sources is all that stands before `--cfg job --resolve` prints the resolved config: it
    must find the read in the raw text, wherever the interpolation sits and whatever node holds it."""
    from peftc.config.provenance import check_sources

    monkeypatch.setenv("PEFTC_CANARY", CANARY)
    with pytest.raises(peftc.ConfigError, match="environment variable") as info:
        check_sources([override])
    assert info.value.key == override.split("=")[0] and CANARY not in str(info.value)


def test_env_interpolation_is_refused_without_reading_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTC_CANARY", CANARY)
    with pytest.raises(peftc.ConfigError, match="environment variable") as info:
        peftc.compile(["model.name=${oc.env:PEFTC_CANARY}"])
    assert CANARY not in str(info.value)


def test_other_resolvers_still_work_and_are_plain_values() -> None:
    plan = peftc.compile(["model=tiny_llama", "model.name=tiny-${model.model_type}"])
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


# --------------------------------------------------------------------- hydra.* and provenance
def test_peftcs_and_hydras_packaged_targets_are_allowed() -> None:
    from peftc.config.provenance import check_sources

    check_sources([])  # the sweep-summary callback, Hydra's basic launcher and sweeper
    check_sources(["hydra/launcher=peftc_joblib", "hydra.callbacks.sweep_summary.metric=val_acc"])


def test_a_packaged_target_set_again_on_the_command_line_is_refused() -> None:
    """Provenance, not the key or the value: the very same class named by an override is refused."""
    from peftc.config.provenance import check_sources

    with pytest.raises(peftc.ConfigError, match=r"never instantiates.*source: command line") as info:
        check_sources(["hydra.callbacks.sweep_summary._target_=peftc.cli.sweep.SweepSummary"])
    assert info.value.key == "hydra.callbacks.sweep_summary._target_"


@pytest.mark.parametrize(
    "override",
    [
        "hydra.callbacks={sweep_summary:{_target_:os.system}}",  # the whole mapping replaced
        "hydra.callbacks.sweep_summary={_target_:os.system}",  # the packaged node replaced
    ],
)
def test_a_packaged_target_replaced_inside_a_mapping_value_is_refused(override: str) -> None:
    """An override whose value is a mapping replaces the packaged keys under it: its _target_
    comes from the command line, not from the packaged file it replaces."""
    from peftc.config.provenance import check_sources

    with pytest.raises(peftc.ConfigError, match=r"never instantiates.*source: command line") as info:
        check_sources([override])
    assert info.value.key == "hydra.callbacks.sweep_summary._target_"


def test_a_target_inside_a_mapping_added_on_the_command_line_names_that_override() -> None:
    """The key itself was never set by a file or an override of its own: its source is the
    override that added the mapping holding it."""
    from peftc.config.provenance import check_sources

    with pytest.raises(peftc.ConfigError, match=r"never instantiates.*source: added by command line: \+hydra") as info:
        check_sources(["+hydra.callbacks.x={_target_: builtins.open, file: PWNED}"])
    assert info.value.key == "hydra.callbacks.x._target_"


def test_a_hydra_target_in_a_user_config_dir_names_the_file(tmp_path: Path) -> None:
    from peftc.config.provenance import check_sources

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "shared.yaml").write_text(
        "# @package _global_\nhydra:\n  callbacks:\n    x:\n      _target_: builtins.open\n      file: PWNED\n"
    )
    with pytest.raises(peftc.ConfigError, match="never instantiates") as info:
        check_sources([f"hydra.searchpath=[file://{tmp_path}]", "+experiment=shared"])
    assert f"source: {tmp_path}/experiment/shared.yaml" in str(info.value)


def test_a_hydra_callback_on_the_command_line_never_runs(tmp_path: Path) -> None:
    args = ["dry_run=true", "+hydra.callbacks.x._target_=builtins.open", "+hydra.callbacks.x.file=PWNED"]
    result = run_cli([*args, "+hydra.callbacks.x.mode=w"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: hydra.callbacks.x._target_") and result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # no PWNED, no outputs/


def test_experimental_rerun_is_refused_before_the_pickle_is_read(tmp_path: Path) -> None:
    import pickle

    from tests.catalogue import Payload

    (tmp_path / "config.pickle").write_bytes(pickle.dumps(Payload(tmp_path / "SENTINEL")))
    result = run_cli(["--experimental-rerun", "config.pickle"], cwd=tmp_path)
    assert result.returncode == 2 and "never loads pickles" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.pickle"]


@pytest.mark.parametrize("flags", [["--cfg", "job", "--resolve"], ["-c", "job", "--resolve"], ["--info", "config"]])
def test_printing_the_resolved_config_does_not_read_the_environment(tmp_path: Path, flags: list[str]) -> None:
    result = run_cli([*flags, "model.name='${oc.env:PEFTC_CANARY}'"], cwd=tmp_path, env={"PEFTC_CANARY": CANARY})
    assert result.returncode == 2 and "environment variable" in result.stderr
    assert CANARY not in result.stdout + result.stderr


# ------------------------------------------------------------------------ interpolation grammar
@pytest.mark.parametrize(
    ("text", "called"),
    [
        ("${model.model_type}", []),
        ("tiny-${oc.select:model.name,x}", ["oc.select"]),
        ("${oc.select:'${oc.env:X}',2}", ["oc.env", "oc.select"]),  # inside a quoted argument
        ("${oc.${oc.decode:env}:X}", [None, "oc.decode"]),  # a name built by interpolation
        ("\\${oc.env:X}", []),  # escaped: plain text
    ],
)
def test_called_resolvers_are_read_from_omegaconfs_parse_tree(text: str, called: list[str | None]) -> None:
    from peftc.config.safety import called_resolvers

    assert sorted(called_resolvers(text), key=str) == sorted(called, key=str)


def test_a_resolver_name_built_by_interpolation_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTC_CANARY", CANARY)
    with pytest.raises(peftc.ConfigError, match="builds a resolver name") as info:
        peftc.compile(["model.name='${oc.${oc.decode:env}:PEFTC_CANARY}'"])
    assert CANARY not in str(info.value)


def test_an_environment_read_built_while_resolving_is_caught_by_the_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """The text names only oc.decode; the oc.env call it builds exists only while resolving."""
    from omegaconf import OmegaConf

    monkeypatch.setenv("PEFTC_CANARY", CANARY)
    cfg = compose([])
    cfg.model.name = "${oc.decode:'\\${oc.${oc.decode:env}:PEFTC_CANARY}'}"
    assert OmegaConf.to_container(cfg.model, resolve=True)["name"] == CANARY  # what the guard prevents
    with pytest.raises(peftc.ConfigError, match="environment variable") as info:
        to_spec(cfg)
    assert info.value.key == "model.name" and CANARY not in str(info.value)


def test_the_guard_restores_the_registered_resolvers() -> None:
    from omegaconf.basecontainer import BaseContainer

    from peftc.config.safety import guarded_resolvers

    before = BaseContainer._resolvers
    with guarded_resolvers():
        assert "oc.env" in BaseContainer._resolvers  # present, but refusing
    assert BaseContainer._resolvers is before and "oc.env" in before
