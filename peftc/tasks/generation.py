"""How text-generating tasks (causal_lm, seq2seq_lm) generate at prediction time:
`task.generation.*`, transformers' own generate() settings. Greedy by default (deterministic);
sampling draws from the run's seed, so a prediction repeats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from peftc.config.spec import SpecNode, at_least, greater_than, in_range, param
from peftc.errors import ConfigError

SAMPLING_ONLY = ("temperature", "top_p", "top_k")


@dataclass
class GenerationSpec(SpecNode):
    do_sample: bool = param(False, "Sample the next token (false: greedy, or beam search with num_beams > 1).")
    num_beams: int = param(1, "Beams of beam search (1: none).", at_least(1))
    temperature: float | None = param(None, "Sampling temperature; null: the model's default (1.0).", greater_than(0.0))
    top_p: float | None = param(
        None,
        "Nucleus sampling: the smallest token set with this probability mass; null: all.",
        in_range(0.0, 1.0, high_open=False),
    )
    top_k: int | None = param(None, "Sample among the k most likely tokens; null: the model's default.", at_least(0))
    repetition_penalty: float | None = param(
        None, "Penalty > 1 on tokens already generated (transformers' CTRL-style); null: none.", greater_than(0.0)
    )

    def cross_check(self, key: str, run: Any) -> None:
        if not self.do_sample:
            for name in SAMPLING_ONLY:
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"{key}.{name}",
                        getattr(self, name),
                        "only applies when sampling",
                        f"add {key}.do_sample=true (or leave {key}.{name} unset for greedy decoding)",
                    )


def generate_kwargs(spec: GenerationSpec, seed: int) -> dict[str, Any]:
    """generate()'s keyword arguments for this spec (a sampling run is seeded first)."""
    if spec.do_sample:
        torch.manual_seed(seed)
    chosen = {name: getattr(spec, name) for name in (*SAMPLING_ONLY, "repetition_penalty")}
    return {
        "do_sample": spec.do_sample,
        "num_beams": spec.num_beams,
        **{name: value for name, value in chosen.items() if value is not None},
    }
