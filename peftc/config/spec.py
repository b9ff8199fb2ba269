"""Typed, sealed specs: the one place where a composed Hydra config becomes data and is checked.

Every config group option has a schema: a dataclass deriving from `SpecNode`, registered in
Hydra's ConfigStore under `schema/<group>/<name>`, which the option's YAML extends. Hydra then
rejects unknown keys and wrong types at compose time; `to_spec` turns the composed config into
sealed dataclass instances and runs the semantic checks that each field declares in its
metadata (`param(..., check=at_least(1))`) plus each schema's `cross_check`. Every error names
the config key, the bad value and what would work. Nothing downstream reads a raw DictConfig.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from peftc.config.lightning_values import ACCELERATORS, PRECISION_ALIASES, PRECISIONS, lightning_devices
from peftc.errors import ConfigError, did_you_mean

GROUPS = ("peft", "task", "quant", "model", "data", "trainer")

# --------------------------------------------------------------------------------------------
# Declaring fields: a default, a one-line description, and an optional check.

Check = Callable[[Any], "str | None"]  # returns what is allowed when the value is bad


def param(default: Any, help: str, check: Check | None = None) -> Any:
    """A schema field with its description (shown in docs and errors) and its semantic check."""
    metadata = {"help": help, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def at_least(low: float) -> Check:
    return lambda v: None if v is None or v >= low else f"must be >= {low}"


def greater_than(low: float) -> Check:
    return lambda v: None if v is None or v > low else f"must be > {low}"


def in_range(low: float, high: float, *, high_open: bool = True) -> Check:
    def check(v: Any) -> str | None:
        if v is None:
            return None
        ok = low <= v < high if high_open else low <= v <= high
        return None if ok and not math.isnan(v) else f"must be in [{low}, {high}{')' if high_open else ']'}"

    return check


def mapping_of(value_type: type | tuple[type, ...], description: str) -> Check:
    """A {name: value} mapping. Mapping fields are typed Any with default None in schemas:
    Hydra refuses new keys inside a typed dict (`key={a: 1}` fails in struct mode)."""

    def check(v: Any) -> str | None:
        if v is None:
            return None
        if not isinstance(v, dict) or not all(
            isinstance(k, str) and isinstance(x, value_type) and not isinstance(x, bool) for k, x in v.items()
        ):
            return f"must be a mapping of names to {description}"
        return None

    return check


def column_mapping(v: Any) -> str | None:
    """data.columns: {field: column}, or {field: [column, ...]} for a text field read from several."""

    def columns(x: Any) -> bool:
        return isinstance(x, str) or (isinstance(x, list) and bool(x) and all(isinstance(c, str) for c in x))

    if v is None or (isinstance(v, dict) and all(isinstance(k, str) and columns(x) for k, x in v.items())):
        return None
    return "must be a mapping of names to column names (or to lists of columns, whose texts are joined)"


NAME_MAX = 255  # bytes in one name of a path, on Linux filesystems
PATH_MAX = 4096  # bytes in a whole path, its terminating NUL included


def unusable_path(path: str) -> str | None:
    """Why the operating system cannot even look this path up (every lookup of it is an OSError,
    'File name too long'), or None."""
    long_name = next((name for name in path.split("/") if len(os.fsencode(name)) > NAME_MAX), None)
    if long_name is not None:
        return f"has a name of {len(os.fsencode(long_name))} bytes; the filesystem allows {NAME_MAX}"
    if len(os.fsencode(path)) >= PATH_MAX:
        return f"is {len(os.fsencode(path))} bytes long; the filesystem allows {PATH_MAX - 1}"
    return None


def path_problem(path: str) -> str | None:
    """What makes a given path unusable before it is looked up: empty (it would silently mean the
    current directory), or a name the operating system cannot look up; None when neither."""
    if not path.strip():
        return "is empty"
    problem = unusable_path(path)
    return f"{problem}; use a shorter name" if problem else None


def a_path(unset_means: str) -> Check:
    """A file or directory path (`path_problem`), or null for `unset_means`."""

    def check(v: Any) -> str | None:
        problem = None if v is None else path_problem(str(v))
        return f"is empty; give a path, or null for {unset_means}" if problem == "is empty" else problem

    return check


def one_of(*choices: Any) -> Check:
    def check(v: Any) -> str | None:
        if v is None or v in choices:
            return None
        hint = did_you_mean(str(v), [str(c) for c in choices])
        allowed = "must be one of " + ", ".join(repr(c) for c in choices)
        return f"{allowed}; {hint}" if hint else allowed

    return check


# --------------------------------------------------------------------------------------------
# Sealed spec nodes


def spec_from_dict(schema: type, data: Any) -> Any:
    """A spec rebuilt from its plain dict (a saved plan's), nested specs included. Keys the
    schema does not have are dropped and missing ones take their defaults, so plans written by
    an older or newer peftc still load."""
    kwargs = {}
    for spec_field in dataclasses.fields(schema):
        if spec_field.name not in data:
            continue
        value = data[spec_field.name]
        nested = spec_field.default_factory
        if isinstance(nested, type) and issubclass(nested, SpecNode) and isinstance(value, dict):
            value = spec_from_dict(nested, value)
        kwargs[spec_field.name] = value
    return schema(**kwargs)


class SpecNode:
    """Base of every schema. Instances are sealed after construction (lists become tuples).

    Hydra needs mutable dataclasses while composing, so sealing happens in `__post_init__`,
    which OmegaConf only runs when `to_spec` converts the composed config into objects.
    """

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        object.__setattr__(self, "_sealed", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_sealed", False):
            raise dataclasses.FrozenInstanceError(f"spec field {name!r} is read-only")
        object.__setattr__(self, name, value)

    def replace(self, **changes: Any) -> Any:
        """A copy with some fields changed (the only way to 'modify' a sealed spec)."""
        return dataclasses.replace(self, **changes)

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        """Rules that involve several fields (or other groups); raise ConfigError naming the key."""

    def to_dict(self) -> dict[str, Any]:
        return plain(self)


def plain(obj: Any) -> Any:
    """JSON-ready plain data for a spec tree (tuples become lists, nested specs become dicts)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    return obj


def register_schema(group: str, name: str, schema: type) -> type:
    """Store a schema where `conf/<group>/<name>.yaml` can extend it (`/schema/<group>/<name>@_here_`)."""
    ConfigStore.instance().store(group=f"schema/{group}", name=name, node=schema)
    _SCHEMAS[(group, name)] = schema
    return schema


_SCHEMAS: dict[tuple[str, str], type] = {}


def schemas(group: str) -> dict[str, type]:
    """Registered schemas of one group, by option name."""
    return {name: cls for (g, name), cls in _SCHEMAS.items() if g == group}


# --------------------------------------------------------------------------------------------
# The run-level schemas (the group-specific ones live beside their implementation:
# methods/*.py, tasks/*.py, quant/*.py).


# transformers config fields that lead to loading code (remote code, or CVE-2026-4372's route).
CODE_LOADING_MODEL_KEYS = frozenset({"trust_remote_code", "auto_map", "_attn_implementation_internal"})


@dataclass
class ModelSpec(SpecNode):
    name: str | None = param(
        None,
        "Short name of the base model for the plan and for adapter_config.json; null: name_or_path.",
    )
    name_or_path: str | None = param(
        None,
        "Local directory or hub id of a pretrained transformers model; null builds the model from `model_type` + `config`.",
        a_path("a model built from `model_type` + `config`"),
    )
    model_type: str | None = param(
        None, "transformers model_type of a config-built model (llama, gpt2, bert, t5, ...)."
    )
    config: dict[str, Any] = param(
        {},
        "transformers config fields: the whole architecture of a config-built model, or overrides for a pretrained one.",
    )
    init_seed: int = param(0, "Seed of the random initialisation of a config-built model (same seed, same weights).")
    dtype: str = param("float32", "Dtype of the frozen base weights.", one_of("float32", "bfloat16", "float16"))
    tokenizer: str | None = param(
        None,
        "Tokenizer directory or hub id; null means the model's own, or peftc's byte-level tokenizer for config-built models.",
        a_path("the model's own"),
    )
    chat_template: str | None = param(
        None,
        "Jinja chat template (the text, or a file holding it) for data.format=chat; null: the tokenizer's own.",
    )
    revision: str | None = param(None, "Hub revision of a pretrained model.")

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        for name in sorted(set(self.config or {}) & CODE_LOADING_MODEL_KEYS):
            raise ConfigError(
                f"{key}.config.{name}",
                self.config[name],
                "would let the model's files run code, which peftc never allows",
                "remove it (trust_remote_code is always off)",
            )
        if self.name_or_path is None and self.model_type is None:
            raise ConfigError(
                f"{key}.name_or_path",
                None,
                "no model given",
                "set model.name_or_path=<dir or hub id>, or pick a built-in model such as model=tiny_llama",
            )
        # (A saved plan of a config-built model may name it by its own label: that is no path.)
        if self.name_or_path is not None and self.model_type is not None and self.name_or_path != self.name:
            # A config-built option (tiny_llama) with a path would load the path and silently
            # apply the option's config on top, under the option's name.
            raise ConfigError(
                f"{key}.name_or_path",
                self.name_or_path,
                f"is set on model={self.name or self.model_type}, which is built from a config (model_type "
                f"{self.model_type}), not loaded",
                f"to load a model from a directory or hub id, use model=hf {key}.name_or_path={self.name_or_path}",
            )
        if self.name_or_path is not None and not str(self.name_or_path).strip():
            raise ConfigError(
                f"{key}.name_or_path",
                self.name_or_path,
                "is empty",
                "give a local directory or a hub id",
            )

    @property
    def is_config_built(self) -> bool:
        return self.name_or_path is None

    @property
    def label(self) -> str:
        """The option's name for a model peftc ships (config-built, or a `pkg:` path); for one at a
        path of the user's, that path (`model.name_or_path=DIR` under the default option must not
        read as demo_llama)."""
        if self.name and (self.name_or_path is None or self.name_or_path.startswith("pkg:")):
            return self.name
        return self.name_or_path or self.name or str(self.model_type)


@dataclass
class DataSpec(SpecNode):
    source: str = param(
        "builtin",
        "Where examples come from: a dataset shipped with peftc, a local JSONL/CSV file, or hf: the Hugging "
        "Face datasets library (a parquet/arrow/json/csv file, a save_to_disk directory or a hub dataset id).",
        one_of("builtin", "jsonl", "csv", "hf"),
    )
    name: str | None = param(None, "Name of the built-in dataset (source=builtin).")
    format: str = param(
        "text",
        "Row layout for task=causal_lm: text (one `text` field, all tokens trained), prompt_response "
        "(`prompt` + `response` or TRL's `completion`, the loss on the response only unless "
        "task.train_on_prompt), chat (`messages`: [{role, content}, ...], or TRL's `prompt` + `completion` "
        "message lists, rendered with the chat template, the loss on assistant turns).",
        one_of("text", "prompt_response", "chat"),
    )
    path: str | None = param(
        None,
        "Path of a local JSONL/CSV file (source=jsonl|csv); for source=hf a data file, a save_to_disk "
        "directory, a directory of data files, or a hub dataset id (org/name; offline: the local cache).",
        a_path("none (source=builtin)"),
    )
    val_path: str | None = param(
        None,
        "Optional separate validation file (source=jsonl|csv); otherwise `val_fraction` of `path` is held out.",
        a_path("holding out val_fraction of `path`"),
    )
    split: str = param("train", "The split to train on (source=hf).")
    val_split: str | None = param(
        None, "The split to validate on (source=hf), e.g. validation; null: hold out val_fraction of `split`."
    )
    subset: str | None = param(None, "The dataset's configuration (source=hf), for sets that have several.")
    streaming: bool = param(
        False,
        "Read only the rows the run uses, lazily (source=hf; needs limit_examples), instead of the whole split.",
    )
    columns: Any = param(
        None,
        "Map from the task's field names (e.g. text, label) to the file's column names, e.g. {text: body}; a "
        "list reads a text field from several columns, joined by a blank line: {prompt: [instruction, input]}.",
        column_mapping,
    )

    val_fraction: float = param(
        0.1,
        "Share of a user file held out for validation (fixed, seeded split).",
        in_range(0.0, 1.0),
    )
    max_length: int = param(
        128,
        "Tokens per example after truncation (or per packed block for language modelling).",
        at_least(8),
    )
    truncation: bool = param(
        True, "Cut examples longer than max_length (false: keep them whole; packing still uses max_length)."
    )
    padding: str = param(
        "longest",
        "Pad each batch to its longest example, or always to max_length (fixed shapes).",
        one_of("longest", "max_length"),
    )
    batch_size: int = param(8, "Examples per training batch.", at_least(1))
    eval_batch_size: int | None = param(None, "Examples per validation batch; null = batch_size.", at_least(1))
    num_workers: int = param(0, "DataLoader worker processes.", at_least(0))
    limit_examples: int | None = param(None, "Use only the first N training examples (quick runs).", at_least(1))
    limit_val_examples: int | None = param(None, "Use only the first N validation examples.", at_least(1))

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        if self.source == "builtin" and not self.name:
            raise ConfigError(f"{key}.name", self.name, "a built-in dataset needs a name", "e.g. data=causal_lm")
        if self.source in ("jsonl", "csv", "hf") and not self.path:
            raise ConfigError(
                f"{key}.path",
                self.path,
                f"source={self.source} needs a file"
                + (", a directory or a hub dataset id" if self.source == "hf" else ""),
                "set data.path=<file>",
            )
        if self.source != "hf":
            self._check_hf_only(key)
        elif self.val_path:
            raise ConfigError(
                f"{key}.val_path",
                self.val_path,
                "is for source=jsonl|csv",
                "with source=hf name the split: data.val_split=<split>",
            )
        elif self.streaming and self.limit_examples is None:
            raise ConfigError(
                f"{key}.streaming",
                True,
                "reads only the rows the run uses, so it needs their number",
                "set data.limit_examples=<training rows>, or data.streaming=false to read the whole split",
            )

    def _check_hf_only(self, key: str) -> None:
        """split, val_split, subset and streaming mean something only to the datasets library."""
        for name, unset in (("split", "train"), ("val_split", None), ("subset", None), ("streaming", False)):
            if getattr(self, name) != unset:
                raise ConfigError(
                    f"{key}.{name}",
                    getattr(self, name),
                    f"is read by data.source=hf only (source is {self.source})",
                    f"use data.source=hf, or drop {key}.{name}",
                )


@dataclass
class TrainerSpec(SpecNode):
    accelerator: str = param("cpu", "Lightning accelerator (cpu, gpu, cuda, mps, tpu, auto).", one_of(*ACCELERATORS))
    devices: Any = param(1, "Lightning devices: a count, a list of ids, or 'auto'.", lightning_devices)
    strategy: str = param("auto", "Lightning strategy (auto, ddp, fsdp, deepspeed_stage_2, ...).")
    num_nodes: int = param(1, "Number of nodes for multi-node strategies.", at_least(1))
    precision: str = param(
        "32-true",
        "Lightning precision (32-true, bf16-mixed, 16-mixed, bf16-true, 16-true, 64-true, transformer-engine).",
        one_of(*PRECISIONS, *PRECISION_ALIASES),
    )
    max_steps: int = param(40, "Optimizer steps to train for (-1: bounded by max_epochs).", at_least(-1))
    max_epochs: int | None = param(None, "Epoch limit (null: only max_steps counts).", at_least(1))
    lr: float = param(1e-3, "Peak learning rate of AdamW.", greater_than(0.0))
    weight_decay: float = param(
        0.0,
        "AdamW weight decay, on matrices only (biases, norm weights and 1-D scaling vectors are not decayed).",
        at_least(0.0),
    )
    betas: list[float] = param([0.9, 0.999], "AdamW betas.")
    warmup_steps: int = param(0, "Linear warm-up steps.", at_least(0))
    scheduler: str = param("constant", "Learning-rate schedule after warm-up.", one_of("constant", "linear", "cosine"))
    gradient_clip_val: float | None = param(
        None, "Clip the gradient norm to this value (null: no clipping).", greater_than(0.0)
    )
    accumulate_grad_batches: int = param(1, "Batches per optimizer step.", at_least(1))
    val_check_interval: Any = param(
        None,
        "Validate every N steps (int) or fraction of an epoch (float); null: once per epoch and at the end.",
    )
    limit_val_batches: Any = param(None, "Validation batches per check (int) or fraction (float); null: all.")
    log_every_n_steps: int = param(5, "Log training metrics every N steps.", at_least(1))
    logger: str = param(
        "csv",
        "Metrics tracker: csv (logs/metrics.csv), tensorboard, wandb (WANDB_MODE=offline logs locally), mlflow "
        "(MLFLOW_TRACKING_URI, else a local store in the run directory), or none.",
        one_of("csv", "tensorboard", "wandb", "mlflow", "none"),
    )
    tracker_project: str = param(
        "peftc", "W&B project / MLflow experiment the run is logged under (trainer.logger=wandb|mlflow)."
    )
    progress_bar: bool | None = param(None, "Show a progress bar; null: only when stderr is a terminal.")
    deterministic: bool = param(False, "Ask torch for deterministic algorithms (slower, reproducible).")
    gradient_checkpointing: bool = param(False, "Recompute activations in backward to save memory.")
    compile: bool = param(
        False, "Compile each repeated block of the model with torch.compile (opt-in: slow first steps)."
    )
    checkpoint_every_n_steps: int = param(
        50,
        "Write checkpoints/last.ckpt (trainable tensors + optimizer state) every N optimizer steps and after "
        "the last; 0: only on SIGTERM or Ctrl-C.",
        at_least(0),
    )
    early_stopping_patience: int | None = param(
        None,
        "Stop once the task's primary validation metric has not improved for this many validation checks "
        "(see val_check_interval); null: train to max_steps.",
        at_least(1),
    )
    save_best: bool = param(
        False, "Save the adapter of the best validation check (the task's primary metric), not the last step's."
    )

    @property
    def precision_name(self) -> str:
        """The precision under Lightning's full name (its aliases '32', 'bf16', ... resolved)."""
        return PRECISION_ALIASES.get(self.precision, self.precision)

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        if self.max_steps == -1 and self.max_epochs is None:
            raise ConfigError(
                f"{key}.max_steps",
                -1,
                "training would never stop",
                "set trainer.max_steps>0 or trainer.max_epochs",
            )
        if self.max_steps == 0:
            raise ConfigError(
                f"{key}.max_steps",
                0,
                "must be positive (or -1 with max_epochs)",
                "e.g. trainer.max_steps=100",
            )
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(
                f"{key}.betas",
                list(self.betas),
                "must be two numbers in [0, 1)",
                "e.g. [0.9, 0.999]",
            )


@dataclass
class BudgetSpec(SpecNode):
    memory_gb: float | None = param(
        None,
        "Training memory available per device in GiB; the plan says whether its estimate fits and by how much.",
        greater_than(0.0),
    )


@dataclass
class RunSpec(SpecNode):
    """The whole composed run: one option per group plus run-level switches."""

    peft: Any = MISSING
    task: Any = MISSING
    quant: Any = MISSING
    model: Any = MISSING
    data: Any = MISSING
    trainer: Any = MISSING
    seed: int = param(
        0,
        "Global seed for data order, dropout and adapter initialisation.",
        # numpy's seed range; Lightning's seed_everything raises outside it, after plan.json is written
        in_range(0, 2**32 - 1, high_open=False),
    )
    dry_run: bool = param(False, "Print the plan and exit without loading weights.")
    output_dir: str | None = param(
        None,
        "Where the run writes adapter/, plan.json and metrics; null: Hydra's run directory.",
        a_path("Hydra's run directory"),
    )
    adapter_name: str = param("default", "Name of the adapter being trained (peft's default is 'default').")
    save_merged: bool = param(False, "Also write the merged model (adapter folded into the base) to merged/.")
    predict_samples: int = param(
        4, "After training, predict the first N validation examples into predictions.jsonl (0: none).", at_least(0)
    )
    explain: bool = param(False, "Print where every config value came from (file, group option, override) and exit.")
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    resume: str | None = param(
        None,
        "Continue training from a checkpoint: a .ckpt file or a run directory holding checkpoints/last.ckpt (same config only).",
        a_path("a fresh run"),
    )
    action: str = param(
        "train",
        "train: fit and save an adapter; eval: metrics on the validation split; predict: run on `input`/`input_file`; "
        "merge: write the base with `adapter` folded in (loadable by from_pretrained); export: `adapter` with a model card, ready to upload.",
        one_of("train", "eval", "predict", "merge", "export"),
    )
    adapter: str | None = param(
        None,
        "Saved adapter directory (or hub id): for action=eval|predict|merge|export its base model, head and task are rebuilt from it; for action=train training continues from it (its method, settings and base model; the run's data and trainer). null: the plan's untrained adapter (eval, predict), or a fresh one (train).",
        a_path("no saved adapter"),
    )
    input: Any = param(None, "What action=predict runs on: a text, a {field: value} mapping, or a list of them.")
    input_file: str | None = param(
        None,
        "A .jsonl/.csv (task fields, data.columns applies) or .txt (one input per line) file for action=predict.",
        a_path("no input file"),
    )

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        check_adapter_name("adapter_name", self.adapter_name)
        if self.action in ("merge", "export") and self.adapter is None:
            raise ConfigError(
                "adapter", None, f"action={self.action} needs the adapter to {self.action}", "give adapter=RUN/adapter"
            )
        if self.action == "predict" and self.input is None and self.input_file is None:
            raise ConfigError(
                "input",
                None,
                "action=predict needs something to predict on",
                "give input='\"a text\"', input={field: value} or input_file=PATH",
            )
        if self.action != "predict" and (self.input is not None or self.input_file is not None):
            name = "input" if self.input is not None else "input_file"
            raise ConfigError(name, getattr(self, name), "is only read by action=predict", "add action=predict")


ConfigStore.instance().store(name="run_schema", node=RunSpec)
for _group, _schema in (("model", ModelSpec), ("data", DataSpec), ("trainer", TrainerSpec)):
    register_schema(_group, "base", _schema)

_ADAPTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def check_adapter_name(key: str, name: str) -> None:
    """Adapter names become key segments and folder names: no dots, slashes or empties."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise ConfigError(
            key,
            name,
            "is not a valid adapter name",
            "use letters, digits, '_' or '-', starting with a letter or '_' (no dots)",
        )


# --------------------------------------------------------------------------------------------
# Composed config -> sealed spec


def validate(node: SpecNode, key: str = "", run: RunSpec | None = None, *, cross: bool = True) -> None:
    """Run the declared field checks and cross checks of a spec tree, depth first.
    `cross=False` runs the field checks only (specs read back from files, whose cross rules
    may concern what a user may set, not what peftc wrote)."""
    run = run if run is not None else (node if isinstance(node, RunSpec) else None)
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        full_key = f"{key}.{f.name}" if key else f.name
        if isinstance(value, SpecNode):
            validate(value, full_key, run, cross=cross)
            continue
        check_finite(full_key, value)
        check = f.metadata.get("check")
        if check is not None:
            try:
                problem = check(value)
            except TypeError:
                problem = "has the wrong type"
            if problem:
                raise ConfigError(full_key, value, problem)
    if cross:
        node.cross_check(key or "<root>", run)


def check_finite(key: str, value: Any) -> None:
    """inf and nan are refused in every number of every schema (scalars, lists, mappings such
    as rank/alpha patterns and model.config): one would train nothing or turn the adapter's
    tensors into NaN, and no range check can be relied on to catch it (nan fails every comparison)."""
    pending = [(key, value)]  # a loop, not recursion: a mapping read from a file may nest deeply
    while pending:
        key, value = pending.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(
                key, value, "must be a finite number (inf and nan are not allowed)", "give a finite value"
            )
        if isinstance(value, (list, tuple, ListConfig)):
            pending.extend((f"{key}.{index}", item) for index, item in reversed(list(enumerate(value))))
        elif isinstance(value, (dict, DictConfig)):
            pending.extend((f"{key}.{name}", item) for name, item in reversed(list(value.items())))


def reject_unknown_keys(cfg: Any, schema: type | None, key: str) -> None:
    """`+key=value` overrides bypass Hydra's struct mode; refuse keys no schema declares."""
    if not isinstance(cfg, DictConfig):
        return
    object_type = OmegaConf.get_type(cfg)
    schema = object_type if dataclasses.is_dataclass(object_type) else schema
    if schema is None or not dataclasses.is_dataclass(schema):
        return
    known = {f.name: f for f in dataclasses.fields(schema)}
    for name in cfg:
        full_key = f"{key}.{name}" if key else str(name)
        if name not in known:
            raise unknown_key_error(full_key, str(name), schema)
        child = cfg._get_node(name)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            reject_unknown_keys(child, None, full_key)


def unknown_key_error(full_key: str, name: str, schema: type | None) -> ConfigError:
    where = full_key.rsplit(".", 1)[0] if "." in full_key else "<root>"
    if schema is None or not dataclasses.is_dataclass(schema):
        return ConfigError(
            full_key,
            None,
            f"{where} has no entry {name!r}",
            f"to add an entry to this mapping, write +{full_key}=<value>",
        )
    fields = [f.name for f in dataclasses.fields(schema)]
    hints = [_key_elsewhere(name, where) or did_you_mean(name, fields) or "known keys: " + ", ".join(fields)]
    owners = _options_with_key(where, name, schema)
    if owners:
        hints.append(
            f"{full_key} is a key of {where}={', '.join(owners)}; pick one of those with {where}=<name>"
            if len(owners) > 1
            else f"{full_key} is a key of {where}={owners[0]}; select it with {where}={owners[0]}"
        )
    return ConfigError(full_key, None, f"unknown key for {where} ({schema.__name__})", "; ".join(hints))


def _key_elsewhere(name: str, where: str) -> str | None:
    """peftc's key for a setting written as another tool names it (`lora_r`, `learning_rate`), or
    written at the top level where a group has it (`r=8` for peft.r)."""
    from peftc.config.other_tools import OTHER_TOOLS_NAMES

    meant = [OTHER_TOOLS_NAMES[name]] if name in OTHER_TOOLS_NAMES else []
    if not meant and where == "<root>":
        meant = sorted(
            {f"{group}.{name}" for group in GROUPS for schema in schemas(group).values() if _has_field(schema, name)}
        )
    return f"did you mean {' or '.join(meant)}?" if meant else None


def _has_field(schema: type, name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(schema)}


def _options_with_key(group: str, name: str, chosen: type) -> list[str]:
    """Other options of a config group whose schema has this key (`peft.r` under prompt
    tuning: lora, adalora, ... have an `r`)."""
    return sorted(
        option
        for option, schema in schemas(group).items()
        if schema is not chosen and name in {f.name for f in dataclasses.fields(schema)}
    )


def describe(schema: type) -> Iterator[tuple[str, Any, str]]:
    """(name, default, help) for each field of a schema: feeds docs and `--help`-style listings."""
    for f in dataclasses.fields(schema):
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        yield f.name, default, f.metadata.get("help", "")


def as_list(value: Any) -> list[Any] | None:
    """Normalise a str-or-sequence config value (tuples from sealed specs, ListConfig) to a list."""
    if value is None:
        return None
    if isinstance(value, (list, tuple, ListConfig)):
        return list(value)
    return [value]
