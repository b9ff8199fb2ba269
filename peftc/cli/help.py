"""`python -m peftc --help` and `--version`: peftc's own pages, written from the schemas.

`--help` lists each config group with its options and the run-level keys with their help;
`--help peft=lora` (any group=option overrides) lists the keys of the chosen options with the
values they would take and what each means. Hydra's generic page stays at `--hydra-help`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftc.config.compose import CONFIG_MODULE, compose, shipped_options, to_spec
from peftc.config.spec import GROUPS, RunSpec, SpecNode, describe

USAGE = """usage: python -m peftc [group=option ...] [key=value ...]     train (the default: LoRA, causal LM, tiny pretrained Llama)
       python -m peftc ... dry_run=true                          print the plan, load no weights
       python -m peftc -m key=a,b,c ...                          sweep: one job per value
       python -m peftc --help group=option ...                   the keys of those options, with their values
       python -m peftc --version | --hydra-help | --cfg job"""


def version_text() -> str:
    from peftc.version import __version__

    return f"peftc {__version__}"


def help_text(overrides: Sequence[str]) -> str:
    """The general page, or (with group=option overrides) the chosen options' keys."""
    chosen = dict(o.split("=", 1) for o in overrides if "=" in o and o.split("=", 1)[0] in GROUPS)
    if not chosen:
        return general_page()
    spec = to_spec(compose(list(overrides)))
    return "\n\n".join(group_page(group, option, getattr(spec, group)) for group, option in chosen.items())


def general_page() -> str:
    lines = [USAGE, "", "config groups (pick one option each; defaults marked *):"]
    defaults = default_options()
    for group in GROUPS:
        current = defaults.get(group)
        options = ", ".join(f"{name}*" if name == current else name for name in shipped_options(group))
        lines.append(f"  {group:<8} {options}")
    lines += ["", "run-level keys:"]
    for name, default, text in describe(RunSpec):
        if name in GROUPS:
            continue
        if dataclasses.is_dataclass(default):  # a nested section such as budget: its own keys
            lines += [_key_line(f"{name}.{sub}", value, help_) for sub, value, help_ in describe(type(default))]
        else:
            lines.append(_key_line(name, default, text))
    lines += ["", "`python -m peftc --help peft=lora` lists an option's keys, e.g. peft.r, with their values."]
    return "\n".join(lines)


def group_page(group: str, option: str, node: SpecNode) -> str:
    lines = [f"{group}={option} ({type(node).__name__}):"]
    for name, _default, text in describe(type(node)):
        lines.append(_key_line(f"{group}.{name}", getattr(node, name), text))
    return "\n".join(lines)


def default_options() -> dict[str, str]:
    """group -> option chosen by conf/config.yaml's defaults list (data follows the task)."""
    import yaml

    conf = Path(importlib.import_module(CONFIG_MODULE).__file__).parent
    entries = yaml.safe_load((conf / "config.yaml").read_text())["defaults"]
    chosen = {k: str(v) for entry in entries if isinstance(entry, dict) for k, v in entry.items()}
    if chosen.get("data", "").startswith("${"):
        chosen["data"] = chosen.get("task", "")
    return chosen


def _key_line(key: str, value: Any, text: str) -> str:
    shown = _plain(value)
    return f"  {key} = {shown}\n      {text}" if text else f"  {key} = {shown}"


def _plain(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return "{...}"
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    return "null" if value is None else str(value)
