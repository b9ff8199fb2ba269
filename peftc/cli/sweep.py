"""Sweep summaries: every multirun ends with sweep_summary.csv, a plot and a terminal table.

A Hydra callback (registered in conf/config.yaml under hydra.callbacks) does the work:
`on_job_end` writes the job's row to `<job dir>/job_summary.json`, and `on_multirun_end`
gathers the rows from the job directories. Going through the job directories, not the
callback's memory, keeps this right under any launcher: joblib, submitit and ray run jobs (and
their `on_job_end`) in other processes, while `on_multirun_end` runs in the launching one.
A job that failed is a row with its error; the sweep itself goes on (see `__main__`).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from peftc.cli.sweep_rows import metric_of, parse_overrides

JOB_FILE = "job_summary.json"
SUMMARY_CSV = "sweep_summary.csv"
SUMMARY_PNG = "sweep_summary.png"
# Leading columns of the CSV; the override keys and any other metrics follow.
COLUMNS = (
    "job",
    "overrides",
    "status",
    "fingerprint",
    "trainable_params",
    "total_params",
    "memory_estimate_bytes",
    "train_loss",
    "val_loss",
    "steps",
    "wall_time_s",
    "error",
)
_NOT_METRICS = {"status", "error", "fingerprint", "adapter_fingerprint", "job", "overrides", "job_dir"}

# Failed jobs of the last multirun in this process (the CLI turns them into exit status 1).
last_failures: list[dict[str, Any]] = []


class SweepSummary(Callback):
    """Hydra callback: per-job rows during a multirun, the summary files at its end."""

    def __init__(self, metric: str = "val_loss", plot: bool = True) -> None:
        self.metric = metric
        self.plot = plot
        self._started = time.perf_counter()

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        self._started = time.perf_counter()

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        row = job_row(job_return, int(config.hydra.job.num), time.perf_counter() - self._started)
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / JOB_FILE).write_text(json.dumps(row, indent=2, sort_keys=True, default=str) + "\n")

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect_rows(sweep_dir)
        if not rows:
            return
        write_summary(rows, sweep_dir, self.metric, plot=self.plot)


def job_row(job_return: Any, job_num: int, wall_time_s: float) -> dict[str, Any]:
    """One CSV row from a Hydra JobReturn (our summary dict, or the exception it raised)."""
    from hydra.core.utils import JobStatus

    overrides = list(job_return.overrides or [])
    row: dict[str, Any] = {"job": job_num, "overrides": " ".join(overrides)}
    row.update(parse_overrides(overrides))
    value = job_return._return_value  # .return_value re-raises a failed job's exception
    if job_return.status == JobStatus.FAILED:
        row.update(status="failed", error=f"{type(value).__name__}: {value}")
    elif isinstance(value, dict):
        row.update({k: v for k, v in value.items() if not isinstance(v, (dict, list))})
    row["wall_time_s"] = round(wall_time_s, 3)
    row.setdefault("status", "done")
    return row


def swept_keys(override_lists: Sequence[Sequence[str]]) -> list[str]:
    """Override keys whose value differs between jobs, in command-line order."""
    parsed = [parse_overrides(job) for job in override_lists]
    keys: list[str] = []
    for job in parsed:
        keys.extend(k for k in job if k not in keys)
    return [k for k in keys if len({job.get(k) for job in parsed}) > 1]


def collect_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(sweep_dir.glob(f"**/{JOB_FILE}")):
        row = json.loads(path.read_text())
        row["job_dir"] = str(path.parent.relative_to(sweep_dir))
        rows.append(row)
    return sorted(rows, key=lambda r: r.get("job", 0))


def write_summary(rows: list[dict[str, Any]], sweep_dir: Path, metric: str, plot: bool = True) -> None:
    """sweep_summary.csv, sweep_summary.png (when matplotlib is installed) and a terminal table."""
    global last_failures
    keys = swept_keys([r["overrides"].split() for r in rows])
    write_csv(rows, sweep_dir / SUMMARY_CSV)
    print_table(rows, keys, metric)
    print(f"sweep summary: {sweep_dir / SUMMARY_CSV}")
    if plot:
        from peftc.cli.sweep_plot import plot_sweep

        if plot_sweep(rows, keys, metric, sweep_dir / SUMMARY_PNG):
            print(f"sweep plot: {sweep_dir / SUMMARY_PNG}")
    last_failures = [r for r in rows if r.get("status") == "failed"]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    override_keys: list[str] = []
    for row in rows:
        override_keys.extend(k for k in parse_overrides(row["overrides"].split()) if k not in override_keys)
    extra = sorted({k for row in rows for k in row} - set(COLUMNS) - set(override_keys) - {"job_dir"})
    columns = [*COLUMNS, *override_keys, *extra, "job_dir"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})


def print_table(rows: list[dict[str, Any]], keys: list[str], metric: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from peftc.planning.render import human_count

    table = Table(title=f"sweep: {len(rows)} jobs", title_justify="left")
    for column in ("#", *keys, "status", "trainable", "train_loss", metric, "wall s", "fingerprint"):
        table.add_column(column, justify="left" if column in ("status", "fingerprint") else "right")
    for row in rows:
        metric_value = metric_of(row, metric)
        train_loss = metric_of(row, "train_loss")
        status = row.get("status", "")
        if status == "failed":
            status = escape(f"failed: {str(row.get('error', ''))[:80]}")
        table.add_row(
            str(row.get("job", "")),
            *(escape(str(parse_overrides(row["overrides"].split()).get(k, ""))) for k in keys),
            status,
            human_count(int(row["trainable_params"])) if row.get("trainable_params") else "",
            f"{train_loss:.4f}" if train_loss is not None else "",
            f"{metric_value:.4f}" if metric_value is not None else "",
            f"{row.get('wall_time_s', 0):.1f}",
            str(row.get("fingerprint", "")),
        )
    Console(width=max(120, Console().width)).print(table)
