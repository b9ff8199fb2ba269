"""Reading adapter_model.safetensors defensively: the header is parsed and checked by us
before the safetensors library maps a single byte of tensor data.

A safetensors file is an 8-byte little-endian header length, a JSON header
`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}`, then the data
buffer. Everything a hostile or truncated file can lie about is checked here: the header length
(against the file and the format's 100,000,000-byte cap), the JSON itself (no duplicate names),
dtypes, shapes, that `end - begin == numel * itemsize`, that offsets stay inside the buffer, and
that the tensors tile the buffer exactly (no overlap, no gap, no trailing bytes). Every problem
is an AdapterFileError naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftc.errors import AdapterFileError

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit (MAX_HEADER_SIZE)
ITEM_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
_CORRUPT = "the file is truncated or corrupt; restore it or save the adapter again"


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors a safetensors file declares, after checking the header tells the truth."""
    source = str(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw_length = fh.read(8)
        if len(raw_length) < 8:
            raise AdapterFileError(source, f"truncated: {size} bytes, shorter than a safetensors header", _CORRUPT)
        length = struct.unpack("<Q", raw_length)[0]
        if length > MAX_HEADER_BYTES:
            raise AdapterFileError(
                source, f"header claims {length:,} bytes, more than safetensors allows ({MAX_HEADER_BYTES:,})", _CORRUPT
            )
        if length > size - 8:
            raise AdapterFileError(source, f"header claims {length:,} bytes but the file has {size:,}", _CORRUPT)
        raw_header = fh.read(length)
    header = _parse_json(source, raw_header)
    data_bytes = size - 8 - length
    entries = {name: _entry(source, name, info, data_bytes) for name, info in header.items() if name != "__metadata__"}
    _check_metadata(source, header.get("__metadata__"))
    _check_tiling(source, entries, data_bytes)
    return entries


def _parse_json(source: str, raw: bytes) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            duplicate = next(k for k in keys if keys.count(k) > 1)
            raise AdapterFileError(source, f"header names tensor {duplicate!r} twice", _CORRUPT)
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(source, f"header is not valid JSON ({exc})", _CORRUPT) from exc
    except RecursionError:
        raise AdapterFileError(source, "header JSON is nested too deeply to read", _CORRUPT) from None
    if not isinstance(header, dict):
        raise AdapterFileError(source, "header is not a JSON object", _CORRUPT)
    return header


def _entry(source: str, name: str, info: Any, data_bytes: int) -> TensorEntry:
    where = f"tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise AdapterFileError(
            source, f"{where}: header entry must have exactly dtype, shape and data_offsets", _CORRUPT
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in ITEM_BYTES:
        raise AdapterFileError(source, f"{where}: unknown dtype {dtype!r}", f"known: {', '.join(ITEM_BYTES)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise AdapterFileError(source, f"{where}: shape {shape!r} is not a list of non-negative integers", _CORRUPT)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise AdapterFileError(source, f"{where}: data_offsets {offsets!r} is not [begin, end]", _CORRUPT)
    begin, end = offsets
    if end < begin or end > data_bytes:
        raise AdapterFileError(
            source, f"{where}: data_offsets [{begin}, {end}] lie outside the {data_bytes:,}-byte data buffer", _CORRUPT
        )
    expected = math.prod(shape) * ITEM_BYTES[dtype]
    if end - begin != expected:
        raise AdapterFileError(
            source,
            f"{where}: header says {end - begin:,} bytes but shape {shape} of {dtype} needs {expected:,}",
            _CORRUPT,
        )
    return TensorEntry(dtype, tuple(shape), begin, end)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_metadata(source: str, metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise AdapterFileError(source, "__metadata__ must map strings to strings", _CORRUPT)


def _check_tiling(source: str, entries: dict[str, TensorEntry], data_bytes: int) -> None:
    """Tensors must cover the data buffer exactly once, in offset order."""
    position, previous = 0, None
    for name, entry in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if entry.begin < position:
            raise AdapterFileError(source, f"tensor {name!r} overlaps tensor {previous!r}", _CORRUPT)
        if entry.begin > position:
            raise AdapterFileError(source, f"{entry.begin - position:,} unused bytes before tensor {name!r}", _CORRUPT)
        position, previous = entry.end, name
    if position != data_bytes:
        raise AdapterFileError(source, f"{data_bytes - position:,} bytes after the last tensor", _CORRUPT)


def load_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read these tensors (the header was checked by `read_header` first)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(str(path), f"cannot be read as safetensors ({exc})", _CORRUPT) from exc
