"""The metrics tracker of a run (trainer.logger), as Lightning's own logger for it.

csv and tensorboard write into the run directory. wandb logs to the user's W&B account, or
locally with WANDB_MODE=offline (`wandb sync` uploads later). mlflow logs to MLFLOW_TRACKING_URI
when set, else to a local store in the run directory (`mlflow ui --backend-store-uri
<run>/mlruns` shows it). W&B and MLflow also get the run's whole config as parameters, so a run
there can be reproduced from what they show.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peftc.config.spec import RunSpec

LOCAL_MLFLOW_DIR = "mlruns"


def make_logger(run: RunSpec, output_dir: Path) -> Any:
    """Lightning's logger for trainer.logger (False for none)."""
    kind = run.trainer.logger
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(output_dir), name="logs", version="")
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(output_dir), name="tensorboard", version="")
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(project=run.trainer.tracker_project, name=run_name(output_dir), save_dir=str(output_dir))
    elif kind == "mlflow":
        logger = _mlflow_logger(run, output_dir)
    else:
        return False
    logger.log_hyperparams(run.to_dict())
    return logger


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
