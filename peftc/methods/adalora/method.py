"""AdaLoRA: y = W x + (alpha / (ranknum + 1e-5)) * B (E ⊙ A) dropout(x), an SVD-shaped LoRA
(P = B, Λ = diag(E), Q = A) whose per-module ranks are pruned during training.

A (r x in; in x kernel for Conv2d), E (r x 1), B (out x r) start with r = init_r (E = 0, A and B ~ N(0, 0.02): an exact
no-op); ranknum stays init_r, also after pruning. Training adds the orthogonal regulariser
orth_reg_weight * mean over A and B of ||A A^T - I||_F and ||B^T B - I||_F to the loss
(`extra_loss`), and a Lightning callback (`callbacks`, see `budget.py`) runs peft's rank
allocator after every optimizer step: importance scores |p * grad| smoothed by beta1/beta2, a
cubic budget schedule from init_r to target_r per module between tinit and
total_step - tfinal, the least important triplets masked (E = 0). total_step is
trainer.max_steps. When training ends the masks become `rank_pattern`, the adapter is cut to
the kept triplets and re-planned, so the saved files are peft's pruned AdaLoRA layout.
`bias` trains base biases as LoRA's does ('all' / 'lora_only'; peft's AdaLoraConfig inherits it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from peftc.config.spec import RunSpec, at_least, greater_than, in_range, param
from peftc.errors import ConfigError, PlanError
from peftc.methods import register
from peftc.methods.adalora.layer import AdaLoraLayer, orthogonal_penalty
from peftc.methods.base import InjectableMethod
from peftc.methods.common import (
    UNIMPLEMENTED_LORA_FIELDS,
    LayeredTargetsSpec,
    bias_param,
    flag,
    integer,
    number,
    real,
    refuse_unimplemented,
    target_fields,
    target_kwargs,
    trained_biases,
)
from peftc.methods.defaults import ADALORA_TARGETS
from peftc.planning.graph import ModelGraph, ModuleInfo
from peftc.planning.plan import Plan, Site

if TYPE_CHECKING:
    from peftc.runtime.model import PeftcModel


# AdaLoraConfig inherits every LoraConfig field. peft's AdaLoRA honours some through the LoRA
# model code it inherits (layer replication, trainable tokens, target parameters, weight tying)
# and refuses DoRA and LoftQ itself; peftc implements none of them for AdaLoRA, so a file that
# sets one is refused rather than loaded with other numbers. (use_rslora, alpha_pattern,
# lora_bias and r are read by neither: AdaLoRA's scaling is lora_alpha / init_r.)
ADALORA_UNIMPLEMENTED_FIELDS = (
    *UNIMPLEMENTED_LORA_FIELDS,
    "ensure_weight_tying",
    "use_dora",
    "loftq_config",
    "trainable_token_indices",
    "target_parameters",
)


def _open_unit(value: float) -> str | None:
    return None if value is None or 0.0 < value < 1.0 else "must be in (0, 1)"


@dataclass
class AdaLoraSpec(LayeredTargetsSpec):
    init_r: int = param(12, "Initial rank of every adapted module.", at_least(1))
    target_r: int = param(8, "Average rank per module the budget shrinks to.", at_least(0))
    lora_alpha: float = param(8, "Scale numerator: the update is multiplied by lora_alpha / init_r.", greater_than(0))
    lora_dropout: float = param(0.0, "Dropout on the adapter's input.", in_range(0.0, 1.0))
    tinit: int = param(0, "Optimizer steps of warm-up before the budget starts to shrink.", at_least(0))
    tfinal: int = param(0, "Final optimizer steps with the pruned ranks fixed.", at_least(0))
    deltaT: int = param(1, "Prune every deltaT steps while the budget shrinks.", at_least(1))
    beta1: float = param(0.85, "EMA factor of the importance (sensitivity) scores.", _open_unit)
    beta2: float = param(0.85, "EMA factor of the uncertainty scores.", _open_unit)
    orth_reg_weight: float = param(0.5, "Weight of the orthogonal regulariser added to the loss.", at_least(0.0))
    init_lora_weights: bool = param(True, "true: E = 0 (no-op); false: A, E, B ~ N(0, 1) (not a no-op).")
    bias: str = bias_param("lora")
    rank_pattern: Any = param(
        None, "Written by training: {module path.lora_E: keep-mask of init_r booleans}. Not set by hand."
    )
    total_step: int | None = param(
        None, "Written to adapter files: trainer.max_steps. Not set by hand (set trainer.max_steps)."
    )

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        for field, hint in (
            ("rank_pattern", "it is the result of training; the ranks start at peft.init_r"),
            ("total_step", "it is trainer.max_steps; set that instead"),
        ):
            if getattr(self, field) is not None:
                raise ConfigError(f"{key}.{field}", getattr(self, field), "is written by peftc, not set", hint)
        if self.target_r > self.init_r:
            raise ConfigError(
                f"{key}.target_r", self.target_r, f"exceeds {key}.init_r={self.init_r}", "the budget only shrinks"
            )
        if run is None:
            return
        total = run.trainer.max_steps
        if total <= 0:
            raise ConfigError(
                "trainer.max_steps",
                total,
                "AdaLoRA's budget schedule needs the number of optimizer steps (its total_step is trainer.max_steps)",
                "set trainer.max_steps to a positive number of steps",
            )
        if self.tinit >= total - self.tfinal:
            raise ConfigError(
                f"{key}.tinit",
                self.tinit,
                f"leaves no budgeting phase: tinit must be < total_step - tfinal = trainer.max_steps ({total}) - {key}.tfinal ({self.tfinal})",
                f"lower {key}.tinit or {key}.tfinal, or raise trainer.max_steps",
            )


@register
class AdaLora(InjectableMethod):
    name = "adalora"
    peft_type = "ADALORA"
    schema = AdaLoraSpec
    layer_class = AdaLoraLayer
    wraps_quantized = True  # base(x) + update; merges add delta_weight
    supported_kinds = frozenset({"linear", "conv1d_hf", "conv2d"})
    default_targets = ADALORA_TARGETS
    tensor_prefix = "lora_"

    def plan_site(self, spec: AdaLoraSpec, module: ModuleInfo, graph: ModelGraph) -> Site:
        keep = (spec.rank_pattern or {}).get(f"{module.path}.lora_E")
        r = sum(bool(k) for k in keep) if keep is not None else spec.init_r
        columns = module.in_features
        if module.kind == "conv2d":
            if module.get("groups", 1) != 1:
                raise PlanError(
                    "peft.target_modules",
                    module.path,
                    f"is a grouped Conv2d (groups={module.get('groups')}), which AdaLoRA cannot adapt (peft raises)",
                    f"exclude it: peft.exclude_modules=[{module.leaf_name}], or use LoRA",
                )
            columns *= module.get("kernel_size")[0] * module.get("kernel_size")[1]
        tensors = {
            "lora_A": (r, columns),
            "lora_B": (module.out_features, r),
            "lora_E": (r, 1),
        }
        options = {
            "r": r,
            "ranknum": spec.init_r,
            "scaling": spec.lora_alpha,
            "init": spec.init_lora_weights,
        }
        return Site.for_module(module, tensors, options, dropout=spec.lora_dropout)

    def plan_unfrozen(self, spec: AdaLoraSpec, graph: ModelGraph, sites: Sequence[Site]) -> dict[str, tuple[int, ...]]:
        return trained_biases(spec.bias, graph, sites)  # peft's AdaLoraConfig inherits LoraConfig's bias

    # ---------------------------------------------------------------------------- training
    def extra_loss(self, model: PeftcModel, adapter_name: str) -> torch.Tensor | None:
        weight = model.plan_of(adapter_name).spec.peft.orth_reg_weight
        layers = [
            layer
            for _, layer in model.adapter_layers()
            if isinstance(layer, AdaLoraLayer) and adapter_name in layer.adapter_names
        ]
        penalty = orthogonal_penalty(layers, adapter_name)
        return weight * penalty if penalty is not None else None

    def callbacks(self, model: PeftcModel, plan: Plan) -> list[Any]:
        from peftc.methods.adalora.budget import AdaLoraBudget

        return [AdaLoraBudget(model, plan)]

    # ------------------------------------------------------------------------------- files
    def peft_config(self, spec: AdaLoraSpec, plan: Plan) -> dict[str, Any]:
        return {
            **target_fields(spec, plan, ADALORA_TARGETS),
            "r": 8,  # peft's LoraConfig default: AdaLoRA ignores r (init_r counts) and warns on other values
            "lora_alpha": number(spec.lora_alpha),
            "lora_dropout": spec.lora_dropout,
            "fan_in_fan_out": any(s.kind == "conv1d_hf" for s in plan.sites),
            "bias": spec.bias,
            "use_dora": False,
            "init_lora_weights": spec.init_lora_weights,
            "init_r": spec.init_r,
            "target_r": spec.target_r,
            "tinit": spec.tinit,
            "tfinal": spec.tfinal,
            "deltaT": spec.deltaT,
            "beta1": spec.beta1,
            "beta2": spec.beta2,
            "orth_reg_weight": spec.orth_reg_weight,
            "total_step": spec.total_step if spec.total_step is not None else plan.spec.trainer.max_steps,
            "rank_pattern": {k: [bool(x) for x in v] for k, v in spec.rank_pattern.items()}
            if spec.rank_pattern
            else None,
        }

    def spec_from_peft_config(self, config: Mapping[str, Any]) -> AdaLoraSpec:
        refuse_unimplemented(config, ADALORA_UNIMPLEMENTED_FIELDS, "AdaLoRA")
        pattern = config.get("rank_pattern")
        return AdaLoraSpec(
            **target_kwargs(config),
            init_r=integer(config, "init_r", 12),
            target_r=integer(config, "target_r", 8),
            lora_alpha=real(config, "lora_alpha", 8),
            lora_dropout=real(config, "lora_dropout", 0.0),
            tinit=integer(config, "tinit", 0),
            tfinal=integer(config, "tfinal", 0),
            deltaT=integer(config, "deltaT", 1),
            beta1=real(config, "beta1", 0.85),
            beta2=real(config, "beta2", 0.85),
            orth_reg_weight=real(config, "orth_reg_weight", 0.5),
            init_lora_weights=flag(config, "init_lora_weights", True),
            bias=config.get("bias") or "none",
            rank_pattern={_pattern_key(k): list(v) for k, v in pattern.items()} if pattern else None,
            total_step=config.get("total_step"),
        )


def _pattern_key(key: str) -> str:
    """'<module>.lora_E' (peft strips the adapter name on save; tolerate '<module>.lora_E.<name>')."""
    return key if key.endswith(".lora_E") else key.rsplit(".", 1)[0]
