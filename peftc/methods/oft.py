"""OFT: y = W (R x), i.e. W' = W R^T, with R = blockdiag(R_1..R_r) orthogonal, r blocks of size b
(r * b = the layer's input size; for embeddings the output rows are rotated: E' = E R).

Each block is the Cayley transform of a skew-symmetric Q_i (its b(b-1)/2 upper-triangle entries
are the trainable `oft_R.weight` row i): R_i = (I - Q_i)(I + Q_i)^-1, or by default peft's
truncated Cayley-Neumann series I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1) with
n = num_cayley_neumann_terms (n = 3 is computed like n = 4, as peft does). `block_share` uses one
Q for all blocks; COFT projects each Q into a Frobenius ball of radius eps / sqrt(rows) before
use (in place, as peft does). Q = 0 gives R = I: the default init is an exact no-op.

Merging multiplies W by R^T block by block (several active adapters in reverse order: the input
rotated as x R_1 R_2 is the weight W R_2^T R_1^T, as peft 0.22 merges); unmerging multiplies by
(R^-1)^T computed in float64, so merge -> unmerge restores W to float32 rounding even when the
series makes R not exactly orthogonal.

Conv2d, as peft 0.22: the weight viewed as (out, C*kh*kw) is rotated, W' = W R^T, and the base
layer's own convolution (stride, padding, dilation, padding mode) runs with it; several active
adapters give W R_k^T ... R_1^T, built as merging builds it. The unmerged layer is the merged one,
for any kernel shape. A grouped Conv2d is refused at plan time: R mixes all C*kh*kw inputs of a
filter, which a grouped weight does not hold (peft 0.22 raises on it).

peft < 0.22 transformed the input instead: it cut it into k x k patches (stride 1, no padding),
rotated each patch's C*k*k values and put the patches back with F.fold, which sums where they
overlap, after a reshape that does not invert the unfold's layout; the convolution then ran on
the result. For k > 1 that map is no weight: even R = I changes the input, and 0.21's merged weight
gave other outputs than its forward. `conv_transform=patches` reproduces it step for step where it
differs from the rotation (kernels over 1 x 1, grouped convs), on the square, undilated kernels
0.21 could adapt, and refuses to merge those sites by name. A 1 x 1 ungrouped convolution has no
overlaps: both transforms are the same input rotation, which merges. Loading sets the field from
the file's peft_version (`written_before_peft_0_22`, read as peft 0.22 reads it): an adapter peft
< 0.22 trained keeps the outputs it was trained to give, its plan and load_adapter warn that peft
0.22 itself gives other outputs for it, and it is saved with peft_version 0.21.2, which reads back
the same (linear, embedding and 1 x 1 sites are the same under both: no warning, saved as 0.22).

Exactly one of r / oft_block_size is non-zero (peft's rule); a size that does not
divide a layer is refused at plan time, naming the nearest valid sizes, unless
`adjust_block_size=true` asks for peft's silent per-layer adjustment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftc.config.spec import RunSpec, at_least, greater_than, in_range, one_of, param
from peftc.errors import ConfigError, MergeError, PlanError
from peftc.methods import register
from peftc.methods.base import InjectableMethod, saves_embedding_weight
from peftc.methods.common import (
    LayeredTargetsSpec,
    bias_param,
    target_fields,
    target_kwargs,
    trained_biases,
    written_before_peft_0_22,
)
from peftc.methods.defaults import LORA_TARGETS
from peftc.methods.layer import AdapterLayer
from peftc.planning.graph import ModelGraph, ModuleInfo
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


# ------------------------------------------------------------------------------- the rotation
def skew(vector: torch.Tensor, size: int) -> torch.Tensor:
    """(rows, size(size-1)/2) upper-triangle entries -> (rows, size, size) skew-symmetric Q."""
    rows, cols = _upper_triangle(size, vector.device)
    matrix = torch.zeros(vector.shape[0], size, size, device=vector.device, dtype=vector.dtype)
    matrix[:, rows, cols] = vector
    return matrix - matrix.transpose(-2, -1)


_TRIANGLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _upper_triangle(size: int, device: torch.device) -> torch.Tensor:
    """Row and column indices of a size x size matrix's strict upper triangle, made once per size
    and device instead of per layer and step (each is an operator: a kernel launch on a GPU).
    Traced code makes them afresh: compiled, they are constants of the graph."""
    if torch.compiler.is_compiling():
        return torch.triu_indices(size, size, 1, device=device)
    key = (size, device)
    if key not in _TRIANGLES:
        _TRIANGLES[key] = torch.triu_indices(size, size, 1, device=device)
    return _TRIANGLES[key]


def cayley(vector: torch.Tensor, size: int, neumann: bool, terms: int) -> torch.Tensor:
    """The orthogonal blocks R from the Q entries (see the module docstring for the series).
    The series is summed in place with `alpha`, one operator per term (as peft sums it)."""
    q = skew(vector, size)
    eye = torch.eye(size, device=q.device, dtype=q.dtype)
    if not neumann:
        eye = eye.expand_as(q)
        return torch.linalg.solve(eye + q, eye - q, left=False)
    rotation = eye.repeat(q.shape[0], 1, 1)
    if terms > 1:
        rotation.add_(q, alpha=2.0)
    if terms > 2:
        power = torch.bmm(q, q)
        rotation.add_(power, alpha=2.0)
        for _ in range(3, terms - 1):
            power = torch.bmm(power, q)
            rotation.add_(power, alpha=2.0)
        rotation.add_(torch.bmm(power, q))
    return rotation


@torch.no_grad()
def project_(weight: torch.Tensor, size: int, eps: float) -> None:
    """COFT: scale each block's Q down to Frobenius norm eps / sqrt(rows) when it is larger."""
    radius = eps / float(torch.sqrt(torch.tensor(float(weight.shape[0]))))
    q = skew(weight, size)
    norm = torch.norm(q, dim=(1, 2), keepdim=True)
    projected = torch.where(norm <= radius, q, radius * (q / norm))
    rows, cols = torch.triu_indices(size, size, 1, device=weight.device)
    weight.copy_(projected[:, rows, cols])


