"""The module graph of a model: every module's path, kind and shapes, plus the config facts
that prompt methods and memory estimates need. Built on the meta device (no weights) for
planning, or read off a live model when an adapter is loaded onto it.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from torch import nn

    from peftc.config.spec import ModelSpec

# Module kinds the methods reason about. "conv1d_hf" is transformers' Conv1D (GPT-2), which
# stores its weight as (in, out): a Linear with fan_in_fan_out.
LINEAR_KINDS = frozenset({"linear", "conv1d_hf"})


@dataclass(frozen=True)
class ModuleInfo:
    path: str
    class_name: str
    kind: str
    in_features: int | None = None
    out_features: int | None = None
    has_bias: bool = False
    params: tuple[tuple[str, tuple[int, ...]], ...] = ()  # own parameters (not children)
    extra: tuple[tuple[str, Any], ...] = ()  # kernel_size, groups, ...
    has_children: bool = False

    @property
    def leaf_name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.extra).get(key, default)


@dataclass(frozen=True)
class ModelFacts:
    """Architecture numbers read from the transformers config (text config for multimodal)."""

    model_type: str
    hidden_size: int | None
    num_layers: int | None
    num_attention_heads: int | None
    num_key_value_heads: int | None
    head_dim: int | None
    vocab_size: int | None
    max_positions: int | None
    is_encoder_decoder: bool
    num_decoder_layers: int | None = None
    intermediate_size: int | None = None
    tie_word_embeddings: bool = False


@dataclass(frozen=True)
class ModelGraph:
    model_class: str
    facts: ModelFacts
    modules: tuple[ModuleInfo, ...]
    total_params: int
    param_bytes: int
    dtype: str
    input_embedding: str | None
    output_embedding: str | None
    tied_parameters: tuple[tuple[str, str], ...] = ()
    # Whether the model's forward, or its backbone's, names transformers' `cache` argument:
    # prefix tuning hands its keys and values over there (peft's test before its first forward).
    takes_cache: bool = False
    _index: dict[str, ModuleInfo] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._index.update({m.path: m for m in self.modules})

    @property
    def model_type(self) -> str:
        return self.facts.model_type

    def module(self, path: str) -> ModuleInfo | None:
        return self._index.get(path)

    def tied_with(self, parameter: str) -> set[str]:
        """The other parameters that are this one (tie_word_embeddings: the head's and the input
        embedding's weight), by full name."""
        names = {name for pair in self.tied_parameters if parameter in pair for name in pair}
        return names - {parameter}

    def weight_shared_with(self, path: str) -> set[str]:
        """The other modules whose weight is this module's weight."""
        return {name.removesuffix(".weight") for name in self.tied_with(f"{path}.weight") if name.endswith(".weight")}

    def subtree(self, path: str) -> Iterator[ModuleInfo]:
        prefix = path + "."
        for info in self.modules:
            if info.path == path or info.path.startswith(prefix):
                yield info

    def leaf_names(self) -> set[str]:
        return {m.leaf_name for m in self.modules if m.path}


def module_kind(module: nn.Module) -> str:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return "conv1d_hf"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    for dims, cls in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d)):
        if isinstance(module, cls):
            return f"conv{dims}d"
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm) or name.endswith(("RMSNorm", "LayerNorm", "GroupNorm")):
        return "norm"
    return "container" if any(True for _ in module.children()) else "other"


def _shapes(module: nn.Module, kind: str) -> tuple[int | None, int | None, tuple[tuple[str, Any], ...]]:
    if kind == "linear":
        return module.in_features, module.out_features, ()
    if kind == "conv1d_hf":
        return module.weight.shape[0], module.weight.shape[1], ()
    if kind == "embedding":
        return module.num_embeddings, module.embedding_dim, (("padding_idx", module.padding_idx),)
    if kind.startswith("conv"):
        extra = (
            ("kernel_size", tuple(module.kernel_size)),
            ("stride", tuple(module.stride)),
            (
                "padding",
                module.padding if isinstance(module.padding, str) else tuple(module.padding),
            ),
            ("groups", module.groups),
            ("dilation", tuple(module.dilation)),
        )
        return module.in_channels, module.out_channels, extra
    if kind == "mha":  # in_proj: E -> 3E (q, k, v packed)
        return module.embed_dim, 3 * module.embed_dim, (("same_embed_dim", module._qkv_same_embed_dim),)
    return None, None, ()


