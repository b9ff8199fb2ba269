"""Machinery of the bad-input catalogue (tests/test_bad_inputs.py): the world a case may
touch, snapshots proving it was not changed, and builders of broken inputs."""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from unittest import mock

import torch

import peftc
from peftc.planning.plan import Plan
from peftc.runtime.model import PeftcModel

# The world's model: 6 blocks, every Linear adapted, so an adapter has 42 sites.
WORLD_OVERRIDES = ["model=tiny_llama", "model.config.num_hidden_layers=6", "peft.target_modules=all-linear", "peft.r=4"]


@dataclass
class Pristine:
    plan: Plan
    base: torch.nn.Module
    model: PeftcModel
    files: Path
    states: dict[str, Any]  # model_state of `base` and `model`, taken once


@dataclass
class World:
    root: Path
    plan: Plan
    pristine: Pristine
    good: Path  # a good adapter directory for `model`
    out: Path  # a previous run's output directory (adapter/ + plan.json)
    inputs: Path  # where a case's setup writes its bad inputs

    # The models are copied from the pristine ones when a case first touches them (most cases
    # fail before any model exists): a model no case touched is the pristine one, unchanged.
    @cached_property
    def base(self) -> torch.nn.Module:
        """A plain base model (no adapter yet)."""
        return copy.deepcopy(self.pristine.base)

    @cached_property
    def model(self) -> PeftcModel:
        """The same architecture carrying adapter 'default'."""
        return copy.deepcopy(self.pristine.model)

    def touched(self, name: str) -> bool:
        """Whether a case has used the world's `name` model (so it may have changed it)."""
        return name in self.__dict__


def build_pristine(directory: Path) -> Pristine:
    from tests.helpers import build_base

    plan = peftc.compile(WORLD_OVERRIDES)
    base = build_base(plan)
    model = peftc.materialize(plan, base_model=copy.deepcopy(base), init=False)  # random B: not a no-op
    model.eval()
    model.save_adapter(directory / "good")
    (directory / "out").mkdir()
    model.save_adapter(directory / "out" / "adapter")
    (directory / "out" / "plan.json").write_text(plan.to_json() + "\n")
    return Pristine(plan, base, model, directory, {"base": model_state(base), "model": model_state(model)})


def make_world(pristine: Pristine, root: Path) -> World:
    shutil.copytree(pristine.files / "good", root / "good")
    shutil.copytree(pristine.files / "out", root / "out")
    (root / "inputs").mkdir()
    return World(root, pristine.plan, pristine, root / "good", root / "out", root / "inputs")


# ------------------------------------------------------------------------------ snapshots
def model_state(model: torch.nn.Module) -> dict[str, Any]:
    """Everything about a model a failed operation must leave exactly as it was."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "modules": [(name, type(m).__name__, m.training) for name, m in model.named_modules()],
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "adapters": (list(model.plans), list(model.active_adapters), list(model.load_reports))
        if isinstance(model, PeftcModel)
        else None,
    }


def assert_same_model(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["modules"] == before["modules"], "module structure changed"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad changed"
    assert after["adapters"] == before["adapters"], "adapter bookkeeping changed"
    assert set(after["tensors"]) == set(before["tensors"]), "tensor names changed"
    for name, tensor in before["tensors"].items():
        other = after["tensors"][name]
        assert tensor.dtype == other.dtype and torch.equal(tensor, other), f"{name} changed"


def file_tree(root: Path) -> dict[str, str]:
    """Every path under root (hidden ones included) with its content hash."""
    tree = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink() and not path.exists():
            tree[rel] = f"link to {path.readlink()}"  # a dangling link has no content to hash
        else:
            tree[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return tree


# ---------------------------------------------------------------------- broken adapter files
def adapter_variant(change: Callable[[Path], None]) -> Callable[[World], Path]:
    """Setup: a copy of the good adapter with `change` applied to it."""

    def setup(world: World) -> Path:
        target = world.inputs / "adapter"
        shutil.copytree(world.good, target)
        change(target)
        return target

    return setup


def edit_config(**fields: Any) -> Callable[[Path], None]:
    def change(directory: Path) -> None:
        path = directory / "adapter_config.json"
        config = json.loads(path.read_text())
        config.update(fields)
        path.write_text(json.dumps(config))

    return change


def split_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_safetensors(path: Path, header: Any, data: bytes, *, header_text: bytes | None = None) -> None:
    text = header_text if header_text is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_header(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    """Rewrite the safetensors header (tensor data untouched)."""

    def apply(directory: Path) -> None:
        path = directory / "adapter_model.safetensors"
        header, data = split_safetensors(path)
        change(header)
        write_safetensors(path, header, data)

    return apply


def edit_bytes(change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        path = directory / "adapter_model.safetensors"
        path.write_bytes(change(path.read_bytes()))

    return apply


def edit_tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    """Rewrite the weights as a valid safetensors file with changed tensors."""
    from safetensors.torch import load_file, save_file

    def apply(directory: Path) -> None:
        path = directory / "adapter_model.safetensors"
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)

    return apply


def tensor_names(header: dict[str, Any]) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


class Payload:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.sentinel), "w"))


def write_pickle_adapter(directory: Path, sentinel: Path) -> None:
    torch.save({"base_model.model.x.lora_A.weight": Payload(sentinel)}, directory / "adapter_model.bin")


# ------------------------------------------------------------------------------- write faults
@contextmanager
def disk_full_while_writing_weights() -> Iterator[None]:
    """safetensors writes half the file, then the disk is full (ENOSPC)."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def half_then_full(tensors: Any, filename: str, metadata: Any = None) -> None:
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    with mock.patch.object(safetensors.torch, "save_file", half_then_full):
        yield


@contextmanager
def failing(target: str, error: BaseException, *, after: int = 0) -> Iterator[None]:
    """Patch `target` (dotted path) so that its call number `after` + 1 raises `error`."""
    module_name, _, attr = target.rpartition(".")
    import importlib

    module = importlib.import_module(module_name)
    real = getattr(module, attr)
    calls = {"n": 0}

    def fake(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > after:
            raise error
        return real(*args, **kwargs)

    with mock.patch.object(module, attr, fake):
        yield
