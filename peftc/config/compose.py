"""The compose stage: Hydra config groups + overrides -> one composed config, and Hydra's
errors translated into ConfigError (key, bad value, what would work, a close match)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from peftc.config.registry import import_registries
from peftc.config.safety import CODE_KEYS, check_config, check_resolver, code_key_error, guarded_resolvers
from peftc.config.spec import RunSpec, reject_unknown_keys, unknown_key_error, validate
from peftc.errors import ConfigError, did_you_mean, first_line

# The command-line overrides of the job being run (set by the CLI; checkpoints record them so that
# resume= can replay them).
RUN_OVERRIDES: ContextVar[tuple[str, ...] | None] = ContextVar("peftc_run_overrides", default=None)
CONFIG_MODULE = "peftc.conf"
CONFIG_NAME = "config"
VERSION_BASE = "1.3"


def compose_error(exc: BaseException, config_dirs: Sequence[str] = ()) -> ConfigError:
    """Translate Hydra/OmegaConf composition errors into one ConfigError naming the key (and the
    file of the user's `config_dirs` it is in)."""
    from hydra.errors import MissingConfigException, OverrideParseException

    cause = _root_cause(exc)
    if isinstance(exc, MissingConfigException) or isinstance(cause, MissingConfigException):
        return _missing_option_error(exc if isinstance(exc, MissingConfigException) else cause)
    if isinstance(exc, OverrideParseException):
        return _override_parse_error(getattr(exc, "override", None) or "", exc.message)
    if isinstance(cause, OmegaConfBaseException):
        return _naming_config_file(_omegaconf_error(cause, str(exc)), str(exc), config_dirs)
    return _sweep_outside_multirun_error(str(exc)) or ConfigError("config", None, first_line(exc))


_OVERRIDE_FORM = "overrides look like key=value, group=option or +key=value, each one argument"


def _override_parse_error(override: str, message: str) -> ConfigError:
    """An override Hydra's grammar refuses, in one line; a word without `=` (`lora`, or
    `peft.r 8` split by the shell) says which override was probably meant."""
    if "=" not in override:
        return ConfigError("override", override, "has no '='", _meant_by_word(override))
    detail = " ".join(line.strip() for line in message.splitlines() if line.strip() and not line.startswith("See "))
    key, _, value = override.partition("=")
    if any(c == "~" or not c.isascii() for c in value) and not value.startswith(("'", '"')):
        # A home directory or a non-ASCII name: Hydra's grammar takes them only quoted.
        return ConfigError("override", override, f"cannot be parsed: {detail}", f"quote the value: {key}='{value}'")
    return ConfigError("override", override, f"cannot be parsed: {detail}", _OVERRIDE_FORM)


def _meant_by_word(override: str) -> str:
    from peftc.config.spec import GROUPS

    word = override.lstrip("+~")
    groups = [group for group in GROUPS if word in shipped_options(group)]
    if groups:
        return "did you mean " + " or ".join(f"{group}={word}" for group in groups) + "?"
    if word in GROUPS:
        return f"choose an option: {word}=<option> ({', '.join(shipped_options(word))})"
    if word.split(".")[0] in {f.name for f in dataclasses.fields(RunSpec)}:
        return f"give its value in the same argument: {override}=<value> (no spaces around '=')"
    return _OVERRIDE_FORM


def shipped_options(group: str) -> list[str]:
    """The options peftc ships for a config group (`peft` -> adalora, ..., vera)."""
    import importlib

    conf = Path(importlib.import_module(CONFIG_MODULE).__file__).parent
    return sorted(path.stem for path in (conf / group).glob("*.yaml"))


# Hydra's refusals of a sweep value in a single run, quoting the user's override.
_AMBIGUOUS_SWEEP = re.compile(r"Ambiguous value for argument '(?P<override>.*)'")
_SWEEP_NEEDS_MULTIRUN = re.compile(r"Sweep parameters '(?P<override>.*)' requires --multirun")
_HYDRA_SWEEP = re.compile(r"Sweeping over Hydra's configuration is not supported : '(?P<override>.*)'")


def _sweep_outside_multirun_error(message: str) -> ConfigError | None:
    """A comma, range() or choice() where one value belongs: what it means and the ways to say
    what was meant (Hydra's own advice spans four lines; this keeps it to one)."""
    match = next((m for p in (_AMBIGUOUS_SWEEP, _SWEEP_NEEDS_MULTIRUN, _HYDRA_SWEEP) if (m := p.search(message))), None)
    if match is None:
        return None
    key, _, value = match["override"].partition("=")
    as_text = f"for one string quote it: '{key}=\"{value}\"'"
    if key.startswith(("hydra.", "+hydra.", "++hydra.")):
        return ConfigError(key, value, "Hydra's own settings cannot be swept", f"give it one value; {as_text}")
    if match.re is _SWEEP_NEEDS_MULTIRUN:
        return ConfigError(key, value, "a sweep needs a multirun", "add -m to run one job per value")
    return ConfigError(
        key,
        value,
        "a comma-separated value is a sweep, and this is a single run",
        f"for a list write {key}=[{value}]; {as_text}; or add -m to run one job per value",
    )


# Hydra's prefix for an error in a config file it was composing (not in a command-line override).
_IN_CONFIG_FILE = re.compile(r"^In '(?P<path>[^']+)': ")


def _naming_config_file(error: ConfigError, outer: str, config_dirs: Sequence[str]) -> ConfigError:
    """A bad key or value in a YAML file (a user's --config-dir file) names that file; one
    from a command-line override names itself."""
    match = _IN_CONFIG_FILE.match(outer)
    if match is None:
        return error
    name = f"{match['path']}.yaml"
    found = (Path(d.removeprefix("file://")).expanduser() / name for d in config_dirs)
    return error.with_source(str(next((path for path in found if path.is_file()), name)))


def _root_cause(exc: BaseException) -> BaseException:
    """The first OmegaConf error in the chain (Hydra wraps them, sometimes only as context)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc.__cause__ if exc.__cause__ is not None else exc


def yaml_error(exc: BaseException) -> ConfigError:
    """A YAML file that cannot be read: which file, where, and why (never a traceback)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{mark.name}:{mark.line + 1}" if mark is not None else "config file"
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if "python/" in str(problem):
        return ConfigError(
            where, None, f"uses a Python-object YAML tag ({problem})", "peftc reads plain YAML only; remove the tag"
        )
    return ConfigError(where, None, f"is not valid YAML: {problem}", "check the indentation and brackets there")


def _omegaconf_error(cause: OmegaConfBaseException, outer: str) -> ConfigError:
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        MissingMandatoryValue,
        ValidationError,
    )

    key = getattr(cause, "full_key", None) or "config"
    schema = getattr(cause, "object_type", None)
    message = (getattr(cause, "msg", None) or str(cause)).strip().splitlines()[0]
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        name = getattr(cause, "key", None) or key.rsplit(".", 1)[-1]
        if str(name) in CODE_KEYS:
            return code_key_error(key)
        return unknown_key_error(key, str(name), schema if dataclasses.is_dataclass(schema) else None)
    if isinstance(cause, MissingMandatoryValue):
        return ConfigError(key, None, "is required but has no value", f"set {key}=<value>")
    if isinstance(cause, ValidationError):
        value = message.split("'")[1] if message.count("'") >= 2 else None
        return ConfigError(key, value, _type_problem(message, schema, key))
    return ConfigError(key, None, message)


