"""Acts and setups of the bad-input catalogue (tests/test_bad_inputs.py): how a case feeds
its bad input to peftc (the CLI's job, load_adapter, the model API, a faulty write), and how it
builds the bad input inside the world first."""

from __future__ import annotations

import copy
import errno
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch

import peftc
from tests.catalogue import (
    WORLD_OVERRIDES,
    World,
    edit_config,
    edit_tensors,
    failing,
    split_safetensors,
    tensor_names,
    write_pickle_adapter,
    write_safetensors,
)


# ------------------------------------------------------------------------------- acting
def cli(*args: str) -> Callable[[World, Any], Any]:
    """The job the CLI runs: preflight (compose + validate), then execute into world.out.
    '{input}' in an argument is replaced by what the case's setup returned."""

    def act(world: World, made: Any) -> Any:
        from peftc.cli.main import preflight, search_options, split_argv
        from peftc.cli.run import execute
        from peftc.config.compose import compose, to_spec

        argv = [a.replace("{input}", str(made)) for a in args]
        preflight(argv)
        overrides, _ = split_argv(argv)
        search, name = search_options(argv)
        return execute(to_spec(compose([*search, *overrides], config_name=name)), world.out)

    return act


def cli_entry(*args: str) -> Callable[[World, Any], Any]:
    """`python -m peftc ARGS` through the real entry point (Hydra included), run in the world's
    inputs dir with HYDRA_FULL_ERROR=1 so that a refusal surfaces as the exception itself."""

    def act(world: World, made: Any) -> Any:
        import contextlib
        import os
        import sys

        from hydra.core.global_hydra import GlobalHydra

        from peftc.cli.main import main

        argv = ["peftc", *(a.replace("{input}", str(made)) for a in args)]
        GlobalHydra.instance().clear()
        try:
            with (
                mock.patch.object(sys, "argv", argv),
                mock.patch.dict(os.environ, {"HYDRA_FULL_ERROR": "1", "HF_HUB_OFFLINE": "1"}),
                contextlib.chdir(world.inputs),
            ):
                return main()
        finally:
            GlobalHydra.instance().clear()

    return act


def with_cuda_devices(count: int, act: Callable[[World, Any], Any]) -> Callable[[World, Any], Any]:
    """Run `act` as on a machine with `count` CUDA devices (the catalogue must not depend on the
    machine running it)."""

    def on_this_machine(world: World, made: Any) -> Any:
        with mock.patch("peftc.planning.compat.cuda_device_count", lambda: count):
            return act(world, made)

    return on_this_machine


def without_package(names: str, act: Callable[[World, Any], Any]) -> Callable[[World, Any], Any]:
    """Run `act` as on a machine where the packages `names` (comma-separated) are not installed."""
    import importlib.util

    real = importlib.util.find_spec
    missing = set(names.split(","))

    def act_without(world: World, made: Any) -> Any:
        with mock.patch("importlib.util.find_spec", lambda n, *a: None if n in missing else real(n, *a)):
            return act(world, made)

    return act_without


def write_pickle(world: World) -> Path:
    """A pickle whose loading creates the world's SENTINEL file."""
    import pickle

    from tests.catalogue import Payload

    path = world.inputs / "config.pickle"
    path.write_bytes(pickle.dumps(Payload(world.root / "SENTINEL")))
    return path


def load_into_model(**kwargs: Any) -> Callable[[World, Any], Any]:
    """Load the setup's adapter dir as a second adapter of the world's model."""
    return lambda world, directory: peftc.load_adapter(world.model, directory, **{"adapter_name": "second", **kwargs})


def load_into_base(world: World, directory: Any) -> Any:
    return peftc.load_adapter(world.base, directory)


def save_over_previous(fault: Callable[[], Any]) -> Callable[[World, Any], Any]:
    def act(world: World, made: Any) -> Any:
        with fault():
            world.model.save_adapter(world.out / "adapter")

    return act


def fail_at_last_site(target: str) -> Callable[[World, Any], Any]:
    """Inject an all-linear adapter (42 sites) while creating the LAST site's tensors fails."""
    from peftc.methods.lora.method import LoraLayer

    def act(world: World, made: Any) -> Any:
        last = world.plan.sites[-1].path
        assert len(world.plan.sites) >= 40
        real = LoraLayer.create_adapter

        def create(layer: LoraLayer, name: str, site: Any, init: bool) -> None:
            if site.path == last:
                raise MemoryError(f"simulated out-of-memory at {site.path}")
            real(layer, name, site, init)

        plan = world.plan
        with mock.patch.object(LoraLayer, "create_adapter", create):
            if target == "base":
                peftc.materialize(plan, base_model=world.base)
            else:
                world.model.add_adapter("second", plan)

    return act


def write_file(name: str, content: str | bytes) -> Callable[[World], Path]:
    def setup(world: World) -> Path:
        path = world.inputs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    return setup


def dangling_link(name: str) -> Callable[[World], Path]:
    """A symbolic link in the world's inputs to a path that does not exist."""

    def setup(world: World) -> Path:
        path = world.inputs / name
        path.symlink_to(world.inputs / "gone")
        return path

    return setup


