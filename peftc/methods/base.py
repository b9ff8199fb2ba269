"""The contracts every PEFT method implements: two kinds, each small.

`Method` is what every method has: its schema, its peft config fields (to and from
adapter_config.json), run checks, and optional training hooks. An `InjectableMethod` adapts
modules of the base model: the planner asks it for target selection and one `Site` per
module (plus model-level shared tensors), and the runtime wraps each module with its
`AdapterLayer` (peftc/methods/layer.py). A `PromptMethod` adds a prompt encoder instead: the
planner asks it for a `PromptPlan`, and the runtime builds, saves and loads the encoder through
it. The planner calls the planning hooks once; what they return is stored in the plan, so the
files and fingerprints need no method code. Code below the plug-ins (planning, config), which
may not import this module, tells the contracts apart by their `kind` constant.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from peftc.methods.defaults import Targets, targets_for
from peftc.planning.targets import TargetRequest

if TYPE_CHECKING:
    from pathlib import Path

    from peftc.config.spec import RunSpec, SpecNode
    from peftc.methods.layer import AdapterLayer
    from peftc.planning.graph import ModelGraph, ModuleInfo
    from peftc.planning.plan import Plan, PromptPlan, SharedTensor, Site
    from peftc.tasks.base import Task


@dataclass(frozen=True)
class BatchField:
    """A per-example model input taken from a data column (`data.columns.<field>` renames it)."""

    field: str  # the row field, e.g. "task_id"
    default: int  # its value for rows (or whole files) without that column
    limit: int | None = None  # values must lie in [0, limit)
    key: str = "peft"  # the config key that sets the limit, for error messages


@dataclass(frozen=True)
class GatheredTensor:
    """One tensor of a plan built from several tensors of a file (see Method.gathered_tensors)."""

    sources: tuple[str, ...]  # the file's tensor names, in the order `build` takes them
    shape: tuple[int, ...]  # the built tensor's, for the header check before anything is read
    build: Callable[[list[torch.Tensor]], torch.Tensor]
    piece_shape: tuple[int, ...]  # every source's; a file whose pieces differ is not gathered


class Method:
    """What every PEFT method has. Subclass `InjectableMethod` or `PromptMethod`, not this."""

    name: ClassVar[str]  # group option and registry key, e.g. "lora"
    peft_type: ClassVar[str]  # peft's PeftType value, e.g. "LORA"
    schema: ClassVar[type[SpecNode]]
    # The contract this method keeps, for code below the plug-ins (planning, config), which
    # cannot import this module: "injectable" or "prompt".
    kind: ClassVar[str]
    mergeable: ClassVar[bool] = True  # whether the adapter can be folded into the base weights
    # Fields an older peft wrote that peft has since dropped and this method still reads from an
    # adapter_config.json (spec_from_peft_config), rather than dropping them with a warning.
    legacy_fields: ClassVar[frozenset[str]] = frozenset()

    # --------------------------------------------------------------------------- planning
    def modules_to_save(self, spec: Any) -> list[str]:
        return names_or_none("peft.modules_to_save", getattr(spec, "modules_to_save", None)) or []

    def spec_for_model(self, spec: Any, graph: ModelGraph) -> Any:
        """The spec as it reads on this model, before anything else is planned from it, and as
        adapter_config.json records it (LoRA: transformers-4 expert names on transformers-5 MoE
        models, as peft 0.22 rewrites its config). Default: as written."""
        return spec

    def check_run(self, spec: Any, run: RunSpec, graph: ModelGraph) -> None:
        """Rules needing the model graph or other groups (raise ConfigError/PlanError)."""

    def batch_fields(self, spec: Any) -> dict[str, BatchField]:
        """Extra per-example inputs the method reads from the data, by batch key (e.g. the
        task ids of multitask prompt tuning). Tasks carry these fields from rows to batches."""
        return {}

    # ---------------------------------------------------------------------------- training
    def extra_loss(self, model: nn.Module, adapter_name: str) -> torch.Tensor | None:
        """A term added to the task loss during training (AdaLoRA's orthogonal regulariser)."""
        return None

    def callbacks(self, model: nn.Module, plan: Plan) -> list[Any]:
        """Lightning callbacks the method needs while training (AdaLoRA's rank allocator)."""
        return []

    def rewrites_base(self, spec: Any) -> bool:
        """Whether creating this adapter changes the base weights (LoRA's PiSSA and OLoRA)."""
        return False

    def weighted_adapter_spec(
        self, names: Sequence[str], plans: Sequence[Plan], combination_type: str, svd_rank: int | None
    ) -> SpecNode:
        """The spec of a new adapter combining these (PeftcModel.add_weighted_adapter)."""
        from peftc.errors import ConfigError

        raise ConfigError(
            "adapters", list(names), f"{self.name} adapters cannot be combined", "add_weighted_adapter supports LoRA"
        )

    # ------------------------------------------------------------------------------- files
    def peft_config(self, spec: Any, plan: Plan) -> dict[str, Any]:
        """Method-specific adapter_config.json fields (peft's names and defaults), resolved
        against the planned sites. The planner calls it once and stores the result in the plan;
        nothing else does."""
        raise NotImplementedError

    def spec_from_peft_config(self, config: Mapping[str, Any]) -> SpecNode:
        """Our schema from a peft adapter_config.json (fields we do not model are dropped)."""
        raise NotImplementedError

    def plan_warnings(self, spec: Any, sites: Sequence[Site], graph: ModelGraph) -> tuple[str, ...]:
        """What a user of this plan should know that is not an error (the plan shows them, and
        load_adapter warns with them): e.g. an adapter kept on an older peft's numerics."""
        return ()

    def tied_modules(self, spec: Any, graph: ModelGraph) -> dict[str, str]:
        """Modules whose adapter is another module's, because the two share their weight (LoRA's
        ensure_weight_tying: the output head follows the input embedding): follower path ->
        the path it follows. The planner saves a follower of a module in modules_to_save as a
        module holding that module's trained weight. Default: none."""
        return {}

    def tying_hint(self, spec: Any, graph: ModelGraph, sharers: Sequence[str]) -> str:
        """How this method's settings would make `sharers` (modules sharing an adapted module's
        weight) follow the adapter, as '; <what to set>' for the planner's tied-weight warning,
        or '' where it has no way. Default: ''."""
        return ""

    def gathered_tensors(
        self, plan: Plan, file_names: Collection[str], config: Mapping[str, Any]
    ) -> dict[str, GatheredTensor]:
        """Tensors of `plan` that an adapter file (its screened adapter_config.json: `config`)
        holds in pieces, under other names or in another shape, because it was written for an
        older layout of the same model (LoRA: transformers 4's per-expert MoE projections) or by
        an older peft (LoRA: peft 0.2's enable_lora), by the plan's tensor name. Default: none."""
        return {}

    def tensors_from_file(
        self, plan: Plan, tensors: dict[str, torch.Tensor], config: Mapping[str, Any], directory: Path
    ) -> dict[str, torch.Tensor]:
        """An adapter file's tensors (peft's names, checked against `plan`) as this method runs
        them, given the file's screened adapter_config.json: where an older peft wrote numbers
        that mean something else today, converted as peft converts them when it loads the file
        (LoRA on MultiheadAttention before peft 0.22). Default: as read."""
        return tensors


class InjectableMethod(Method):
    """A method that adapts modules of the base model, one `Site` each, wrapped at run time by
    its `AdapterLayer`; it may add tensors shared by all sites (VeRA's projections)."""

    kind = "injectable"
    layer_class: ClassVar[type[AdapterLayer]]
    supported_kinds: ClassVar[frozenset[str]] = frozenset()
    default_targets: ClassVar[Mapping[str, Targets]] = {}
    tensor_prefix: ClassVar[str] = ""
    # Whether the layer works over a quantized base layer (bitsandbytes, quanto, torchao): true
    # when its forward only calls base_layer(x) or reads the base weight through
    # AdapterLayer.read_base_weight, and its merges write through write_base_weight. False
    # refuses quant != none at compile time (peftc/planning/compat.py).
    wraps_quantized: ClassVar[bool] = False

    # --------------------------------------------------------------------------- planning
    def default_target_modules(self, model_type: str) -> list[str] | str:
        """target_modules when the spec leaves it null (peft's table for this method); [] if none."""
        return targets_for(self.default_targets, model_type)

    def target_request(self, spec: Any) -> TargetRequest:
        pattern = names_or_none("peft.layers_pattern", getattr(spec, "layers_pattern", None))
        layers = getattr(spec, "layers_to_transform", None)
        if layers is not None and not (
            _is_index(layers) or isinstance(layers, (list, tuple)) and all(map(_is_index, layers))
        ):
            from peftc.errors import ConfigError

            raise ConfigError(
                "peft.layers_to_transform", layers, "must be a layer index or a list of them", "e.g. [0, 1]"
            )
        return TargetRequest(
            target_modules=getattr(spec, "target_modules", None),
            exclude_modules=getattr(spec, "exclude_modules", None),
            layers_to_transform=tuple([layers] if isinstance(layers, int) else layers) if layers is not None else None,
            layers_pattern=tuple(pattern) if pattern is not None else None,
        )

    def select_targets(self, spec: Any, modules: Sequence[ModuleInfo], graph: ModelGraph) -> list[ModuleInfo]:
        """Narrow the resolved target modules further (e.g. only the last N layers); default: all."""
        return list(modules)

    def plan_site(self, spec: Any, module: ModuleInfo, graph: ModelGraph) -> Site:
        raise NotImplementedError

    def extra_sites(self, spec: Any, graph: ModelGraph, sites: Sequence[Site]) -> tuple[Site, ...]:
        """Sites beside the target modules' (LoRA's trainable tokens); default: none."""
        return ()

    def plan_shared(self, spec: Any, graph: ModelGraph, sites: Sequence[Site]) -> tuple[SharedTensor, ...]:
        """Tensors of the adapter as a whole, which every site reads (VeRA's shared random
        projections, sized by the largest site); default: none."""
        return ()

    def plan_unfrozen(self, spec: Any, graph: ModelGraph, sites: Sequence[Site]) -> dict[str, tuple[int, ...]]:
        """Base parameters this method trains in place (e.g. biases); names are model paths."""
        return {}

    # ----------------------------------------------------------------------- materializing
    def layer_type(self, site: Site) -> type[AdapterLayer]:
        """The adapter layer class that wraps this site's module."""
        return self.layer_class

    def create_shared(self, spec: Any, shared: Sequence[SharedTensor]) -> dict[str, torch.Tensor]:
        """The planned shared tensors' values, by name; created together, because one random
        generator may draw them in turn."""
        raise NotImplementedError(f"{self.name} declares no shared tensors")


class PromptMethod(Method):
    """A method whose adapter is a prompt encoder beside the base model, planned as a
    `PromptPlan` and saved as the tensors peft writes for it."""

    kind = "prompt"
    mergeable = False

    def plan_prompt(self, spec: Any, graph: ModelGraph, task: Task, run: RunSpec) -> PromptPlan:
        raise NotImplementedError

    def saved_prompt_tensors(self, prompt: PromptPlan) -> dict[str, tuple[int, ...]]:
        """Names and shapes the prompt encoder writes to adapter_model.safetensors."""
        raise NotImplementedError

    def create_prompt_encoder(self, prompt: PromptPlan, spec: Any, base_model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def prompt_tensors(self, encoder: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors a prompt encoder saves (peft: the encoder output as 'prompt_embeddings')."""
        raise NotImplementedError

    def load_prompt_tensors(self, encoder: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError


def not_mergeable(method: str) -> Exception:
    """The error for merging an adapter that is not a weight update (prompts, gated attention)."""
    from peftc.errors import ConfigError

    return ConfigError(
        "peft",
        method,
        "cannot be merged into the base weights: the adapter is not a weight update",
        "keep the adapter for inference, or unload() for the plain base model",
    )


def names_or_none(key: str, value: Any) -> list[str] | None:
    """A config value that names modules: null, one name, or a list of names."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    from peftc.errors import ConfigError

    raise ConfigError(key, value, "must be a module name or a list of module names", "e.g. [classifier]")


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def saves_embedding_weight(targets: Any, module: ModuleInfo, graph: ModelGraph) -> bool:
    """peft's rule: when target_modules names embed_tokens/lm_head, the targeted input/output
    embedding's base weight is saved with the adapter too (it may have been resized)."""
    if module.path not in (graph.input_embedding, graph.output_embedding):
        return False
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return False
        import re

        return any(
            re.fullmatch(targets, m.path)
            for m in graph.modules
            if re.match(rf"(.*\.)?({'|'.join(EMBEDDING_LAYER_NAMES)})$", m.path)
        )
    return bool(targets) and any(name in targets for name in EMBEDDING_LAYER_NAMES)


# ------------------------------------------------------------------------------------------