def _type_problem(message: str, schema: Any, key: str) -> str:
    match = re.search(r"could not be converted to (\w+)", message)
    if match:
        return f"expected {match.group(1).lower()}"
    return message


# Names other tools give what is an option's setting here (or another group's option).
_OPTION_ELSEWHERE = {
    ("peft", "qlora"): "QLoRA is peft=lora with quant=bnb_nf4",
    ("peft", "dora"): "DoRA is peft=lora with peft.use_dora=true",
    ("peft", "rslora"): "rsLoRA is peft=lora with peft.use_rslora=true",
    ("peft", "pissa"): "PiSSA is peft=lora with peft.init_lora_weights=pissa",
    ("peft", "olora"): "OLoRA is peft=lora with peft.init_lora_weights=olora",
    ("quant", "4bit"): "4-bit is quant=bnb_nf4 (QLoRA's), bnb_fp4 or quanto_int4",
    ("quant", "load_in_4bit"): "4-bit is quant=bnb_nf4 (QLoRA's), bnb_fp4 or quanto_int4",
    ("quant", "nf4"): "NF4 is quant=bnb_nf4",
    ("quant", "null"): "no quantization is quant=none",
    ("quant", "false"): "no quantization is quant=none",
    ("quant", "8bit"): "8-bit is quant=bnb_int8, quanto_int8 or torchao_int8",
    ("quant", "load_in_8bit"): "8-bit is quant=bnb_int8, quanto_int8 or torchao_int8",
}


