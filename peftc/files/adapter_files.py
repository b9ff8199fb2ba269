"""Adapter files in the Hugging Face PEFT layout: adapter_config.json + adapter_model.safetensors.

Tensor names follow peft's saved format: `base_model.model.<module path>.<tensor suffix>` with
the adapter name removed (`...q_proj.lora_A.weight`), modules_to_save under the wrapped
module's own name, prompt encoders as `prompt_embeddings`. The default adapter goes to the
directory itself, any other adapter to a subfolder named after it. Writes are atomic: files
are staged in a temporary directory beside the target, fsynced, then renamed into place.
Only safetensors are read or written; pickle is never loaded.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftc.errors import AdapterFileError, first_line
from peftc.files.atomic import atomic_directory, recover
from peftc.files.tensorfile import TensorEntry, read_header

# The layout is planned (peftc.planning.layout); these files write and read it. Re-exported
# because every reader of adapter files needs the names.
from peftc.planning.layout import (
    _ST_DTYPES as _ST_DTYPES,
)
from peftc.planning.layout import (
    ADAPTER_DTYPE as ADAPTER_DTYPE,
)
from peftc.planning.layout import (
    CONFIG_NAME as CONFIG_NAME,
)
from peftc.planning.layout import (
    MODEL_PREFIX as MODEL_PREFIX,
)
from peftc.planning.layout import (
    PICKLE_NAME as PICKLE_NAME,
)
from peftc.planning.layout import (
    PLAN_NAME as PLAN_NAME,
)
from peftc.planning.layout import (
    PROMPT_MODEL_PREFIX as PROMPT_MODEL_PREFIX,
)
from peftc.planning.layout import (
    SHARED_PREFIX as SHARED_PREFIX,
)
from peftc.planning.layout import (
    WEIGHTS_NAME as WEIGHTS_NAME,
)
from peftc.planning.layout import config_to_write
from peftc.planning.layout import (
    model_prefix as model_prefix,
)
from peftc.planning.layout import (
    safetensors_size as safetensors_size,
)
from peftc.planning.layout import (
    saved_layout as saved_layout,
)
from peftc.planning.layout import (
    unfrozen_saved_name as unfrozen_saved_name,
)
from peftc.planning.model_source import HUB_ID

if TYPE_CHECKING:
    import torch

    from peftc.planning.plan import Plan


def write_adapter_files(
    directory: Path,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    plan: Plan | None = None,
) -> None:
    """Write one adapter's files into an (already staged) directory."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    contiguous = {name: t.detach().contiguous().clone() for name, t in tensors.items()}
    save_file(contiguous, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    if plan is not None:
        (directory / PLAN_NAME).write_text(plan.to_json() + "\n")


# ----------------------------------------------------------------------------------- reading


def adapter_directory(value: str | os.PathLike[str]) -> Path:
    """Where an adapter's files are: a local directory, or for a hub id (`org/name`, when no
    such local path or parent directory exists) its snapshot in the Hugging Face cache, which
    `huggingface_hub` downloads when online and reads from the cache when offline
    (HF_HUB_OFFLINE=1). Only the adapter's own files are fetched; nothing is unpickled."""
    path = Path(value).expanduser()
    text = str(value)
    if path.exists() or path.parent.exists() or not HUB_ID.fullmatch(text):
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, PLAN_NAME, "README.md"]))
    except Exception as exc:  # not cached while offline, no such repository, no network: one line
        raise AdapterFileError(
            text,
            f"is neither a local directory nor a hub adapter that could be fetched ({first_line(exc)})",
            "give the adapter's directory, or the hub id of an adapter in the Hugging Face cache",
        ) from exc


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """adapter_config.json as a dict, after refusing fields that could carry code."""
    from peftc.files.screening import refuse_code

    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        recover(Path(directory))  # a save killed mid-swap may have left the old copy aside
    if Path(directory).is_file():  # adapter_config.json itself, as peft's users sometimes give it
        raise AdapterFileError(
            str(directory), "is a file; an adapter is the directory that holds it", f"give {Path(directory).parent}"
        )
    if not Path(directory).is_dir():
        raise AdapterFileError(str(directory), "no such adapter directory")
    if not path.is_file():
        raise AdapterFileError(str(path), "missing", _what_directory_this_is(Path(directory)))
    config = read_json_object(path)
    refuse_code(config, str(path))
    if "peft_type" not in config:
        raise AdapterFileError(str(path), "has no 'peft_type'", "it is required to know which method wrote the adapter")
    return config


def _what_directory_this_is(directory: Path) -> str:
    """The hint for a directory without adapter_config.json: a run directory names its adapter."""
    from peftc.files.run_dir import ADAPTER_DIR, CHECKPOINT_DIR

    if (directory / ADAPTER_DIR / CONFIG_NAME).is_file():
        return f"this is a run directory; its adapter is {directory / ADAPTER_DIR}"
    if (directory / CHECKPOINT_DIR).is_dir():
        return "this run directory has checkpoints but no adapter yet; continue it with resume=" + str(directory)
    # peft's save_pretrained writes every adapter but `default` into a subdirectory of its name
    named = sorted(child.name for child in directory.iterdir() if (child / CONFIG_NAME).is_file())
    if named:
        shown = ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
        return f"it holds adapters in subdirectories ({shown}, as peft saves named adapters); give one: {directory / named[0]}"
    return "an adapter directory holds adapter_config.json and adapter_model.safetensors"


