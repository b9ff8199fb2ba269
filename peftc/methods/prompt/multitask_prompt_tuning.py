"""Multitask prompt tuning (Wang et al. 2023): one shared prompt P (n x d) modulated per task by
a rank-r matrix, P_t = P * (U_t V_t) elementwise, U_t = prefix_task_cols[t] (n x r),
V_t = prefix_task_rows[t] (r x d), both N(0, 0.02) at the start.

Each example picks its task by `task_ids` in the batch: a `task_id` column of the data (rename
it with `data.columns.task_id=<column>`; rows without it are task 0). A call without task_ids
(e.g. prediction on raw text) uses task 0, with a warning when there are several tasks. The prompt starts like prompt tuning (random or an init text) or from a
source multitask adapter (`prompt_tuning_init_state_dict_path`, a safetensors file or adapter
directory): AVERAGE_SOURCE_TASKS (P and the mean of the source U, V), EXACT_SOURCE_TASK (P and
the U, V of task `prompt_tuning_init_task`), ONLY_SOURCE_SHARED (only P). The source U, V seed
every target task. For encoder-decoders the second half of the 2n tokens is prepended to the
decoder inputs (labels padded with -100), as peft does. Saved: `prompt_embeddings` (P),
`prefix_task_cols`, `prefix_task_rows`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc.config.spec import RunSpec, at_least, one_of, param
from peftc.errors import ConfigError, PlanError
from peftc.methods import register
from peftc.methods.base import BatchField
from peftc.methods.common import integer
from peftc.methods.prompt.encoder import VirtualTokenEncoder
from peftc.methods.prompt.prompt_tuning import (
    PromptTuningSpec,
    check_text_init,
    init_table,
    init_token_ids,
    text_init_config,
    text_init_fields,
)
from peftc.methods.prompt.shared import PromptLearningMethod, PromptShapes
from peftc.planning.plan import Plan, PromptPlan

SOURCE_INITS = ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")
INITS = ("RANDOM", "TEXT", *SOURCE_INITS)


@dataclass
class MultitaskPromptTuningSpec(PromptTuningSpec):
    prompt_tuning_init: str = param(
        "RANDOM", "How the prompt starts (the source inits read a trained adapter).", one_of(*INITS)
    )
    prompt_tuning_init_state_dict_path: str | None = param(
        None, "Source multitask adapter for the *_SOURCE_* inits: adapter_model.safetensors or its directory."
    )
    prompt_tuning_init_task: int = param(0, "Source task whose U, V seed the prompt (EXACT_SOURCE_TASK).", at_least(0))
    num_tasks: int = param(1, "Tasks the prompt serves; task ids run 0..num_tasks-1.", at_least(1))
    num_ranks: int = param(1, "Rank r of each task's modulation U_t V_t.", at_least(1))

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        check_text_init(key, self.prompt_tuning_init, self.prompt_tuning_init_text, self.inference_mode)
        if (
            self.prompt_tuning_init in SOURCE_INITS
            and not self.inference_mode
            and not self.prompt_tuning_init_state_dict_path
        ):
            raise ConfigError(
                f"{key}.prompt_tuning_init_state_dict_path",
                None,
                f"prompt_tuning_init={self.prompt_tuning_init} starts from a trained multitask adapter",
                f"set {key}.prompt_tuning_init_state_dict_path=<adapter dir or adapter_model.safetensors>",
            )


def source_file(path: str) -> Path:
    """The safetensors file of a source adapter (a directory means its adapter_model.safetensors)."""
    from peftc.planning.layout import PICKLE_NAME, WEIGHTS_NAME

    file = Path(path).expanduser()
    if file.is_dir():
        file = file / WEIGHTS_NAME
    key = "peft.prompt_tuning_init_state_dict_path"
    if file.name == PICKLE_NAME or file.suffix in (".bin", ".pt", ".pth"):
        raise ConfigError(
            key, path, "pickle files are never loaded (they can run code)", "use the adapter's .safetensors file"
        )
    if not file.is_file():
        raise ConfigError(
            key, path, "no such file", "give a multitask adapter directory or its adapter_model.safetensors"
        )
    return file


def source_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a source adapter, from its checked header (a corrupt file is a ConfigError)."""
    from peftc.errors import AdapterFileError
    from peftc.files.tensorfile import read_header

    try:
        return {name: entry.shape for name, entry in read_header(file).items()}
    except AdapterFileError as exc:
        raise ConfigError("peft.prompt_tuning_init_state_dict_path", str(file), exc.problem, exc.hint) from exc


