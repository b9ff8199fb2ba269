"""LoRA on nn.MultiheadAttention, as peft's lora.MultiheadAttention: the packed q/k/v projection
`in_proj_weight` (3E, E) gets A (r, E) and B (3E, r) on the attention module's site; the output
projection gets an ordinary LoRA Linear site at `<attention>.base_layer.out_proj`, with the same
rank and alpha (where peft puts it, so saved names and the live tree are peft's).

torch's attention reads both weights directly and never calls out_proj's forward, so the
attention layer runs the module with W + dW for both (functional_call; peft merges and unmerges
around the call, the same numbers). As there, lora_dropout is not applied (nothing calls an input
through the adapter), and out_proj's update counts once, in the forward and in merges (W + s B A).
peft before 0.22 added it twice (huggingface/peft#3774): as peft 0.22 does, a file such a peft
wrote gets its out_proj lora_B doubled on load (`out_proj_counted_once`). peft refuses DoRA and
q/k/v of different sizes; peftc also refuses inits beyond true/false/gaussian and lora_bias (peft
0.22 refuses it too: it never applied B's bias to in_proj), and targeting an attention's out_proj on its own (the attention never
calls it: the adapter would do nothing).

peft 0.22's own gradients upstream of out_proj (in_proj's adapter and every layer before the
attention) are not those of its forward: its unmerge subtracts out_proj's update in place from
the merged weight the attention saved for backward, so it backpropagates through W alone.
peftc's are the gradients of the function both compute (tests/method_cases.py marks peft's).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch.func import functional_call

from peftc.errors import PlanError
from peftc.methods.common import written_before_peft_0_22
from peftc.methods.lora.layer import LoraLayer
from peftc.planning.layout import CONFIG_NAME, WEIGHTS_NAME, model_prefix
from peftc.planning.plan import Plan, Site

if TYPE_CHECKING:
    from pathlib import Path

    from peftc.planning.graph import ModelGraph, ModuleInfo

KIND = "mha"


def check_site(spec: Any, module: ModuleInfo) -> None:
    """What peft refuses on an attention module, and what peftc does not implement there."""
    where = f"{module.path} (MultiheadAttention)"
    if not module.get("same_embed_dim", True):
        raise PlanError(
            "peft.target_modules",
            module.leaf_name,
            f"{where} has keys/values of another size than queries; peft adapts only equal ones",
        )
    refused = {
        "use_dora": (spec.use_dora, "peft does not implement DoRA there", "false"),
        "lora_bias": (spec.lora_bias, "peft 0.22 refuses it there too (it never applied B's bias to in_proj)", "false"),
    }
    for field, (value, why, fix) in refused.items():
        if value:
            raise PlanError(f"peft.{field}", value, f"does not work on {where}: {why}", f"set peft.{field}={fix}")
    if spec.init_lora_weights not in (True, False, "gaussian"):
        raise PlanError(
            "peft.init_lora_weights",
            spec.init_lora_weights,
            f"peftc implements only true, false and gaussian on {where}",
            "use one of them, or exclude the attention module",
        )


def check_not_out_proj(module: ModuleInfo, graph: ModelGraph) -> None:
    parent = graph.module(module.path.rpartition(".")[0])
    if parent is not None and parent.kind == KIND and module.leaf_name == "out_proj":
        raise PlanError(
            "peft.target_modules",
            module.leaf_name,
            f"{module.path} is the output projection of a MultiheadAttention, which never calls it: an adapter there does nothing",
            f"target the attention module ({parent.leaf_name}) instead, which adapts out_proj too; or exclude {module.path}",
        )


def out_proj_sites(sites: Sequence[Site], graph: ModelGraph) -> tuple[Site, ...]:
    """The out_proj Linear site of every attention site (same rank and alpha, peft's nesting)."""
    extra = []
    for site in sites:
        if site.kind != KIND:
            continue
        out_proj = graph.module(f"{site.path}.out_proj")
        r, width = site.options["r"], out_proj.in_features
        tensors = {"lora_A.weight": (r, width), "lora_B.weight": (out_proj.out_features, r)}
        path = f"{site.path}.base_layer.out_proj"
        extra.append(replace(site, path=path, kind="linear", module_class=out_proj.class_name, in_features=width, out_features=out_proj.out_features, tensors=tensors))  # fmt: skip
    return tuple(extra)


def out_proj_counted_once(
    plan: Plan, tensors: dict[str, torch.Tensor], config: Mapping[str, Any], directory: Path
) -> dict[str, torch.Tensor]:
    """An adapter file's tensors as peft 0.22 loads them: from a file that a peft counting
    out_proj's update twice wrote, every attention site's out_proj lora_B comes doubled, so the
    adapter keeps its outputs (one warning). peftc writes peft_version 0.22.0: a file it saves
    again is not doubled on the next load."""
    prefix = model_prefix(plan)
    keys = [f"{prefix}{site.path}.base_layer.out_proj.lora_B.weight" for site in plan.sites if site.kind == KIND]
    keys = [key for key in keys if key in tensors]
    writer = _writer_counting_twice(config, directory) if keys else None
    if writer is None:
        return tensors
    warnings.warn(
        f"{directory / WEIGHTS_NAME}: written by {writer}, which adds a MultiheadAttention's out_proj LoRA update "
        "twice (huggingface/peft#3774); its out_proj lora_B is doubled on load to keep the adapter's outputs",
        UserWarning,
        stacklevel=2,
    )
    return {**tensors, **{key: 2 * tensors[key] for key in keys}}


def _writer_counting_twice(config: Mapping[str, Any], directory: Path) -> str | None:
    """The peft that wrote the adapter, named, if it counted out_proj's update twice (a peft
    before 0.22, by peft 0.22's own reading of peft_version); else None."""
    if not written_before_peft_0_22(config, str(directory / CONFIG_NAME)):
        return None
    if "peft_version" not in config:
        return "a peft before 0.18 (no peft_version)"
    return f"peft {config['peft_version']}"


class MhaLoraLayer(LoraLayer):
    """LoRA on an attention's in_proj_weight; runs the attention with out_proj's adapter too."""

    def _creation_device(self) -> torch.device | None:
        device = self.base_layer.in_proj_weight.device
        return device if device.type == "meta" else None

    def create_adapter(self, name: str, site: Site, init: bool) -> None:
        super().create_adapter(name, site, init)
        device = self._weight().device
        if device.type != "meta":  # drawn on the CPU as peft draws them, then beside the weights
            self.lora_A[name].to(device)
            self.lora_B[name].to(device)

    def _weight(self) -> torch.nn.Parameter:
        return self.base_layer.in_proj_weight

    _base_weight = _weight

    def merge_targets(self, names: Sequence[str]) -> tuple[str, ...]:
        return ("in_proj_weight",)

    def unmerge(self) -> None:
        # out_proj's adapter belongs to this one: undo both (peft's MultiheadAttention.unmerge)
        super().unmerge()
        out_proj = self.base_layer.out_proj
        if isinstance(out_proj, LoraLayer):
            out_proj.unmerge()

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or self.merged_adapters or not self.active_adapters:
            return super().forward(query, *args, **kwargs)
        return functional_call(self.base_layer, self._adapted_weights(), (query, *args), kwargs)

    def _adapted_weights(self) -> dict[str, torch.Tensor]:
        weight = self._weight()
        weights = {"in_proj_weight": weight + sum(self.delta_weight(n) for n in self.active_adapters).to(weight.dtype)}
        out_proj = self.base_layer.out_proj
        names = (
            [n for n in self.active_adapters if n in out_proj.adapter_names] if isinstance(out_proj, LoraLayer) else []
        )
        if names:
            base = out_proj.base_layer.weight
            weights["out_proj.base_layer.weight"] = base + sum(out_proj.delta_weight(n) for n in names).to(base.dtype)
        return weights
