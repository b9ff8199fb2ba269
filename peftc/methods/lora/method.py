"""LoRA: y = W x + s * B A dropout(x), with s = lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA).

A (r x in) and B (out x r) are the trainable tensors per site; B starts at zero, so the default
adapter is an exact no-op. Variants and options, all with peft 0.22.0's semantics:
- DoRA (`use_dora`): W' = m * (W + s B A) / ||W + s B A|| row-wise, m trainable (dora.py);
- `init_lora_weights`: true, false, gaussian, pissa, pissa_niter_K, olora (the last three move
  the principal part of W into the adapter and leave the residual in the base), orthogonal,
  nora (init.py);
- `bias`: train the base biases of every module ('all') or of the adapted ones ('lora_only');
  `lora_bias`: B gets its own bias;
- sites: nn.Linear, GPT-2's Conv1D (W stored (in, out)), nn.Embedding, nn.Conv1d/2d/3d
  (A copies the base conv's kernel, B is 1x1); raw parameters such as MoE expert stacks
  (`target_parameters`, parameters.py); nn.MultiheadAttention (in_proj and out_proj, attention.py);
  trainable embedding rows (`trainable_token_indices`, tokens.py).
The layer is lora_layer.py; adapters are combined (add_weighted_adapter) in lora_combine.py.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from peftc.config.spec import RunSpec, as_list, at_least, greater_than, in_range, mapping_of, param
from peftc.errors import AdapterFileError, ConfigError, PlanError
from peftc.methods import register
from peftc.methods.base import GatheredTensor, InjectableMethod, saves_embedding_weight
from peftc.methods.common import (
    UNIMPLEMENTED_LORA_FIELDS,
    LayeredTargetsSpec,
    bias_param,
    check_patterns,
    flag,
    integer,
    pattern_value,
    real,
    refuse_unimplemented,
    trained_biases,
)
from peftc.methods.common import number as _number
from peftc.methods.defaults import LORA_TARGETS, targets_for
from peftc.methods.layer import AdapterLayer
from peftc.methods.lora import attention, merged_linear, moe_layout, parameters, tokens, tying
from peftc.methods.lora import combine as lora_combine
from peftc.methods.lora.dora import magnitude_shape
from peftc.methods.lora.init import BASE_MUTATING, init_family, is_valid_init
from peftc.methods.lora.layer import CONV_KINDS, LoraLayer
from peftc.planning.graph import ModelGraph, ModuleInfo
from peftc.planning.plan import Plan, Site
from peftc.planning.targets import TargetRequest

if TYPE_CHECKING:
    from pathlib import Path

    import torch

# Initialisations peft can write whose trained adapter is a plain LoRA over the untouched base.
PLAIN_ON_LOAD = ("eva",)


@dataclass
class LoraSpec(LayeredTargetsSpec):
    r: int = param(8, "Rank of the update B A.", at_least(1))
    lora_alpha: float = param(8, "Scale numerator: the update is multiplied by lora_alpha / r.", greater_than(0))
    lora_dropout: float = param(0.0, "Dropout on the adapter's input.", in_range(0.0, 1.0))
    use_rslora: bool = param(False, "Rank-stabilised scaling lora_alpha / sqrt(r).")
    init_lora_weights: Any = param(
        True,
        "true: A Kaiming-uniform, B zero (no-op); 'gaussian': A ~ N(0, 1/r), B zero; false: both random (not a no-op); "
        "'pissa' / 'pissa_niter_K': A, B from the top-r SVD of W (full, or randomised with K iterations), base keeps the residual; "
        "'olora': A, B from the QR decomposition of W, base keeps the residual; 'orthogonal': A, B orthogonal with B A = 0; "
        "'nora': A's columns normalised to unit norm, B zero (Linear layers and target_parameters).",
    )
    use_dora: bool = param(
        False, "DoRA: learn a per-output-row magnitude m; W' = m (W + s B A) / ||W + s B A|| (norm detached)."
    )
    bias: str = bias_param("lora")
    lora_bias: bool = param(False, "Give B its own trainable bias (merged into the base bias).")
    rank_pattern: Any = param(
        None,
        "Per-module rank overrides {regex matched at the end of the module path: rank}, e.g. {q_proj: 16}.",
        mapping_of(int, "ranks"),
    )
    alpha_pattern: Any = param(
        None, "Per-module lora_alpha overrides {regex: alpha}.", mapping_of((int, float), "alphas")
    )
    trainable_token_indices: Any = param(
        None,
        "Embedding rows trained in full (new special tokens): a list of token ids (the input embedding), "
        "or {embedding module: [ids]}.",
    )
    target_parameters: Any = param(
        None,
        "Raw parameters to adapt (MoE expert weights): names or dotted suffixes, e.g. [experts.gate_up_proj]; "
        "a 3-D (experts, out, in) stack gets a rank-r update per expert.",
    )
    ensure_weight_tying: bool = param(
        False,
        "Keep a tied input embedding and output head (tie_word_embeddings) tied: the head follows the "
        "embedding's LoRA or trained copy when target_modules or modules_to_save names embed_tokens or lm_head.",
    )

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        self._check_init(key)
        if self.trainable_token_indices is not None:
            tokens.check_indices(self.trainable_token_indices)
        if self.target_parameters is not None:
            parameters.check_spec(self, key)
        check_patterns(key, self.rank_pattern, self.alpha_pattern)
        if self.lora_bias and self.use_dora:
            raise ConfigError(
                f"{key}.lora_bias", True, "is not supported with DoRA (peft)", f"set {key}.use_dora=false"
            )

    def _check_init(self, key: str) -> None:
        init = self.init_lora_weights
        if not is_valid_init(init):
            raise ConfigError(
                f"{key}.init_lora_weights",
                init,
                "is not a supported initialisation",
                "use true, false, gaussian, pissa, pissa_niter_<K>, olora, orthogonal or nora",
            )
        if init == "orthogonal":
            odd = {p: r for p, r in {"r": self.r, **(self.rank_pattern or {})}.items() if r % 2}
            if odd:
                raise ConfigError(
                    f"{key}.init_lora_weights",
                    init,
                    f"needs even ranks, got {odd}",
                    "use an even r (and even rank_pattern values)",
                )
        if self.lora_bias and init not in (True, False):
            raise ConfigError(
                f"{key}.lora_bias", True, f"only works with init_lora_weights true or false (peft), not {init!r}"
            )


@register
class Lora(InjectableMethod):
    name = "lora"
    peft_type = "LORA"
    schema = LoraSpec
    legacy_fields = merged_linear.LEGACY_FIELDS  # peft 0.2's enable_lora, merge_weights
    layer_class = LoraLayer
    supported_kinds = frozenset({"linear", "conv1d_hf", "embedding", attention.KIND, *CONV_KINDS})
    default_targets = LORA_TARGETS
    tensor_prefix = "lora_"

    def spec_for_model(self, spec: LoraSpec, graph: ModelGraph) -> LoraSpec:
        return tying.for_model(moe_layout.for_model(spec, graph), graph)

    def tied_modules(self, spec: LoraSpec, graph: ModelGraph) -> dict[str, str]:
        return tying.tied_modules(spec, graph)

    def tying_hint(self, spec: LoraSpec, graph: ModelGraph, sharers: Sequence[str]) -> str:
        return tying.hint(spec, graph, sharers)

    def select_targets(self, spec: LoraSpec, modules: Sequence[ModuleInfo], graph: ModelGraph) -> list[ModuleInfo]:
        return tying.without_tied_heads(spec, modules, graph)

    def plan_warnings(self, spec: LoraSpec, sites: Sequence[Site], graph: ModelGraph) -> tuple[str, ...]:
        return tying.warnings_for(spec, graph)

    def gathered_tensors(
        self, plan: Plan, file_names: Collection[str], config: Mapping[str, Any]
    ) -> dict[str, GatheredTensor]:
        return moe_layout.gathered_tensors(plan, file_names) | merged_linear.gathered_tensors(plan, file_names, config)

    wraps_quantized = True  # forward calls base_layer(x); merges go through read/write_base_weight

    def plan_site(self, spec: LoraSpec, module: ModuleInfo, graph: ModelGraph) -> Site:
        r = pattern_value(module.path, spec.rank_pattern or {}, spec.r)
        alpha = pattern_value(module.path, spec.alpha_pattern or {}, spec.lora_alpha)
        _check_site(spec, module, r)
        if module.kind == attention.KIND:
            attention.check_site(spec, module)
        else:
            attention.check_not_out_proj(module, graph)
        scaling = alpha / math.sqrt(r) if spec.use_rslora else alpha / r
        options: dict[str, Any] = {
            "r": r,
            "alpha": alpha,
            "scaling": scaling,
            "init": spec.init_lora_weights,
        }
        if spec.use_dora:
            options["dora"] = True
        if spec.lora_bias:
            options["lora_bias"] = True
        tensors = site_tensors(module, r, dora=spec.use_dora, lora_bias=spec.lora_bias)
        return Site.for_module(
            module,
            tensors,
            options,
            dropout=spec.lora_dropout,
            save_base_weight=saves_embedding_weight(spec.target_modules, module, graph),
        )

    def target_request(self, spec: LoraSpec) -> TargetRequest:
        # With target_parameters, target_modules may adapt nothing ([], or null without defaults), as in peft.
        return replace(super().target_request(spec), modules_optional=bool(spec.target_parameters))

    def check_run(self, spec: LoraSpec, run: RunSpec, graph: ModelGraph) -> None:
        from peftc.config.registry import QUANT_BACKENDS

        backend = QUANT_BACKENDS.for_spec(run.quant).name
        if spec.target_parameters and backend != "none":
            raise ConfigError(
                parameters.KEY,
                list(spec.target_parameters),
                f"peftc adapts raw parameters of unquantized models only, not with quant={backend}",
                "use quant=none, or target modules instead",
            )

    def extra_sites(self, spec: LoraSpec, graph: ModelGraph, sites: Sequence[Site]) -> tuple[Site, ...]:
        extra = attention.out_proj_sites(sites, graph) + parameters.parameter_sites(spec, graph, sites)
        # peft adds the tied heads' LoRA after every other LoRA layer (the order of random draws)
        extra += tying.head_sites(spec, graph, sites)
        return extra + self._token_sites(spec, graph, sites)

    def _token_sites(self, spec: LoraSpec, graph: ModelGraph, sites: Sequence[Site]) -> tuple[Site, ...]:
        extra = tokens.token_sites(spec.trainable_token_indices, graph, init=spec.init_lora_weights is not False)
        adapted = {s.path for s in sites}
        saved = set(self.modules_to_save(spec))
        for site in extra:
            if site.path in adapted:
                raise PlanError(
                    tokens.KEY,
                    site.path,
                    "is also a LoRA target",
                    "adapt the embedding one way: exclude it from peft.target_modules",
                )
            if site.path in saved or site.path.rsplit(".", 1)[-1] in saved:
                raise PlanError(
                    tokens.KEY, site.path, "is also in peft.modules_to_save, which trains the whole embedding (peft refuses both)",
                    "keep one of them",
                )  # fmt: skip
        return extra

    def layer_type(self, site: Site) -> type[AdapterLayer]:
        if parameters.is_parameter_site(site):
            return parameters.ParamLoraLayer
        if site.kind == attention.KIND:
            return attention.MhaLoraLayer
        return tokens.TrainableTokensLayer if tokens.is_token_site(site) else LoraLayer

    def plan_unfrozen(self, spec: LoraSpec, graph: ModelGraph, sites: Sequence[Site]) -> dict[str, tuple[int, ...]]:
        return trained_biases(spec.bias, graph, sites)

    def rewrites_base(self, spec: LoraSpec) -> bool:
        return init_family(spec.init_lora_weights) in BASE_MUTATING

    def weighted_adapter_spec(
        self, names: Sequence[str], plans: Sequence[Plan], combination_type: str, svd_rank: int | None
    ) -> LoraSpec:
        if any(tokens.is_token_site(s) for plan in plans for s in plan.sites):
            raise ConfigError(
                "adapters",
                list(names),
                "carry trainable tokens, which peftc does not combine",
                "combine adapters without them",
            )
        if any(parameters.is_parameter_site(s) or s.kind == attention.KIND for plan in plans for s in plan.sites):
            raise ConfigError(
                "adapters",
                list(names),
                "target parameters or MultiheadAttention, which peftc does not combine (peft: not parameters)",
                "combine adapters without them",
            )
        return lora_combine.weighted_spec(names, plans, combination_type, svd_rank)

    def peft_config(self, spec: LoraSpec, plan: Plan) -> dict[str, Any]:
        return {
            "r": spec.r,
            "lora_alpha": _number(spec.lora_alpha),
            "lora_dropout": spec.lora_dropout,
            "target_modules": _jsonable_targets(spec.target_modules, plan),
            "exclude_modules": _jsonable_targets(spec.exclude_modules, None),
            "layers_to_transform": _plain_list(spec.layers_to_transform),
            "layers_pattern": _plain_list(spec.layers_pattern),
            "use_rslora": spec.use_rslora,
            "init_lora_weights": spec.init_lora_weights,
            "rank_pattern": dict(spec.rank_pattern or {}),
            "alpha_pattern": {p: _number(v) for p, v in (spec.alpha_pattern or {}).items()},
            "fan_in_fan_out": any(s.kind == "conv1d_hf" for s in plan.sites),
            "bias": spec.bias,
            "lora_bias": spec.lora_bias,
            "use_dora": spec.use_dora,
            "modules_to_save": as_list(spec.modules_to_save),
            "trainable_token_indices": plain_tokens(spec.trainable_token_indices),
            "target_parameters": _plain_list(spec.target_parameters),
            "ensure_weight_tying": spec.ensure_weight_tying,
        }

    def spec_from_peft_config(self, config: Mapping[str, Any]) -> LoraSpec:
        refuse_unimplemented(config, UNIMPLEMENTED_LORA_FIELDS, "LoRA")
        init = config.get("init_lora_weights", True)
        if init in PLAIN_ON_LOAD:
            init = True
        elif not is_valid_init(init):
            raise AdapterFileError(
                "adapter_config.json",
                f"init_lora_weights={init!r} changes the base weights in a way peftc does not implement",
                "supported: true, false, gaussian, pissa, pissa_niter_<K>, olora, orthogonal, nora, eva",
            )
        r, lora_alpha = merged_linear.rank_and_alpha(config, integer(config, "r", 8), real(config, "lora_alpha", 8))
        return LoraSpec(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=real(config, "lora_dropout", 0.0),
            target_modules=config.get("target_modules"),
            exclude_modules=config.get("exclude_modules"),
            layers_to_transform=config.get("layers_to_transform"),
            layers_pattern=config.get("layers_pattern"),
            use_rslora=flag(config, "use_rslora", False),
            init_lora_weights=init,
            use_dora=flag(config, "use_dora", False),
            bias=config.get("bias") or "none",
            lora_bias=flag(config, "lora_bias", False),
            rank_pattern=dict(config.get("rank_pattern") or {}),
            alpha_pattern=dict(config.get("alpha_pattern") or {}),
            modules_to_save=config.get("modules_to_save"),
            trainable_token_indices=config.get("trainable_token_indices"),
            target_parameters=config.get("target_parameters") or None,  # peft reads [] as none
            ensure_weight_tying=flag(config, "ensure_weight_tying", False),
        )

    def tensors_from_file(
        self, plan: Plan, tensors: dict[str, torch.Tensor], config: Mapping[str, Any], directory: Path
    ) -> dict[str, torch.Tensor]:
        return attention.out_proj_counted_once(plan, tensors, config, directory)


def site_tensors(module: ModuleInfo, r: int, *, dora: bool, lora_bias: bool) -> dict[str, tuple[int, ...]]:
    """peft's per-site tensor names and shapes for one module."""
    in_f, out_f = module.in_features, module.out_features
    if module.kind == "embedding":
        tensors = {"lora_embedding_A": (r, in_f), "lora_embedding_B": (out_f, r)}
    elif module.kind in CONV_KINDS:
        kernel = tuple(module.get("kernel_size"))
        ones = (1,) * len(kernel)
        tensors = {"lora_A.weight": (r, in_f, *kernel), "lora_B.weight": (out_f, r // module.get("groups", 1), *ones)}
    else:
        tensors = {"lora_A.weight": (r, in_f), "lora_B.weight": (out_f, r)}
    if lora_bias:
        tensors["lora_B.bias"] = (out_f,)
    if dora:
        tensors["lora_magnitude_vector"] = magnitude_shape(module.kind, out_f)
    return tensors


def _check_site(spec: LoraSpec, module: ModuleInfo, r: int) -> None:
    """Combinations peft refuses (or silently breaks on) at one module, refused while planning."""
    family = init_family(spec.init_lora_weights)
    init_key, where = "peft.init_lora_weights", f"{module.path} ({module.class_name})"
    is_conv = module.kind in CONV_KINDS
    if is_conv and family in (*BASE_MUTATING, "orthogonal"):
        raise PlanError(
            init_key,
            spec.init_lora_weights,
            f"peft supports it on Linear layers only, not {where}",
            "exclude the conv layers or use true/gaussian",
        )
    if family == "nora" and (is_conv or module.kind == "embedding"):
        raise PlanError(
            init_key,
            spec.init_lora_weights,
            f"peft implements NoRA on Linear layers and target_parameters only, not {where}",
            f"exclude it: peft.exclude_modules=[{module.leaf_name}], or use true/gaussian",
        )
    if family in BASE_MUTATING and module.kind != "embedding" and r > min(module.in_features, module.out_features):
        raise PlanError(
            init_key,
            spec.init_lora_weights,
            f"needs r <= min(in, out) = {min(module.in_features, module.out_features)} at {where}, got r={r}",
        )
    if spec.lora_bias and module.kind == "embedding":
        raise PlanError(
            "peft.lora_bias",
            True,
            f"is not supported on embeddings ({where}; peft)",
            "exclude the embedding from target_modules",
        )
    groups = module.get("groups", 1) if is_conv else 1
    if groups > 1 and r % groups:
        raise PlanError("peft.r", r, f"must be divisible by groups={groups} of {where} (peft)")


def plain_tokens(value: Any) -> Any:
    """trainable_token_indices as JSON: a list, or {module: list} (as the user gave it, as peft writes it)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {str(k): list(v) for k, v in value.items()}
    return list(value)


def _plain_list(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _jsonable_targets(targets: Any, plan: Plan | None) -> Any:
    """peft writes target_modules as a list (or a regex string); null becomes the resolved names,
    or the model type's default where that is a regex (names alone would widen it)."""
    default = targets_for(LORA_TARGETS, plan.model.model_type) if plan is not None else None
    if targets is None and isinstance(default, str):
        return default
    if targets is None and plan is not None:
        # what the user targets: not peft's wrapper-internal sites (an attention's out_proj) or others
        modules = [
            s
            for s in plan.sites
            if s.path == s.module_path and not tokens.is_token_site(s) and not parameters.is_parameter_site(s)
        ]
        return sorted({s.path.rsplit(".", 1)[-1] for s in modules})
    if isinstance(targets, (list, tuple)):
        return list(targets)
    return targets