class Rotation(nn.Module):
    """Holds one adapter's Q entries as `.weight` (peft's saved name: `oft_R.weight`)."""

    def __init__(self, rows: int, entries: int, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, entries, device=device))


class OFTLayer(AdapterLayer):
    adapter_containers = ("oft_R", "oft_embedding_R")

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__(base_layer, kind)
        self.oft_R = nn.ModuleDict()
        self.oft_embedding_R = nn.ModuleDict()

    def _container(self) -> nn.ModuleDict:
        return self.oft_embedding_R if self.kind == "embedding" else self.oft_R

    def create_adapter(self, name: str, site: Site, init: bool) -> None:
        ((suffix, shape),) = site.tensors.items()
        rotation = Rotation(*shape, device=self.base_layer.weight.device)
        if not (init and site.options["init"]):
            nn.init.normal_(rotation.weight, mean=0.0, std=0.1)
        self._container()[name] = rotation

    def blocks(self, name: str) -> torch.Tensor:
        """(r, b, b): this adapter's orthogonal blocks."""
        options = self.site_options[name]
        weight = self._container()[name].weight
        if options["coft"]:
            project_(weight, options["block_size"], options["eps"])
        rotation = cayley(weight, options["block_size"], options["neumann"], options["terms"])
        if options["block_share"]:
            rotation = rotation.expand(options["blocks"], -1, -1)
        if self.training and options["module_dropout"] > 0:
            rotation = _drop_blocks(rotation, options["module_dropout"])
        return rotation

    def _rotate(self, name: str, x: torch.Tensor) -> torch.Tensor:
        rotation = self.blocks(name)
        blocks, size = rotation.shape[0], rotation.shape[-1]
        rotated = torch.einsum("...rk,rkc->...rc", x.to(rotation.dtype).reshape(*x.shape[:-1], blocks, size), rotation)
        return rotated.reshape(x.shape).to(x.dtype)

    def adapter_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv2d":
            return self._rotate_patches(name, x) if self._patches(name) else x
        return x if self.kind == "embedding" else self._rotate(name, x)

    def _patches(self, name: str) -> bool:
        return self.site_options[name].get("conv_transform") == "patches"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.kind != "conv2d" or self.disabled or self.merged_adapters:
            return super().forward(x, *args, **kwargs)
        rotating = [n for n in self.active_adapters if not self._patches(n)]
        return self._rotated_conv(x, rotating) if rotating else super().forward(x, *args, **kwargs)

    def _rotated_conv(self, x: torch.Tensor, rotating: Sequence[str]) -> torch.Tensor:
        """peft 0.22's Conv2d forward: the convolution with the rotated weight W R_k^T ... R_1^T
        (the merged layer's weight, built as merging builds it: last adapter first), each rotation
        in its adapter's dtype; the convolution runs in the base weight's dtype, as merged.
        Adapters with the patch transform (see the module docstring) transform the input first."""
        conv, dtype = self.base_layer, x.dtype
        for name in self.active_adapters:
            x = self.adapter_input(name, x)
        rotated = conv.weight
        for name in reversed(rotating):
            blocks = self.blocks(name)
            rotated = self._rotate_weight(rotated.to(blocks.dtype), blocks)
        weight = rotated.to(conv.weight.dtype)
        return conv._conv_forward(x.to(weight.dtype), weight, conv.bias).to(dtype)

    def _rotate_patches(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """peft 0.21's conv input transform, step for step (see the module docstring): its final
        reshape reads the (C, H', W', k, k) patches as (C*k*k, H'*W') columns, so it is copied
        rather than written as F.unfold's inverse."""
        k = self.site_options[name]["kernel"]
        batch, channels, height, width = x.shape
        out_h, out_w = height - k + 1, width - k + 1
        patches = x.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5)
        rotated = self._rotate(name, patches.reshape(batch * out_h * out_w, channels * k * k))
        columns = rotated.reshape(batch, out_h, out_w, channels, k, k).permute(0, 3, 1, 2, 4, 5)
        columns = columns.reshape(batch, channels * k * k, out_h * out_w)
        return F.fold(columns, output_size=(height, width), kernel_size=(k, k))

    def adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return self._rotate(name, result) if self.kind == "embedding" else result

    def merge(self, names: Sequence[str] | None = None) -> list[str]:
        """Linear and Conv2d fold adapters in reverse: several active adapters rotate the input
        as x R_1 R_2 ..., which is the weight W R_2^T R_1^T, and each fold multiplies by one R^T
        (peft 0.22's order; 0.21 folded them in order, away from its own forward). An
        embedding's rows are rotated as E R_1 R_2 ...: it folds them in order."""
        chosen = list(names if names is not None else self.active_adapters)
        return super().merge(chosen if self.kind == "embedding" else chosen[::-1])

    def check_mergeable(self, names: Sequence[str]) -> None:
        patches = [n for n in names if self.kind == "conv2d" and self._patches(n)]
        if not patches:
            return
        kernel, groups = self.base_layer.kernel_size[0], self.base_layer.groups
        if kernel > 1:
            raise MergeError(
                f"OFT adapter {patches[0]!r} on a Conv2d with kernel_size {kernel} cannot be merged: it has peft < 0.22's "
                "conv transform (conv_transform=patches), overlapping input patches rotated and folded back (summing the "
                "overlaps), which no merged weight gives (peft 0.21's own merge changes the outputs); keep it unmerged"
            )
        raise MergeError(
            f"OFT adapter {patches[0]!r} on a grouped Conv2d (groups={groups}) cannot be merged: it has peft < 0.22's conv "
            "transform (conv_transform=patches), which rotates all input channels, more than a grouped weight holds; "
            "keep it unmerged"
        )

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self._rotate_weight(weight, self.blocks(name).float())

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        inverse = torch.linalg.inv(self.blocks(name).double())
        return self._rotate_weight(weight.double(), inverse).to(weight.dtype)

    def _rotate_weight(self, weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Linear: W (out, in) -> W blockdiag(M)^T; embedding: E (num, dim) -> E blockdiag(M)."""
        count, size = blocks.shape[0], blocks.shape[-1]
        split = weight.reshape(weight.shape[0], count, size)
        pattern = "nrk,rkc->nrc" if self.kind == "embedding" else "orb,rcb->orc"
        return torch.einsum(pattern, split, blocks.to(weight.dtype)).reshape(weight.shape)


def _drop_blocks(rotation: torch.Tensor, share: float) -> torch.Tensor:
    """Multiplicative dropout: int(share * blocks) random blocks become the identity. (peft 0.21
    builds this layer but never calls it; peftc applies the option as documented.)"""
    count = rotation.shape[0]
    dropped = int(share * count)
    if count == 1 or dropped == 0:
        return rotation
    mask = torch.zeros(count, 1, 1, device=rotation.device, dtype=rotation.dtype)
    mask[torch.randperm(count, device=rotation.device)[:dropped]] = 1.0
    eye = torch.eye(rotation.shape[-1], device=rotation.device, dtype=rotation.dtype)
    return (1 - mask) * rotation + mask * eye


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

    def plan_warnings(self, spec: OFTSpec, sites: Sequence[Site]) -> tuple[str, ...]:
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
                "OFT adapter without 'oft_block_size' (written by peft < 0.14, an incompatible format)",
                "retrain the adapter with a current peft or peftc",
            )
        return OFTSpec(
            **target_kwargs(config),
            r=int(config.get("r", 0)),
            oft_block_size=int(config.get("oft_block_size", 32)),
            module_dropout=float(config.get("module_dropout", 0.0) or 0.0),
            coft=bool(config.get("coft", False)),
            eps=float(config.get("eps", 6e-5)),
            block_share=bool(config.get("block_share", False)),
            use_cayley_neumann=bool(config.get("use_cayley_neumann", True)),
            num_cayley_neumann_terms=int(config.get("num_cayley_neumann_terms", 5)),
            init_weights=bool(config.get("init_weights", True)),
            bias=config.get("bias") or "none",
            adjust_block_size=True,  # peft wrote it: its per-layer adjustment applies
            conv_transform="patches" if written_before_peft_0_22(config) else "weight",
        )


def _patch_sites(sites: Sequence[Site]) -> list[str]:
    """The paths of the sites planned with peft < 0.22's conv transform."""
    return [site.path for site in sites if site.options.get("conv_transform") == "patches"]
