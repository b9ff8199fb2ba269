"""The runtime side of injectable methods: the layer that wraps one base module.

`AdapterLayer` wraps one base layer (composition, never a subclass of it), holds any number of
named adapters, knows which are active, computes their contribution, merges and unmerges
exactly, and can be disabled. `ModulesToSaveWrapper` trains a full copy of a base module per
adapter (peft's modules_to_save). Nothing here knows a method's math.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from peftc.planning.graph import WrapsModule

if TYPE_CHECKING:
    from peftc.planning.plan import Site


class AdapterLayer(WrapsModule, nn.Module):
    """Wraps one base layer and holds the named adapters of one method at that site.

    Subclasses declare `adapter_containers` (attributes that are ModuleDict/ParameterDict keyed
    by adapter name; their names are peft's tensor names) and implement `create_adapter`, and
    `adapter_output` (a term on the base output, LoRA) and/or `adapter_input` (a transform of
    the base layer's input, OFT and IA3's feed-forward scaling). For merging, additive methods
    implement `delta_weight`; others override `merged_weight`/`unmerged_weight` (the weight
    after folding one adapter in or out, computed in float32 and cast once), and methods that
    also change the bias extend `merge_targets` and `merge_one`/`unmerge_one`.
    Over a quantized base layer, weights are read and written only through
    `read_base_weight`/`write_base_weight` (dequantize; quantize again), and a merge keeps the
    stored quantized weight, so unmerging restores it exactly.
    """

    adapter_containers: ClassVar[tuple[str, ...]] = ()
    wrapped_attribute = "base_layer"

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.site_options: dict[str, dict[str, Any]] = {}
        # Per adapter, the module holding its shared tensors as buffers (owned and registered by
        # the PeftcModel; a plain dict here, so that state dicts hold them once, not per layer).
        self.shared_holders: dict[str, nn.Module] = {}
        # Pre-merge copies of the base tensors a merge changes, kept only where add/subtract
        # cannot restore them exactly (half-precision weights): unmerge then restores bit-exactly.
        self._premerge: dict[str, torch.Tensor] = {}
        self._prequant: Any = None  # the quantized base weight as stored before a merge
        self.rounding_error = 0.0  # largest requantization error of the last merge

    # ---------------------------------------------------------------------------- hooks
    def create_adapter(self, name: str, site: Site, init: bool) -> None:
        raise NotImplementedError

    def adapter_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The base layer's input as this adapter transforms it (identity unless overridden)."""
        return x

    def adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The base layer's output with this adapter's contribution (x: the original input)."""
        return result

    def delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    def share_adapter(self, name: str, owner: AdapterLayer) -> None:
        """Use the tensors of adapter `name` at another site (`owner`), for a site planned with a
        'shares_with' option (peft's trainable tokens on an output head tied to the embedding)."""
        raise NotImplementedError(f"{type(self).__name__} does not share adapters between sites")

    def combine_adapters(
        self, name: str, sources: Sequence[str], weights: Sequence[float], combination_type: str, **options: Any
    ) -> None:
        """Fill adapter `name` from weighted source adapters (see Method.weighted_adapter_spec)."""
        raise NotImplementedError(f"{type(self).__name__} cannot combine adapters")

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The weight with this adapter folded in, from a float32 `weight` the caller owns (it
        may be updated in place: no second copy of W). Additive methods: W + delta."""
        return weight.add_(self.delta_weight(name).to(weight.dtype))

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of `merged_weight`, under the same contract."""
        return weight.sub_(self.delta_weight(name).to(weight.dtype))

    # ------------------------------------------------------------------------ lifecycle
    @property
    def adapter_names(self) -> list[str]:
        return list(self.site_options)

    def add_adapter(self, name: str, site: Site, *, init: bool = True) -> None:
        if name in self.site_options:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        self.site_options[name] = dict(site.options)
        self.create_adapter(name, site, init)
        ref = self.base_layer.weight if hasattr(self.base_layer, "weight") else None
        for param in self.adapter_parameters(name):
            if ref is not None and param.device != ref.device and ref.device.type != "meta":
                param.data = param.data.to(ref.device)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before deleting")
        for container in self._containers():
            if name in container:
                del container[name]
        self.site_options.pop(name, None)
        self.shared_holders.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def attach_shared(self, name: str, holder: nn.Module) -> None:
        """Give adapter `name` (about to be added) its shared tensors: `holder`'s buffers."""
        self.shared_holders[name] = holder

    def shared_tensor(self, name: str, tensor: str) -> torch.Tensor:
        """One of adapter `name`'s shared tensors, looked up on each call (moving the model to
        another device replaces the buffer)."""
        return self.shared_holders[name].get_buffer(tensor)

    def set_active(self, names: Sequence[str]) -> None:
        self.active_adapters = [n for n in names if n in self.site_options]

    def _containers(self) -> Iterator[nn.ModuleDict | nn.ParameterDict]:
        for attr in self.adapter_containers:
            container = getattr(self, attr, None)
            if container is not None:
                yield container

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        for container in self._containers():
            if name in container:
                entry = container[name]
                if isinstance(entry, nn.Parameter):
                    yield entry
                else:
                    yield from entry.parameters()

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """This adapter's tensors under peft's per-site names ('lora_A.weight', 'lora_E', ...)."""
        tensors: dict[str, torch.Tensor] = {}
        for attr in self.adapter_containers:
            container = getattr(self, attr, None)
            if container is None or name not in container:
                continue
            entry = container[name]
            if isinstance(entry, nn.Parameter):
                tensors[attr] = entry
            else:
                for param_name, tensor in entry.state_dict(keep_vars=True).items():
                    tensors[f"{attr}.{param_name}"] = tensor
        return tensors

    @torch.no_grad()
    def load_adapter_tensors(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        own = self.adapter_tensors(name)
        for suffix, tensor in tensors.items():
            target = own[suffix]
            target.copy_(tensor.to(dtype=target.dtype, device=target.device))

    # ---------------------------------------------------------------------------- merging
    def _weight(self) -> nn.Parameter:
        return self.base_layer.weight

    @property
    def quant_backend(self) -> Any:
        """The backend that quantized the base layer, or None for a plain layer."""
        from peftc.quant.base import backend_of

        return backend_of(self.base_layer)

    @torch.no_grad()
    def read_base_weight(self) -> torch.Tensor:
        """The base weight in float32, in the layout the layer stores it ((out, in) for Linear),
        dequantized for a quantized base (a fresh tensor then; for a float32 plain layer it is
        the weight's own storage, so do not modify it in place)."""
        backend = self.quant_backend
        return backend.dequantize(self.base_layer) if backend is not None else self._weight().data.float()

    @torch.no_grad()
    def write_base_weight(self, weight: torch.Tensor) -> float:
        """Store a new float base weight; returns the largest rounding error a quantized base adds
        when it quantizes the weight again (0.0 for a plain layer, which casts once to its dtype)."""
        backend = self.quant_backend
        if backend is None:
            target = self._weight()
            target.data = weight.to(target.dtype)
            return 0.0
        backend.requantize(self.base_layer, weight)
        return float((backend.dequantize(self.base_layer) - weight.float()).abs().max())

    def check_mergeable(self, names: Sequence[str]) -> None:
        """Raise (before anything changes) if these adapters cannot be merged here."""

    def merge_targets(self, names: Sequence[str]) -> tuple[str, ...]:
        """Names of the base layer's parameters that merging these adapters changes."""
        return ("weight",)

    def merge(self, names: Sequence[str] | None = None) -> list[str]:
        """Fold adapters into the base weight; returns the names actually merged."""
        chosen = [
            n
            for n in (names if names is not None else self.active_adapters)
            if n not in self.merged_adapters and n in self.site_options
        ]
        if not chosen:
            return []
        self.check_mergeable(chosen)
        self._snapshot(self.merge_targets(chosen))
        self.rounding_error = 0.0
        for name in chosen:
            self.rounding_error = max(self.rounding_error, self.merge_one(name) or 0.0)
            self.merged_adapters.append(name)
        return chosen

    def unmerge(self) -> None:
        if self._premerge or self._prequant is not None:
            if self._prequant is not None:
                self.quant_backend.restore(self.base_layer, self._prequant)
                self._prequant = None
            for pname, saved in self._premerge.items():
                getattr(self.base_layer, pname).data = saved
            self._premerge = {}
            while self.merged_adapters:
                self.forget_merge(self.merged_adapters.pop())
            return
        while self.merged_adapters:
            self.unmerge_one(self.merged_adapters.pop())

    def forget_merge(self, name: str) -> None:
        """Drop per-merge state of an adapter whose merge was undone by restoring a snapshot."""

    @torch.no_grad()
    def _snapshot(self, targets: Sequence[str]) -> None:
        """Keep pre-merge copies when a target is half precision (W + d - d loses its bits there).

        Once a snapshot exists, every later target is snapshotted too (it is still pristine: no
        earlier merge touched it), so that unmerge can restore them all at once. A quantized base
        weight is always kept (its backend hands over the stored weight; no copy is made).
        """
        backend = self.quant_backend
        if backend is not None and "weight" in targets and self._prequant is None and not self.merged_adapters:
            self._prequant = backend.snapshot(self.base_layer)
        if backend is not None:
            for pname in targets:
                tensor = getattr(self.base_layer, pname, None)
                if pname != "weight" and pname not in self._premerge and isinstance(tensor, torch.Tensor):
                    self._premerge[pname] = tensor.detach().clone()
            return
        fresh = {p: getattr(self.base_layer, p, None) for p in targets if p not in self._premerge}
        fresh = {p: t for p, t in fresh.items() if isinstance(t, torch.Tensor)}
        if not fresh:
            return
        if not self._premerge:
            exact = all(t.dtype in (torch.float32, torch.float64) for t in fresh.values())
            if exact or self.merged_adapters:
                return
        for pname, tensor in fresh.items():
            self._premerge[pname] = tensor.detach().clone()

    @torch.no_grad()
    def merge_one(self, name: str) -> float:
        """Fold this adapter into the base weight; returns the requantization error (0.0 unquantized)."""
        if self.quant_backend is not None:
            return self.write_base_weight(self.merged_weight(name, self.read_base_weight()))
        weight = self._weight()
        # float32 weights are handed over as they are (.float() is then no copy).
        weight.data = self.merged_weight(name, weight.data.float()).to(weight.dtype)
        return 0.0

    @torch.no_grad()
    def unmerge_one(self, name: str) -> float:
        if self.quant_backend is not None:
            return self.write_base_weight(self.unmerged_weight(name, self.read_base_weight()))
        weight = self._weight()
        weight.data = self.unmerged_weight(name, weight.data.float()).to(weight.dtype)
        return 0.0

    @torch.no_grad()
    def merge_is_finite(self, names: Sequence[str]) -> bool:
        """Whether merging these adapters would leave only finite weights (for safe_merge)."""
        total = self.read_base_weight().clone()
        for name in names:
            if name in self.site_options and name not in self.merged_adapters:
                total = self.merged_weight(name, total)
        return bool(torch.isfinite(total).all())

    # ---------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged_adapters or not self.active_adapters:
            return self.base_layer(x, *args, **kwargs)
        layer_input = x
        for name in self.active_adapters:
            layer_input = self.adapter_input(name, layer_input)
        result = self.base_layer(layer_input, *args, **kwargs)
        result_dtype = result.dtype
        for name in self.active_adapters:
            result = self.adapter_output(name, x, result)
        # peft adds float32 adapters' updates to a bfloat16 base's output in float32 and rounds
        # the sum once, here; rounding each update first doubled the rounding (up to 1.34x the
        # error of peft's logits over a bfloat16 base).
        return result.to(result_dtype)

    def scaled_like_base(self, lookup: torch.Tensor) -> torch.Tensor:
        """A lookup in (or beside) an embedding table, scaled as the base layer scales its own.

        Scaled word embeddings (Gemma's, BART's, M2M100's: `embed_scale`, often sqrt(hidden))
        multiply the looked-up rows in their forward. An update computed from the table directly
        must carry the same factor, or the unmerged output differs from the merged one (whose
        weight the base's forward scales) and from peft 0.22, which does this too.
        """
        scale = getattr(self.base_layer, "embed_scale", None)
        if scale is None:
            return lookup
        if not isinstance(scale, torch.Tensor):  # BART keeps a float; peft rounds it to the weight's dtype
            scale = torch.tensor(scale, device=lookup.device, dtype=self.base_layer.weight.dtype)
        return lookup * scale.to(lookup.dtype)

    def __getattr__(self, name: str) -> Any:
        # Model code reads attributes of the layer it thinks it has (weight, in_features, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"


class ModulesToSaveWrapper(WrapsModule, nn.Module):
    """Keeps the original module frozen and trains a full copy per adapter (peft's modules_to_save)."""

    wrapped_attribute = "original_module"

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str, follows: nn.Module | None = None) -> None:
        """A trained copy of the module for adapter `name`; one whose weight is the `follows`
        module's (another wrapper's copy: a head tied to the input embedding), so that one
        weight is trained from both modules."""
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        # The tied weight is shared, not copied (a deepcopy would copy it only to replace it).
        memo = {id(self.original_module.weight): follows.weight} if follows is not None else {}
        copied = copy.deepcopy(self.original_module, memo)
        for param in copied.parameters():
            param.requires_grad_(False)
        self.modules_to_save[name] = copied

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active(self, names: Sequence[str]) -> None:
        chosen = [n for n in names if n in self.modules_to_save]
        if len(chosen) > 1:
            warnings.warn(f"modules_to_save supports one active adapter; using {chosen[0]!r}", stacklevel=2)
        self.active_adapter = chosen[0] if chosen else None

    def current(self) -> nn.Module:
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.current(), name)
