"""Config values are data: no config can name code to run, and none is read from the environment.

peftc has no `_target_` at all (components are chosen by group options, e.g. peft=lora), so any
of Hydra's instantiate keys is refused wherever it appears, including inside free-form mappings
such as model.config. Interpolations may only use OmegaConf's and Hydra's own non-evaluating
resolvers, and never `oc.env`: every config value ends up in plan.json, the adapter files and
the checkpoints, so an environment value (a token, a password) would be written to disk.
Refusing is safer than redacting: a redacted plan.json no longer reproduces or resumes the run.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig

from peftc.errors import ConfigError

CODE_KEYS = frozenset({"_target_", "_partial_", "_args_", "_recursive_", "_convert_"})
ENV_RESOLVERS = frozenset({"oc.env", "env"})
# OmegaConf's and Hydra's built-in resolvers; none of them evaluates code.
ALLOWED_RESOLVERS = frozenset(
    {"oc.create", "oc.decode", "oc.deprecated", "oc.dict.keys", "oc.dict.values", "oc.select", "hydra", "now"}
    | {"python_version"}
)
_RESOLVER = re.compile(r"\$\{\s*([A-Za-z_][\w.\-]*)\s*:")


def check_config(cfg: Any) -> None:
    """Refuse instantiate keys and environment or unknown resolvers anywhere in a composed config,
    and group options whose YAML is not a mapping."""
    from peftc.config.spec import GROUPS

    for group in GROUPS:
        node = cfg._get_node(group) if isinstance(cfg, DictConfig) and group in cfg else None
        if node is not None and not isinstance(node, DictConfig):
            raise ConfigError(group, None, "must be a mapping of settings", "its YAML file must hold key: value lines")
    for key, name, raw in _nodes(cfg, ""):
        if name in CODE_KEYS:
            raise code_key_error(key)
        if not isinstance(raw, str) or "${" not in raw:
            continue
        for resolver in _RESOLVER.findall(raw):
            if resolver in ENV_RESOLVERS:
                raise ConfigError(
                    key,
                    raw,
                    "reads an environment variable; config values are saved to plan.json, adapter files and "
                    "checkpoints, so a secret would be written to disk",
                    "pass the value itself (your shell can expand it: key=$VAR)",
                )
            if resolver not in ALLOWED_RESOLVERS:
                raise ConfigError(
                    key,
                    raw,
                    f"uses the resolver {resolver!r}, which peftc does not allow",
                    "allowed: " + ", ".join(sorted(ALLOWED_RESOLVERS)),
                )


def code_key_error(key: str) -> ConfigError:
    return ConfigError(
        key,
        None,
        "peftc never instantiates objects from a config (there is no _target_)",
        "remove it; choose components with group options such as peft=lora",
    )


def _nodes(node: Any, key: str) -> Iterator[tuple[str, str, Any]]:
    """(full key, own name, raw value) of every node, without resolving interpolations."""
    if isinstance(node, (DictConfig, ListConfig)):
        if node._is_interpolation():
            yield key, key.rsplit(".", 1)[-1], node._value()
            return
        if node._is_none() or node._is_missing():
            return
        children = node.keys() if isinstance(node, DictConfig) else range(len(node))
        for child_key in children:
            child = node._get_node(child_key)
            full = f"{key}.{child_key}" if key else str(child_key)
            if isinstance(child, (DictConfig, ListConfig)):
                yield full, str(child_key), None
                yield from _nodes(child, full)
            else:
                yield full, str(child_key), child._value() if child is not None else None
    elif isinstance(node, dict):  # plain containers (e.g. read back from a file)
        for child_key, child in node.items():
            full = f"{key}.{child_key}" if key else str(child_key)
            yield full, str(child_key), child if not isinstance(child, (dict, list)) else None
            yield from _nodes(child, full)
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from _nodes(child, f"{key}.{index}")
