"""The metrics tracker of a run (trainer.logger), as Lightning's own logger for it.

csv and tensorboard write into the run directory; a resumed run continues them (the steps before
its checkpoint are kept, those an interrupted run logged after it are dropped). wandb logs to the user's W&B account, or
locally with WANDB_MODE=offline (`wandb sync` uploads later). mlflow logs to MLFLOW_TRACKING_URI
when set, else to a local store in the run directory (`mlflow ui --backend-store-uri
<run>/mlruns` shows it). W&B and MLflow also get the run's whole config as parameters, so a run
there can be reproduced from what they show.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from peftc.config.spec import RunSpec
from peftc.files.atomic import write_text_atomic

LOCAL_MLFLOW_DIR = "mlruns"


def make_logger(run: RunSpec, output_dir: Path, resumed_at: int | None = None) -> Any:
    """Lightning's logger for trainer.logger (False for none); `resumed_at`: the global step of
    the checkpoint a resumed run starts from (its local logs continue from there)."""
    kind = run.trainer.logger
    if kind == "csv":
        if resumed_at is not None:
            return ContinuedCSVLogger(output_dir, resumed_at)
        return CSVLogger(save_dir=str(output_dir), name="logs", version="")
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        # purge_step: TensorBoard hides what the interrupted run logged from the checkpoint's step on
        purge = {"purge_step": resumed_at} if resumed_at is not None else {}
        return TensorBoardLogger(save_dir=str(output_dir), name="tensorboard", version="", **purge)
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(project=run.trainer.tracker_project, name=run_name(output_dir), save_dir=str(output_dir))
    elif kind == "mlflow":
        logger = _mlflow_logger(run, output_dir)
    else:
        return False
    logger.log_hyperparams(run.to_dict())
    return logger


class ContinuedCSVLogger(CSVLogger):
    """Lightning's CSV logger for a resumed run. Lightning's own deletes an existing
    metrics.csv, so resuming lost the history of the steps before the checkpoint; this one keeps
    those rows and appends the resumed run's."""

    def __init__(self, output_dir: Path, first_step: int) -> None:
        super().__init__(save_dir=str(output_dir), name="logs", version="")
        self._first_step = first_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self._first_step)
        return self._experiment


class _ContinuedWriter(ExperimentWriter):
    def __init__(self, log_dir: str, first_step: int) -> None:
        self._first_step = first_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        """Keep the rows logged before the checkpoint's step (Lightning's step column counts from
        0, so step k's row is at k - 1); later rows are the interrupted run's, logged again now."""
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            rows = [row for row in reader if row.get("step") and int(float(row["step"])) < self._first_step]
            self.metrics_keys = sorted(reader.fieldnames or [])
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(path, text.getvalue())


def run_name(output_dir: Path) -> str:
    """The run's name in a tracker: its directory under outputs/ (date-time, plus the job number in a sweep)."""
    return "-".join(output_dir.resolve().parts[-3:] if output_dir.name.isdigit() else output_dir.resolve().parts[-2:])


def _mlflow_logger(run: RunSpec, output_dir: Path) -> Any:
    from lightning.pytorch.loggers import MLFlowLogger

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        # mlflow 3 keeps its file store "in maintenance mode" behind this switch; it still reads
        # and writes runs and needs no database package (a local sqlite store would need the
        # full mlflow distribution, SQLAlchemy and alembic, for a few metrics).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (output_dir.resolve() / LOCAL_MLFLOW_DIR).as_uri()
    return MLFlowLogger(experiment_name=run.trainer.tracker_project, run_name=run_name(output_dir), tracking_uri=uri)


@contextmanager
def trackers_closed(trainer: Any) -> Iterator[None]:
    """Close the run's W&B run when training ends (failed, if it raised): Lightning leaves it open
    until the process exits, so a second run in one process (peftc.train in a notebook, a sweep
    job) would log into the first."""
    failed = True
    try:
        yield
        failed = False
    finally:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:  # started, not yet finished
                logger.experiment.finish(exit_code=1 if failed else 0)
