"""Where every value of a composed config came from, `hydra.*` included.

Hydra composes a config by merging, in order, the entries of its defaults list (each group
option's schema, then its YAML file, then the primary config) and finally the command-line
overrides. Replaying that order key by key tells, for every value, the last thing that set it:
a schema default (the dataclass field), a YAML file of a group option (and whether that option
was chosen on the command line or by the defaults list), or an override (`+key=` marked as an
added key). `explain=true` prints it; the config safety check uses it to tell peftc's and
Hydra's own packaged configs (trusted: their `_target_`s are the sweep-summary callback and the
launchers) from anything a user or a stranger wrote (a `--config-dir` file, an override).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from peftc.config.compose import (
    CONFIG_MODULE,
    CONFIG_NAME,
    check_search_path,
    compose_error,
    option_by_name,
    searchpath_dirs,
    yaml_error,
)
from peftc.config.safety import check_config
from peftc.errors import ConfigError

# Config sources shipped inside installed packages: peftc's conf/, Hydra's own, the structured
# configs registered in Hydra's ConfigStore (peftc's schemas, the launcher plugins') and the
# configs installed Hydra plugins ship (hydra_plugins.*, e.g. hydra/job_logging=colorlog).
PACKAGED_SOURCES = frozenset({f"pkg://{CONFIG_MODULE}", "pkg://hydra.conf", "structured://"})
PLUGIN_SOURCES = "pkg://hydra_plugins."


@dataclass(frozen=True)
class Source:
    label: str
    packaged: bool  # set by a config shipped with peftc or Hydra, not by the user
    user_file: bool = False  # a YAML file of the user's (a --config-dir or primary config)


UNKNOWN = Source("unknown", packaged=False)


@dataclass(frozen=True)
class Composition:
    config: DictConfig  # the whole composed config, hydra.* included, unresolved
    sources: dict[str, Source]  # key -> the last thing that set it (or a parent of it)

    def source(self, key: str) -> Source:
        """The source of a key, or of the nearest parent a source set (a dict-valued override)."""
        while key:
            if key in self.sources:
                return self.sources[key]
            key = key.rpartition(".")[0]
        return UNKNOWN

    def naming_user_file(self, error: ConfigError) -> ConfigError:
        """`error`, naming the user's config file that set its key: an override names itself
        on the command line, a value from a file of theirs would otherwise be hard to find."""
        source = self.source(error.key)
        return error.with_source(source.label) if source.user_file else error


def compose_with_sources(overrides: Sequence[str], config_name: str = CONFIG_NAME) -> Composition:
    """Compose like Hydra's own run does (hydra.* kept) and record each key's source."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    from peftc.config.registry import import_registries

    import_registries()
    check_search_path(overrides, config_name)
    loader = _recording_loader(searchpath_dirs(overrides))
    groups = set(loader.list_groups(""))
    overrides = [option_by_name(o, groups) for o in overrides]
    try:
        config = loader.load_configuration(config_name, list(overrides), RunMode.RUN)
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise compose_error(exc, searchpath_dirs(overrides)) from exc
    except YAMLError as exc:
        raise yaml_error(exc) from exc
    defaults, repo = loader.composed
    return Composition(config, _replay(defaults, repo, parsed, set(config.hydra.runtime.choices)))


def _recording_loader(config_dirs: Sequence[str] = ()) -> Any:
    """Hydra's config loader, keeping the defaults list it composed the config from (composing
    once tells both the config and where each part came from)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery

    class RecordingLoader(ConfigLoaderImpl):
        composed: tuple[list[Any], Any] = ([], None)

        def _compose_config_from_defaults_list(self, defaults: list[Any], repo: Any) -> DictConfig:
            self.composed = (defaults, repo)
            return super()._compose_config_from_defaults_list(defaults=defaults, repo=repo)

    search_path = create_config_search_path(f"pkg://{CONFIG_MODULE}")
    for directory in config_dirs:  # as --config-dir: a primary config there is found too
        search_path.prepend(provider="command-line", path=directory, anchor=SearchPathQuery(provider="schema"))
    return RecordingLoader(config_search_path=search_path)


def _replay(defaults: list[Any], repo: Any, parsed: list[Any], groups: set[str]) -> dict[str, Source]:
    """Key -> source, replaying the defaults list in order, then the command line's config
    overrides (those whose key is not a config group: peft.r=4, not peft=lora)."""
    chosen_on_cli = {o.key_or_group for o in parsed if o.key_or_group in groups}
    sources: dict[str, Source] = {}
    for entry in defaults:
        if entry.config_path is None:
            continue
        loaded = repo.load_config(entry.config_path)
        if loaded is None or not isinstance(loaded.config, DictConfig):  # a list: check_config refuses it
            continue
        body = OmegaConf.masked_copy(loaded.config, [k for k in loaded.config if k != "defaults"])
        packaged = loaded.path in PACKAGED_SOURCES or loaded.path.startswith(PLUGIN_SOURCES)
        user_file = not packaged and not loaded.is_schema_source
        source = Source(_label(entry, loaded, chosen_on_cli), packaged=packaged, user_file=user_file)
        for key in _leaf_keys(body, entry.package or ""):
            sources[key] = source
    for override in parsed:
        if override.key_or_group in groups:
            continue
        how = "added by command line" if override.is_add() or override.is_force_add() else "command line"
        _mark(sources, override.key_or_group, Source(f"{how}: {override.input_line}", packaged=False))
    return sources


def _label(entry: Any, loaded: Any, chosen_on_cli: set[str]) -> str:
    path = entry.config_path
    if loaded.is_schema_source:
        node = loaded.config
        schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        return f"schema default ({getattr(schema, '__name__', path)})"
    if loaded.path == "pkg://hydra.conf" or loaded.path.startswith(PLUGIN_SOURCES):
        return f"Hydra's {path}"
    if loaded.path != f"pkg://{CONFIG_MODULE}":
        return f"{loaded.path.removeprefix('file://')}/{path}.yaml"
    if path == CONFIG_NAME:
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


def _mark(sources: dict[str, Source], key: str, source: Source) -> None:
    """An override sets the key and everything below it (a dict-valued override)."""
    for existing in [k for k in sources if k == key or k.startswith(key + ".")]:
        sources[existing] = source
    sources[key] = source


def check_sources(overrides: Sequence[str], config_name: str = CONFIG_NAME) -> Composition:
    """Refuse code keys and environment reads in the whole config Hydra would run, hydra.*
    included; code keys pass only where peftc's or Hydra's packaged configs set them. Returns
    that config (unresolved), checked, with its sources."""
    composition = compose_with_sources(overrides, config_name)
    check_config(composition.config, composition)
    return composition
