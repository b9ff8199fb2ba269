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
from peftc.planning import model_source
from peftc.planning.memory import DTYPE_BYTES
from peftc.planning.plan import QuantPlan, numel

if TYPE_CHECKING:
    from peftc.config.spec import RunSpec
    from peftc.planning.graph import ModelGraph, ModuleInfo
    from peftc.planning.plan import Site
    from peftc.quant.base import QuantBackend

KEY = "quant.skip_modules"


def checkpoint_quantization(run: RunSpec, backend: QuantBackend) -> tuple[RunSpec, dict[str, Any] | None]:
    """A checkpoint saved quantized (config.json's `quantization_config`) trains as it is stored:
    with the backend whose layers it holds, that spec's storage fields taken from the checkpoint.
    Any other `quant`, and a format no backend reads (GPTQ, AWQ, fp8, ...), is refused here,
    before anything is loaded. Returns the run and the checkpoint's quantization_config."""
    from peftc.config.registry import QUANT_BACKENDS

    stored = model_source.stored_quantization(run.model)
    if stored is None:
        return run, None
    owner = QUANT_BACKENDS.find(lambda candidate: candidate.stores(stored))
    if owner is None:
        raise ConfigError(
            "model.name_or_path",
            run.model.name_or_path,
            f"is saved quantized as {_format_of(stored)} (config.json quantization_config), "
            "which peftc cannot train adapters on",
            "use the model's unquantized checkpoint (quant=bnb_nf4 trains it in 4 bits), "
            "or one saved by bitsandbytes (quant=bnb_nf4, bnb_fp4, bnb_int8)",
        )
    if owner is not backend:
        raise ConfigError(
            "quant",
            backend.name,
            f"model.name_or_path={run.model.name_or_path} is saved quantized as {_format_of(stored)} "
            "(config.json quantization_config) and trains as it is stored",
            f"set quant={owner.name}",
        )
    if run.quant.skip_modules is not None:
        raise ConfigError(
            KEY,
            run.quant.skip_modules,
            f"model.name_or_path={run.model.name_or_path} is saved quantized: the checkpoint fixes which modules are",
            "leave quant.skip_modules unset",
        )
    return run.replace(quant=backend.checkpoint_spec(run.quant, stored)), stored


def _format_of(stored: dict[str, Any]) -> str:
    """How a quantization_config names its format: `bitsandbytes nf4`, `gptq 4-bit`, ..."""
    method, bits = stored.get("quant_method"), model_source.bitsandbytes_bits(stored)
    if bits is not None:
        return f"bitsandbytes {stored.get('bnb_4bit_quant_type') or 'fp4'}" if bits == 4 else "bitsandbytes int8"
    if not method:
        return "an unnamed format (no quant_method)"
    return f"{method} {stored['bits']}-bit" if isinstance(stored.get("bits"), int) else str(method)


def plan_quantization(
    backend: QuantBackend,
    spec: Any,
    graph: ModelGraph,
    dtype: str,
    *,
    protected: Iterable[str] = (),
    stored: dict[str, Any] | None = None,
) -> QuantPlan:
    """The QuantPlan of `backend` over `graph` whose unquantized weights are stored as `dtype`;
    `stored`: the quantization_config of a checkpoint saved quantized, which fixes the modules."""
    candidates = [m for m in graph.modules if m.path and backend.quantizes(m)]
    if backend.name == "none":
        return QuantPlan("none", "", (), (), _bytes_by_dtype(backend, spec, graph, dtype, set()))
    if stored is None:
        kept = _kept(spec, graph, candidates, protected)
    else:
        kept = _kept_by_checkpoint(graph, candidates, stored)
    modules = tuple(m.path for m in candidates if m.path not in kept)
    if stored is not None:
        _check_trainable(modules, protected, graph)
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
        from_checkpoint=stored is not None,
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


def _kept_by_checkpoint(graph: ModelGraph, candidates: list[ModuleInfo], stored: dict[str, Any]) -> set[str]:
    """The Linear modules transformers leaves unquantized when it reads a bitsandbytes checkpoint:
    those its `llm_int8_skip_modules` names, else transformers' default (`get_keys_to_not_convert`:
    tied weights, the output embedding, the module of the model's last parameter)."""
    patterns = stored.get("llm_int8_skip_modules")
    if patterns is None:
        tied_copies = {name for name, _ in graph.tied_parameters}
        patterns = [name.removesuffix(".weight") for pair in graph.tied_parameters for name in pair]
        patterns += [graph.output_embedding] if graph.output_embedding else []
        owners = [m.path for m in graph.modules if any(f"{m.path}.{n}" not in tied_copies for n, _ in m.params)]
        patterns += owners[-1:]
    return {m.path for m in candidates if _skipped_by(m.path, [str(p) for p in patterns])}


def _skipped_by(path: str, patterns: list[str]) -> bool:
    """transformers' rule (`should_convert_module`, 5.25) for a skip list entry: it matches from the
    start up to a module boundary, as a regex with that boundary, or as a suffix of the path."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{pattern}){boundary}", path) or path.endswith(pattern) for pattern in patterns)


def _check_trainable(modules: tuple[str, ...], protected: Iterable[str], graph: ModelGraph) -> None:
    """A module the run trains in full (task head, modules_to_save) cannot be one the checkpoint stores quantized."""
    for owner in protected:
        inside = [path for path in modules if path == owner or path.startswith(owner + ".")]
        if inside:
            raise PlanError(
                "peft.modules_to_save",
                owner,
                f"is trained in full, but the checkpoint stores {inside[0]} quantized "
                f"(its quantization_config's skip list does not keep it in {graph.dtype})",
                "use the model's unquantized checkpoint with quant=bnb_nf4, or leave the module out",
            )


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