def graph_of(model: nn.Module, facts: ModelFacts | None = None) -> ModelGraph:
    """Read the module graph off a model (meta or real). peftc wrappers already injected are
    seen through: the graph describes the base model as it was before any adapter."""
    modules = []
    params: dict[int, Any] = {}
    for path, module in _walk(model):
        kind = module_kind(module)
        in_features, out_features, extra = _shapes(module, kind)
        own = list(module.named_parameters(recurse=False))
        for _, p in own:
            params.setdefault(id(p), p)
        if getattr(module, "is_transposed", None) is True:  # MoE experts stored (experts, in, out)
            extra += (("is_transposed", True),)
        bias = getattr(module, "bias", None)
        modules.append(
            ModuleInfo(
                path=path,
                class_name=type(module).__name__,
                kind=kind,
                in_features=in_features,
                out_features=out_features,
                has_bias=bias is not None and not isinstance(bias, bool),
                params=tuple((n, tuple(p.shape)) for n, p in own),
                extra=extra,
                has_children=any(True for _ in module.children()),
            )
        )
    values = list(params.values())
    dtype = str(values[0].dtype).replace("torch.", "") if values else "float32"
    return ModelGraph(
        model_class=type(model).__name__,
        facts=facts or facts_of(getattr(model, "config", None)),
        modules=tuple(modules),
        total_params=sum(p.numel() for p in values),
        param_bytes=sum(p.numel() * p.element_size() for p in values),
        dtype=dtype,
        input_embedding=_path_of(model, "get_input_embeddings"),
        output_embedding=_path_of(model, "get_output_embeddings"),
        tied_parameters=_tied(model),
        takes_cache=_takes_cache(model),
    )


def _takes_cache(model: nn.Module) -> bool:
    for module in (model, getattr(model, "base_model", None)):
        forward = getattr(module, "forward", None)
        if forward is not None and "cache" in inspect.signature(forward).parameters:
            return True
    return False


class WrapsModule:
    """Marks peftc's wrappers (adapter layers, modules_to_save): the graph of a model that holds
    them is the graph of the model they wrap, so planning a second adapter sees the base."""

    wrapped_attribute: ClassVar[str]


def _unwrap(module: nn.Module) -> nn.Module:
    # Wrappers can nest (LoRA wraps a module once per targeted parameter, as peft does).
    while isinstance(module, WrapsModule):
        module = getattr(module, module.wrapped_attribute)
    return module


def _walk(root: nn.Module, *, unique: bool = True) -> Iterator[tuple[str, nn.Module]]:
    """Like named_modules(), but through peftc's wrappers and without adapter internals;
    `unique=False` yields a module reused under several paths at each of them."""
    seen: set[int] = set()
    stack = [("", root)]
    while stack:
        path, module = stack.pop()
        module = _unwrap(module)
        if unique and id(module) in seen:
            continue
        seen.add(id(module))
        yield path, module
        children = [(f"{path}.{name}" if path else name, child) for name, child in module.named_children()]
        stack.extend(reversed(children))


