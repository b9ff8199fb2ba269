"""Transformers-4 names of mixture-of-experts projections on transformers-5 models, read as peft
0.22 reads them (its `_convert_peft_config_moe`).

Transformers 5 fused the experts of Mixtral- and Qwen2-MoE-style models (Qwen3-MoE, OLMoE, ...):
each expert's two input projections (Mixtral's w1 and w3, Qwen's gate_proj and up_proj) are one
stacked `experts.gate_up_proj` parameter, the output projections one `experts.down_proj`, and the
router `gate` is no longer an nn.Linear. A LoRA config written for the old layout, or
`all-linear` (which on transformers 4 reached the experts and the router), would now adapt the
attention alone. peft 0.22 rewrites such a config against the model, and saves the rewritten
one; so does peftc, so both adapt the same tensors:

- a target name of the old layout becomes a target parameter (gate_proj/up_proj, w1/w3 ->
  gate_up_proj; down_proj, w2 -> down_proj; gate -> gate.weight), and stays a target module where
  the model still has nn.Linear modules of that name (Qwen2-MoE's shared expert);
- the two fused halves must be targeted together; their stacked update then has rank 2r and
  alpha 2 lora_alpha (rank_pattern/alpha_pattern), so each half keeps its alpha/r;
- `all-linear` is the model's linear leaf names plus every old name; a regex is the leaf names it
  matches, plus the old names it matches under the fused parameter's module.

An adapter file written on transformers 4 holds per-expert factors (`experts.{e}.w1.lora_A.weight`,
...; Mixtral's block was `block_sparse_moe`, now `mlp`); `gathered_tensors` builds the fused
factors from them as peft 0.22 does when it loads such a file: A stacks each expert's halves'
A rows (expert-major), B puts each expert's halves' B block-diagonally and interleaves the experts
in its columns (the stacked-parameter layout of parameters.py), so every expert computes
B_w1 A_w1 x and B_w3 A_w3 x in its two halves exactly as before.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from peftc.errors import ConfigError
from peftc.methods.base import GatheredTensor
from peftc.methods.lora.parameters import PLAIN_INITS
from peftc.planning.graph import LINEAR_KINDS
from peftc.planning.layout import model_prefix

if TYPE_CHECKING:
    from peftc.planning.graph import ModelGraph
    from peftc.planning.plan import ParameterTarget, Plan

# transformers-4 target name -> the transformers-5 name, per conversion family (peft 0.22's tables)
OLD_TO_NEW: dict[str, dict[str, str]] = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {
        "gate": "gate.weight",
        "gate_proj": "gate_up_proj",
        "up_proj": "gate_up_proj",
        "down_proj": "down_proj",
    },
}
# a fused parameter -> the old projections stacked in it
FUSED: dict[str, dict[str, tuple[str, ...]]] = {
    "mixtral": {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)},
    "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)},
}
# the experts' block as transformers 4 named it (transformers 5: `.mlp.`)
OLD_BLOCK = {"mixtral": ".block_sparse_moe.", "qwen2_moe": ".mlp."}


def conversion_family(model_type: str) -> str | None:
    """The MoE layout transformers 5 converts this model type's checkpoints with, if one above."""
    try:  # transformers' own table, as peft reads it; a transformers without it converts nothing
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN
    except ImportError:
        return None
    family = {**_MODEL_TO_CONVERSION_PATTERN, "mixtral": "mixtral", "qwen2_moe": "qwen2_moe"}.get(model_type)
    return family if family in OLD_TO_NEW else None


