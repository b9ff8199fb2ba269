"""`explain=true`: where every config value came from (the replay of Hydra's composition is
`peftc.config.provenance`, which the config safety check shares)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import ListConfig, OmegaConf

from peftc.config.compose import CONFIG_NAME


@dataclass(frozen=True)
class Provenance:
    key: str
    value: Any
    source: str


def explain(overrides: Sequence[str], search: Sequence[str] = (), config_name: str = CONFIG_NAME) -> list[Provenance]:
    """Every leaf key of the composed config (hydra.* left out) with its value and source, composed
    as the run will be: with the user's config directories (`search`) and primary config name."""
    from peftc.config.compose import compose, hydra_runtime
    from peftc.config.provenance import compose_with_sources
    from peftc.config.safety import guarded_resolvers

    every = [*search, *overrides]
    composed = compose(every, config_name=config_name, with_hydra=True)  # a bad override: a ConfigError first
    composition = compose_with_sources(every, config_name)
    with hydra_runtime(composed) as job, guarded_resolvers():
        values = OmegaConf.to_container(job, resolve=True)
    flat = _flatten(values)
    return [Provenance(k, v, composition.source(k).label) for k, v in flat.items()]


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            if not prefix and key == "hydra":
                continue
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: list(data) if isinstance(data, (list, ListConfig)) else data}


def print_explanations(
    jobs: Sequence[Sequence[str]], search: Sequence[str] = (), config_name: str = CONFIG_NAME
) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=max(120, Console().width))
    for overrides in jobs:
        table = Table(
            title=f"where each value comes from: {escape(' '.join(overrides)) or 'defaults'}", title_justify="left"
        )
        for column in ("key", "value", "source"):
            table.add_column(column)
        for item in explain(overrides, search, config_name):
            table.add_row(item.key, escape(repr(item.value)), escape(item.source))
        console.print(table)
