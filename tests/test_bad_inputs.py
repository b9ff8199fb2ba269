"""The bad-input catalogue: things users (or strangers' files) hand peftc.

Every case names the exception type and a message fragment, and proves nothing changed: the
world's models are bit-identical (tensors, structure, requires_grad, adapter bookkeeping), no
file under the world's directory appeared, vanished or changed (no partial files, no leftover
staging dirs, no pickle sentinel; the previous run's output dir is byte-identical), and after a
failed overwrite the previous adapter still loads with its exact tensors.
"""

from __future__ import annotations

import copy
import errno
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

import peftc
from peftc.errors import AdapterFileError, ConfigError, DataError, PlanError
from tests.catalogue import (
    World,
    adapter_variant,
    assert_same_model,
    build_pristine,
    disk_full_while_writing_weights,
    edit_bytes,
    edit_config,
    edit_header,
    edit_tensors,
    failing,
    file_tree,
    make_world,
    model_state,
    tensor_names,
    write_pickle_adapter,
    write_safetensors,
)


@dataclass(frozen=True)
class Bad:
    id: str
    kind: str  # override | yaml | model_dir | dataset | adapter_file | api | write | resume
    act: Callable[[World, Any], Any]
    error: type[BaseException]
    fragment: str
    setup: Callable[[World], Any] = lambda world: None


# ------------------------------------------------------------------------------- acting
def cli(*args: str) -> Callable[[World, Any], Any]:
    """The job the CLI runs: preflight (compose + validate), then execute into world.out.
    '{input}' in an argument is replaced by what the case's setup returned."""

    def act(world: World, made: Any) -> Any:
        from peftc.__main__ import preflight, search_options, split_argv
        from peftc.compose import compose
        from peftc.run import execute
        from peftc.spec import to_spec

        argv = [a.replace("{input}", str(made)) for a in args]
        preflight(argv)
        overrides, _ = split_argv(argv)
        search, name = search_options(argv)
        return execute(to_spec(compose([*search, *overrides], config_name=name)), world.out)

    return act


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
    from peftc.methods.lora import LoraLayer

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
        from peftc.loading import load_tokenizer

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
        with failing("peftc.materializer.load_base_model", boom):
            return act(world, made)

    return guarded


def pickle_only(world: World) -> Path:
    target = world.inputs / "adapter"
    target.mkdir()
    (target / "adapter_config.json").write_text((world.good / "adapter_config.json").read_text())
    write_pickle_adapter(target, world.root / "SENTINEL")
    return target


def _dup_offsets(header: dict[str, Any]) -> None:
    """Two tensors of the same size claim the same bytes."""
    names = tensor_names(header)
    size = {n: header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in names}
    first = names[0]
    second = next(n for n in names[1:] if size[n] == size[first])
    header[second]["data_offsets"] = list(header[first]["data_offsets"])


def _shape_lie(header: dict[str, Any]) -> None:
    name = tensor_names(header)[0]
    header[name]["shape"] = [header[name]["shape"][0] * 2, header[name]["shape"][1]]


def _out_of_range(header: dict[str, Any]) -> None:
    name = max(tensor_names(header), key=lambda n: header[n]["data_offsets"][1])
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 8, end + 8]


def _set_dtype(code: str) -> Callable[[dict[str, Any]], None]:
    def change(header: dict[str, Any]) -> None:
        header[tensor_names(header)[0]]["dtype"] = code

    return change


def _first(tensors: dict[str, torch.Tensor]) -> str:
    return sorted(tensors)[0]