def _parameters_through_wrappers(root: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Like named_parameters(remove_duplicate=False), named as in the base model before any
    adapter: a tie between two wrapped modules (a tied head and embedding both adapted) is then
    seen under the names the unwrapped model gives it, as a plan made on the bare model saw it."""
    for path, module in _walk(root, unique=False):
        for name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            yield (f"{path}.{name}" if path else name), param


def _path_of(model: nn.Module, getter: str) -> str | None:
    fn = getattr(model, getter, None)
    if fn is None:
        return None
    try:
        target = fn()
    except (NotImplementedError, AttributeError):
        return None
    if target is None:
        return None
    target = _unwrap(target)
    for path, module in _walk(model):
        if module is target:
            return path
    return None


def _tied(model: nn.Module) -> tuple[tuple[str, str], ...]:
    seen: dict[int, str] = {}
    tied = []
    for name, param in _parameters_through_wrappers(model):
        if id(param) in seen:
            tied.append((name, seen[id(param)]))
        else:
            seen[id(param)] = name
    return tuple(tied)


def _first(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def facts_of(config: Any) -> ModelFacts:
    if config is None:
        return ModelFacts("unknown", None, None, None, None, None, None, None, False)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    heads = _first(text, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    kv_heads = _first(text, "num_key_value_heads") or heads
    head_dim = _first(text, "head_dim", "d_kv") or (hidden // heads if hidden and heads else None)
    return ModelFacts(
        model_type=getattr(config, "model_type", "unknown"),
        hidden_size=hidden,
        num_layers=_first(text, "num_hidden_layers", "n_layer", "num_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=_first(text, "vocab_size"),
        max_positions=_first(text, "max_position_embeddings", "n_positions"),
        is_encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
        num_decoder_layers=_first(text, "num_decoder_layers", "decoder_layers"),
        intermediate_size=_first(text, "intermediate_size", "n_inner", "d_ff", "encoder_ffn_dim"),
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
    )


def meta_graph(model: ModelSpec, auto_class_name: str, extra_config: dict[str, Any] | None = None) -> ModelGraph:
    """The graph of a model spec, built on the meta device; cached per (config, head class)."""
    import torch

    from peftc.planning.model_source import head_class, hf_config

    config = hf_config(model, extra_config)
    check_buildable(facts_of(config))
    # The dtype is part of the key: the same config in bfloat16 has half the parameter bytes.
    key = (auto_class_name, model.dtype, json.dumps(config.to_dict(), sort_keys=True, default=str))
    if key not in _META_GRAPHS:
        with torch.device("meta"):
            meta = head_class(auto_class_name, config).from_config(config, dtype=getattr(torch, model.dtype))
        if len(_META_GRAPHS) >= 32:
            _META_GRAPHS.pop(next(iter(_META_GRAPHS)))
        _META_GRAPHS[key] = graph_of(meta)
    return _META_GRAPHS[key]


_META_GRAPHS: dict[tuple[str, str, str], ModelGraph] = {}

# Beyond these a config describes no model anyone trains (the largest have ~2e12 parameters and
# ~200 layers), and building its graph, even on the meta device, would take minutes and memory
# without bound (one Python module object per layer part).
MAX_LAYERS = 10_000
MAX_PARAMETERS = 10**14


def check_buildable(facts: ModelFacts) -> None:
    """Refuse, before building anything, a config whose model could not exist anywhere."""
    from peftc.errors import ConfigError

    layers = (facts.num_layers or 0) + (facts.num_decoder_layers or 0)
    if layers > MAX_LAYERS:
        raise ConfigError(
            "model.config.num_hidden_layers",
            layers,
            f"asks for more than {MAX_LAYERS:,} layers, which no trainable model has",
            "use a real layer count (hundreds at most)",
        )
    hidden, inner, vocab = facts.hidden_size or 0, facts.intermediate_size or 0, facts.vocab_size or 0
    estimate = max(layers, 1) * (4 * hidden * hidden + 3 * hidden * inner) + 2 * vocab * hidden
    if estimate > MAX_PARAMETERS:
        raise ConfigError(
            "model.config",
            f"hidden_size={hidden}, intermediate_size={inner}, vocab_size={vocab}, layers={layers}",
            f"describes a model of about {estimate:.1e} parameters, beyond any that can be trained ({MAX_PARAMETERS:.0e})",
            "check the sizes in model.config",
        )


def layer_index(path: str, layers_pattern: tuple[str, ...] | None = None) -> int | None:
    """The transformer-block index of a module path.

    With `layers_pattern`, the integer right after a segment named like the pattern
    (`model.layers.3.mlp` -> 3 for 'layers'); without, the first integer segment. Unlike peft's
    regex this also works for a bare ModuleList at the root (peft#3610).
    """
    parts = path.split(".")
    if layers_pattern:
        for i, part in enumerate(parts[:-1]):
            if part in layers_pattern and parts[i + 1].isdigit():
                return int(parts[i + 1])
        return None
    for part in parts:
        if part.isdigit():
            return int(part)
    return None


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at the dotted `path` of `root` (for injection, unloading and quantization)."""
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)