def for_model(spec: Any, graph: ModelGraph, key: str = "peft") -> Any:
    """The LoRA spec with old-layout expert names rewritten for this model (unchanged elsewhere)."""
    family = conversion_family(graph.model_type)
    if family is None or spec.target_modules is None:
        return spec
    old_to_new = OLD_TO_NEW[family]
    targets = spec.target_modules
    if isinstance(targets, str):
        targets = _names_of(targets, graph, old_to_new)
        if not targets:  # matches nothing: left for the usual error
            return spec
    modules: list[str] = []
    parameters = list(spec.target_parameters or ())
    fused_seen: dict[str, set[str]] = {}
    for target in targets:
        old = next((o for o in old_to_new if target == o or target.endswith(f".{o}")), None)
        if old is None:
            modules.append(target)
            continue
        new = old_to_new[old].join(target.rsplit(old, 1))
        if _linear_modules_named(target, graph):
            modules.append(target)  # still an nn.Linear here (a shared expert's projection)
            if not _parameters_named(new, graph):
                continue
        parameters.append(new)
        fused_seen.setdefault(old_to_new[old], set()).add(old)
    if not parameters or parameters == list(spec.target_parameters or ()):
        return spec
    ranks, alphas = dict(spec.rank_pattern or {}), dict(spec.alpha_pattern or {})
    for fused, halves in FUSED[family].items():
        seen = fused_seen.get(fused, set())
        if seen and len(seen) < len(halves):
            missing = sorted(set(halves) - seen)
            raise ConfigError(
                f"{key}.target_modules",
                list(spec.target_modules) if isinstance(spec.target_modules, tuple) else spec.target_modules,
                f"names {', '.join(sorted(seen))} but not {', '.join(missing)}, which transformers 5 stores in one "
                f"{fused} parameter with it (peft refuses this too)",
                f"target {' and '.join(halves)} together, or neither",
            )
        if len(seen) == len(halves) > 1:
            pattern = rf".*\.{re.escape(fused)}"
            ranks[pattern] = spec.r * len(halves)
            alphas[pattern] = spec.lora_alpha * len(halves)
    _check_parameter_options(spec, key, graph.model_type)
    return spec.replace(
        target_modules=tuple(dict.fromkeys(modules)),
        target_parameters=tuple(dict.fromkeys(parameters)),
        rank_pattern=ranks or None,
        alpha_pattern=alphas or None,
    )


def _names_of(pattern: str, graph: ModelGraph, old_to_new: dict[str, str]) -> list[str]:
    """A string target as the leaf names it reaches on the old layout."""
    if pattern.lower() == "all-linear":
        linear = {m.leaf_name for m in graph.modules if m.kind in LINEAR_KINDS and m.path != graph.output_embedding}
        return sorted(linear | old_to_new.keys())
    try:
        regex = re.compile(pattern)
    except re.error:
        return []  # refused later, with the key
    paths = [m.path for m in graph.modules if m.path]
    paths += [f"{m.path}.{name}" if m.path else name for m in graph.modules for name, _ in m.params]
    names = {path.rsplit(".", 1)[-1] for path in paths if regex.fullmatch(path)}
    holders = {m.path for m in graph.modules for name, _ in m.params if name != "weight"}
    for old, new in old_to_new.items():
        leaf = new.rsplit(".", 1)[-1]
        owners = [m.path for m in graph.modules if m.path in holders and any(n == leaf for n, _ in m.params)]
        if old not in names and any(regex.fullmatch(f"{owner}.{old}") for owner in owners):
            names.add(old)
    return sorted(names)


def _linear_modules_named(target: str, graph: ModelGraph) -> bool:
    """Whether the target (a name or dotted suffix) matches modules, all of them linear."""
    matched = [m for m in graph.modules if m.path == target or m.path.endswith(f".{target}")]
    return bool(matched) and all(m.kind == "linear" for m in matched)


def _parameters_named(name: str, graph: ModelGraph) -> bool:
    """Whether a parameter outside the linear modules has this name or dotted suffix."""
    paths = [f"{m.path}.{n}" for m in graph.modules if m.kind != "linear" for n, _ in m.params]
    return any(p == name or p.endswith(f".{name}") for p in paths)


