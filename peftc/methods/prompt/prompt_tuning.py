"""Prompt tuning (Lester et al. 2021): x' = [P; E(x)] with P (n x d) a learned table.

P starts as N(0, 1) (`random`), as the embeddings of vocabulary tokens drawn uniformly
(`sample_vocab`), or as the embeddings of an init text tokenized with the model's tokenizer,
cut or repeated to n tokens (`text`; the token ids are part of the plan). Encoder-decoders
allocate 2n rows (peft's num_transformer_submodules=2) and use the first n on the encoder side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftc.config.spec import RunSpec, one_of, param
from peftc.errors import ConfigError
from peftc.methods import register
from peftc.methods.prompt.encoder import VirtualTokenEncoder
from peftc.methods.prompt.shared import PromptLearningMethod, PromptLearningSpec, PromptShapes
from peftc.planning.plan import Plan, PromptPlan

INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclass
class PromptTuningSpec(PromptLearningSpec):
    prompt_tuning_init: str = param("RANDOM", "How the prompt starts.", one_of(*INITS))
    prompt_tuning_init_text: str | None = param(None, "Text whose token embeddings start the prompt (init TEXT).")
    tokenizer_name_or_path: str | None = param(
        None, "Tokenizer for the init text; null: the model's own (model.tokenizer, or the byte tokenizer)."
    )

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        check_text_init(key, self.prompt_tuning_init, self.prompt_tuning_init_text, self.inference_mode)


def check_text_init(key: str, init: str, text: str | None, inference_mode: bool) -> None:
    if init == "TEXT" and not inference_mode and not (text and str(text).strip()):
        raise ConfigError(
            f"{key}.prompt_tuning_init_text",
            text,
            "prompt_tuning_init=TEXT needs the text to start from",
            f"e.g. {key}.prompt_tuning_init_text='Classify the sentiment:'",
        )


def init_token_ids(spec: Any, run: RunSpec, total: int) -> list[int] | None:
    """The init text's token ids (special tokens included, as peft), cut or tiled to `total`."""
    if spec.prompt_tuning_init != "TEXT" or spec.inference_mode:
        return None
    from peftc.planning.model_source import load_tokenizer

    model = run.model
    if spec.tokenizer_name_or_path:
        model = model.replace(tokenizer=spec.tokenizer_name_or_path)
    ids = list(load_tokenizer(model)(spec.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ConfigError(
            "peft.prompt_tuning_init_text",
            spec.prompt_tuning_init_text,
            "tokenizes to nothing",
            "give a non-empty text",
        )
    return (ids * math.ceil(total / len(ids)))[:total]


def init_table(embedding: nn.Embedding, options: Mapping[str, Any], words: nn.Module | None) -> None:
    """Fill a fresh prompt table by the planned init (any other init keeps nn.Embedding's N(0, 1))."""
    init = options.get("init", "RANDOM")
    if init not in ("SAMPLE_VOCAB", "TEXT") or options.get("inference_mode") or words is None:
        return
    rows = embedding.num_embeddings
    device = words.weight.device
    if init == "SAMPLE_VOCAB":
        ids = torch.randint(0, words.num_embeddings, (rows,), dtype=torch.long).to(device)
    else:
        ids = torch.tensor(options["init_token_ids"], dtype=torch.long, device=device)
    with torch.no_grad():
        embedding.weight = nn.Parameter(words(ids).detach().clone().float())


class PromptEmbedding(VirtualTokenEncoder):
    def __init__(self, prompt: PromptPlan, base_model: nn.Module) -> None:
        super().__init__(prompt)
        self.embedding = nn.Embedding(self.total_tokens, self.token_dim)
        init_table(self.embedding, prompt.options, base_model.get_input_embeddings())

    def prompt_embeddings(self, batch: int, task_ids: torch.Tensor | None) -> torch.Tensor:
        return self.embedding.weight.unsqueeze(0).expand(batch, -1, -1)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.embedding.weight.detach()}

    def load_saved(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._copy_into(self.embedding.weight, tensors["prompt_embeddings"], "prompt_embeddings")


@register
class PromptTuning(PromptLearningMethod):
    name = "prompt_tuning"
    peft_type = "PROMPT_TUNING"
    schema = PromptTuningSpec
    encoder_class = PromptEmbedding

    def encoder_tensors(self, spec: Any, shapes: PromptShapes, total_tokens: int) -> dict[str, tuple[int, ...]]:
        return {"embedding.weight": (total_tokens, shapes.token_dim)}

    def encoder_options(self, spec: PromptTuningSpec, shapes: PromptShapes, run: RunSpec) -> dict[str, Any]:
        total = spec.num_virtual_tokens * shapes.num_transformer_submodules
        options: dict[str, Any] = {"init": spec.prompt_tuning_init}
        ids = init_token_ids(spec, run, total)
        if ids is not None:
            options["init_token_ids"] = ids
        return options

    def method_config(self, spec: PromptTuningSpec, plan: Plan) -> dict[str, Any]:
        return text_init_config(spec, plan)

    def method_spec_fields(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return text_init_fields(config, INITS)


def text_init_config(spec: Any, plan: Plan) -> dict[str, Any]:
    text = spec.prompt_tuning_init == "TEXT"
    return {
        "prompt_tuning_init": spec.prompt_tuning_init,
        "prompt_tuning_init_text": spec.prompt_tuning_init_text,
        # peft needs a tokenizer for TEXT; name ours (config-built models: the byte tokenizer).
        "tokenizer_name_or_path": (spec.tokenizer_name_or_path or _tokenizer_of(plan)) if text else None,
        "tokenizer_kwargs": None,
    }


def text_init_fields(config: Mapping[str, Any], inits: tuple[str, ...]) -> dict[str, Any]:
    init = str(config.get("prompt_tuning_init") or "RANDOM")
    return {
        "prompt_tuning_init": init if init in inits else "RANDOM",
        "prompt_tuning_init_text": config.get("prompt_tuning_init_text"),
        "tokenizer_name_or_path": config.get("tokenizer_name_or_path"),
    }


def _tokenizer_of(plan: Plan) -> str | None:
    """What peft loads to tokenize the init text: a directory or hub id it can read (a `pkg:`
    reference is resolved to its directory, as base_model_name_or_path is)."""
    from peftc.planning.model_source import PACKAGE_SCHEME, tokenizer_source

    model = plan.spec.model
    if model.tokenizer or model.is_config_built or str(model.name_or_path).startswith(PACKAGE_SCHEME):
        return tokenizer_source(model)
    return model.name_or_path
