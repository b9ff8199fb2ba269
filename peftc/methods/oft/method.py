"""OFT's settings and plan: block layouts, conv sites (and which conv transform they keep),
peft's config fields both ways."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftc.config.spec import RunSpec, at_least, greater_than, in_range, one_of, param
from peftc.errors import ConfigError, PlanError
from peftc.methods import register
from peftc.methods.base import InjectableMethod, saves_embedding_weight
from peftc.methods.common import (
    LayeredTargetsSpec,
    bias_param,
    flag,
    integer,
    real,
    target_fields,
    target_kwargs,
    trained_biases,
    written_before_peft_0_22,
)
from peftc.methods.defaults import LORA_TARGETS
from peftc.methods.oft.layer import OFTLayer
from peftc.planning.graph import ModelGraph, ModuleInfo
from peftc.planning.layout import CONFIG_NAME
from peftc.planning.plan import Plan, Site


@dataclass
class OFTSpec(LayeredTargetsSpec):
    r: int = param(0, "Number of orthogonal blocks per layer; 0: derived from oft_block_size.", at_least(0))
    oft_block_size: int = param(
        32, "Size b of each orthogonal block (r x b = input size); 0: derived from r.", at_least(0)
    )
    module_dropout: float = param(
        0.0, "Training only: replace this share of the blocks by the identity.", in_range(0.0, 1.0)
    )
    coft: bool = param(False, "Constrained OFT: keep each Q within a ball of radius eps.")
    eps: float = param(6e-5, "COFT's radius (scaled by 1/sqrt(number of blocks)).", greater_than(0.0))
    block_share: bool = param(False, "One rotation shared by all blocks of a layer.")
    use_cayley_neumann: bool = param(
        True, "Truncated Neumann series instead of the exact (matrix-inverse) Cayley transform."
    )
    num_cayley_neumann_terms: int = param(5, "Terms of the Neumann series.", at_least(1))
    init_weights: bool = param(True, "true: Q = 0, R = I (no-op); false: Q ~ N(0, 0.1) (not a no-op).")
    bias: str = bias_param("oft")
    adjust_block_size: bool = param(
        False,
        "When r / oft_block_size does not divide a layer: false refuses the plan; true adjusts it per layer to the nearest divisor (peft's behaviour).",
    )
    conv_transform: str = param(
        "weight",
        "How Conv2d sites apply R: 'weight' rotates the kernel, W' = W R^T (peft >= 0.22; merges); 'patches' is peft < 0.22's "
        "transform of the input's k x k patches, which no weight gives (not mergeable; square, undilated kernels), used where it "
        "differs (kernels over 1x1, grouped convs). Loading sets it from the file's peft_version (before 0.22: patches), so that "
        "an adapter gives the outputs it was trained to give; saving writes a peft_version before 0.22 for it.",
        one_of("weight", "patches"),
    )

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(
                f"{key}.r",
                self.r,
                f"set exactly one of {key}.r and {key}.oft_block_size (now oft_block_size={self.oft_block_size}); r x oft_block_size = the input size",
                f"e.g. {key}.oft_block_size=0 {key}.r={self.r or 4}, or {key}.r=0 {key}.oft_block_size=32",
            )


# The last peft release with the patch transform: the peft_version an adapter that keeps it is saved with.
PATCHES_PEFT_VERSION = "0.21.2"


def nearest_divisor(size: int, wanted: int) -> int:
    """peft's adjustment: the divisor of `size` closest to `wanted` (ties go to the smaller)."""
    if wanted >= size:
        return size
    higher = wanted
    while higher <= size and size % higher:
        higher += 1
    lower = wanted
    while lower > 1 and size % lower:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


