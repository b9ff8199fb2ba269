"""Screening adapter_config.json: an adapter from a stranger is data, never code.

Only fields that peft itself defines for the file's peft_type (the table in
`assets/peft_config_fields.json`, generated from peft and checked against it by the tests) or
that the method's own schema declares are passed on. Unknown fields, e.g. from a newer peft,
are dropped with one warning, as peft does. Fields that could run code or fetch remote code are
refused outright: `_target_` anywhere (peftc never instantiates from a config),
`trust_remote_code: true` anywhere, non-empty loader kwargs (`tokenizer_kwargs`, the
peft#2888 route to remote code), and URLs where a local path or hub id is expected.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from peftc.config.safety import CODE_KEYS  # the Hydra instantiate keys, refused in configs too
from peftc.errors import AdapterFileError

FIELD_TABLE = Path(__file__).resolve().parents[1] / "assets" / "peft_config_fields.json"
# Written by every peft config class (PeftConfigMixin / PeftConfig).
COMMON_FIELDS = frozenset(
    {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version"}
)
LOADER_KWARGS = frozenset({"tokenizer_kwargs", "model_kwargs", "trust_remote_code_kwargs", "loader_kwargs"})
PATH_SUFFIXES = ("_path", "_name_or_path", "_dir", "_file")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    return json.loads(FIELD_TABLE.read_text())


def peft_fields() -> dict[str, frozenset[str]]:
    """peft's config fields per peft_type (for the peft release `peft_table_version()`)."""
    return {peft_type: frozenset(fields) for peft_type, fields in _table()["fields"].items()}


def peft_table_version() -> str:
    return str(_table()["peft_version"])


def known_fields(peft_type: str, schema: type | None, legacy: frozenset[str] = frozenset()) -> frozenset[str]:
    import dataclasses

    own = {f.name for f in dataclasses.fields(schema)} if schema is not None else set()
    return peft_fields().get(peft_type, frozenset()) | COMMON_FIELDS | own | legacy


def screen(
    config: Mapping[str, Any], source: str, schema: type | None, legacy: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The fields peftc may read; refuses code-carrying fields, warns once about unknown ones.
    `legacy`: fields an older peft wrote that the method still reads (Method.legacy_fields)."""
    refuse_code(config, source)
    known = known_fields(str(config.get("peft_type")), schema, legacy)
    unknown = sorted(set(config) - known)
    if unknown:
        warnings.warn(
            f"{source}: unexpected fields {unknown} for peft_type {config.get('peft_type')!r}, these are ignored "
            f"({_writer(config)}; peftc reads the fields of peft {peft_table_version()})",
            UserWarning,
            stacklevel=3,
        )
    return {key: value for key, value in config.items() if key in known}


def _writer(config: Mapping[str, Any]) -> str:
    """Which peft probably wrote a config with fields peft's table lacks: a newer one, or an older
    one whose fields peft has since dropped (peft writes peft_version from 0.18 on)."""
    from packaging.version import InvalidVersion, Version

    written = config.get("peft_version")
    if not isinstance(written, str):
        return "probably written by a peft before 0.18, which had fields peft has since dropped"
    try:
        newer = Version(written.split("@")[0]) > Version(peft_table_version())
    except InvalidVersion:
        return f"written by peft {written!r}"
    return f"written by peft {written}" + ("" if newer else ", whose fields peft has since dropped")


def refuse_code(config: Any, source: str) -> None:
    """Raise AdapterFileError on any field that could make a loader run or fetch code."""
    for path, key, value in _walk(config):
        shown = ".".join([*path, key])
        if key in CODE_KEYS:
            raise AdapterFileError(
                source,
                f"field {shown} would name code to instantiate; peftc never instantiates objects from files",
                "remove it; adapter configs hold plain values only",
            )
        if key == "trust_remote_code" and value not in (None, False):
            raise AdapterFileError(
                source,
                f"field {shown}={value!r} asks to run code shipped with a model",
                "peftc never enables trust_remote_code from a file; remove the field",
            )
        if key in LOADER_KWARGS and value not in (None, {}, []):
            raise AdapterFileError(
                source,
                f"field {shown} passes keyword arguments to a loader ({value!r})",
                "peftc forwards no loader kwargs from adapter files; remove the field",
            )
        if isinstance(value, str) and _URL.match(value) and key.endswith(PATH_SUFFIXES):
            raise AdapterFileError(
                source,
                f"field {shown}={value!r} is a URL where a local path or hub id is expected",
                "download the files yourself and point at a local directory",
            )


def _walk(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str, Any]]:
    if isinstance(value, Mapping):
        for key, child in value.items():
            yield path, str(key), child
            yield from _walk(child, (*path, str(key)))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _walk(child, (*path, str(index)))
