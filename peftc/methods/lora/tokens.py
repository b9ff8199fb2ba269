"""Trainable tokens (peft's `trainable_token_indices` on LoRA): chosen rows of an embedding trained
in full beside the adapter, the usual way to teach a model new special tokens (a chat template's
markers) without training the whole vocabulary.

The adapter holds the chosen rows, initialised to the base rows, under peft's saved name
`<embedding>.token_adapter.trainable_tokens_delta` (shape (tokens, dim); despite the name, the
rows' new values, not a difference). The forward looks tokens up in the base weight with those
rows replaced, as peft does. Merging writes the rows into the weight; unmerging writes back the
original rows (kept in memory, not saved). An embedding whose weight the output head shares
(tie_word_embeddings) is refused for now: peft then trains the tied head's rows too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftc.errors import ConfigError, PlanError, did_you_mean
from peftc.methods.base import AdapterLayer
from peftc.planning.graph import ModelGraph, ModuleInfo
from peftc.planning.plan import Site

KEY = "peft.trainable_token_indices"
CONTAINER = "token_adapter"
SUFFIX = f"{CONTAINER}.trainable_tokens_delta"


def check_indices(value: Any) -> None:
    """Shape of the setting, before any model is known: a list of token ids, or {module: list}."""
    lists = value.items() if isinstance(value, Mapping) else [(None, value)]
    for module, tokens in lists:
        key = f"{KEY}.{module}" if module is not None else KEY
        if not isinstance(tokens, (list, tuple)) or not tokens:
            shown = list(tokens) if isinstance(tokens, tuple) else tokens
            raise ConfigError(key, shown, "must be a non-empty list of token ids", f"e.g. {KEY}=[32000,32001]")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
            raise ConfigError(key, list(tokens), "token ids are integers >= 0")
        if len(set(tokens)) != len(tokens):
            raise ConfigError(key, list(tokens), "lists a token id twice")


def token_sites(value: Any, graph: ModelGraph, init: bool) -> tuple[Site, ...]:
    """One site per embedding named by the setting (a bare list: the model's input embedding)."""
    if value is None:
        return ()
    targets = dict(value) if isinstance(value, Mapping) else {graph.input_embedding or "embed_tokens": list(value)}
    sites = []
    for name, tokens in targets.items():
        for module in _embeddings_named(str(name), graph):
            sites.append(_site(module, list(tokens), graph, init))
    return tuple(sites)


def _embeddings_named(name: str, graph: ModelGraph) -> list[ModuleInfo]:
    matches = [m for m in graph.modules if m.path and (m.path == name or m.path.endswith("." + name))]
    if not matches:
        hint = did_you_mean(name.rsplit(".", 1)[-1], sorted(graph.leaf_names())) or "name an nn.Embedding of the model"
        raise PlanError(KEY, name, f"no module named {name!r} in {graph.model_class}", hint)
    wrong = next((m for m in matches if m.kind != "embedding"), None)
    if wrong is not None:
        raise PlanError(
            KEY, name, f"{wrong.path} is a {wrong.class_name}; trainable tokens are rows of an nn.Embedding"
        )
    return matches


def _site(module: ModuleInfo, tokens: list[int], graph: ModelGraph, init: bool) -> Site:
    vocab, dim = module.in_features, module.out_features
    outside = [t for t in tokens if t >= vocab]
    if outside:
        raise PlanError(KEY, tokens, f"token ids {outside} are outside {module.path}'s {vocab} rows")
    weight = f"{module.path}.weight"
    if any(weight in pair for pair in graph.tied_parameters):
        raise PlanError(
            KEY,
            tokens,
            f"{module.path} shares its weight with the output head (tie_word_embeddings); peftc does not "
            "implement trainable tokens on tied embeddings yet",
            f"train the whole embedding instead: peft.modules_to_save=[{module.path.rsplit('.', 1)[-1]}]",
        )
    return Site(
        module.path,
        "embedding",
        module.class_name,
        vocab,
        dim,
        {SUFFIX: (len(tokens), dim)},
        {"token_indices": tuple(tokens), "init": init},
    )


def is_token_site(site: Site) -> bool:
    return "token_indices" in site.options


class TrainableTokensLayer(AdapterLayer):
    """An embedding with some rows replaced by trained values (per adapter)."""

    adapter_containers = (CONTAINER,)

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__(base_layer, kind)
        self.token_adapter = nn.ParameterDict()
        self._indices: dict[str, torch.Tensor] = {}
        self._originals: dict[str, torch.Tensor] = {}

    def create_adapter(self, name: str, site: Site, init: bool) -> None:
        weight = self.base_layer.weight
        indices = torch.tensor(site.options["token_indices"], dtype=torch.long, device=weight.device)
        originals = weight.detach()[indices].clone()
        values = originals.clone() if init and site.options.get("init", True) else torch.randn_like(originals)
        self._indices[name], self._originals[name] = indices, originals
        self.token_adapter[name] = nn.Parameter(values)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self._indices.pop(name, None)
        self._originals.pop(name, None)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {SUFFIX: self.token_adapter[name]} if name in self.token_adapter else {}

    def _rows_replaced(self, weight: torch.Tensor, names: Sequence[str], source: dict[str, Any]) -> torch.Tensor:
        for name in names:
            index = self._indices[name].to(weight.device)
            weight = weight.index_copy(0, index, source[name].to(weight))
        return weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled or self.merged_adapters or not self.active_adapters:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        weight = self._rows_replaced(base.weight, self.active_adapters, self.token_adapter)
        return F.embedding(
            x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_copy_(
            0, self._indices[name].to(weight.device), self.token_adapter[name].detach().to(weight)
        )

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_copy_(0, self._indices[name].to(weight.device), self._originals[name].to(weight))