def block_layout(spec: OFTSpec, size: int, path: str) -> tuple[int, int]:
    """(number of blocks, block size) for a layer whose rotated dimension is `size`."""
    key, wanted = ("peft.oft_block_size", spec.oft_block_size) if spec.r == 0 else ("peft.r", spec.r)
    if size % wanted or wanted > size:
        if not spec.adjust_block_size:
            below = max(d for d in range(1, min(wanted, size + 1)) if size % d == 0)
            above = [d for d in range(wanted + 1, size + 1) if size % d == 0][:1]
            options = [below, *above]
            raise PlanError(
                key,
                wanted,
                f"does not divide {size}, the rotated size of {path}",
                f"use a divisor of {size} such as {' or '.join(map(str, options))}, "
                "or peft.adjust_block_size=true to adjust it per layer as peft does",
            )
        wanted = nearest_divisor(size, wanted)
    return (size // wanted, wanted) if spec.r == 0 else (wanted, size // wanted)


def conv_options(spec: OFTSpec, module: ModuleInfo) -> tuple[int, dict[str, Any]]:
    """A Conv2d site's rotated size and options. peft 0.22 rotates the weight over all
    in_channels x kh x kw inputs of a filter, which a grouped weight does not hold (refused, as
    peft refuses it). `conv_transform=patches` keeps peft < 0.22's transform where it differs
    from that: over a kernel larger than 1 x 1, or on a grouped conv."""
    height, width = module.get("kernel_size")
    groups = module.get("groups")
    if spec.conv_transform == "patches" and (height * width > 1 or groups > 1):
        kernel = _square_kernel(module)
        return module.in_features * kernel * kernel, {"conv_transform": "patches", "kernel": kernel}
    if groups > 1:
        raise PlanError(
            "peft.target_modules", module.path, f"is a grouped Conv2d (groups={groups}): OFT rotates all in_channels x kernel "
            "inputs of a filter, which a grouped weight does not hold (peft 0.22 refuses it too)",
            f"exclude it: peft.exclude_modules=[{module.leaf_name}]",
        )  # fmt: skip
    return module.in_features * height * width, {"conv_transform": "weight"}


def _square_kernel(module: ModuleInfo) -> int:
    """The kernel size of a Conv2d peft 0.21's OFT can rotate: square (it sizes the rotation as
    C*k[0]*k[0] and fails on other kernels) and undilated (it refuses dilation)."""
    height, width = module.get("kernel_size")
    if height != width:
        raise PlanError(
            "peft.target_modules", module.path, f"is a Conv2d with kernel_size {(height, width)}; peft < 0.22's conv "
            "transform (conv_transform=patches) rotates square kernels only (peft 0.21 fails on others)",
            f"exclude it: peft.exclude_modules=[{module.leaf_name}], or peft.conv_transform=weight",
        )  # fmt: skip
    if max(module.get("dilation")) > 1:
        raise PlanError(
            "peft.target_modules", module.path, "is a dilated Conv2d, which peft < 0.22's conv transform "
            "(conv_transform=patches) cannot adapt (peft 0.21 refuses it)",
            f"exclude it: peft.exclude_modules=[{module.leaf_name}], or peft.conv_transform=weight",
        )  # fmt: skip
    return height


@register
class OFT(InjectableMethod):
    name = "oft"
    peft_type = "OFT"
    schema = OFTSpec
    layer_class = OFTLayer
    supported_kinds = frozenset({"linear", "embedding", "conv2d"})
    default_targets = LORA_TARGETS  # peft copies LoRA's table for OFT
    tensor_prefix = "oft_"
    wraps_quantized = True  # base(R x); merges rotate the weight via merged_weight

    def plan_site(self, spec: OFTSpec, module: ModuleInfo, graph: ModelGraph) -> Site:
        embedding = module.kind == "embedding"
        size, conv = module.out_features if embedding else module.in_features, {}
        if module.kind == "conv2d":
            size, conv = conv_options(spec, module)
        blocks, block_size = block_layout(spec, size, module.path)
        rows = 1 if spec.block_share else blocks
        suffix = "oft_embedding_R.weight" if embedding else "oft_R.weight"
        options = {
            "blocks": blocks,
            "block_size": block_size,
            "coft": spec.coft,
            "eps": spec.eps,
            "block_share": spec.block_share,
            "neumann": spec.use_cayley_neumann,
            "terms": spec.num_cayley_neumann_terms,
            "module_dropout": spec.module_dropout,
            "init": spec.init_weights,
            **conv,
        }
        tensors = {suffix: (rows, block_size * (block_size - 1) // 2)}
        return Site.for_module(
            module,
            tensors,
            options,
            save_base_weight=saves_embedding_weight(spec.target_modules, module, graph),
        )

    def plan_unfrozen(self, spec: OFTSpec, graph: ModelGraph, sites: Sequence[Site]) -> dict[str, tuple[int, ...]]:
        return trained_biases(spec.bias, graph, sites)

    def plan_warnings(self, spec: OFTSpec, sites: Sequence[Site], graph: ModelGraph) -> tuple[str, ...]:
        patches = _patch_sites(sites)
        if not patches:
            return ()
        return (
            f"OFT on Conv2d {', '.join(patches)} uses peft < 0.22's conv transform (peft.conv_transform=patches: "
            "rotated input patches folded back), which this adapter was trained with; peft 0.22 itself rotates the "
            "weight and gives other outputs for it; it cannot be merged",
        )

    def peft_config(self, spec: OFTSpec, plan: Plan) -> dict[str, Any]:
        # peft_version keeps the meaning of an adapter with the patch transform: read again, by
        # peftc or by a peft that tells the two apart, it is an adapter peft < 0.22 trained.
        written = {"peft_version": PATCHES_PEFT_VERSION} if _patch_sites(plan.sites) else {}
        return {
            **written,
            **target_fields(spec, plan, LORA_TARGETS),
            "r": spec.r,
            "oft_block_size": spec.oft_block_size,
            "module_dropout": spec.module_dropout,
            "fan_in_fan_out": False,
            "bias": spec.bias,
            "init_weights": spec.init_weights,
            "coft": spec.coft,
            "eps": spec.eps,
            "block_share": spec.block_share,
            "use_cayley_neumann": spec.use_cayley_neumann,
            "num_cayley_neumann_terms": spec.num_cayley_neumann_terms,
        }

    def spec_from_peft_config(self, config: Mapping[str, Any]) -> OFTSpec:
        if "oft_block_size" not in config:
            from peftc.errors import AdapterFileError

            raise AdapterFileError(
                "adapter_config.json",
                "OFT adapter without oft_block_size: written by peft < 0.14, whose OFT (oft_r blocks) peft 0.14 "
                "replaced by another parameterization; peftc and peft 0.22 cannot run it",
                "load it with peft <= 0.13, or retrain the adapter with a current peft or peftc",
            )
        return OFTSpec(
            **target_kwargs(config),
            r=integer(config, "r", 0),
            oft_block_size=integer(config, "oft_block_size", 32),
            module_dropout=real(config, "module_dropout", 0.0),
            coft=flag(config, "coft", False),
            eps=real(config, "eps", 6e-5),
            block_share=flag(config, "block_share", False),
            use_cayley_neumann=flag(config, "use_cayley_neumann", True),
            num_cayley_neumann_terms=integer(config, "num_cayley_neumann_terms", 5),
            init_weights=flag(config, "init_weights", True),
            bias=config.get("bias") or "none",
            adjust_block_size=True,  # peft wrote it: its per-layer adjustment applies
            conv_transform="patches" if written_before_peft_0_22(config) else "weight",
        )

    def tensors_from_file(
        self, plan: Plan, tensors: dict[str, torch.Tensor], config: Mapping[str, Any], directory: Path
    ) -> dict[str, torch.Tensor]:
        """As read; with a warning for an adapter of peft 0.14-0.17 (no peft_version) on the
        Cayley-Neumann series: those summed I + 2Q + ... + 2Q^(n-1), peft 0.18 on (and peftc) end
        in Q^(n-1) (n = 3: I + 2Q + 2Q^2 + Q^3), so its outputs differ from the ones it was trained
        with, slightly for a small Q (peft 0.22 warns too and computes what peftc does)."""
        spec = plan.spec.peft
        if "peft_version" not in config and spec.use_cayley_neumann and spec.num_cayley_neumann_terms > 2:
            warnings.warn(
                f"{directory / CONFIG_NAME}: OFT adapter of a peft before 0.18 (no peft_version) with "
                f"use_cayley_neumann=true: that peft's series ended in 2 Q^{spec.num_cayley_neumann_terms - 1}, peft 0.18 "
                "and peftc end it otherwise, so its outputs differ slightly from the ones it was trained with (as in "
                "peft 0.22); run it with peft 0.17, or retrain it",
                UserWarning,
                stacklevel=2,
            )
        return tensors


def _patch_sites(sites: Sequence[Site]) -> list[str]:
    """The paths of the sites planned with peft < 0.22's conv transform."""
    return [site.path for site in sites if site.options.get("conv_transform") == "patches"]
