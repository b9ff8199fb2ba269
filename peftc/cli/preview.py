"""Sweep preview: `python -m peftc -m <sweep> dry_run=true` compiles every job (meta device,
no weights) and prints one table instead of launching anything.

Each row: the swept values, trainable parameters, the memory estimate (and the budget verdict
when budget.memory_gb is set), the plan fingerprint. Jobs that compile to the same plan as an
earlier job are flagged as duplicates (training them again would train the same adapter), and
invalid points show their error. Exit status: 0 when every job is valid, 2 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftc.errors import PeftcError

if TYPE_CHECKING:
    from peftc.cli.main import CheckedJob
    from peftc.planning.plan import Plan


@dataclass
class PreviewRow:
    index: int
    overrides: list[str]
    plan: Plan | None = None
    error: PeftcError | None = None
    duplicate_of: int | None = None

    @property
    def status(self) -> str:
        if self.error is not None:
            return "invalid"
        return "duplicate" if self.duplicate_of is not None else "ok"


def preview_rows(jobs: list[CheckedJob]) -> list[PreviewRow]:
    """Plan every job that composed; flag identical plans and invalid points."""
    from peftc.planning import planner

    rows: list[PreviewRow] = []
    first_with: dict[str, int] = {}
    for index, job in enumerate(jobs):
        row = PreviewRow(index, job.overrides, error=job.error)
        if job.spec is not None:
            try:
                row.plan = planner.plan(job.spec)
            except PeftcError as exc:
                row.error = exc
        if row.plan is not None:
            row.duplicate_of = first_with.setdefault(row.plan.fingerprint, index)
            if row.duplicate_of == index:
                row.duplicate_of = None
        rows.append(row)
    return rows


def preview(jobs: list[CheckedJob]) -> int:
    """Print the preview table; the exit status (2 when any job is invalid)."""
    from rich.console import Console

    rows = preview_rows(jobs)
    console = Console(width=max(140, Console().width))
    console.print(preview_table(rows))
    invalid = [r for r in rows if r.status == "invalid"]
    duplicates = [r for r in rows if r.status == "duplicate"]
    distinct = len(rows) - len(invalid) - len(duplicates)
    console.print(
        f"{len(rows)} jobs: {distinct} distinct plans, {len(duplicates)} duplicates, {len(invalid)} invalid. "
        "Nothing was trained (dry_run=true)."
    )
    for row in invalid:
        console.print(f"job {row.index} ({' '.join(row.overrides) or 'defaults'}): error: {row.error}", markup=False)
    return 2 if invalid else 0


def preview_table(rows: list[PreviewRow]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    from peftc.cli.sweep import swept_keys
    from peftc.cli.sweep_rows import parse_overrides
    from peftc.planning.memory import GIB, budget_verdict
    from peftc.planning.render import human_bytes, human_count

    keys = swept_keys([r.overrides for r in rows])
    table = Table(title=f"sweep preview: {len(rows)} jobs (no weights loaded)", title_justify="left")
    for column in ("#", *keys, "method", "trainable", "memory (est.)", "fingerprint", "status"):
        table.add_column(column, justify="left" if column in ("method", "fingerprint", "status") else "right")
    for row in rows:
        values = parse_overrides(row.overrides)
        cells = [str(row.index), *(escape(values.get(k, "")) for k in keys)]
        plan = row.plan
        if plan is None:
            cells += ["", "", "", "", "INVALID (error below)"]
        else:
            verdict = budget_verdict(plan)
            memory = human_bytes(plan.memory.total)
            if verdict is not None:
                margin = human_bytes(abs(verdict["margin_gb"]) * GIB)
                memory += f" fits ({margin} spare)" if verdict["fits"] else f" OVER budget by {margin}"
            status = f"DUPLICATE of job {row.duplicate_of} (same plan)" if row.duplicate_of is not None else "ok"
            cells += [plan.method, human_count(plan.trainable_params), memory, plan.fingerprint, status]
        table.add_row(*cells)
    return table
