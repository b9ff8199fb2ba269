"""The LoRA adapter layer: y = base(x) + s * B A dropout(x) per active adapter (DoRA: see dora.py).

Wraps nn.Linear, transformers' Conv1D (GPT-2, weight stored (in, out)), nn.Embedding and
nn.Conv1d/2d/3d. Per adapter it holds peft's tensors under peft's names: `lora_A`/`lora_B`
(Linear or ConvNd modules; B may carry a bias with lora_bias), `lora_embedding_A`/`_B` for
embeddings, and `lora_magnitude_vector` for DoRA.

Weights are reasoned about in *row layout* (one row per output feature): Linear and ConvNd
weights already are; Conv1D and Embedding weights are transposed into it. Then
dW = s * B A (convolutions: B (out, r) times A (r, in*k*k), reshaped), and merging adds dW,
or for DoRA scales W + dW row-wise by m / ||W + dW||, remembering the norm for an exact unmerge.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from peftc.errors import MergeError
from peftc.methods.layer import AdapterLayer
from peftc.methods.lora import dora
from peftc.methods.lora.init import BASE_MUTATING, init_family, olora, orthogonal, pissa, reset_default
from peftc.methods.lora.lowrank import (
    adapters_fusable,
    fused_linear,
    fused_quantized_linear,
    fused_rescaled_linear,
    plain_linear,
    without_hooks,
)

if TYPE_CHECKING:
    from peftc.planning.plan import Site

CONV_KINDS = ("conv1d", "conv2d", "conv3d")
TRANSPOSED_KINDS = ("conv1d_hf", "embedding")  # weights stored (in, out)


def meta_linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """An nn.Linear on the meta device, never initialised: on meta, kaiming_uniform_ draws
    nothing but costs ~0.2 ms through a Python decomposition, and torch's skip_init ~0.2 ms more
    (a 70B all-linear plan creates 1,120 of these)."""
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = in_features, out_features
    layer.weight = nn.Parameter(torch.empty(out_features, in_features, device="meta"))
    layer.register_parameter("bias", nn.Parameter(torch.empty(out_features, device="meta")) if bias else None)
    return layer


class TiedFactor(nn.Module):
    """A LoRA factor of a tied output head that is the transpose of the input embedding's
    (ensure_weight_tying, tying.py): A_head = B_emb^T, B_head = A_emb^T. It owns no parameter:
    the embedding's is trained and counted once, and gradients from the head reach it through the
    transpose. The embedding's container is held in a plain dict, not as a submodule."""

    bias = None

    def __init__(self, container: nn.ParameterDict, name: str) -> None:
        super().__init__()
        self._source = {"container": container, "name": name}

    @property
    def weight(self) -> torch.Tensor:
        return self._source["container"][self._source["name"]].T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class LoraLayer(AdapterLayer):
    adapter_containers = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__(base_layer, kind)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self._merged_norms: dict[str, torch.Tensor] = {}  # DoRA: the norm each merge used
        # A tied head's adapters: the embedding layer whose factors they read (plain dict: its
        # parameters are counted and saved there), and peft's initial draws waiting for it.
        self._tied_owners: dict[str, LoraLayer] = {}
        self._tied_draws: dict[str, torch.Tensor | None] = {}
        self._tied_paths: dict[str, str] = {}  # the head's own path, for a merge refusal to name

    # ------------------------------------------------------------------------- creating
    def create_adapter(self, name: str, site: Site, init: bool) -> None:
        opts = site.options
        r, scaling = opts["r"], opts["scaling"]
        self.scaling[name] = scaling
        self.lora_dropout[name] = nn.Dropout(site.dropout) if site.dropout > 0 else nn.Identity()
        if site.shares_with is not None:
            self._draw_tied(name, site, init)
        elif self.kind == "embedding":
            self._create_embedding(name, site, init and opts["init"] is not False)
        elif self.kind in CONV_KINDS:
            self._create_conv(name, r, opts, init)
        else:
            self._create_linear(name, site, r, opts, init)
        if opts.get("dora") and site.shares_with is None:  # a tied head's: once it has factors
            self._create_magnitude(name)

    @torch.no_grad()
    def _create_magnitude(self, name: str) -> None:
        """DoRA's m = ||W + s B A|| per row, from the adapter's factors as they are now."""
        weight = self._base_weight()
        lora_rows = self._lora_rows(name).to(weight.device)
        magnitude = dora.initial_magnitude(self._rows(weight).float(), lora_rows, self.scaling[name], self.kind)
        self.lora_magnitude_vector[name] = nn.Parameter(magnitude)

    def _create_embedding(self, name: str, site: Site, init: bool) -> None:
        # peft draws both from N(0, 1) first (kept when init is false), then resets them.
        device = self._creation_device()
        a = nn.Parameter(torch.randn(site.options["r"], site.in_features, device=device))
        b = nn.Parameter(torch.randn(site.out_features, site.options["r"], device=device))
        if init:  # every truthy init is "A zero, B normal" for embeddings (peft)
            nn.init.zeros_(a)
            nn.init.normal_(b)
        self.lora_embedding_A[name], self.lora_embedding_B[name] = a, b

    def _draw_tied(self, name: str, site: Site, init: bool) -> None:
        """A head tied to the embedding's LoRA draws what peft's draws: its two Linear layers
        (then dropped), and its reset of A into the embedding's B (a transposed view of it, the
        memory order peft fills); B_head = A_emb^T is zeroed. Written there by share_adapter."""
        r, init_value = site.options["r"], site.options["init"]
        self._tied_paths[name] = site.path
        if self._creation_device() is not None:
            self._tied_draws[name] = None
            return
        nn.Linear(site.in_features, r, bias=False)
        nn.Linear(r, site.out_features, bias=False)
        drawn = None
        if init and init_family(init_value) in ("default", "gaussian"):
            drawn = torch.empty(site.in_features, r)
            reset_default(SimpleNamespace(weight=drawn.T), SimpleNamespace(weight=torch.empty(0)), init_value, r)
        self._tied_draws[name] = drawn

    def share_adapter(self, name: str, owner: AdapterLayer) -> None:
        if not isinstance(owner, LoraLayer) or name not in owner.lora_embedding_A:
            raise TypeError(f"adapter {name!r}: {type(owner).__name__} holds no LoRA embedding factors to tie to")
        self._tied_owners[name] = owner
        self.lora_A[name] = TiedFactor(owner.lora_embedding_B, name)
        self.lora_B[name] = TiedFactor(owner.lora_embedding_A, name)
        drawn = self._tied_draws.pop(name, None)
        if drawn is not None:
            with torch.no_grad():
                owner.lora_embedding_B[name].copy_(drawn)
                owner.lora_embedding_A[name].zero_()
        if self.site_options[name].get("dora"):  # peft's head: its own m, from the tied factors
            self._create_magnitude(name)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        tensors = super().adapter_tensors(name)
        if name in self._tied_owners:  # saved under the head's names too, as peft does
            tensors.update({"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight})
        return tensors

    def _merged_by_owner(self, name: str) -> bool:
        """A tied head whose base weight is the embedding's: the embedding's merge already added
        the same update ((s B A)^T) to that one weight, so the head adds nothing (peft adds it
        a second time)."""
        owner = self._tied_owners.get(name)
        return owner is not None and owner.base_layer.weight is self.base_layer.weight

    def _create_conv(self, name: str, r: int, opts: dict[str, Any], init: bool) -> None:
        base = self.base_layer
        conv = type(base)
        ones = (1,) * (base.weight.dim() - 2)
        # As peft 0.22: A copies kernel, stride, padding, dilation and padding_mode, so that B A x is
        # the merged weight's convolution; B is a 1x1 conv with base's groups.
        device = self._creation_device()
        a = conv(
            base.in_channels,
            r,
            base.kernel_size,
            base.stride,
            base.padding,
            base.dilation,
            padding_mode=base.padding_mode,
            bias=False,
            device=device,
        )
        b = conv(r, base.out_channels, ones, ones, groups=base.groups, bias=opts.get("lora_bias", False), device=device)
        if init and opts["init"] is not False:
            reset_default(a, b, opts["init"], r)
        self.lora_A[name], self.lora_B[name] = a, b

    def _create_linear(self, name: str, site: Site, r: int, opts: dict[str, Any], init: bool) -> None:
        device = self._creation_device()
        if device is not None:  # meta: nothing to draw, so no initialisation at all (fast plans)
            a = meta_linear(site.in_features, r, bias=False)
            b = meta_linear(r, site.out_features, bias=opts.get("lora_bias", False))
        else:
            a = nn.Linear(site.in_features, r, bias=False)
            b = nn.Linear(r, site.out_features, bias=opts.get("lora_bias", False))
        self.lora_A[name], self.lora_B[name] = a, b
        family = init_family(opts["init"])
        if family in BASE_MUTATING:
            # Always, also when loading: the base must become the residual the adapter was trained on.
            self._init_from_base(name, family, opts)
        elif init and family == "orthogonal":
            lora_a, lora_b = orthogonal(site.in_features, site.out_features, r)
            dtype = self._base_weight().dtype  # peft rounds through the base dtype
            a.weight.data, b.weight.data = lora_a.to(dtype).float(), lora_b.to(dtype).float()
        elif init and family != "none" and device is None:
            reset_default(a, b, opts["init"], r)

    @torch.no_grad()
    def _init_from_base(self, name: str, family: str, opts: dict[str, Any]) -> None:
        """PiSSA / OLoRA: take the adapter from W and leave the residual W - s B A in the base."""
        weight = self._base_weight()
        rows = self._rows(weight.float())
        r, scaling = opts["r"], opts["scaling"]
        lora_a, lora_b = pissa(rows, r, scaling, opts["init"]) if family == "pissa" else olora(rows, r)
        self.lora_A[name].weight.data, self.lora_B[name].weight.data = lora_a, lora_b
        residual = rows - scaling * lora_b @ lora_a
        self.write_base_weight(self._unrows(residual).contiguous())

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self._tied_owners.pop(name, None)
        self._tied_draws.pop(name, None)
        self._tied_paths.pop(name, None)
        self.scaling.pop(name, None)
        self._merged_norms.pop(name, None)
        if name in self.lora_dropout:
            del self.lora_dropout[name]

    def _creation_device(self) -> torch.device | None:
        """Meta for meta models (no memory); else the CPU, drawing the same random numbers as
        peft does (AdapterLayer.add_adapter then moves the tensors to the base's device)."""
        device = self.base_layer.weight.device
        return device if device.type == "meta" else None

    # --------------------------------------------------------------------------- layouts
    def _base_weight(self) -> torch.Tensor:
        """The base weight to compute with: the layer's own parameter, or for a quantized base its
        float32 dequantization (a fresh copy: changes go through write_base_weight)."""
        if self.quant_backend is not None:
            return self.read_base_weight()
        return self.base_layer.weight

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.kind in TRANSPOSED_KINDS else weight

    _unrows = _rows  # a transpose is its own inverse

    def _lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as 2-D factors in row layout: A (r, in...), B (out, r)."""
        if self.kind == "embedding":
            return self.lora_embedding_A[name], self.lora_embedding_B[name]
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        r = a.shape[0]
        return a.reshape(r, -1), b.reshape(-1, r)

    def _lora_rows(self, name: str) -> torch.Tensor:
        """B A in row layout (without the scaling)."""
        a, b = self._lora_factors(name)
        if self.kind in CONV_KINDS:
            return (b @ a).reshape(self._base_weight().shape)
        return b @ a

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A in the base weight's own layout (float32)."""
        return self._unrows(self._delta_rows(name))

    def _delta_rows(self, name: str) -> torch.Tensor:
        if self.kind == "embedding":
            return self.lora_embedding_B[name].float() @ self.lora_embedding_A[name].float() * self.scaling[name]
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        if self.kind in CONV_KINDS:
            r = a.shape[0]
            delta = (b.reshape(-1, r) @ a.reshape(r, -1)).reshape(self._base_weight().shape)
            return delta * self.scaling[name]
        return b @ a * self.scaling[name]

    # --------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        fused = None if args or kwargs else self._fused_forward(x)
        return fused if fused is not None else super().forward(x, *args, **kwargs)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Plain LoRA adapters, or one DoRA adapter, on a plain nn.Linear without dropout, or
        plain LoRA adapters on a quantized linear whose backend gives its frozen product: one
        fused node (lowrank.py), or None."""
        if not adapters_fusable(self) or any(self.lora_B[name].bias is not None for name in self.active_adapters):
            return None
        dora_names = [name for name in self.active_adapters if name in self.lora_magnitude_vector]
        if not plain_linear(self.base_layer):
            frozen = self._frozen_product()
            if frozen is None or dora_names:
                return None
            scalings, factors = self._lora_scalings_and_factors()
            return fused_quantized_linear(x, frozen, scalings, factors)
        if dora_names:
            if len(self.active_adapters) > 1:
                return None
            (name,) = dora_names
            rescale = self._dora_scale(name, self.base_layer.weight)
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            return fused_rescaled_linear(x, self.base_layer, self.scaling[name], a, b, rescale)
        scalings, factors = self._lora_scalings_and_factors()
        return fused_linear(x, self.base_layer, scalings, factors)

    def _lora_scalings_and_factors(self) -> tuple[list[float], list[torch.Tensor]]:
        """The active adapters' scalings and their (A, B) weights, interleaved."""
        scalings, factors = [], []
        for name in self.active_adapters:
            scalings.append(self.scaling[name])
            factors += [self.lora_A[name].weight, self.lora_B[name].weight]
        return scalings, factors

    def _frozen_product(self) -> Any:
        """The quantized base layer's frozen product (quant.base.FrozenLinear), or None."""
        backend = self.quant_backend
        if backend is None or not without_hooks(self.base_layer):
            return None
        return backend.frozen_linear(self.base_layer)

    def adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if self.kind == "embedding":
            return self._embedding_output(name, x, result)
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        dropout, scaling = self.lora_dropout[name], self.scaling[name]
        x = x.to(lora_a.weight.dtype)
        if name not in self.lora_magnitude_vector:
            return result + lora_b(lora_a(dropout(x))) * scaling  # rounded once, in AdapterLayer.forward
        # DoRA: reuse the base output when no dropout is applied, else recompute W x on dropped-out x.
        weight = self._base_weight()
        if isinstance(dropout, nn.Identity) or not self.training:
            base_out = self._without_bias(result)
        else:
            x = dropout(x)
            base_out = self._bare_forward(x, weight.to(x.dtype))
        mag_scale = self._dora_scale(name, self._rows(weight))
        channel = 1 if self.kind in CONV_KINDS else -1
        delta = dora.output_delta(mag_scale, base_out, lora_b(lora_a(x)), scaling, channel)
        return result + delta

    def _embedding_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        lora_a, lora_b, scaling = self.lora_embedding_A[name], self.lora_embedding_B[name], self.scaling[name]
        after_a = F.embedding(
            x, lora_a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )
        update = self.scaled_like_base(after_a @ lora_b.T * scaling)
        if name not in self.lora_magnitude_vector:
            return result + update
        weight = self._rows(self._base_weight())
        mag_scale = self._dora_scale(name, weight)
        return mag_scale * result + mag_scale * update

    def _dora_scale(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """m / ||W + s B A|| per row, shape (out,); the norm is detached (DoRA section 4.3)."""
        lora_a, lora_b = self._lora_factors(name)
        if lora_b.shape[0] == rows.shape[0]:  # factored_row_norm runs without grad
            norm = dora.factored_row_norm(rows, lora_a, lora_b, self.scaling[name])
        else:  # a grouped conv: peft's B A there is a product over each group's rows, reshaped
            norm = dora.row_norm(rows + self.scaling[name] * self._lora_rows(name).detach()).detach()
        return self.lora_magnitude_vector[name].reshape(-1) / norm

    def _without_bias(self, result: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.base_layer, "bias", None)
        if bias is None:
            return result
        shape = [1] * result.dim()
        shape[1 if self.kind in CONV_KINDS else -1] = -1
        return result - bias.view(shape)

    def _bare_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """W x without bias (the part DoRA rescales); a convolution pads as the base layer does."""
        if self.kind in CONV_KINDS:
            return self.base_layer._conv_forward(x, weight, None)
        return F.linear(x, self._rows(weight))

    def combine_adapters(
        self, name: str, sources: Sequence[str], weights: Sequence[float], combination_type: str, **options: Any
    ) -> None:
        from peftc.methods.lora.combine import combine

        if name in self._tied_owners:  # the embedding's combined factors are this head's, transposed
            return
        combine(self, name, sources, weights, combination_type, **options)

    # --------------------------------------------------------------------------- merging
    def check_mergeable(self, names: Sequence[str]) -> None:
        tied_dora = next((n for n in names if n in self._tied_owners and n in self.lora_magnitude_vector), None)
        if tied_dora is not None:
            head = self._tied_paths[tied_dora]
            raise MergeError(
                f"adapter {tied_dora!r} cannot be merged: {head} is tied to the input embedding but has a DoRA "
                f"magnitude of its own ({head}.lora_magnitude_vector, as in peft), and one tied weight cannot hold "
                "two different DoRA results (peft's merge gives neither); use the unmerged model"
            )
        if self.kind in CONV_KINDS and self.base_layer.groups > 1:
            raise MergeError(
                f"LoRA on a grouped {type(self.base_layer).__name__} (groups>1) cannot be merged (as in peft)"
            )
        if any(self._has_lora_bias(n) for n in names) and getattr(self.base_layer, "bias", None) is None:
            raise MergeError("lora_bias adapters cannot be merged into a layer without a bias (as in peft)")

    def merge_targets(self, names: Sequence[str]) -> tuple[str, ...]:
        if all(self._merged_by_owner(n) for n in names):
            return ()  # nothing to snapshot: a copy taken after the embedding's merge would be wrong
        return ("weight", "bias") if any(self._has_lora_bias(n) for n in names) else ("weight",)

    def _has_lora_bias(self, name: str) -> bool:
        return name in self.lora_B and self.lora_B[name].bias is not None

    @torch.no_grad()
    def merge_one(self, name: str) -> float:
        if self._merged_by_owner(name):
            return 0.0
        if name in self.lora_magnitude_vector:
            merged, norm = self._dora_merged(name, self._base_weight().float())
            self._merged_norms[name] = norm
            rounding = self.write_base_weight(merged)
        else:
            rounding = super().merge_one(name)
        if self._has_lora_bias(name):
            bias = self.base_layer.bias
            bias.data = (bias.data.float() + self.lora_B[name].bias.float() * self.scaling[name]).to(bias.dtype)
        return rounding

    @torch.no_grad()
    def unmerge_one(self, name: str) -> float:
        if self._merged_by_owner(name):
            return 0.0
        if name in self.lora_magnitude_vector:
            mag_scale = self.lora_magnitude_vector[name].reshape(-1).float() / self._merged_norms.pop(name)
            rows = dora.unmerged_rows(self._rows(self._base_weight().float()), self._delta_rows(name), mag_scale)
            rounding = self.write_base_weight(self._unrows(rows).contiguous())
        else:
            rounding = super().unmerge_one(name)
        if self._has_lora_bias(name):
            bias = self.base_layer.bias
            bias.data = (bias.data.float() - self.lora_B[name].bias.float() * self.scaling[name]).to(bias.dtype)
        return rounding

    def forget_merge(self, name: str) -> None:
        self._merged_norms.pop(name, None)

    def _dora_merged(self, name: str, current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m/n) (W_now + dW) with n = ||W + dW|| of the *unmerged* base W, as the forward sees it."""
        delta = self._delta_rows(name)
        norm = dora.row_norm(self._rows(self._pristine_weight()) + delta)
        mag_scale = self.lora_magnitude_vector[name].reshape(-1).float() / norm
        rows = dora.merged_rows(self._rows(current), delta, mag_scale)
        return self._unrows(rows).contiguous(), norm

    def _pristine_weight(self) -> torch.Tensor:
        """The base weight with every merged adapter taken out again (float32)."""
        if "weight" in self._premerge:
            return self._premerge["weight"].float()
        weight = self._base_weight().float().clone()
        for name in reversed(self.merged_adapters):
            if name in self._merged_norms:
                mag_scale = self.lora_magnitude_vector[name].reshape(-1).float() / self._merged_norms[name]
                weight = self._unrows(dora.unmerged_rows(self._rows(weight), self._delta_rows(name), mag_scale))
            else:
                weight = weight - self.delta_weight(name)
        return weight

    @torch.no_grad()
    def merge_is_finite(self, names: Sequence[str]) -> bool:
        weight = self._base_weight().float().clone()
        bias_ok = True
        for name in names:
            if name not in self.site_options or name in self.merged_adapters:
                continue
            if name in self.lora_magnitude_vector:
                weight = self._dora_merged(name, weight)[0]
            else:
                weight += self.delta_weight(name)
            if self._has_lora_bias(name):
                merged_bias = self.base_layer.bias.float() + self.lora_B[name].bias.float() * self.scaling[name]
                bias_ok = bias_ok and bool(torch.isfinite(merged_bias).all())
        return bias_ok and bool(torch.isfinite(weight).all())