# A shipped preset (hydra/launcher=peftc_slurm) whose base config comes with a Hydra plugin.
_HYDRA_PLUGIN_MISSING = re.compile(
    r"In '(?P<group>hydra/\w+)/(?P<option>[^']+)': Could not load '(?P=group)/(?P<base>[^']+)'"
)
_HYDRA_PLUGINS = {
    "joblib": "hydra-joblib-launcher",
    "submitit_slurm": "hydra-submitit-launcher",
    "submitit_local": "hydra-submitit-launcher",
    "ray": "hydra-ray-launcher",
}


def _missing_option_error(exc: Any) -> ConfigError:
    text = str(exc)
    match = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    options = (
        re.findall(r"^\s+(\S+)\s*$", text.split("Available options", 1)[-1], re.M)
        if "Available options" in text
        else []
    )
    options = [o for o in options if not o.startswith("schema")]
    plugin = _HYDRA_PLUGIN_MISSING.search(text)
    if plugin and plugin["base"] in _HYDRA_PLUGINS:
        group, option, base = plugin["group"], plugin["option"], plugin["base"]
        return ConfigError(
            group,
            option,
            f"extends Hydra's {base} {group.removeprefix('hydra/')}, whose plugin is not installed",
            f"pip install {_HYDRA_PLUGINS[base]}",
        )
    if not match:
        return ConfigError("config", None, text.strip().splitlines()[0])
    group, option = match.group(1), match.group(2)
    hint = _OPTION_ELSEWHERE.get((group, option.lower())) or did_you_mean(option, options)
    allowed = "available: " + ", ".join(options) if options else None
    return ConfigError(group, option, f"no such {group} option", "; ".join(x for x in (hint, allowed) if x))


