"""`explain=true`: where every config value came from.

Hydra composes a config by merging, in order, the entries of its defaults list (each group
option's schema, then its YAML file, then the primary config) and finally the command-line
overrides. Replaying that order key by key tells, for every value, the last thing that set it:
a schema default (the dataclass field), a YAML file of a group option (and whether that option
was chosen on the command line or by the defaults list), or an override (`+key=` marked as an
added key).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


@dataclass(frozen=True)
class Provenance:
    key: str
    value: Any
    source: str


def explain(overrides: Sequence[str]) -> list[Provenance]:
    """Every leaf key of the composed config (hydra.* left out) with its value and source."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.types import RunMode

    from peftc.config.compose import CONFIG_MODULE, CONFIG_NAME, compose
    from peftc.config.registry import import_registries

    composed = compose(overrides)  # also turns a bad override into a ConfigError first
    import_registries()
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(f"pkg://{CONFIG_MODULE}"))
    defaults = loader.compute_defaults_list(CONFIG_NAME, list(overrides), RunMode.RUN)
    chosen_on_cli = {group for group, meta in defaults.overrides.override_metadata.items() if meta.external_override}
    sources: dict[str, str] = {}
    for entry in defaults.defaults:
        if entry.config_path is None or (entry.package or "").startswith("hydra"):
            continue
        loaded = loader.repository.load_config(entry.config_path)
        if loaded is None:
            continue
        body = OmegaConf.masked_copy(loaded.config, [k for k in loaded.config if k not in ("defaults", "hydra")])
        label = _label(entry, loaded, chosen_on_cli)
        for key in _leaf_keys(body, entry.package or ""):
            sources[key] = label
    for override in defaults.overrides.config_overrides:
        how = "added by command line" if override.is_add() or override.is_force_add() else "command line"
        _mark(sources, override.key_or_group, f"{how}: {override.input_line}")
    values = OmegaConf.to_container(composed, resolve=True)
    flat = _flatten(values)
    return [Provenance(k, v, _source(sources, k)) for k, v in flat.items()]


def _label(entry: Any, loaded: Any, chosen_on_cli: set[str]) -> str:
    path = entry.config_path
    if loaded.is_schema_source:
        node = loaded.config
        schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        return f"schema default ({getattr(schema, '__name__', path)})"
    if path == "config":
        return "conf/config.yaml"
    group, _, option = path.rpartition("/")
    how = "command line" if group in chosen_on_cli else "defaults list"
    return f"conf/{path}.yaml ({group}={option}, chosen by {how})"


def _leaf_keys(node: Any, prefix: str) -> list[str]:
    if isinstance(node, DictConfig) and len(node) > 0:
        keys = []
        for name in node:
            keys += _leaf_keys(node._get_node(name), f"{prefix}.{name}" if prefix else str(name))
        return keys
    return [prefix] if prefix else []


def _mark(sources: dict[str, str], key: str, label: str) -> None:
    """An override sets the key and everything below it (a dict-valued override)."""
    for existing in [k for k in sources if k == key or k.startswith(key + ".")]:
        sources[existing] = label
    sources[key] = label


def _source(sources: dict[str, str], key: str) -> str:
    while key:
        if key in sources:
            return sources[key]
        key = key.rpartition(".")[0]
    return "unknown"


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            if not prefix and key == "hydra":
                continue
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: list(data) if isinstance(data, (list, ListConfig)) else data}


def print_explanations(jobs: Sequence[Sequence[str]]) -> None:
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
        for item in explain(overrides):
            table.add_row(item.key, escape(repr(item.value)), escape(item.source))
        console.print(table)
