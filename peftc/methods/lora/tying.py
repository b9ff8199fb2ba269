"""peft's `ensure_weight_tying` for LoRA: an output head that shares the input embedding's weight
(tie_word_embeddings: Llama-3.2, Qwen2.5, Gemma, GPT-2) follows the embedding's adapter instead of
being adapted apart, so that the weight stays one weight.

Which adapter the head follows is peft 0.22's rule, by module *name* (`embed_tokens`, `lm_head`):
- modules_to_save names one of them: the embedding's trained copy is the head's weight too (one
  copy, trained from both ends). peft rewrites modules_to_save to the embedding's path (the head's
  entry removed) and saves the copy under both modules' names.
- otherwise target_modules names one of them: the embedding gets LoRA (A: (r, vocab), B: (dim, r))
  and the head's LoRA is the same update read the other way, A_head = B^T and B_head = A^T, so
  that s B_head A_head = (s B A)^T is the embedding's update in the head's layout. peft rewrites
  target_modules likewise and saves the head's factors and both base weights too.
peftc applies the same rewrites to the spec (so adapter_config.json records what peft writes) and
plans the head as a site or saved module that follows the embedding's (`Site.shares_with`,
`SavedModule.follows`): the head owns no trainable tensor, so the update is trained once.
Trainable tokens tie the same way with or without the flag (tokens.py).

With DoRA (use_dora) the head keeps a magnitude of its own, as peft 0.22's does: m_head (vocab,),
initialised to ||W + dW|| per vocabulary row, trained and saved as `lm_head.lora_magnitude_vector`,
beside the embedding's m_emb (dim,), a norm per embedding dimension. So the two read one W and one
dW = s (B A)^T as two weights, (W + dW) diag(m_emb / col norms) and diag(m_head / row norms)
(W + dW): one tensor cannot hold both, and merging is refused (LoraLayer.check_mergeable); peft
merges both into it, one rescaling on top of the other, dW added twice.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from peftc.errors import PlanError
from peftc.methods.base import EMBEDDING_LAYER_NAMES
from peftc.methods.lora.dora import magnitude_shape
from peftc.methods.lora.init import init_family
from peftc.planning.plan import Site

if TYPE_CHECKING:
    from collections.abc import Sequence

    from peftc.methods.lora.method import LoraSpec
    from peftc.planning.graph import ModelGraph, ModuleInfo

KEY = "peft.ensure_weight_tying"
# Inits under which the embedding's factors are drawn as peft draws the head's (tied_head_init)
TIEABLE_INITS = ("default", "none", "gaussian")


def heads_tied_to_input(graph: ModelGraph) -> list[ModuleInfo]:
    """The Linear modules whose weight is the input embedding's (tie_word_embeddings)."""
    if graph.input_embedding is None:
        return []
    modules = [graph.module(path) for path in sorted(graph.weight_shared_with(graph.input_embedding))]
    return [m for m in modules if m is not None and m.kind == "linear"]


def _names_embedding(entries: Any, embedding: str) -> bool:
    """peft's test: an entry whose last dotted name is embed_tokens or lm_head (a regex string:
    one that matches either name); and the input embedding's full path, which is what peft's
    rewrite writes (GPT-2: `transformer.wte`), so that peft's files load tied. peft itself tests
    only the names when it loads them, and leaves GPT-2's head untied then."""
    if isinstance(entries, str):
        return any(re.fullmatch(entries, name) for name in EMBEDDING_LAYER_NAMES)
    return any(str(e) == embedding or str(e).rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES for e in entries or ())


def tied_through(spec: LoraSpec, graph: ModelGraph) -> str | None:
    """How the flag ties the heads on this model: 'modules_to_save', 'target_modules' or None."""
    if not spec.ensure_weight_tying or not heads_tied_to_input(graph):
        return None
    if _names_embedding(spec.modules_to_save, graph.input_embedding):
        return "modules_to_save"
    if _names_embedding(spec.target_modules, graph.input_embedding):
        return "target_modules"
    return None


