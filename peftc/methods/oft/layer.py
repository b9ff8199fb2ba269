"""OFT's adapted layer: the rotation of a Linear's input, of an Embedding's rows, or of a Conv2d's
weight (peft 0.22), or peft < 0.22's patch transform on a Conv2d; merging in reverse order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftc.errors import MergeError
from peftc.methods.layer import AdapterLayer
from peftc.methods.oft.rotation import cayley, project_
from peftc.planning.plan import Site


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
