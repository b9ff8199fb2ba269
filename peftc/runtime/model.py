"""The wrapped model: a transformers model with adapters injected, plus their lifecycle.

`PeftcModel` holds the base model (adapter layers live inside it, wrapping base layers), any
prompt encoders, and one Plan per named adapter. It adds, activates, disables, merges, unloads
and saves adapters; it behaves like the underlying model for forward and generate.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftc.config.spec import check_adapter_name
from peftc.errors import ConfigError, MergeError, PlanError
from peftc.methods.layer import AdapterLayer, ModulesToSaveWrapper
from peftc.planning.graph import replace_module
from peftc.runtime.injection import inject

if TYPE_CHECKING:
    from peftc.planning.plan import Plan


class PeftcModel(nn.Module):
    def __init__(self, base_model: nn.Module) -> None:
        super().__init__()
        self.base_model = base_model
        self.prompt_encoders = nn.ModuleDict()
        self.shared_tensors = nn.ModuleDict()  # adapter name -> its shared tensors (Plan.shared)
        self.plans: dict[str, Plan] = {}
        self.active_adapters: list[str] = []
        self.load_reports: dict[str, Any] = {}  # adapter name -> adapters.LoadReport of its load
        self._disabled = False

    # ---------------------------------------------------------------------------- running
    # model(input_ids=..., labels=...) of a causal LM computes transformers' loss in chunks,
    # without the full logits (made only if read); see lm_loss.forward_with_chunked_loss for
    # when. False: always transformers' own full-logits loss.
    chunked_loss: bool = True
    # Set by trainer.compile=true (training.lightning.compile_blocks): the decoder blocks are
    # compiled for training steps. generate() then decodes eagerly: a KV cache changes the
    # blocks' guards as it is created and grows, so the first generate() compiled 6 more
    # variants of each block (minutes of inductor time on a GPU, for a few validation prompts)
    # and pushed training's own variants toward Dynamo's recompile limit.
    blocks_compiled_for_training: bool = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.chunked_loss and kwargs.get("labels") is not None:
            from peftc.tasks.lm_loss import forward_with_chunked_loss

            return forward_with_chunked_loss(self._run, self.base_model, args, kwargs)
        return self._run(*args, **kwargs)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward, through the active prompt encoder if there is one."""
        encoder = self._active_prompt_encoder()
        if encoder is not None:
            return encoder.forward_model(self.base_model, *args, **kwargs)
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        # Only around blocks peftc compiled: a stance set here replaces the caller's own.
        eager = torch.compiler.set_stance("force_eager") if self.blocks_compiled_for_training else nullcontext()
        with eager:
            encoder = self._active_prompt_encoder()
            if encoder is not None:
                return encoder.generate(self.base_model, *args, **kwargs)
            return self.base_model.generate(*args, **kwargs)

    def _active_prompt_encoder(self) -> nn.Module | None:
        if self._disabled:
            return None
        for name in self.active_adapters:
            if name in self.prompt_encoders:
                return self.prompt_encoders[name]
        return None

    @property
    def config(self) -> Any:
        return self.base_model.config

    # --------------------------------------------------------------------------- structure
    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        for path, module in self.base_model.named_modules():
            if isinstance(module, AdapterLayer):
                yield path, module

    def saved_modules(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for path, module in self.base_model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield path, module

    @property
    def adapter_names(self) -> list[str]:
        return list(self.plans)

    def plan_of(self, name: str) -> Plan:
        if name not in self.plans:
            raise ConfigError(
                "adapter_name",
                name,
                "no such adapter",
                f"adapters: {', '.join(self.plans) or 'none'}",
            )
        return self.plans[name]

    # --------------------------------------------------------------------------- lifecycle
    def add_adapter(self, name: str, plan: Plan, *, init: bool = True) -> None:
        """Inject a planned adapter under `name` (not activated; see set_adapter)."""
        check_adapter_name("adapter_name", name)
        if name in self.plans:
            raise ConfigError(
                "adapter_name",
                name,
                "an adapter with this name already exists",
                "pick another name or delete_adapter() it first",
            )
        self._check_compatible(name, plan)
        inject(self, plan, name, init=init)
        self.plans[name] = plan
        self._refresh_trainable()

    def _check_compatible(self, name: str, plan: Plan) -> None:
        """peft's rules for adapters that share a model: one may train base parameters (biases);
        one that rewrites the base weights (PiSSA, OLoRA) should be alone (a warning)."""
        from peftc import methods

        owners = [other for other, p in self.plans.items() if p.unfrozen]
        if plan.unfrozen and owners:
            raise ConfigError(
                "peft.bias",
                plan.adapter_config.get("bias", "trained base parameters"),
                f"adapter {owners[0]!r} already trains base parameters; only one adapter per model may (peft)",
                "set peft.bias=none for all adapters but one",
            )
        for other in self.plans.values():
            _check_same_shared_options(plan, other)
        if self.plans and any(methods.get(p.method).rewrites_base(p.spec.peft) for p in [plan, *self.plans.values()]):
            warnings.warn(
                f"adding adapter {name!r}: an adapter initialised from the base weights (PiSSA/OLoRA) changed them, "
                "so the other adapters see a different base than they were trained on",
                stacklevel=3,
            )

    def replace_plan(self, name: str, plan: Plan) -> None:
        """Record a new plan for an adapter whose shape changed after it was made (AdaLoRA cuts
        its pruned ranks when training ends). The live tensors must be exactly the plan's."""
        from peftc.files.adapter_files import check_layout

        previous = self.plan_of(name)
        self.plans[name] = plan
        try:
            check_layout(plan, self.adapter_state_dict(name))
        except BaseException:
            self.plans[name] = previous
            raise
        for site in plan.sites:
            self.base_model.get_submodule(site.path).site_options[name] = dict(site.options)

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Activate one or several adapters (the active ones train and run)."""
        from peftc.config.names import check_unique

        chosen = [names] if isinstance(names, str) else check_unique("adapter_names", names)
        for name in chosen:
            self.plan_of(name)
        self.active_adapters = chosen
        for _, layer in self.adapter_layers():
            layer.set_active(chosen)
        for _, wrapper in self.saved_modules():
            wrapper.set_active(chosen)
        self._refresh_trainable()

    def delete_adapter(self, name: str) -> None:
        self.plan_of(name)
        for path, layer in self.adapter_layers():
            if name in layer.merged_adapters:
                raise ConfigError("adapter_name", name, f"is merged into {path}", "unmerge_adapter() first")
        for _, layer in self.adapter_layers():
            layer.delete_adapter(name)
        for _, wrapper in self.saved_modules():
            wrapper.delete_adapter(name)
        if name in self.prompt_encoders:
            del self.prompt_encoders[name]
        if name in self.shared_tensors:
            del self.shared_tensors[name]
        for param_name in self.plans[name].unfrozen:
            self.base_model.get_parameter(param_name).requires_grad_(False)
        del self.plans[name]
        self.load_reports.pop(name, None)
        self.set_adapter([a for a in self.active_adapters if a != name])
        self._remove_empty_layers()

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model: adapters (merged ones unmerged), heads and prompts switched off."""
        previous = self._disabled
        self._set_disabled(True)
        try:
            yield
        finally:
            self._set_disabled(previous)

    def _set_disabled(self, disabled: bool) -> None:
        self._disabled = disabled
        for _, layer in self.adapter_layers():
            layer.disabled = disabled
        for _, wrapper in self.saved_modules():
            wrapper.disabled = disabled

    def _refresh_trainable(self) -> None:
        """Only the active adapters' parameters train; everything else stays frozen."""
        active = set(self.active_adapters)
        for _, layer in self.adapter_layers():
            for name in layer.adapter_names:
                for param in layer.adapter_parameters(name):
                    param.requires_grad_(name in active)
        for _, wrapper in self.saved_modules():
            for name, module in wrapper.modules_to_save.items():
                module.requires_grad_(name in active)
        for name, encoder in self.prompt_encoders.items():
            encoder.requires_grad_(name in active)
        for name, plan in self.plans.items():
            for param_name in plan.unfrozen:
                self.base_model.get_parameter(param_name).requires_grad_(name in active)

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        *,
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
    ) -> Plan:
        """Add `adapter_name` combining existing adapters with weights (peft's LoRA semantics:
        'linear' needs equal ranks, 'cat' has rank sum(r), 'svd' rank svd_rank or max(r)).

        The new adapter has a real plan (it saves, loads and counts like any other); it is
        added inactive. Returns its plan.
        """
        from peftc import methods
        from peftc.planning import planner
        from peftc.planning.graph import graph_of

        plans = [self.plan_of(name) for name in adapters]
        if not plans or len(weights) != len(plans):
            raise ConfigError("weights", list(weights), f"needs one weight per adapter ({len(plans)})")
        if len({p.method for p in plans}) != 1:
            raise ConfigError("adapters", list(adapters), "mix methods", "combine adapters of one method")
        shared = [path for path, w in self.saved_modules() if sum(a in w.modules_to_save for a in adapters) > 1]
        if shared:
            raise ConfigError(
                "adapters",
                list(adapters),
                f"each keep their own copy of {shared[0]} (modules_to_save)",
                "such copies cannot be combined",
            )
        method = methods.get(plans[0].method)
        combination = "linear" if len(plans) == 1 else combination_type  # as peft: one adapter is only scaled
        spec = method.weighted_adapter_spec(list(adapters), plans, combination, svd_rank)
        run = plans[0].spec.replace(peft=spec, adapter_name=adapter_name)
        plan = planner.plan(run, graph_of(self.base_model), strict_targets=False)
        self.add_adapter(adapter_name, plan)
        options = {"svd_clamp": svd_clamp, "svd_full_matrices": svd_full_matrices, "svd_driver": svd_driver}
        try:
            for site in plan.sites:
                layer = self.base_model.get_submodule(site.path)
                layer.combine_adapters(adapter_name, list(adapters), list(weights), combination, **options)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        return plan

    # ----------------------------------------------------------------------------- merging
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, *, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights (kept, so unmerge_adapter can undo it).

        With safe_merge, every merged weight is checked for NaN/Inf first; if any is not
        finite nothing is merged and the base weights stay bit-identical.
        """
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        self._check_mergeable(names)
        layers = list(self.adapter_layers())
        if layers and all(
            all(n in layer.merged_adapters or n not in layer.adapter_names for n in names) for _, layer in layers
        ):
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
            return
        for _, layer in layers:  # every refusal before any weight changes
            layer.check_mergeable([n for n in names if n in layer.adapter_names and n not in layer.merged_adapters])
        quantized = _check_quantized_merge(layers, names)
        if safe_merge:
            for path, layer in layers:
                if not layer.merge_is_finite(names):
                    raise MergeError(
                        f"NaNs detected in the merged weights. The adapter {', '.join(names)} seems to be broken (at {path})"
                    )
        for _, layer in layers:
            layer.merge(names)
        if quantized:
            _warn_requantized(quantized)

    def _check_mergeable(self, names: Sequence[str]) -> None:
        from peftc import methods
        from peftc.methods.base import not_mergeable

        for name in names:
            method = self.plan_of(name).method
            if not methods.get(method).mergeable:
                raise not_mergeable(method)

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def merge_and_unload(self, *, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> nn.Module:
        """The plain transformers model with the adapters folded in (adapters removed). A module in
        modules_to_save becomes the merged adapters' trained copy (the active adapter's by default)."""
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        copies = self._kept_copies(names)  # also inside disable_adapter(): what is merged is what is kept (peft)
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._unwrap(copies)

    def unload(self) -> nn.Module:
        """The plain transformers model without any adapter: base weights as they were, and each
        module in modules_to_save the original, not a trained copy (peft >= 0.22)."""
        self.unmerge_adapter()
        return self._unwrap({})

    def _kept_copies(self, names: Sequence[str]) -> dict[str, nn.Module]:
        """For each modules_to_save wrapper, the trained copy of the one merged adapter that has
        one; two such adapters on one module cannot both be kept (peft refuses too)."""
        kept = {}
        for path, wrapper in self.saved_modules():
            owners = [name for name in names if name in wrapper.modules_to_save]
            if len(owners) > 1:
                raise ConfigError(
                    "adapter_names",
                    owners,
                    f"each keep their own copy of {path} (modules_to_save); a merged model keeps one",
                    "merge one of them",
                )
            if owners:
                kept[path] = wrapper.modules_to_save[owners[0]]
        return kept

    def _unwrap(self, kept_copies: Mapping[str, nn.Module]) -> nn.Module:
        # innermost first: wrappers nest (one per targeted parameter of a module)
        for path, layer in reversed(list(self.adapter_layers())):
            replace_module(self.base_model, path, layer.base_layer)
        for path, wrapper in list(self.saved_modules()):
            replace_module(self.base_model, path, kept_copies.get(path, wrapper.original_module))
        self.plans.clear()
        self.active_adapters = []
        self.prompt_encoders = nn.ModuleDict()
        return self.base_model

    def _remove_empty_layers(self) -> None:
        for path, layer in reversed(list(self.adapter_layers())):
            if not layer.adapter_names:
                replace_module(self.base_model, path, layer.base_layer)
        for path, wrapper in list(self.saved_modules()):
            if not len(wrapper.modules_to_save):
                replace_module(self.base_model, path, wrapper.original_module)

    # ---------------------------------------------------------------------------- counting
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def total_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters(), self.total_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ------------------------------------------------------------------------------- files
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """This adapter's tensors under peft's saved names."""
        from peftc.files.adapter_files import adapter_tensors

        return adapter_tensors(self, name)

    def save_adapter(self, directory: str | Path, adapter_names: Sequence[str] | None = None) -> Path:
        """Save adapters in peft's layout (default at the root, others in subfolders)."""
        from peftc.config.names import check_unique
        from peftc.files.adapter_files import save_adapters

        names = check_unique("adapter_names", adapter_names) if adapter_names is not None else self.adapter_names
        return save_adapters(self, Path(directory), names)