def user_config(group: str, name: str, text: str) -> Callable[[World], Path]:
    """A user config dir holding <group>/<name>.yaml (used with --config-dir)."""

    def setup(world: World) -> Path:
        path = world.inputs / "conf" / group / f"{name}.yaml"
        path.parent.mkdir(parents=True)
        path.write_text(text)
        return world.inputs / "conf"

    return setup


def model_dir(change: Callable[[Path], None] | None, *, weights: bool = True) -> Callable[[World], Path]:
    """A saved copy of the world's base model (config.json + weights), then changed."""

    def setup(world: World) -> Path:
        from peftc.planning.model_source import load_tokenizer

        target = world.inputs / "model"
        world.base.save_pretrained(target)
        load_tokenizer(world.plan.spec.model).save_pretrained(target)
        if not weights:
            (target / "model.safetensors").unlink()
        if change is not None:
            change(target)
        return target

    return setup


def edit_model_config(**fields: Any) -> Callable[[Path], None]:
    def change(directory: Path) -> None:
        config = json.loads((directory / "config.json").read_text())
        config.update(fields)
        (directory / "config.json").write_text(json.dumps(config))

    return change


def fake_checkpoint(fingerprint: str | None) -> Callable[[World], Path]:
    """A small checkpoint written by another plan (the default config with seed=99)."""

    def setup(world: World) -> Path:
        path = world.inputs / "last.ckpt"
        content: dict[str, Any] = {"state_dict": {}, "global_step": 3}
        if fingerprint is not None:
            spec = peftc.compile([]).spec.to_dict()
            content.update(peftc_fingerprint=fingerprint, peftc_spec={**spec, "seed": 99})
        torch.save(content, path)
        return path

    return setup


def never_load_base(act: Callable[[World, Any], Any]) -> Callable[[World, Any], Any]:
    """Fail loudly if the base model (any weights) is loaded."""

    def guarded(world: World, made: Any) -> Any:
        boom = AssertionError("the base model must not be loaded")
        with failing("peftc.runtime.materialize.load_base_model", boom):
            return act(world, made)

    return guarded


def prompt_adapter(nan: bool = False, **fields: Any) -> Callable[[World], Path]:
    """A prompt-tuning adapter for the world's base, with config fields changed (peft#2888)."""

    def setup(world: World) -> Path:
        plan = peftc.compile(["peft=prompt_tuning", *WORLD_OVERRIDES[:1]])
        target = world.inputs / "prompt"
        peftc.materialize(plan, base_model=copy.deepcopy(world.base)).save_adapter(target)
        edit_config(**fields)(target)
        if nan:
            edit_tensors(poison(math.nan))(target)
        return target

    return setup


def pickle_only(world: World) -> Path:
    target = world.inputs / "adapter"
    target.mkdir()
    (target / "adapter_config.json").write_text((world.good / "adapter_config.json").read_text())
    write_pickle_adapter(target, world.root / "SENTINEL")
    return target


def dup_offsets(header: dict[str, Any]) -> None:
    """Two tensors of the same size claim the same bytes."""
    names = tensor_names(header)
    size = {n: header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in names}
    first = names[0]
    second = next(n for n in names[1:] if size[n] == size[first])
    header[second]["data_offsets"] = list(header[first]["data_offsets"])


def shape_lie(header: dict[str, Any]) -> None:
    name = tensor_names(header)[0]
    header[name]["shape"] = [header[name]["shape"][0] * 2, header[name]["shape"][1]]


def shape_undersized(header: dict[str, Any]) -> None:
    """The shape needs half the bytes the offsets give it (the other direction of shape_lie)."""
    name = tensor_names(header)[0]
    header[name]["shape"] = [header[name]["shape"][0] // 2, header[name]["shape"][1]]


def out_of_range(header: dict[str, Any]) -> None:
    name = max(tensor_names(header), key=lambda n: header[n]["data_offsets"][1])
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 8, end + 8]


def set_dtype(code: str) -> Callable[[dict[str, Any]], None]:
    def change(header: dict[str, Any]) -> None:
        header[tensor_names(header)[0]]["dtype"] = code

    return change


def first_tensor(tensors: dict[str, torch.Tensor]) -> str:
    return sorted(tensors)[0]


def poison(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t[first_tensor(t)].view(-1).__setitem__(0, value)


def duplicate_names(directory: Path) -> None:
    path = directory / "adapter_model.safetensors"
    header, data = split_safetensors(path)
    name = tensor_names(header)[0]
    text = json.dumps(header)[:-1] + f', "{name}": ' + json.dumps(header[name]) + "}"
    write_safetensors(path, None, data, header_text=text.encode())


def drop_peft_type(directory: Path) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    del config["peft_type"]
    path.write_text(json.dumps(config))


def crash_between_renames() -> Any:
    """The fallback swap (no RENAME_EXCHANGE): the old target is moved aside, then moving the
    new one in fails; the old one must be put back."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch("peftc.files.atomic.exchange", lambda a, b: False))
    real_rename = __import__("os").rename
    calls = {"n": 0}

    def rename(src: Any, dst: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.EIO, "Input/output error", str(dst))
        real_rename(src, dst)

    stack.enter_context(mock.patch("peftc.files.atomic.os.rename", rename))
    return stack