def _poison(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t[_first(t)].view(-1).__setitem__(0, value)


def _duplicate_names(directory: Path) -> None:
    path = directory / "adapter_model.safetensors"
    from tests.catalogue import split_safetensors

    header, data = split_safetensors(path)
    name = tensor_names(header)[0]
    text = json.dumps(header)[:-1] + f', "{name}": ' + json.dumps(header[name]) + "}"
    write_safetensors(path, None, data, header_text=text.encode())


def _drop_peft_type(directory: Path) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    del config["peft_type"]
    path.write_text(json.dumps(config))


def _crash_between_renames() -> Any:
    """The fallback swap (no RENAME_EXCHANGE): the old target is moved aside, then moving the
    new one in fails; the old one must be put back."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch("peftc.atomic.exchange", lambda a, b: False))
    real_rename = __import__("os").rename
    calls = {"n": 0}

    def rename(src: Any, dst: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.EIO, "Input/output error", str(dst))
        real_rename(src, dst)

    stack.enter_context(mock.patch("peftc.atomic.os.rename", rename))
    return stack


LORA_YAML = "defaults:\n  - /schema/peft/lora@_here_\n  - _self_\n"
STORY = '{"text": "Once upon a time there was a small robot who liked to count the stars."}\n'

# One row per bad input: id, kind, what is done, the error type, a fragment of its message, and
# the setup that builds the bad input inside the world.
# fmt: off
CASES = [
    # --- command-line overrides -----------------------------------------------------------
    Bad("unknown-key", "override", cli("peft.rr=8"), ConfigError, "did you mean 'r'"),
    Bad("added-unknown-key", "override", cli("+peft.rr=8"), ConfigError, "did you mean 'r'"),
    Bad("rank-zero", "override", cli("peft.r=0"), ConfigError, "must be >= 1"),
    Bad("rank-text", "override", cli("peft.r=abc"), ConfigError, "expected int"),
    Bad("dropout-above-one", "override", cli("peft.lora_dropout=1.5"), ConfigError, "must be in [0.0, 1.0)"),
    Bad("alpha-negative", "override", cli("peft.lora_alpha=-1"), ConfigError, "must be > 0"),
    Bad("no-such-method", "override", cli("peft=lorra"), ConfigError, "did you mean 'lora'"),
    Bad("target-typo", "override", cli("peft.target_modules=[q_prj]"), PlanError, "did you mean 'q_proj'"),
    Bad("target-empty-list", "override", cli("peft.target_modules=[]"), ConfigError, "is empty"),
    Bad("target-bad-regex", "override", cli("peft.target_modules='(q_proj'"), ConfigError, "not a valid regular"),
    Bad("target-a-number", "override", cli("peft.target_modules=5"), ConfigError, "must be a list of module names"),
    Bad("target-a-norm", "override", cli("peft.target_modules=[norm]"), PlanError, "which lora cannot adapt"),
    Bad("layer-out-of-range", "override", cli("peft.layers_to_transform=[7]"), PlanError, "no such layer"),
    Bad("exclude-typo", "override", cli("peft.exclude_modules=[o_prj]"), PlanError, "excludes nothing"),
    Bad("modules-to-save-typo", "override", cli("peft.modules_to_save=[lm_haed]"), PlanError, "did you mean"),
    Bad("huge-rank", "override", never_load_base(cli("peft.r=1000000000")), PlanError, "more than this machine"),
    Bad("max-steps-zero", "override", cli("trainer.max_steps=0"), ConfigError, "must be positive"),
    Bad("betas-one", "override", cli("trainer.betas=[0.9]"), ConfigError, "two numbers"),
    Bad("batch-size-zero", "override", cli("data.batch_size=0"), ConfigError, "must be >= 1"),
    Bad("precision-typo", "override", cli("trainer.precision=8-mixed"), ConfigError, "must be one of"),
    Bad("dtype-typo", "override", cli("model.dtype=float8"), ConfigError, "must be one of"),
    Bad("model-type-typo", "override", cli("model.model_type=lama"), ConfigError, "did you mean 'llama'"),
    Bad("override-syntax", "override", cli("peft.r=[4"), ConfigError, "cannot be parsed"),
    Bad("target-at-root", "override", cli("+_target_=os.system"), ConfigError, "never instantiates"),
    Bad("target-in-group", "override", cli("+peft._target_=os.system"), ConfigError, "never instantiates"),
    Bad("target-in-mapping", "override", cli("+model.config._target_=builtins.eval"), ConfigError, "never instantiates"),
    Bad("target-as-pattern", "override", cli("peft.rank_pattern={_target_: 2}"), ConfigError, "never instantiates"),
    Bad("env-interpolation", "override", cli("model.name=${oc.env:HOME}"), ConfigError, "environment variable"),
    Bad("remote-code-config", "override", cli("+model.config.trust_remote_code=true"), ConfigError, "run code"),
    Bad("adapter-name-dot", "override", cli("adapter_name=my.adapter"), ConfigError, "no dots"),
    Bad("adapter-name-empty", "override", cli("adapter_name=''"), ConfigError, "not a valid adapter name"),
    Bad("adapter-name-prefix", "override", cli("adapter_name=lora"), ConfigError, "is reserved"),
    Bad("adapter-name-module", "override", cli("adapter_name=mlp"), PlanError, "is also a module name"),
    Bad("model-hf-no-path", "override", cli("model=hf"), ConfigError, "no model given"),
    # --- YAML files in a user config directory (--config-dir) --------------------------------
    Bad("yaml-unknown-key", "yaml", cli("--config-dir", "{input}", "peft=mine"), ConfigError, "unknown key",
        user_config("peft", "mine", LORA_YAML + "rr: 4\n")),
    Bad("yaml-wrong-type", "yaml", cli("--config-dir", "{input}", "peft=mine"), ConfigError, "expected int",
        user_config("peft", "mine", LORA_YAML + "r: many\n")),
    Bad("yaml-target", "yaml", cli("--config-dir", "{input}", "peft=mine"), ConfigError, "never instantiates",
        user_config("peft", "mine", LORA_YAML + "_target_: os.system\n")),
    Bad("yaml-python-tag", "yaml", cli("--config-dir", "{input}", "peft=mine"), ConfigError, "Python-object YAML tag",
        user_config("peft", "mine", LORA_YAML + 'r: !!python/object/apply:os.system ["touch SENTINEL"]\n')),
    Bad("yaml-syntax", "yaml", cli("--config-dir", "{input}", "peft=mine"), ConfigError, "not valid YAML",
        user_config("peft", "mine", LORA_YAML + "r: [4\n")),
    Bad("yaml-a-list", "yaml", cli("--config-dir", "{input}", "peft=mine"), ConfigError, "must be a mapping",
        user_config("peft", "mine", "- 4\n- 8\n")),
    Bad("yaml-env", "yaml", cli("--config-dir", "{input}", "model=mine"), ConfigError, "environment variable",
        user_config("model", "mine", "defaults:\n  - tiny_llama\n  - _self_\nname: ${oc.env:HOME}\n")),
    Bad("yaml-model-code", "yaml", cli("--config-dir", "{input}", "model=mine"), ConfigError, "never instantiates",
        user_config("model", "mine", "defaults:\n  - tiny_llama\n  - _self_\nconfig:\n  _target_: os.system\n")),
    # --- model directories ---------------------------------------------------------------------
    Bad("model-dir-missing", "model_dir", cli("model=hf", "model.name_or_path=/no/such/model"), ConfigError,
        "no such directory"),
    Bad("model-dir-no-config", "model_dir", cli("model=hf", "model.name_or_path={input}"), ConfigError,
        "has no config.json", model_dir(lambda d: (d / "config.json").unlink())),
    Bad("model-config-not-json", "model_dir", cli("model=hf", "model.name_or_path={input}"), ConfigError,
        "config.json cannot be used", model_dir(lambda d: (d / "config.json").write_text("{nope"))),
    Bad("model-type-unknown", "model_dir", cli("model=hf", "model.name_or_path={input}"), ConfigError,
        "config.json cannot be used", model_dir(edit_model_config(model_type="llamaxx"))),
    Bad("model-custom-code", "model_dir", cli("model=hf", "model.name_or_path={input}"), ConfigError,
        "needs code shipped with the model",
        model_dir(edit_model_config(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig"}))),
    Bad("model-no-weights", "model_dir", cli("model=hf", "model.name_or_path={input}"), ConfigError,
        "cannot be loaded", model_dir(None, weights=False)),
    Bad("model-weights-truncated", "model_dir", cli("model=hf", "model.name_or_path={input}"), ConfigError,
        "the weights cannot be used",
        model_dir(lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:999]))),
    Bad("model-weights-other-shape", "model_dir", cli("model=hf", "model.name_or_path={input}"), ConfigError,
        "size mismatch", model_dir(edit_model_config(intermediate_size=96))),
    # --- datasets --------------------------------------------------------------------------------
    Bad("data-missing-file", "dataset", cli("data.source=jsonl", "data.path=/no/such.jsonl"), ConfigError,
        "no such file"),
    Bad("data-bad-json-line", "dataset", cli("data.source=jsonl", "data.path={input}"), DataError,
        "not valid JSON", write_file("d.jsonl", STORY * 20 + "{oops\n")),
    Bad("data-row-not-object", "dataset", cli("data.source=jsonl", "data.path={input}"), DataError,
        "expected a JSON object", write_file("d.jsonl", STORY * 20 + "[1, 2]\n")),
    Bad("data-missing-column", "dataset", cli("data.source=jsonl", "data.path={input}"), DataError,
        "missing column 'text'", write_file("d.jsonl", '{"body": "x"}\n' * 20)),
    Bad("data-empty-file", "dataset", cli("data.source=jsonl", "data.path={input}"), DataError, "has no rows",
        write_file("d.jsonl", "")),
    Bad("data-not-utf8", "dataset", cli("data.source=jsonl", "data.path={input}"), DataError, "not UTF-8",
        write_file("d.jsonl", b"\xff\xfe\x00garbage\x80\n")),
    Bad("data-csv-empty", "dataset", cli("data.source=csv", "data.path={input}"), DataError, "no header row",
        write_file("d.csv", "")),
    Bad("data-column-for-no-field", "dataset",
        cli("data.source=jsonl", "data.path={input}", "data.columns={label: body}"), ConfigError,
        "is not a field of this task", write_file("d.jsonl", STORY * 20)),
    Bad("data-too-few-rows", "dataset", cli("data.source=jsonl", "data.path={input}", "data.val_fraction=0.5"),
        DataError, "cannot be split", write_file("d.jsonl", STORY)),
    Bad("data-too-short-for-a-block", "dataset", cli("data.source=jsonl", "data.path={input}", "data.max_length=512"),
        DataError, "cannot fill one block", write_file("d.jsonl", STORY * 3)),
    # --- adapter directories and their files --------------------------------------------------------
    Bad("adapter-dir-missing", "adapter_file", load_into_model(), AdapterFileError, "no such adapter directory",
        lambda world: world.inputs / "nothing"),
    Bad("adapter-config-missing", "adapter_file", load_into_model(), AdapterFileError, "adapter_config.json: missing",
        adapter_variant(lambda d: (d / "adapter_config.json").unlink())),
    Bad("adapter-config-not-json", "adapter_file", load_into_model(), AdapterFileError, "not valid JSON",
        adapter_variant(lambda d: (d / "adapter_config.json").write_text("{"))),
    Bad("adapter-config-a-list", "adapter_file", load_into_model(), AdapterFileError, "must hold a JSON object",
        adapter_variant(lambda d: (d / "adapter_config.json").write_text("[]"))),
    Bad("adapter-no-peft-type", "adapter_file", load_into_model(), AdapterFileError, "has no 'peft_type'",
        adapter_variant(_drop_peft_type)),
    Bad("adapter-unknown-peft-type", "adapter_file", load_into_model(), AdapterFileError, "did you mean 'LORA'",
        adapter_variant(edit_config(peft_type="LORAX"))),
    Bad("adapter-trust-remote-code", "adapter_file", load_into_model(), AdapterFileError, "run code",
        adapter_variant(edit_config(trust_remote_code=True))),
    Bad("adapter-tokenizer-kwargs", "adapter_file", load_into_model(), AdapterFileError, "passes keyword arguments",
        adapter_variant(edit_config(tokenizer_kwargs={"trust_remote_code": True}))),
    Bad("adapter-nested-target", "adapter_file", load_into_model(), AdapterFileError, "never instantiates",
        adapter_variant(edit_config(rank_pattern={"_target_": "os.system"}))),
    Bad("adapter-url-base", "adapter_file", load_into_base, AdapterFileError, "is a URL",
        adapter_variant(edit_config(base_model_name_or_path="https://evil.example/model"))),
    Bad("adapter-rank-text", "adapter_file", load_into_model(), AdapterFileError, "wrong type",
        adapter_variant(edit_config(r="eight"))),
    Bad("adapter-rank-zero", "adapter_file", load_into_model(), AdapterFileError, "must be >= 1",
        adapter_variant(edit_config(r=0))),
    Bad("adapter-rank-huge", "adapter_file", load_into_model(), AdapterFileError, "1000000000",
        adapter_variant(edit_config(r=10**9))),
    Bad("adapter-dropout-two", "adapter_file", load_into_model(), AdapterFileError, "must be in [0.0, 1.0)",
        adapter_variant(edit_config(lora_dropout=2.0))),
    Bad("adapter-targets-a-number", "adapter_file", load_into_model(), ConfigError, "must be a list of module names",
        adapter_variant(edit_config(target_modules=5))),
    Bad("adapter-claims-dora", "adapter_file", load_into_model(), AdapterFileError, "are missing",
        adapter_variant(edit_config(use_dora=True))),
    Bad("adapter-unsupported-feature", "adapter_file", load_into_model(), AdapterFileError,
        "peftc does not implement", adapter_variant(edit_config(use_qalora=True))),
    Bad("adapter-pickle-only", "adapter_file", load_into_model(), AdapterFileError, "pickle adapter files are never",
        pickle_only),
    Bad("adapter-weights-missing", "adapter_file", load_into_model(), AdapterFileError, "safetensors: missing",
        adapter_variant(lambda d: (d / "adapter_model.safetensors").unlink())),
    Bad("st-empty", "adapter_file", load_into_model(), AdapterFileError, "truncated",
        adapter_variant(edit_bytes(lambda b: b""))),
    Bad("st-truncated-in-header", "adapter_file", load_into_model(), AdapterFileError, "header claims",
        adapter_variant(edit_bytes(lambda b: b[:40]))),
    Bad("st-truncated-in-data", "adapter_file", load_into_model(), AdapterFileError, "outside the",
        adapter_variant(edit_bytes(lambda b: b[: len(b) // 3]))),
    Bad("st-last-bytes-lost", "adapter_file", load_into_model(), AdapterFileError, "outside the",
        adapter_variant(edit_bytes(lambda b: b[:-100]))),
    Bad("st-header-over-cap", "adapter_file", load_into_model(), AdapterFileError, "more than safetensors allows",
        adapter_variant(edit_bytes(lambda b: (200_000_000).to_bytes(8, "little") + b[8:]))),
    Bad("st-header-not-json", "adapter_file", load_into_model(), AdapterFileError, "header is not valid JSON",
        adapter_variant(edit_bytes(lambda b: b[:8] + b"{" * 16 + b[24:]))),
    Bad("st-duplicate-names", "adapter_file", load_into_model(), AdapterFileError, "twice",
        adapter_variant(_duplicate_names)),
    Bad("st-overlapping-offsets", "adapter_file", load_into_model(), AdapterFileError, "overlaps",
        adapter_variant(edit_header(_dup_offsets))),
    Bad("st-out-of-range-offsets", "adapter_file", load_into_model(), AdapterFileError, "outside the",
        adapter_variant(edit_header(_out_of_range))),
    Bad("st-shape-lies-about-size", "adapter_file", load_into_model(), AdapterFileError, "needs",
        adapter_variant(edit_header(_shape_lie))),
    Bad("st-unknown-dtype", "adapter_file", load_into_model(), AdapterFileError, "unknown dtype",
        adapter_variant(edit_header(_set_dtype("F99")))),
    Bad("st-integer-dtype", "adapter_file", load_into_model(), AdapterFileError, "adapter tensors are floating point",
        adapter_variant(edit_header(_set_dtype("I32")))),
    Bad("st-trailing-bytes", "adapter_file", load_into_model(), AdapterFileError, "after the last tensor",
        adapter_variant(edit_bytes(lambda b: b + b"\0" * 64))),
    Bad("tensor-nan", "adapter_file", load_into_model(), AdapterFileError, "NaN or Inf",
        adapter_variant(edit_tensors(_poison(math.nan)))),
    Bad("tensor-inf", "adapter_file", load_into_model(), AdapterFileError, "NaN or Inf",
        adapter_variant(edit_tensors(_poison(math.inf)))),
    Bad("tensor-missing", "adapter_file", load_into_model(), AdapterFileError, "are missing",
        adapter_variant(edit_tensors(lambda t: t.pop(_first(t))))),
    Bad("tensor-unexpected", "adapter_file", load_into_model(), AdapterFileError, "do not belong",
        adapter_variant(edit_tensors(lambda t: t.update({"base_model.model.x.lora_A.weight": torch.zeros(2)})))),
    Bad("tensor-mis-shaped", "adapter_file", load_into_model(), AdapterFileError, "has shape",
        adapter_variant(edit_tensors(lambda t: t.update({_first(t): torch.zeros(3, 3)})))),
    Bad("plan-with-target", "adapter_file", load_into_model(), AdapterFileError, "never instantiates",
        adapter_variant(lambda d: (d / "peftc_plan.json").write_text('{"spec": {"model": {"_target_": "os"}}}'))),
    Bad("plan-not-json", "adapter_file", load_into_base, AdapterFileError, "not valid JSON",
        adapter_variant(lambda d: (d / "peftc_plan.json").write_text("{"))),
    # --- adapter names and the model API ---------------------------------------------------------
    Bad("load-name-duplicate", "api", load_into_model(adapter_name="default"), ConfigError, "already exists",
        lambda world: world.good),
    Bad("load-name-module", "api", load_into_model(adapter_name="self_attn"), PlanError, "is also a module name",
        lambda world: world.good),
    Bad("load-name-container", "api", load_into_model(adapter_name="lora_A"), ConfigError, "is reserved",
        lambda world: world.good),
    Bad("load-name-empty", "api", load_into_model(adapter_name=""), ConfigError, "not a valid adapter name",
        lambda world: world.good),
    Bad("add-name-module", "api", lambda world, _: world.model.add_adapter("mlp", world.plan), PlanError,
        "is also a module name"),
    Bad("add-name-duplicate", "api", lambda world, _: world.model.add_adapter("default", world.plan), ConfigError,
        "already exists"),
    Bad("set-adapter-twice", "api", lambda world, _: world.model.set_adapter(["default", "default"]), ConfigError,
        "more than once"),
    Bad("set-unknown-adapter", "api", lambda world, _: world.model.set_adapter("nope"), ConfigError,
        "no such adapter"),
    Bad("save-names-twice", "api", lambda world, _: world.model.save_adapter(world.out / "adapter", ["default"] * 2),
        ConfigError, "more than once"),
    Bad("inject-fails-at-last-site-of-base", "api", fail_at_last_site("base"), MemoryError, "simulated out-of-memory"),
    Bad("inject-fails-at-last-site-of-second", "api", fail_at_last_site("model"), MemoryError,
        "simulated out-of-memory"),
    # --- writes that fail over a previous adapter --------------------------------------------------
    Bad("disk-full-mid-weights", "write", save_over_previous(disk_full_while_writing_weights), AdapterFileError,
        "the disk is full"),
    Bad("read-only-dir", "write",
        save_over_previous(lambda: failing("tempfile.mkdtemp", OSError(errno.EROFS, "Read-only file system"))),
        AdapterFileError, "read-only"),
    Bad("permission-denied-at-swap", "write",
        save_over_previous(lambda: failing("peftc.atomic.exchange", OSError(errno.EACCES, "Permission denied"))),
        AdapterFileError, "permission denied"),
    Bad("crash-between-renames", "write", save_over_previous(_crash_between_renames), AdapterFileError,
        "cannot be written"),
    Bad("interrupt-while-staging", "write",
        save_over_previous(lambda: failing("peftc.io.write_adapter_files", KeyboardInterrupt())),
        KeyboardInterrupt, ""),
    # --- resume ------------------------------------------------------------------------------------
    Bad("resume-nothing-there", "resume", never_load_base(cli("resume=/no/such/run")), ConfigError,
        "no checkpoint there"),
    Bad("resume-not-a-checkpoint", "resume", never_load_base(cli("resume={input}")), ConfigError,
        "cannot be read as a checkpoint", write_file("last.ckpt", b"PK\x03\x04 not really a zip")),
    Bad("resume-empty-file", "resume", never_load_base(cli("resume={input}")), ConfigError,
        "cannot be read as a checkpoint", write_file("last.ckpt", b"")),
    Bad("resume-not-peftc", "resume", never_load_base(cli("resume={input}")), ConfigError,
        "not a peftc checkpoint", fake_checkpoint(None)),
    Bad("resume-other-plan", "resume", never_load_base(cli("resume={input}")), ConfigError,
        "was written by a different plan (seed: 99 -> 0)", fake_checkpoint("0123456789abcdef")),
]
# fmt: on


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_pristine(tmp_path_factory.mktemp("pristine"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_cleanly_and_changes_nothing(case: Bad, pristine: Any, tmp_path: Path) -> None:
    world = make_world(pristine, tmp_path)
    made = case.setup(world)
    models = {"base": model_state(world.base), "model": model_state(world.model)}
    files = file_tree(world.root)

    with pytest.raises(case.error) as info:
        case.act(world, made)

    assert case.fragment in str(info.value), str(info.value)
    assert not (world.root / "SENTINEL").exists(), "a pickle payload ran"
    assert_same_model(models["base"], model_state(world.base))
    assert_same_model(models["model"], model_state(world.model))
    assert file_tree(world.root) == files, "files appeared, vanished or changed"
    if case.kind == "write":  # a failed overwrite: the previous adapter still loads, unchanged
        reloaded = peftc.load_adapter(copy.deepcopy(pristine.base), world.out / "adapter")
        expected = pristine.model.adapter_state_dict("default")
        assert all(torch.equal(t, expected[k]) for k, t in reloaded.adapter_state_dict("default").items())
