"""Trainable tokens (peft's `trainable_token_indices` on LoRA): chosen rows of an embedding trained
in full beside the adapter, the usual way to teach a model new special tokens (a chat template's
markers) without training the whole vocabulary.

The adapter holds the chosen rows, initialised to the base rows, under peft's saved name
`<embedding>.token_adapter.trainable_tokens_delta` (shape (tokens, dim); despite the name, the
rows' new values, not a difference). The forward looks tokens up in the base weight with those
rows replaced, as peft does. Merging writes the rows into the weight; unmerging writes back the
original rows (kept in memory, not saved).

When the output head shares the input embedding's weight (tie_word_embeddings), peft also wraps
the head (`lm_head`) and ties it to the embedding's adapter: the head computes x @ W^T with the
same rows replaced, trains nothing of its own and saves nothing (its rows are the embedding's).
peftc plans the head as a site without tensors that shares the embedding site's rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftc.errors import ConfigError, PlanError, did_you_mean
from peftc.methods.layer import AdapterLayer
from peftc.methods.lora.tying import heads_tied_to_input
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
    """One site per embedding named by the setting (a bare list: the model's input embedding),
    and one per output head tied to the input embedding (peft ties their rows)."""
    if value is None:
        return ()
    targets = dict(value) if isinstance(value, Mapping) else {graph.input_embedding or "embed_tokens": list(value)}
    heads = heads_tied_to_input(graph)
    named_heads = _named_heads(targets, heads, graph)
    sites = []
    for name, tokens in targets.items():
        if name in named_heads:
            continue
        for module in _embeddings_named(str(name), graph):
            sites.append(_site(module, list(tokens), graph, init))
            if module.path == graph.input_embedding:
                sites.extend(_tied_head_site(head, list(tokens), module.path, init) for head in heads)
    return tuple(sites)


def _named_heads(targets: Mapping[Any, Any], heads: Sequence[ModuleInfo], graph: ModelGraph) -> set[Any]:
    """Setting keys that name a tied head. peft lets the head follow the embedding's adapter when
    both are named with the same tokens; anything else would untie the shared weight's rows."""
    named = {key for key in targets for head in heads if head.path == key or head.path.endswith(f".{key}")}
    embedding = graph.input_embedding or ""
    embedding_tokens = next(
        (list(v) for k, v in targets.items() if embedding == k or embedding.endswith(f".{k}")), None
    )
    for key in named:
        if embedding_tokens is None or list(targets[key]) != embedding_tokens:
            raise PlanError(
                f"{KEY}.{key}",
                list(targets[key]),
                f"{key} shares its weight with {embedding} (tie_word_embeddings): its rows follow the embedding's",
                f"name only the embedding: {KEY}={{{embedding.rsplit('.', 1)[-1]}: {list(targets[key])}}}",
            )
    return named


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
    _refuse_untied_sharing(module, tokens, graph)
    return Site(
        module.path,
        "embedding",
        module.class_name,
        vocab,
        dim,
        {SUFFIX: (len(tokens), dim)},
        {"token_indices": tuple(tokens), "init": init},
    )


def _refuse_untied_sharing(module: ModuleInfo, tokens: list[int], graph: ModelGraph) -> None:
    """A shared weight peft does not tie (another embedding's, or one shared beyond Linear heads:
    T5's encoder and decoder embeddings) would see the rows change only on merge."""
    sharing = graph.tied_with(f"{module.path}.weight")
    heads = {f"{h.path}.weight" for h in heads_tied_to_input(graph)} if module.path == graph.input_embedding else set()
    if sharing - heads:
        shown = sorted(name.removesuffix(".weight") for name in sharing - heads)
        raise PlanError(
            KEY,
            tokens,
            f"{module.path} shares its weight with {', '.join(shown)}, which peft does not tie to its trainable tokens",
            f"train the whole embedding instead: peft.modules_to_save=[{module.path.rsplit('.', 1)[-1]}]",
        )


def _tied_head_site(head: ModuleInfo, tokens: list[int], embedding: str, init: bool) -> Site:
    options = {"token_indices": tuple(tokens), "init": init}
    return Site.for_module(head, {}, options, shares_with=embedding)


def is_token_site(site: Site) -> bool:
    return "token_indices" in site.options


class TrainableTokensLayer(AdapterLayer):
    """An embedding with some rows replaced by trained values (per adapter); or an output head
    tied to such an embedding, computing its logits from the embedding adapter's rows."""

    adapter_containers = (CONTAINER,)

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__(base_layer, kind)
        self.token_adapter = nn.ParameterDict()
        self._indices: dict[str, torch.Tensor] = {}
        self._originals: dict[str, torch.Tensor] = {}
        # Per adapter, the tied embedding's layer whose rows a head uses. Held in a plain dict,
        # not as a submodule: its parameters are the embedding's, saved and counted there once.
        self._rows_owner: dict[str, TrainableTokensLayer] = {}

    def create_adapter(self, name: str, site: Site, init: bool) -> None:
        weight = self.base_layer.weight
        indices = torch.tensor(site.options["token_indices"], dtype=torch.long, device=weight.device)
        originals = weight.detach()[indices].clone()
        self._indices[name], self._originals[name] = indices, originals
        if site.shares_with is not None:
            return  # the rows arrive with share_adapter
        values = originals.clone() if init and site.options.get("init", True) else torch.randn_like(originals)
        self.token_adapter[name] = nn.Parameter(values)

    def share_adapter(self, name: str, owner: AdapterLayer) -> None:
        if not isinstance(owner, TrainableTokensLayer) or name not in owner.token_adapter:
            raise TypeError(f"adapter {name!r}: {type(owner).__name__} holds no trainable tokens to share")
        self._rows_owner[name] = owner

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self._indices.pop(name, None)
        self._originals.pop(name, None)
        self._rows_owner.pop(name, None)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        # A tied head's rows are the embedding's: saved there only, as peft does.
        return {SUFFIX: self.token_adapter[name]} if name in self.token_adapter else {}

    def _rows(self, name: str) -> torch.Tensor:
        owner = self._rows_owner.get(name, self)
        return owner.token_adapter[name]

    def _rows_replaced(self, weight: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        for name in names:
            index = self._indices[name].to(weight.device)
            weight = weight.index_copy(0, index, self._rows(name).to(weight))
        return weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled or self.merged_adapters or not self.active_adapters:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        weight = self._rows_replaced(base.weight, self.active_adapters)
        if not isinstance(base, nn.Embedding):
            # A tied head. peft calls F.linear without the bias; tied heads have none, and with
            # one this is the forward peft's own merged weight gives.
            return F.linear(x, weight, base.bias)
        return self.scaled_like_base(
            F.embedding(
                x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
            )
        )

    @torch.no_grad()
    def _snapshot(self, targets: Sequence[str]) -> None:
        # Writing rows is exact in any dtype and unmerge writes the kept original rows back, so no
        # copy of the weight is needed. A copy would also be wrong for a tied head: taken after
        # the embedding's merge, it would hold the merged rows.
        if self.quant_backend is not None:
            super()._snapshot(targets)

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        # For a tied head this rewrites the rows the embedding's merge already wrote (as peft).
        return weight.index_copy_(0, self._indices[name].to(weight.device), self._rows(name).detach().to(weight))

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_copy_(0, self._indices[name].to(weight.device), self._originals[name].to(weight))
