"""trainer.logger=tensorboard|wandb|mlflow: a short run's metrics and config reach each tracker's
own local store (W&B offline, MLflow's local store); a tracker that cannot work is refused at
compile time, before anything is written."""

from __future__ import annotations

import struct
from contextlib import nullcontext
from pathlib import Path

import pytest

import peftc
from peftc.errors import ConfigError
from tests.helpers import run_cli

pytestmark = pytest.mark.slow

RUN = ["trainer.max_steps=4", "trainer.log_every_n_steps=1", "predict_samples=0", "peft.r=4"]


def train_with(logger: str, tmp_path: Path, env: dict[str, str] | None = None) -> Path:
    run_dir = tmp_path / "run"
    result = run_cli([*RUN, f"trainer.logger={logger}", f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    return run_dir


def test_tensorboard_gets_the_training_and_validation_metrics(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = train_with("tensorboard", tmp_path)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == [0, 1, 2, 3]
    assert "val_loss" in events.Tags()["scalars"]


def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file: wandb's 7-byte header, then LevelDB's log format
    (32 KiB blocks of records with a 7-byte header: crc, length, type 1 full / 2 first / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_logs_metrics_and_the_config_locally(tmp_path: Path) -> None:
    run_dir = train_with("wandb", tmp_path, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    (record_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = {}
    for record in wandb_records(record_file):
        records.setdefault(record.WhichOneof("record_type"), []).append(record)
    logged = [item.key or "/".join(item.nested_key) for r in records["history"] for item in r.history.item]
    config = {item.key: item.value_json for r in records["config"] for item in r.config.update}
    assert logged.count("train_loss") == 4 and "val_loss" in logged
    assert '"r":4' in config["peft"], "the run's config is the W&B run's config"
    assert records["run"][0].run.project == "peftc" and records["run"][0].run.display_name.endswith("run")
    assert "exit" in records, "the W&B run was finished when training ended"
    assert records["exit"][0].exit.exit_code == 0


@pytest.mark.parametrize("fails", [False, True], ids=["trained", "failed"])
def test_the_wandb_run_is_finished_with_the_runs_outcome(fails: bool, tmp_path: Path) -> None:
    """A run that raised is finished as failed in W&B (exit code 1), one that trained as done."""
    from types import SimpleNamespace

    from lightning.pytorch.loggers import WandbLogger

    from peftc.training.trackers import trackers_closed

    exit_codes: list[int] = []
    logger = WandbLogger(offline=True, save_dir=str(tmp_path))
    logger._experiment = SimpleNamespace(finish=lambda exit_code: exit_codes.append(exit_code))  # a started run
    with pytest.raises(RuntimeError) if fails else nullcontext(), trackers_closed(SimpleNamespace(loggers=[logger])):
        if fails:
            raise RuntimeError("the training loss is nan at step 3")
    assert exit_codes == [1 if fails else 0]


def test_mlflow_logs_to_a_local_store_in_the_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = train_with("mlflow", tmp_path)
    client = MlflowClient((run_dir / "mlruns").as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "peftc"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0, 1, 2, 3]
    assert run.data.params["peft/r"] == "4" and "val_loss" in run.data.metrics


@pytest.mark.parametrize(
    ("logger", "module"), [("wandb", "wandb"), ("mlflow", "mlflow"), ("tensorboard", "tensorboard")]
)
def test_a_missing_tracker_package_is_one_error_at_compile_time(
    logger: str, module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peftc.planning import compat

    real = compat._missing
    monkeypatch.setattr(compat, "_missing", lambda name: name in (module, "tensorboardX") or real(name))
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(
        ConfigError, match=rf"trainer.logger='{logger}': .*not installed; pip install 'peftc\[{logger}\]'"
    ):
        peftc.compile([f"trainer.logger={logger}"])


def test_tensorboard_logs_through_tensorboardx_where_tensorboard_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's TensorBoardLogger writes with either package."""
    from peftc.planning import compat

    real = compat._missing
    monkeypatch.setattr(
        compat, "_missing", lambda name: name == "tensorboard" or (name != "tensorboardX" and real(name))
    )
    assert peftc.compile(["trainer.logger=tensorboard"]).spec.trainer.logger == "tensorboard"


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_wandb_logging_locally_or_not_at_all_needs_no_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", mode)
    assert peftc.compile(["trainer.logger=wandb"]).spec.trainer.logger == "wandb"


def test_wandb_without_a_login_and_not_offline_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # wandb login's key would be there
    monkeypatch.setenv("HOME", str(tmp_path))
    result = run_cli(["trainer.logger=wandb", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2
    assert "trainer.logger='wandb': wandb has no login here" in result.stderr and "WANDB_MODE=offline" in result.stderr
    assert not (tmp_path / "run").exists()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    monkeypatch.delenv("NETRC")
    assert peftc.compile(["trainer.logger=wandb"]).spec.trainer.logger == "wandb"


def interrupted_then_resumed(logger: str, directory: Path) -> None:
    """An interrupted run logged train_loss 1.0 at steps 0-9 but checkpointed at step 6; the run
    resumed from it logs 2.0 at steps 6 and 7, into the same directory."""
    from peftc.training.trackers import make_logger

    run = peftc.compile([f"trainer.logger={logger}"]).spec
    interrupted = make_logger(run, directory)
    for step in range(10):
        interrupted.log_metrics({"train_loss": 1.0}, step=step)
    interrupted.finalize("success")
    resumed = make_logger(run, directory, resumed_at=6)
    for step in (6, 7):
        resumed.log_metrics({"train_loss": 2.0}, step=step)
    resumed.finalize("success")


def test_a_resumed_tensorboard_log_hides_what_the_interrupted_run_logged_after_its_checkpoint(tmp_path: Path) -> None:
    """An interrupted run logged steps 0-9 but checkpointed at step 6; the resumed run logs 6-7
    again. TensorBoard shows each step once: the interrupted run's 6-9 are purged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    interrupted_then_resumed("tensorboard", tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train_loss")]
    assert logged == [(step, 1.0) for step in range(6)] + [(6, 2.0), (7, 2.0)]


def test_a_resumed_csv_log_keeps_the_rows_up_to_its_checkpoint_and_drops_those_after(tmp_path: Path) -> None:
    """Lightning writes step k's metrics in the row of step k - 1. Checkpointed at step 6, an
    interrupted run had logged rows 0-9; the resumed run logs rows 6-7 again: rows 0-5 (the
    checkpoint's own step included) stay, the interrupted run's 6-9 go, each row once."""
    import csv

    interrupted_then_resumed("csv", tmp_path)
    with (tmp_path / "logs" / "metrics.csv").open(newline="") as file:
        logged = [(int(row["step"]), float(row["train_loss"])) for row in csv.DictReader(file)]
    assert logged == [(step, 1.0) for step in range(6)] + [(6, 2.0), (7, 2.0)]
