"""The AdaLoRA adapter layer: y = W x + (alpha / (ranknum + 1e-5)) * B (E ⊙ A) dropout(x), whose
triplets (A row, E entry, B column) the rank allocator prunes. On a plain nn.Linear without
dropout it runs as LoRA's fused node with the factor E ⊙ A (methods/lora/lowrank.py)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from peftc.methods.layer import AdapterLayer
from peftc.methods.lora.lowrank import fusable, fused_linear
from peftc.planning.plan import Site


class AdaLoraLayer(AdapterLayer):
    adapter_containers = ("lora_A", "lora_B", "lora_E")

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__(base_layer, kind)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()

    def create_adapter(self, name: str, site: Site, init: bool) -> None:
        options = site.options
        device = self.base_layer.weight.device
        a = torch.randn(site.tensors["lora_A"], device=device)
        e = torch.randn(site.tensors["lora_E"], device=device)
        b = torch.randn(site.tensors["lora_B"], device=device)
        if init and options["init"]:
            nn.init.zeros_(e)
            nn.init.normal_(a, mean=0.0, std=0.02)
            nn.init.normal_(b, mean=0.0, std=0.02)
        self.lora_A[name], self.lora_E[name], self.lora_B[name] = nn.Parameter(a), nn.Parameter(e), nn.Parameter(b)
        self.lora_dropout[name] = nn.Dropout(site.dropout) if site.dropout > 0 else nn.Identity()

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if name in self.lora_dropout:
            del self.lora_dropout[name]

    def _scale(self, name: str) -> float:
        options = self.site_options[name]
        return options["scaling"] / (options["ranknum"] + 1e-5)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        fused = None if args or kwargs else self._fused_forward(x)
        return fused if fused is not None else super().forward(x, *args, **kwargs)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every active adapter through LoRA's fused node with factor E ⊙ A, or None."""
        if not fusable(self):
            return None
        scalings = [self._scale(name) for name in self.active_adapters]
        factors = []
        for name in self.active_adapters:
            factors += [self.lora_A[name] * self.lora_E[name], self.lora_B[name]]
        return fused_linear(x, self.base_layer, scalings, factors)

    def adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        a, e, b = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(a.dtype))
        if self.kind == "conv2d":  # padded as the base pads (peft 0.22)
            update = self.base_layer._conv_forward(x, self.delta_weight(name), None)
            return (result + update).to(result.dtype)
        # peft adds in place (result +=): the sum in the wider dtype, rounded once per adapter
        return (result + (x @ (a * e).T @ b.T) * self._scale(name)).to(result.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self.lora_B[name] @ (self.lora_A[name] * self.lora_E[name]) * self._scale(name)
        if self.kind == "conv2d":
            return delta.reshape(self.base_layer.weight.shape)
        return delta.T if self.kind == "conv1d_hf" else delta

    @torch.no_grad()
    def keep_triplets(self, name: str, keep: list[bool]) -> None:
        """Cut the adapter to the kept (A row, E entry, B column) triplets."""
        index = torch.tensor(keep, dtype=torch.bool, device=self.lora_E[name].device)
        for container, sliced in (
            (self.lora_A, self.lora_A[name][index]),
            (self.lora_E, self.lora_E[name][index]),
            (self.lora_B, self.lora_B[name][:, index]),
        ):
            container[name] = nn.Parameter(sliced.clone(), requires_grad=container[name].requires_grad)
        self.site_options[name]["r"] = int(index.sum())


def orthogonal_penalty(layers: list[AdaLoraLayer], name: str) -> torch.Tensor | None:
    """Mean over every A and B of ||A A^T - I||_F and ||B^T B - I||_F, with one batched product
    per factor shape instead of a handful of small ops per layer (on a GPU each is a kernel
    launch: 224 layers make thousands per step)."""
    by_shape: dict[tuple[str, torch.Size], list[torch.Tensor]] = defaultdict(list)
    for layer in layers:
        a, b = layer.lora_A[name], layer.lora_B[name]
        by_shape["A", a.shape].append(a)  # A A^T
        by_shape["B", b.shape].append(b.T)  # B^T B = (B^T)(B^T)^T
    norms = []
    for factors in by_shape.values():
        stacked = torch.stack(factors)
        gram = stacked @ stacked.transpose(1, 2)
        eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
        norms.append(torch.linalg.matrix_norm(gram - eye))
    return torch.cat(norms).mean() if norms else None
