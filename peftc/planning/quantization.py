"""Planning the quantization of a base: which modules a backend quantizes, and the bytes by dtype.

Pure: works on the module graph (meta device or a live model), loads nothing. The output head
is kept in model.dtype by default (`skip_modules: null`), and so is every module the plan
trains in full (task heads, modules_to_save) and every weight tied to another module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from peftc.errors import ConfigError, PlanError, did_you_mean
from peftc.planning.memory import DTYPE_BYTES
from peftc.planning.plan import QuantPlan, numel

if TYPE_CHECKING:
    from peftc.planning.graph import ModelGraph, ModuleInfo
    from peftc.planning.plan import Site
    from peftc.quant.base import QuantBackend

KEY = "quant.skip_modules"


def plan_quantization(
    backend: QuantBackend,
    spec: Any,
    graph: ModelGraph,
    dtype: str,
    *,
    protected: Iterable[str] = (),
) -> QuantPlan:
    """The QuantPlan of `backend` over `graph` whose unquantized weights are stored as `dtype`."""
    candidates = [m for m in graph.modules if m.path and backend.quantizes(m)]
    if backend.name == "none":
        return QuantPlan("none", "", (), (), _bytes_by_dtype(backend, spec, graph, dtype, set()))
    kept = _kept(spec, graph, candidates, protected)
    modules = tuple(m.path for m in candidates if m.path not in kept)
    if not modules:
        raise PlanError("quant", backend.name, f"would quantize no module of {graph.model_class}", _why_none(graph))
    skipped = tuple(m.path for m in candidates if m.path in kept)
    return QuantPlan(
        backend=backend.name,
        storage=backend.storage,
        modules=modules,
        skipped=skipped,
        bytes_by_dtype=_bytes_by_dtype(backend, spec, graph, dtype, set(modules)),
        merge_policy=backend.merge_policy,
        notes=backend.notes,
    )


def annotate_sites(sites: tuple[Site, ...], quantization: QuantPlan) -> tuple[Site, ...]:
    """Mark the sites whose base layer is quantized (`base_quant`: the storage format)."""
    quantized = set(quantization.modules)
    return tuple(replace(site, base_quant=quantization.storage) if site.path in quantized else site for site in sites)


def _kept(spec: Any, graph: ModelGraph, candidates: list[ModuleInfo], protected: Iterable[str]) -> set[str]:
    blocked = tuple(protected)
    kept = {m.path for m in candidates if any(m.path == p or m.path.startswith(p + ".") for p in blocked)}
    tied = {name.rsplit(".", 1)[0] for pair in graph.tied_parameters for name in pair}
    kept |= {m.path for m in candidates if m.path in tied}
    skip = spec.skip_modules
    if skip is None:
        if graph.output_embedding:
            kept.add(graph.output_embedding)
        return kept
    everything = [m for m in graph.modules if m.path]
    if isinstance(skip, str):
        try:
            pattern = re.compile(skip)
        except re.error as exc:
            raise ConfigError(KEY, skip, f"is not a valid regular expression ({exc})") from exc
        return kept | {m.path for m in everything if pattern.fullmatch(m.path)}
    for entry in skip:
        if not isinstance(entry, str):
            raise ConfigError(KEY, entry, "entries must be module names (strings)")
        found = [m.path for m in everything if m.path == entry or m.path.endswith("." + entry)]
        if not found:
            hint = did_you_mean(entry, graph.leaf_names() | {m.path for m in everything})
            raise PlanError(KEY, entry, f"no module named {entry!r} in {graph.model_class}", hint)
        kept.update(found)
    return kept


def _why_none(graph: ModelGraph) -> str:
    if any(m.kind == "conv1d_hf" for m in graph.modules):
        return (
            "its projections are transformers Conv1D layers (GPT-2 style), which the backends do not quantize; "
            "use quant=none, or a model with nn.Linear projections such as model=tiny_llama"
        )
    return "every Linear module is skipped (quant.skip_modules, the output head, task heads); use quant=none"


def _bytes_by_dtype(
    backend: QuantBackend, spec: Any, graph: ModelGraph, dtype: str, quantized: set[str]
) -> dict[str, int]:
    """Every base parameter once: quantized weights as the backend stores them, the rest as `dtype`
    (float32 when the k-bit preparation keeps unquantized weights there)."""
    tied_copies = {name for name, _ in graph.tied_parameters}
    kept_as = "float32" if getattr(spec, "float32_unquantized", False) else dtype
    sizes: dict[str, int] = {}

    def add(kind: str, size: int) -> None:
        sizes[kind] = sizes.get(kind, 0) + size

    for module in graph.modules:
        for name, shape in module.params:
            full = f"{module.path}.{name}" if module.path else name
            if full in tied_copies:
                continue
            if module.path in quantized and name == "weight":
                for kind, size in backend.weight_bytes(spec, module, dtype).items():
                    add(kind, size)
                continue
            add(kept_as, numel(shape) * DTYPE_BYTES.get(kept_as, 4))
    return dict(sorted(sizes.items()))
