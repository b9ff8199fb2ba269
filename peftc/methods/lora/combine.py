"""Combining LoRA adapters into a new one (peft's `add_weighted_adapter`), owned by the LoRA method.

With weights w_i and scalings s_i of the source adapters:
- linear: A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i, B = sum_i sqrt|w_i s_i| B_i (all ranks equal;
  a rough approximation of sum_i w_i s_i B_i A_i);
- cat: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...], so B A = sum_i w_i s_i B_i A_i
  exactly, at rank sum_i r_i;
- svd: the best rank-k approximation U_k S_k V_k^T of sum_i w_i dW_i, with B = U_k S_k, A = V_k^T,
  k = svd_rank or max_i r_i.
The new adapter is the first source's config with r = lora_alpha = the new rank and rsLoRA off
(scaling exactly 1: the sources' scalings are already in the factors), the union of the targets,
and no rank/alpha patterns. If any source has lora_bias, so does the result, with the bias
sum_i w_i s_i b_i (a bias adds to the output whatever the factorisation). All as peft 0.22.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from peftc.errors import ConfigError
from peftc.methods.lora.init import BASE_MUTATING, init_family

if TYPE_CHECKING:
    from peftc.methods.lora.layer import LoraLayer
    from peftc.methods.lora.method import LoraSpec
    from peftc.planning.plan import Plan

COMBINATIONS = ("linear", "cat", "svd")


def weighted_spec(names: Sequence[str], plans: Sequence[Plan], combination_type: str, svd_rank: int | None) -> LoraSpec:
    """The new adapter's spec, or a ConfigError with peft's rules for ranks and targets."""
    specs = [p.spec.peft for p in plans]
    if combination_type not in COMBINATIONS:
        raise ConfigError(
            "combination_type", combination_type, "is not supported", f"use one of {', '.join(COMBINATIONS)}"
        )
    if any(s.use_dora for s in specs):
        raise ConfigError(
            "adapters",
            list(names),
            "DoRA adapters cannot be combined: their magnitude vectors do not add up",
            "combine plain LoRA adapters",
        )
    ranks = [max([s.r, *(s.rank_pattern or {}).values()]) for s in specs]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ConfigError(
                "combination_type", "linear", f"needs adapters of equal rank, got ranks {ranks}", "use 'cat' or 'svd'"
            )
        rank = ranks[0]
    elif combination_type == "cat":
        rank = sum(ranks)
    else:
        if svd_rank is not None and svd_rank < 1:
            raise ConfigError("svd_rank", svd_rank, "must be >= 1")
        rank = svd_rank or max(ranks)
    lora_bias = any(s.lora_bias for s in specs)
    if lora_bias:
        _refuse_bias_with_embeddings(names, plans)
    first = specs[0]
    # A rewritten base already holds the sources' residual; the combined adapter starts plain.
    init = True if init_family(first.init_lora_weights) in BASE_MUTATING else first.init_lora_weights
    return first.replace(
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        lora_bias=lora_bias,
        target_modules=_union_targets(names, plans),
        rank_pattern=None,
        alpha_pattern=None,
        init_lora_weights=init,
    )


def _refuse_bias_with_embeddings(names: Sequence[str], plans: Sequence[Plan]) -> None:
    """The combined adapter carries a bias on every site, and an embedding's update has none."""
    with_bias = [n for n, p in zip(names, plans, strict=True) if p.spec.peft.lora_bias]
    on_embeddings = [n for n, p in zip(names, plans, strict=True) if any(s.kind == "embedding" for s in p.sites)]
    if on_embeddings:
        raise ConfigError(
            "adapters",
            list(names),
            f"combine lora_bias ({', '.join(with_bias)}) with adapters on an embedding ({', '.join(on_embeddings)}), "
            "which cannot carry a bias",
            "leave either group out (peft refuses this too)",
        )


def _union_targets(names: Sequence[str], plans: Sequence[Plan]) -> Any:
    """peft: regex strings are OR-ed, name sets united; mixing the two is refused."""
    targets = []
    for plan in plans:
        value = plan.spec.peft.target_modules
        if value is None or (isinstance(value, str) and value.lower() == "all-linear"):
            value = sorted({s.path.rsplit(".", 1)[-1] for s in plan.sites})  # what peft resolves them to
        targets.append(value)
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if any(isinstance(t, str) for t in targets):
        raise ConfigError(
            "adapters",
            list(names),
            "mix regex and list target_modules",
            "combine adapters whose target_modules are all lists or all regex strings (peft's rule)",
        )
    return sorted({name for t in targets for name in t})


@torch.no_grad()
def combine(
    layer: LoraLayer,
    name: str,
    sources: Sequence[str],
    weights: Sequence[float],
    combination_type: str,
    *,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
) -> None:
    """Fill adapter `name` of this layer from the sources present here."""
    present = [(s, w) for s, w in zip(sources, weights, strict=True) if s in layer.site_options]
    if not present:
        raise ConfigError("adapters", list(sources), f"none of them adapts {type(layer.base_layer).__name__} here")
    lora_a, lora_b = _factors(layer, name)
    lora_a.zero_()
    lora_b.zero_()
    if combination_type == "cat":
        a_parts = [_factors(layer, s)[0] * w * layer.scaling[s] for s, w in present]
        b_parts = [_factors(layer, s)[1] for s, _ in present]
        stacked_a, stacked_b = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
        lora_a[: stacked_a.shape[0]] = stacked_a
        lora_b[:, : stacked_b.shape[1]] = stacked_b
    elif combination_type == "linear":
        roots = [math.sqrt(abs(w * layer.scaling[s])) for s, w in present]
        signs = [1 if w * layer.scaling[s] >= 0 else -1 for s, w in present]
        lora_a.copy_(
            _weighted_sum(
                [_factors(layer, s)[0] for s, _ in present], [r * g for r, g in zip(roots, signs, strict=True)]
            )
        )
        lora_b.copy_(_weighted_sum([_factors(layer, s)[1] for s, _ in present], roots))
    else:
        delta = _weighted_sum([layer._delta_rows(s) for s, _ in present], [w for _, w in present]).flatten(1)
        u, s_values, vh = torch.linalg.svd(delta, full_matrices=svd_full_matrices, driver=svd_driver)
        rank = lora_a.shape[0]
        u, vh = u[:, :rank] @ torch.diag(s_values[:rank]), vh[:rank, :]
        if svd_clamp is not None:
            high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), svd_clamp)
            u, vh = u.clamp(-high, high), vh.clamp(-high, high)
        lora_b.copy_(u.reshape(lora_b.shape))
        lora_a.copy_(vh.reshape(lora_a.shape))
    if layer._has_lora_bias(name):
        biased = [(s, w) for s, w in present if layer._has_lora_bias(s)]
        bias = layer.lora_B[name].bias
        bias.zero_()
        for source, weight in biased:
            bias.add_(layer.lora_B[source].bias.data, alpha=weight * layer.scaling[source])


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one adapter: the data of its trainable tensors, in peft's shapes."""
    if name in layer.lora_embedding_A:
        return layer.lora_embedding_A[name].data, layer.lora_embedding_B[name].data
    return layer.lora_A[name].weight.data, layer.lora_B[name].weight.data


def _weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i t_i, computed as peft's task_arithmetic does (stack, scale, sum)."""
    stacked = torch.stack(list(tensors), dim=0)
    scale = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    return (stacked * scale.view(-1, *([1] * (stacked.dim() - 1)))).sum(dim=0)
