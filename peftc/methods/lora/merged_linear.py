"""peft 0.2's `enable_lora`: one LoRA on a fused projection (GPT-2's c_attn: query, key, value
stacked) that adapts only the enabled parts of its output (peft's MergedLinear, dropped in 0.3).

The file holds A (k r x in) for the k enabled parts and B as a grouped 1x1 Conv1d weight
(k out/n x r x 1), n = len(enable_lora); part j's delta is B_j A_j x, scaled by lora_alpha / r,
and lands in the output rows of the j-th enabled part. That is a plain LoRA of rank k r with
lora_alpha k lora_alpha (the same scaling) whose B is block-diagonal, zero in the rows of the
disabled parts: peftc loads it as one (and saves it so). peft 0.2 built the Conv1d with
groups=2 whatever k was, so only k = 2 ever ran; another k is refused. `merge_weights`, the
other field of that era, only said whether eval mode folded the update into W: no effect on
what the adapter computes.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from peftc.errors import AdapterFileError
from peftc.methods.base import GatheredTensor
from peftc.planning.layout import model_prefix

if TYPE_CHECKING:
    from peftc.planning.plan import Plan

LEGACY_FIELDS = frozenset({"enable_lora", "merge_weights"})
PEFT_GROUPS = 2  # peft 0.2's MergedLinear: nn.Conv1d(..., groups=2)


def enabled_parts(config: Mapping[str, Any]) -> list[bool] | None:
    """The config's enable_lora as a list of booleans, None when absent (a plain LoRA); a value
    peft 0.2 could not run is refused naming the field."""
    value = config.get("enable_lora")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(part, bool) for part in value):
        raise AdapterFileError(
            "adapter_config.json",
            f"enable_lora={value!r} is not a list of true/false",
            "a peft 0.2 LoRA writes e.g. [true, false, true]",
        )
    if sum(value) != PEFT_GROUPS:
        raise AdapterFileError(
            "adapter_config.json",
            f"enable_lora={value!r} enables {sum(value)} parts; peft 0.2's MergedLinear only ran with exactly 2",
            "load it with the peft 0.2 that trained it, or retrain it as a plain LoRA",
        )
    return value


def rank_and_alpha(config: Mapping[str, Any], r: int, lora_alpha: float) -> tuple[int, float]:
    """The plain LoRA's rank and alpha that compute what the file's MergedLinear did."""
    parts = enabled_parts(config)
    if parts is None:
        return r, lora_alpha
    return r * sum(parts), lora_alpha * sum(parts)


def gathered_tensors(plan: Plan, file_names: Collection[str], config: Mapping[str, Any]) -> dict[str, GatheredTensor]:
    """Each site's B of the plain LoRA, built from the file's grouped Conv1d weight."""
    parts = enabled_parts(config)
    if parts is None:
        return {}
    prefix, names = model_prefix(plan), set(file_names)
    gathered = {}
    for site in plan.sites:
        name = f"{prefix}{site.path}.lora_B.weight"
        out_features, rank = site.tensors["lora_B.weight"]
        if name not in names or out_features % len(parts):
            continue  # not written by MergedLinear: the header check names it
        part_rows, part_rank = out_features // len(parts), rank // sum(parts)
        piece_shape = (part_rows * sum(parts), part_rank, 1)
        build = partial(_block_diagonal_b, parts=parts, out_features=out_features)
        gathered[name] = GatheredTensor((name,), (out_features, rank), build, piece_shape)
    return gathered


def _block_diagonal_b(pieces: list[torch.Tensor], *, parts: list[bool], out_features: int) -> torch.Tensor:
    """(out, k r) from the grouped weight (k out/n, r, 1): enabled part j's rows get its block."""
    grouped = pieces[0][..., 0]
    part_rows, part_rank = out_features // len(parts), grouped.shape[1]
    b = grouped.new_zeros(out_features, part_rank * sum(parts))
    slots = [slot for slot, enabled in enumerate(parts) if enabled]
    for j, slot in enumerate(slots):
        rows = grouped[j * part_rows : (j + 1) * part_rows]
        b[slot * part_rows : (slot + 1) * part_rows, j * part_rank : (j + 1) * part_rank] = rows
    return b