def _check_same_shared_options(plan: Plan, other: Plan) -> None:
    """peft's rule for shared tensors (VeRA's projections): adapters beside each other create
    them alike (one seed, all saved or none). Options are named by the spec fields that set them."""
    theirs = {t.name: t.options for t in other.shared}
    for tensor in plan.shared:
        for option, value in tensor.options.items():
            if tensor.name in theirs and option in theirs[tensor.name] and theirs[tensor.name][option] != value:
                raise ConfigError(
                    f"peft.{option}",
                    value,
                    f"differs from {theirs[tensor.name][option]!r}, the other adapter's (peft: the same for all adapters)",
                    f"set peft.{option}={theirs[tensor.name][option]!r}",
                )


class QuantizedMergeWarning(UserWarning):
    """Merging into a quantized base rounds the merged weights to the backend's format."""


def _check_quantized_merge(layers: list[tuple[str, AdapterLayer]], names: Sequence[str]) -> list[AdapterLayer]:
    """The layers whose quantized base will be requantized; refuses backends whose policy is to
    refuse (nothing has been touched yet when this raises)."""
    quantized = []
    for path, layer in layers:
        if not any(n in layer.adapter_names and n not in layer.merged_adapters for n in names):
            continue
        backend = layer.quant_backend
        if backend is None:
            continue
        if backend.merge_policy == "refuse":
            raise PlanError(
                "quant",
                backend.name,
                f"cannot merge into {path}: {backend.merge_refusal}",
                "merge into the unquantized base instead: peftc.load_adapter(unquantized_base, adapter_dir)"
                ".merge_and_unload(), or train with save_merged=true (which does exactly that)",
            )
        quantized.append(layer)
    return quantized


def _warn_requantized(layers: list[AdapterLayer]) -> None:
    backends = sorted({layer.quant_backend.name for layer in layers})
    worst = max(layer.rounding_error for layer in layers)
    warnings.warn(
        f"merged into {len(layers)} quantized layers ({', '.join(backends)}): each base weight was dequantized, "
        f"updated in float32 and quantized again, so the merged model differs from the unmerged one by that "
        f"rounding (largest weight error {worst:.3g}); unmerge_adapter() restores the stored weights exactly. "
        "For an exact merge, merge into the unquantized base (save_merged=true does).",
        QuantizedMergeWarning,
        stacklevel=3,
    )