def compose(overrides: Sequence[str] = (), *, config_name: str = CONFIG_NAME, with_hydra: bool = False) -> DictConfig:
    """Compose peftc's config with Hydra overrides, translating errors into ConfigError.

    User config directories join through a `hydra.searchpath=[file://DIR]` override. Safe to
    call inside a running Hydra app: the global Hydra state is saved and restored. `with_hydra`
    keeps the `hydra` node (for `hydra_runtime`).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    from yaml import YAMLError

    import_registries()
    check_search_path(overrides, config_name)
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base=VERSION_BASE):
            _add_config_dirs(searchpath_dirs(overrides))
            groups = set(GlobalHydra.instance().config_loader().list_groups(""))
            overrides = [option_by_name(o, groups) for o in overrides]
            return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=with_hydra)
    except (HydraException, OmegaConfBaseException) as exc:
        raise compose_error(exc, searchpath_dirs(overrides)) from exc
    except YAMLError as exc:
        raise yaml_error(exc) from exc
    finally:
        if backup is not None:
            restore_gh_from_backup(backup)


def option_by_name(override: str, groups: set[str]) -> str:
    """`model=1`, `quant=null`: a group's option given as a number, a boolean or null is read as
    the option's name (Hydra's parser types the value and then fails with a ValueError), so that
    a name no option has is answered with the options there are."""
    key, equals, value = override.partition("=")
    if not equals or key.lstrip("+~") not in groups or value.startswith(("'", '"')):
        return override
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        (parsed,) = OverridesParser.create().parse_overrides([override])
    except HydraException:
        return override  # Hydra's own parse error, translated where it is raised
    if parsed.is_sweep_override() or isinstance(parsed.value(), str):
        return override
    return f"{key}='{value.replace(chr(39), chr(92) + chr(39))}'"


@contextlib.contextmanager
def hydra_runtime(cfg: DictConfig, job_num: int | None = None) -> Iterator[DictConfig]:
    """The job's config (without `hydra`) with `${hydra:...}` resolvable as in the job Hydra will
    run, for checks made before Hydra starts: the composed `hydra` node is installed as Hydra's
    config, its runtime.output_dir being the run directory (or sweep directory + job number) that
    Hydra will create. The previous Hydra config is restored afterwards."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals

    setup_globals()  # ${hydra:...} and ${now:...}: Hydra registers them only when it starts
    if "hydra" not in cfg:
        yield cfg
        return
    _fill_runtime(cfg, job_num)
    instance = HydraConfig.instance()
    previous = instance.cfg
    instance.set_config(cfg)
    job = cfg.copy()
    with open_dict(job):
        del job["hydra"]
    try:
        yield job
    finally:
        instance.cfg = previous


def _fill_runtime(cfg: DictConfig, job_num: int | None) -> None:
    """What Hydra sets when a job starts; left missing where the user's run/sweep directory itself
    cannot be resolved (its own error comes when it is used)."""
    hydra = cfg.hydra
    with open_dict(hydra):
        try:
            if job_num is None:
                directory = str(hydra.run.dir)
            else:
                hydra.job.num = job_num
                directory = os.path.join(str(hydra.sweep.dir), str(hydra.sweep.subdir))
        except OmegaConfBaseException:
            return
        if OmegaConf.is_missing(hydra.runtime, "output_dir"):
            hydra.runtime.output_dir = os.path.abspath(directory)
        if OmegaConf.is_missing(hydra.runtime, "cwd"):
            hydra.runtime.cwd = os.getcwd()


def searchpath_dirs(overrides: Sequence[str]) -> list[str]:
    """The directories of `hydra.searchpath=[...]` overrides (how `--config-dir` reaches here)."""
    dirs: list[str] = []
    for override in overrides:
        key, _, value = override.lstrip("+").partition("=")
        if key == "hydra.searchpath":
            dirs += [d.strip().strip("'\"") for d in value.strip("[]").split(",") if d.strip()]
    return dirs


def check_search_path(overrides: Sequence[str], config_name: str = CONFIG_NAME) -> None:
    """Every config search-path entry is a directory. Hydra's other schemes import Python code
    to find configs (`pkg://X` imports package X, running its __init__; `structured://X` imports
    module X), so a search path from the command line, or from a user's primary config (the one
    place Hydra reads `hydra.searchpath` from a file), is refused unless it is `file://` or a
    plain path. Runs before anything composes."""
    dirs = searchpath_dirs(overrides)
    for entry in dirs:
        _check_search_entry(entry, "hydra.searchpath")
    for entry in dirs:
        primary = Path(entry.removeprefix("file://")) / f"{config_name}.yaml"
        for listed in _primary_search_path(primary):
            _check_search_entry(listed, f"{primary}: hydra.searchpath")


def _check_search_entry(entry: str, key: str) -> None:
    scheme = entry.split("://", 1)[0] if "://" in entry else "file"
    if scheme != "file":
        target = entry.split("://", 1)[1]
        raise ConfigError(
            key,
            entry,
            f"makes Hydra import the Python module {target!r} (running its code) to look for configs",
            "give a config directory: --config-dir DIR or hydra.searchpath=[file://DIR]",
        )


