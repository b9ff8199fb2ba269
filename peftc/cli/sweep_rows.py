"""Reading sweep rows: the overrides a job ran with, and its metrics (summary table and plot)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """{'peft.r': '8', 'peft': 'lora'} from ['peft.r=8', 'peft=lora'] (+/++ prefixes dropped)."""
    pairs = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and not key.startswith("~"):
            pairs[key.lstrip("+")] = value
    return pairs


def metric_of(row: dict[str, Any], metric: str) -> float | None:
    value = row.get(metric)
    return float(value) if isinstance(value, (int, float)) else None