def _check_parameter_options(spec: Any, key: str, model_type: str) -> None:
    """What peft refuses on raw parameters, and the inits peftc implements there
    (parameters.check_spec, which ran before the rewrite), said in terms of the names written."""
    if spec.init_lora_weights not in PLAIN_INITS:  # peft 0.22 crashes on the experts' missing .weight
        raise ConfigError(
            f"{key}.init_lora_weights",
            spec.init_lora_weights,
            f"is not implemented on the expert weights peft.target_modules reaches on {model_type} (stacked "
            "parameters in transformers 5: only true, false, gaussian and nora there)",
            "use one of them, or target the attention projections only (e.g. peft.target_modules=[q_proj,v_proj])",
        )
    refused = {"lora_dropout": spec.lora_dropout != 0, "use_dora": spec.use_dora, "lora_bias": spec.lora_bias}
    fix = {"lora_dropout": "0", "use_dora": "false", "lora_bias": "false"}
    for field, is_set in refused.items():
        if is_set:
            raise ConfigError(
                f"{key}.{field}",
                getattr(spec, field),
                f"does not work on the expert weights peft.target_modules reaches on {model_type}: transformers 5 "
                "stores them as stacked parameters, which LoRA adapts without an input (peft refuses it too)",
                f"set {key}.{field}={fix[field]}, or target the attention projections only "
                "(e.g. peft.target_modules=[q_proj,k_proj,v_proj,o_proj])",
            )


def gathered_tensors(plan: Plan, file_names: Collection[str]) -> dict[str, GatheredTensor]:
    """The plan's expert and router factors a transformers-4 file holds in pieces (see above)."""
    family = conversion_family(plan.model.model_type)
    if family is None:
        return {}
    prefix, names = model_prefix(plan), set(file_names)
    gathered = {}
    for site in plan.sites:
        if site.parameter is None:
            continue
        for suffix in ("lora_A.weight", "lora_B.weight"):
            name = f"{prefix}{site.path}.{suffix}"
            shape = tuple(site.tensors[suffix])
            gathering = _old_pieces(family, site.parameter, suffix, shape)
            if name in names or gathering is None:
                continue
            pieces, build, piece_shape = gathering
            sources = tuple(f"{prefix}{piece}" for piece in pieces)
            if all(source in names for source in sources):
                gathered[name] = GatheredTensor(sources, shape, build, piece_shape)
    return gathered


def _old_pieces(
    family: str, target: ParameterTarget, suffix: str, shape: tuple[int, ...]
) -> tuple[list[str], Any, tuple[int, ...]] | None:
    """The old layout's tensor names for one fused factor of `shape` (without the model prefix),
    how to build the factor from them, and each piece's shape; None for a parameter the old
    layout did not split."""
    old_path = OLD_BLOCK[family].join(target.module.rsplit(".mlp.", 1))
    if target.name == "weight" and target.module.endswith(".gate"):  # the router: renamed only
        return [f"{old_path}.{suffix}"], lambda pieces: pieces[0], shape
    halves = FUSED[family].get(target.name)
    if halves is None:
        return None
    experts, n = target.shape[0], len(halves)
    names = [f"{old_path}.{e}.{half}.{suffix}" for e in range(experts) for half in halves]
    if suffix.startswith("lora_A"):  # (E n r, in) from (r, in)
        return names, _fused_a, (shape[0] // (experts * n), shape[1])
    # (n out, n r E) from (out, r)
    return names, partial(_fused_b, experts=experts, halves=n), (shape[0] // n, shape[1] // (n * experts))


def _fused_a(pieces: list[torch.Tensor]) -> torch.Tensor:
    """Each expert's halves' A (r, in), expert-major: rows e*n*r.. are expert e's, half by half."""
    return torch.cat(pieces, 0)


def _fused_b(pieces: list[torch.Tensor], *, experts: int, halves: int) -> torch.Tensor:
    """Each expert's halves' B (out, r) block-diagonal (n*out, n*r), experts interleaved in the
    columns (column k*E + e is expert e's k-th)."""
    per_expert = [torch.block_diag(*pieces[e * halves : (e + 1) * halves]) for e in range(experts)]
    return torch.stack(per_expert).permute(2, 0, 1).flatten(0, 1).T.contiguous()