def _primary_search_path(path: Path) -> list[str]:
    """`hydra.searchpath` of a user's primary config file, read as plain YAML (unreadable files
    are left to the composition, which names their problem)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return []
    hydra = data.get("hydra") if isinstance(data, dict) else None
    listed = hydra.get("searchpath") if isinstance(hydra, dict) else None
    return [str(e) for e in listed] if isinstance(listed, list) else [str(listed)] if listed else []


def _add_config_dirs(dirs: Sequence[str]) -> None:
    """Add user config directories to the search path as Hydra's `--config-dir` does (before
    the schema source), so that a primary config (`--config-name`) there is found too; a
    `hydra.searchpath` override alone only reaches group options."""
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    if not dirs:
        return
    from hydra._internal.config_repository import ConfigRepository

    loader = GlobalHydra.instance().hydra.config_loader
    for directory in dirs:
        loader.get_search_path().prepend(
            provider="command-line", path=directory, anchor=SearchPathQuery(provider="schema")
        )
    loader.repository = ConfigRepository(config_search_path=loader.get_search_path())  # built from the path once


def refuse_interpolated_nodes(cfg: DictConfig) -> None:
    """An interpolation must give what its key holds. OmegaConf lets `budget=${seed}` stand for
    a node of settings and `peft.rank_pattern=${trainer}` put a node where a value belongs, and
    the spec would then hold a number where its settings belong (or the reverse). Named here,
    with the text as written."""
    for f in dataclasses.fields(RunSpec):
        if f.name in cfg:
            _check_interpolations(cfg, f.name, f.name)


def _check_interpolations(parent: Any, key: Any, full_key: str) -> None:
    from omegaconf import Container, DictConfig

    node = parent._get_node(key)
    if node._is_interpolation():
        try:
            target = node._maybe_dereference_node()
        except Exception:  # noqa: BLE001 - a missing key or refused resolver is reported by to_spec
            return
        holds_node, gives_node = isinstance(node, Container), isinstance(target, Container)
        same_kind = type(node) is type(target) if holds_node and gives_node else holds_node == gives_node
        schema = node._metadata.ref_type if isinstance(node, DictConfig) else None  # e.g. BudgetSpec
        if same_kind and isinstance(schema, type) and dataclasses.is_dataclass(schema):
            same_kind = target._metadata.object_type is schema
        if not same_kind:
            raise ConfigError(
                full_key, node._value(), f"holds {_kind(node)}; the interpolation gives {_kind(target)}",
                "give the value itself, or interpolate a key of the same kind",
            )  # fmt: skip
    elif isinstance(node, Container):
        for child in node.keys() if isinstance(node, DictConfig) else range(len(node)):
            _check_interpolations(node, child, f"{full_key}.{child}")


def _kind(node: Any) -> str:
    from omegaconf import AnyNode, DictConfig, ListConfig

    if isinstance(node, ListConfig):
        return "a list"
    if isinstance(node, DictConfig):
        return f"a group of settings ({node._get_full_key(None)}.*)"
    return "a value" if isinstance(node, AnyNode) else "a single value"


def to_spec(cfg: DictConfig) -> RunSpec:
    """Convert a composed config into a sealed RunSpec and run every semantic check."""
    check_config(cfg)
    reject_unknown_keys(cfg, RunSpec, "")
    with guarded_resolvers() as refused:
        refuse_interpolated_nodes(cfg)  # resolves interpolations: under the same guard as to_object
        try:
            spec = OmegaConf.to_object(cfg)
        except OmegaConfBaseException as exc:
            if refused:  # a resolver built at resolution time (oc.decode, oc.create) that is not allowed
                check_resolver(getattr(exc, "full_key", None) or "config", None, refused[0])
            raise compose_error(exc) from exc
    if not isinstance(spec, RunSpec):
        raise ConfigError(
            "<root>",
            type(spec).__name__,
            "the config does not extend run_schema",
            "start from peftc's conf/config.yaml",
        )
    validate(spec)
    return spec
