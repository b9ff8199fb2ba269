"""Config values are data: no config can name code to run, and none is read from the environment.

peftc has no `_target_` of its own outside `hydra.*` (components are chosen by group options,
e.g. peft=lora), so Hydra's instantiate keys are refused wherever they appear, including inside
free-form mappings such as model.config and inside `hydra.*` (callbacks, launchers, sweepers,
logging handlers are all instantiated by Hydra). The only ones allowed are those that peftc's and
Hydra's own packaged configs set (the sweep-summary callback, the launcher presets); that is
decided by where the value came from (`peftc.config.provenance`), never by the key's name alone.

Interpolations may only call OmegaConf's and Hydra's own non-evaluating resolvers, and never
`oc.env`: every config value ends up in plan.json, the adapter files and the checkpoints, so an
environment value (a token, a password) would be written to disk. Refusing is safer than
redacting: a redacted plan.json no longer reproduces or resumes the run. Two checks: each value
is parsed with OmegaConf's interpolation grammar and the resolver names it calls are checked
(a name built from another interpolation is refused), and every resolution peftc performs runs
with only the allowed resolvers registered (`guarded_resolvers`), so what `oc.decode` or
`oc.create` build at resolution time is checked too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig

from peftc.errors import ConfigError

if TYPE_CHECKING:
    from peftc.config.provenance import Composition

CODE_KEYS = frozenset({"_target_", "_partial_", "_args_", "_recursive_", "_convert_"})
# logging.config.dictConfig imports and calls these (Hydra hands it hydra.job_logging).
LOGGING_CODE_KEYS = frozenset({"()", "class"})
LOGGING_SECTIONS = ("hydra.job_logging.", "hydra.hydra_logging.")
# Hydra's record of the command line (the override strings), checked where each one lands.
RAW_OVERRIDES = ("hydra.overrides.", "hydra.job.override_dirname")
ENV_RESOLVERS = frozenset({"oc.env", "env"})
ENV_COPY = "hydra.job.env_copy."  # Hydra copies these variables' values into hydra.job.env_set
# A launcher setting made of shell commands (hydra-submitit-launcher writes these lines into the
# job's sbatch script).
SHELL_KEY = "hydra.launcher.setup"
# OmegaConf's and Hydra's built-in resolvers; none of them evaluates code.
ALLOWED_RESOLVERS = frozenset(
    {"oc.create", "oc.decode", "oc.deprecated", "oc.dict.keys", "oc.dict.values", "oc.select", "hydra", "now"}
    | {"python_version"}
)


def check_config(cfg: Any, composition: Composition | None = None) -> None:
    """Refuse instantiate keys and environment or unknown resolvers anywhere in a composed config,
    and group options whose YAML is not a mapping. With a `composition` (the whole config with
    its sources, hydra.* included), instantiate keys set by peftc's or Hydra's packaged configs
    are allowed and a refusal names the file or override that set the key."""
    from peftc.config.spec import GROUPS

    for group in GROUPS:
        node = cfg._get_node(group) if isinstance(cfg, DictConfig) and group in cfg else None
        if node is not None and not isinstance(node, DictConfig):
            raise ConfigError(group, None, "must be a mapping of settings", "its YAML file must hold key: value lines")
    # The job's own keys first: a refusal names the key the user set, not Hydra's copy of it.
    for key, name, raw in sorted(_nodes(cfg, ""), key=lambda node: node[0].startswith("hydra.")):
        if key.startswith(RAW_OVERRIDES):
            continue
        source = composition.source(key) if composition is not None else None
        packaged = source is not None and source.packaged
        if _is_code_key(key, name) and not packaged:
            raise code_key_error(key, _label(source))
        if (key == SHELL_KEY or key.startswith(SHELL_KEY + ".")) and raw not in (None, []) and not packaged:
            raise ConfigError(
                key,
                raw,
                _with_source("is a shell command the launcher would run", _label(source)),
                "prepare the job's environment yourself (a module load or venv in your own sbatch setup)",
            )
        if key.startswith(ENV_COPY) and not packaged:
            raise ConfigError(
                key,
                raw,
                _with_source("copies an environment variable into the config Hydra saves to .hydra/", _label(source)),
                "set the value you need with hydra.job.env_set.NAME=value instead",
            )
        if isinstance(raw, str) and "${" in raw:
            for resolver in called_resolvers(raw):
                check_resolver(key, raw, resolver, _label(source))


def _label(source: Any) -> str | None:
    return source.label if source is not None else None


def _is_code_key(key: str, name: str) -> bool:
    return name in CODE_KEYS or (name in LOGGING_CODE_KEYS and key.startswith(LOGGING_SECTIONS))


def code_key_error(key: str, source: str | None = None) -> ConfigError:
    return ConfigError(
        key,
        None,
        _with_source("peftc never instantiates objects from a config (there is no _target_)", source),
        "remove it; Hydra callbacks, launchers and loggers come only from peftc's packaged configs "
        "(e.g. hydra/launcher=peftc_joblib)"
        if key.startswith("hydra.")
        else "remove it; choose components with group options such as peft=lora",
    )


def check_resolver(key: str, raw: Any, resolver: str | None, source: str | None = None) -> None:
    """Refuse a resolver call (None: a resolver whose name is itself built by an interpolation)."""
    if resolver is None:
        raise ConfigError(
            key,
            raw,
            _with_source(
                "builds a resolver name from another interpolation, so what would be called is not known in advance",
                source,
            ),
            "write the resolver name out, e.g. ${oc.select:key}",
        )
    if resolver in ENV_RESOLVERS:
        raise ConfigError(
            key,
            raw,
            _with_source(
                "reads an environment variable; config values are saved to plan.json, adapter files and "
                "checkpoints, so a secret would be written to disk",
                source,
            ),
            "pass the value itself (your shell can expand it: key=$VAR)",
        )
    if resolver not in ALLOWED_RESOLVERS:
        raise ConfigError(
            key,
            raw,
            _with_source(f"uses the resolver {resolver!r}, which peftc does not allow", source),
            "allowed: " + ", ".join(sorted(ALLOWED_RESOLVERS)),
        )


def _with_source(problem: str, source: str | None) -> str:
    return f"{problem} [source: {source}]" if source else problem


def called_resolvers(text: str) -> list[str | None]:
    """The resolver names an interpolation string calls, read from OmegaConf's parse tree
    (nested and quoted interpolations included); None for a name built by interpolation.
    A string OmegaConf cannot parse calls nothing (resolving it fails on its own)."""
    from omegaconf import grammar_parser
    from omegaconf.errors import GrammarParseError
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser

    try:
        tree = grammar_parser.parse(text)
    except GrammarParseError:
        return []
    names: list[str | None] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, OmegaConfGrammarParser.ResolverNameContext):
            names.append(None if node.interpolation() else node.getText())
        pending.extend(node.getChildren() if hasattr(node, "getChildren") else [])
    return names


class ResolverRefused(Exception):
    """Raised inside OmegaConf's resolution when a resolver peftc does not allow is called."""


@contextmanager
def guarded_resolvers() -> Iterator[list[str]]:
    """While inside, only the allowed resolvers can be called; the names of refused calls are
    collected in the yielded list (OmegaConf wraps the exception and drops its cause)."""
    from omegaconf.basecontainer import BaseContainer

    refused: list[str] = []
    registered = BaseContainer._resolvers

    def refuse(name: str) -> Any:
        def resolver(*args: Any, **kwargs: Any) -> Any:
            refused.append(name)
            raise ResolverRefused(name)

        return resolver

    class Guarded(dict):
        def __contains__(self, name: object) -> bool:
            return True

        def __getitem__(self, name: str) -> Any:
            return registered[name] if name in ALLOWED_RESOLVERS and name in registered else refuse(name)

    BaseContainer._resolvers = Guarded()
    try:
        yield refused
    finally:
        BaseContainer._resolvers = registered


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