def weights_path(directory: str | os.PathLike[str]) -> Path:
    """adapter_model.safetensors of an adapter directory; a pickle file is never opened."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        if (Path(directory) / PICKLE_NAME).is_file():
            raise AdapterFileError(
                str(Path(directory) / PICKLE_NAME),
                "pickle adapter files are never loaded (unpickling can run arbitrary code); convert to safetensors",
                f"if you trust the file: {conversion_command(Path(directory))}",
            )
        raise AdapterFileError(str(path), "missing")
    return path


def conversion_command(directory: Path) -> str:
    """One shell line that turns adapter_model.bin into adapter_model.safetensors. torch's
    weights_only loader refuses pickled code, so the line cannot run a payload either."""
    source, target = (str(directory / name) for name in (PICKLE_NAME, WEIGHTS_NAME))
    code = (
        "import torch; from safetensors.torch import save_file; "
        f"save_file(torch.load({source!r}, weights_only=True), {target!r}, metadata={{'format': 'pt'}})"
    )
    return f'python -c "{code}"'


def read_tensor_header(directory: str | os.PathLike[str]) -> dict[str, TensorEntry]:
    """Names, dtypes and shapes of the stored tensors, checked, without reading tensor data."""
    return read_header(weights_path(directory))


def read_plan(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(directory) / PLAN_NAME
    if not path.is_file():
        return None
    return read_json_object(path)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold one object: anything else (not UTF-8, not JSON, nested past
    what the parser can follow, an array) is one AdapterFileError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise AdapterFileError(str(path), f"is not UTF-8 text (byte {exc.start})", "save it as UTF-8 JSON") from exc
    except json.JSONDecodeError as exc:
        raise AdapterFileError(str(path), f"not valid JSON ({exc})") from exc
    except RecursionError:
        raise AdapterFileError(str(path), "JSON nested too deeply to read") from None
    if not isinstance(data, dict):
        raise AdapterFileError(str(path), f"must hold a JSON object, not a {type(data).__name__}")
    return data


# ------------------------------------------------------------------------- model <-> tensors
def adapter_tensors(model: Any, name: str) -> dict[str, torch.Tensor]:
    """One adapter's tensors from a PeftcModel, under peft's saved names."""
    from peftc import methods

    plan = model.plan_of(name)
    base = model.base_model
    tensors: dict[str, torch.Tensor] = {}
    MODEL_PREFIX = model_prefix(plan)  # noqa: N806 (shadows the module constant on purpose)
    for site in plan.sites:
        layer = base.get_submodule(site.path)
        for suffix, tensor in layer.adapter_tensors(name).items():
            tensors[f"{MODEL_PREFIX}{site.path}.{suffix}"] = tensor
        if site.save_base_weight:
            tensors[f"{MODEL_PREFIX}{site.path}.base_layer.weight"] = layer.base_layer.weight
    for module in plan.modules_to_save:
        wrapper = base.get_submodule(module.path)
        for pname, tensor in wrapper.modules_to_save[name].state_dict(keep_vars=True).items():
            tensors[f"{MODEL_PREFIX}{module.path}.{pname}"] = tensor
    for pname in plan.unfrozen:
        tensors[f"{MODEL_PREFIX}{unfrozen_saved_name(plan, pname)}"] = base.get_parameter(pname)
    for shared in plan.shared:
        if shared.saved:
            tensors[SHARED_PREFIX + shared.name] = model.shared_tensors[name].get_buffer(shared.name)
    if plan.prompt is not None:
        tensors.update(methods.get(plan.method).prompt_tensors(model.prompt_encoders[name]))
    return tensors


def save_adapters(model: Any, directory: Path, names: list[str]) -> Path:
    """Write adapters atomically: `default` at the root, every other name in a subfolder. Only
    the adapters' own files are replaced; the directory's other files stay (as peft's
    save_pretrained leaves them)."""
    from safetensors import SafetensorError

    for name in names:
        model.plan_of(name)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise AdapterFileError(str(directory), "is a file, not a directory", "save the adapter to a directory path")
    if directory.is_symlink():
        directory = directory.resolve()  # replace what the link points to, never the link itself
    try:
        with atomic_directory(directory, keep_others=True) as staging:
            for name in names:
                plan = model.plan_of(name)
                tensors = adapter_tensors(model, name)
                check_layout(plan, tensors)
                write_adapter_files(
                    staging if name == "default" else staging / name,
                    config_to_write(plan.adapter_config),
                    tensors,
                    plan,
                )
    except OSError as exc:
        raise write_error(directory, exc) from exc
    except SafetensorError as exc:  # safetensors reports I/O failures as its own error ("os error 28")
        code = re.search(r"os error (\d+)", str(exc))
        raise write_error(directory, OSError(int(code.group(1)) if code else errno.EIO, str(exc))) from exc
    return directory


def write_error(target: Path, exc: OSError) -> AdapterFileError:
    """A failed write, said plainly; the previous content of `target` is untouched."""
    reasons = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
    }
    reason = reasons.get(exc.errno, exc.strerror or str(exc))
    kept = "the previous adapter there is unchanged" if Path(target).exists() else "nothing was written"
    return AdapterFileError(
        str(target), f"cannot be written: {reason}", f"{kept}; free space or choose another output_dir"
    )


def check_layout(plan: Plan, tensors: Mapping[str, torch.Tensor]) -> None:
    """The tensors written must be exactly the ones the plan promised (names and shapes)."""
    expected = {k: shape for k, (shape, _) in saved_layout(plan).items()}
    actual = {k: tuple(t.shape) for k, t in tensors.items()}
    if expected != actual:
        missing = sorted(set(expected) - set(actual))[:3]
        extra = sorted(set(actual) - set(expected))[:3]
        raise RuntimeError(
            f"internal error: adapter tensors differ from the plan (missing {missing}, unexpected {extra})"
        )