class MultitaskPromptEmbedding(VirtualTokenEncoder):
    def __init__(self, prompt: PromptPlan, base_model: nn.Module) -> None:
        super().__init__(prompt)
        opts = prompt.options
        self.decoder_prompts = self.is_encoder_decoder and self.num_transformer_submodules == 2
        self.num_tasks = opts["num_tasks"]
        self._warned = False
        self.embedding = nn.Embedding(self.total_tokens, self.token_dim)
        init_table(self.embedding, opts, base_model.get_input_embeddings())
        ranks = opts["num_ranks"]
        self.prefix_task_cols = nn.Parameter(torch.normal(0.0, 0.02, size=(self.num_tasks, self.total_tokens, ranks)))
        self.prefix_task_rows = nn.Parameter(torch.normal(0.0, 0.02, size=(self.num_tasks, ranks, self.token_dim)))
        if opts.get("source") and not self.inference_mode:
            self._init_from_source(opts)

    @torch.no_grad()
    def _init_from_source(self, opts: Mapping[str, Any]) -> None:
        from safetensors.torch import load_file

        source = load_file(opts["source"])
        self._copy_into(self.embedding.weight, source["prompt_embeddings"], "prompt_embeddings")
        init = opts["init"]
        if init == "ONLY_SOURCE_SHARED":
            return
        cols, rows = source["prefix_task_cols"], source["prefix_task_rows"]
        if init == "AVERAGE_SOURCE_TASKS":
            cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
        else:
            task = opts["init_task"]
            cols, rows = cols[task : task + 1], rows[task : task + 1]
        self.prefix_task_cols.copy_(cols.expand_as(self.prefix_task_cols))
        self.prefix_task_rows.copy_(rows.expand_as(self.prefix_task_rows))

    def prompt_embeddings(self, batch: int, task_ids: torch.Tensor | None) -> torch.Tensor:
        if task_ids is None:
            if self.num_tasks > 1 and not self._warned:
                # Prediction paths (generate on raw text) carry no task; say which prompt they get.
                warnings.warn(
                    f"multitask prompt tuning: no task_ids given, every row uses task 0 of {self.num_tasks}; "
                    "pass task_ids=... to choose",
                    stacklevel=3,
                )
                self._warned = True
            task_ids = torch.zeros(batch, dtype=torch.long, device=self.embedding.weight.device)
        task_ids = torch.as_tensor(task_ids, device=self.embedding.weight.device).long().reshape(-1)
        if task_ids.numel() != batch or int(task_ids.min()) < 0 or int(task_ids.max()) >= self.num_tasks:
            raise ValueError(f"task_ids must hold one index in [0, {self.num_tasks}) per row, got {task_ids.tolist()}")
        modulation = self.prefix_task_cols[task_ids] @ self.prefix_task_rows[task_ids]
        return self.embedding.weight.unsqueeze(0) * modulation

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "prompt_embeddings": self.embedding.weight.detach(),
            "prefix_task_cols": self.prefix_task_cols.detach(),
            "prefix_task_rows": self.prefix_task_rows.detach(),
        }

    def load_saved(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._copy_into(self.embedding.weight, tensors["prompt_embeddings"], "prompt_embeddings")
        self._copy_into(self.prefix_task_cols, tensors["prefix_task_cols"], "prefix_task_cols")
        self._copy_into(self.prefix_task_rows, tensors["prefix_task_rows"], "prefix_task_rows")


@register
class MultitaskPromptTuning(PromptLearningMethod):
    name = "multitask_prompt_tuning"
    peft_type = "MULTITASK_PROMPT_TUNING"
    schema = MultitaskPromptTuningSpec
    encoder_class = MultitaskPromptEmbedding

    def encoder_tensors(self, spec: Any, shapes: PromptShapes, total_tokens: int) -> dict[str, tuple[int, ...]]:
        return {
            "embedding.weight": (total_tokens, shapes.token_dim),
            "prefix_task_cols": (spec.num_tasks, total_tokens, spec.num_ranks),
            "prefix_task_rows": (spec.num_tasks, spec.num_ranks, shapes.token_dim),
        }

    def encoder_options(self, spec: MultitaskPromptTuningSpec, shapes: PromptShapes, run: RunSpec) -> dict[str, Any]:
        total = spec.num_virtual_tokens * shapes.num_transformer_submodules
        options: dict[str, Any] = {
            "init": spec.prompt_tuning_init,
            "num_tasks": spec.num_tasks,
            "num_ranks": spec.num_ranks,
            "init_task": spec.prompt_tuning_init_task,
        }
        ids = init_token_ids(spec, run, total)
        if ids is not None:
            options["init_token_ids"] = ids
        if spec.prompt_tuning_init in SOURCE_INITS and not spec.inference_mode:
            options["source"] = str(self._checked_source(spec, shapes, total))
        return options

    def _checked_source(self, spec: MultitaskPromptTuningSpec, shapes: PromptShapes, total: int) -> Path:
        """The source adapter must hold P (total x d) and U, V of this rank and width."""
        file = source_file(str(spec.prompt_tuning_init_state_dict_path))
        found = source_shapes(file)
        tasks = found.get("prefix_task_cols", (0,))[0]
        wanted = {"prompt_embeddings": (total, shapes.token_dim)}
        if spec.prompt_tuning_init != "ONLY_SOURCE_SHARED":
            wanted["prefix_task_cols"] = (tasks, total, spec.num_ranks)
            wanted["prefix_task_rows"] = (tasks, spec.num_ranks, shapes.token_dim)
        for name, shape in wanted.items():
            if found.get(name) != shape:
                raise PlanError(
                    "peft.prompt_tuning_init_state_dict_path",
                    str(file),
                    f"{name} is {found.get(name, 'missing')} there, this prompt needs {shape}",
                    "the source must be a multitask prompt adapter of the same model, num_virtual_tokens and num_ranks",
                )
        if spec.prompt_tuning_init == "EXACT_SOURCE_TASK" and spec.prompt_tuning_init_task >= tasks:
            raise PlanError(
                "peft.prompt_tuning_init_task",
                spec.prompt_tuning_init_task,
                f"the source adapter has {tasks} tasks",
                f"pick a task in 0..{tasks - 1}",
            )
        return file

    def batch_fields(self, spec: MultitaskPromptTuningSpec) -> dict[str, BatchField]:
        return {"task_ids": BatchField("task_id", 0, limit=spec.num_tasks, key="peft.num_tasks")}

    def saved_prompt_tensors(self, prompt: PromptPlan) -> dict[str, tuple[int, ...]]:
        return {
            "prompt_embeddings": prompt.tensors["embedding.weight"],
            "prefix_task_cols": prompt.tensors["prefix_task_cols"],
            "prefix_task_rows": prompt.tensors["prefix_task_rows"],
        }

    def method_config(self, spec: MultitaskPromptTuningSpec, plan: Plan) -> dict[str, Any]:
        return {
            **text_init_config(spec, plan),
            "prompt_tuning_init_state_dict_path": spec.prompt_tuning_init_state_dict_path,
            "prompt_tuning_init_task": spec.prompt_tuning_init_task,
            "num_tasks": spec.num_tasks,
            "num_ranks": spec.num_ranks,
        }

    def method_spec_fields(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return {
            **text_init_fields(config, INITS),
            "prompt_tuning_init_state_dict_path": config.get("prompt_tuning_init_state_dict_path"),
            "prompt_tuning_init_task": integer(config, "prompt_tuning_init_task", 0),
            "num_tasks": integer(config, "num_tasks", 1),
            "num_ranks": integer(config, "num_ranks", 1),
        }