def for_model(spec: LoraSpec, graph: ModelGraph) -> LoraSpec:
    """The spec as peft rewrites it: the embedding's path added to the list that ties, and the
    first entry naming each tied head removed from it."""
    field = tied_through(spec, graph)
    if field is None:
        return spec
    embedding = graph.input_embedding
    value = getattr(spec, field)
    if isinstance(value, str):  # a regex: peft widens it to the embedding's exact path
        return replace(spec, **{field: rf"(?:{value}|^{re.escape(embedding)}$)"})
    entries = [str(entry) for entry in value]
    if embedding not in entries:
        entries.append(embedding)
    for head in heads_tied_to_input(graph):
        match = next((e for e in entries if re.match(rf"(^|.*\.){re.escape(e)}($|\..*)", head.path)), None)
        if match is not None:
            entries.remove(match)
    return replace(spec, **{field: entries})


def tied_modules(spec: LoraSpec, graph: ModelGraph) -> dict[str, str]:
    """Head path -> the input embedding's, for the heads that follow the embedding's adapter."""
    if tied_through(spec, graph) is None:
        return {}
    heads = heads_tied_to_input(graph)
    biased = next((head.path for head in heads if head.has_bias), None)
    if biased is not None:
        raise PlanError(KEY, True, f"{biased} has a bias, which peft's tied head drops", f"set {KEY}=false")
    return {head.path: graph.input_embedding for head in heads}


def without_tied_heads(spec: LoraSpec, modules: Sequence[ModuleInfo], graph: ModelGraph) -> list[ModuleInfo]:
    """The target modules less the heads that will follow the embedding's LoRA."""
    if tied_through(spec, graph) != "target_modules":
        return list(modules)
    heads = set(tied_modules(spec, graph))
    return [m for m in modules if m.path not in heads]


def head_sites(spec: LoraSpec, graph: ModelGraph, sites: Sequence[Site]) -> tuple[Site, ...]:
    """One site per tied head, sharing the embedding site's factors (transposed) and options."""
    if tied_through(spec, graph) != "target_modules":
        return ()
    tied_modules(spec, graph)  # refuses heads it cannot tie
    embedding = next((s for s in sites if s.path == graph.input_embedding), None)
    if embedding is None:
        raise PlanError(
            KEY, True, f"ties the output head to {graph.input_embedding}'s LoRA, which exclude_modules leaves out",
            f"keep {graph.input_embedding} adapted, or set {KEY}=false",
        )  # fmt: skip
    _check_embedding_site(spec, embedding)
    r = embedding.options["r"]
    heads = []
    for head in heads_tied_to_input(graph):
        tensors = {"lora_A.weight": (r, head.in_features), "lora_B.weight": (head.out_features, r)}
        owns = ()
        if spec.use_dora:  # the head's own magnitude, one per vocabulary row (see above)
            tensors["lora_magnitude_vector"] = magnitude_shape(head.kind, head.out_features)
            owns = ("lora_magnitude_vector",)
        heads.append(
            Site.for_module(
                head,
                tensors,
                dict(embedding.options),
                dropout=spec.lora_dropout,
                save_base_weight=embedding.save_base_weight,
                shares_with=embedding.path,
                owns=owns,
            )
        )
    return tuple(heads)


def _check_embedding_site(spec: LoraSpec, embedding: Site) -> None:
    if init_family(spec.init_lora_weights) not in TIEABLE_INITS:
        raise PlanError(
            KEY, True,
            f"with init_lora_weights={spec.init_lora_weights!r} the head's init rewrites the shared weight and unties the factors (peft)",
            f"use init_lora_weights true, false or gaussian, or set {KEY}=false",
        )  # fmt: skip


def hint(spec: LoraSpec, graph: ModelGraph, sharers: Sequence[str]) -> str:
    """The flag, for a tied-weight warning whose sharers include an output head it would tie
    (not T5's encoder/decoder embeddings, which it never ties; not when it is already on)."""
    heads = {head.path for head in heads_tied_to_input(graph)}
    if spec.ensure_weight_tying or not heads & set(sharers):
        return ""
    return f"; {KEY}=true ties {', '.join(sorted(heads & set(sharers)))} to it"


def warnings_for(spec: LoraSpec, graph: ModelGraph) -> tuple[str, ...]:
    """peft's warnings when the flag ties nothing."""
    if not spec.ensure_weight_tying:
        return ()
    if not heads_tied_to_input(graph):
        return (
            f"{KEY}=true ties nothing: {graph.model_class} has no output head sharing its input embedding's "
            "weight (as peft warns)",
        )
    if tied_through(spec, graph) is None:
        return (
            f"{KEY}=true ties no adapter: neither modules_to_save nor target_modules names embed_tokens or lm_head "
            "(peft's rule; trainable tokens follow the embedding anyway)",
        )
    return ()
