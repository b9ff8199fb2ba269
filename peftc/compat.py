"""The compatibility table: method x task x quantization x model family x strategy.

One declarative list of refusals, each with the key to blame, the reason and what would work.
The spec stage checks the rules that need no model; the planner checks the rest against the
model graph. Methods, tasks and backends add their rows here, not scattered validators.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peftc.errors import ConfigError

if TYPE_CHECKING:
    from peftc.graph import ModelGraph
    from peftc.spec import RunSpec


@dataclass(frozen=True)
class Context:
    method: str
    task: str
    quant: str
    strategy: str
    run: RunSpec
    graph: ModelGraph | None = None

    @property
    def family(self) -> str | None:
        return self.graph.model_type if self.graph is not None else None


@dataclass(frozen=True)
class Rule:
    key: str
    reason: str
    suggestion: str
    method: frozenset[str] | None = None  # None: any
    task: frozenset[str] | None = None
    quant: frozenset[str] | None = None
    strategy: frozenset[str] | None = None
    needs_graph: bool = False
    when: Callable[[Context], bool] | None = None

    def applies(self, ctx: Context) -> bool:
        for wanted, actual in (
            (self.method, ctx.method),
            (self.task, ctx.task),
            (self.quant, ctx.quant),
            (self.strategy, ctx.strategy),
        ):
            if wanted is not None and actual not in wanted:
                return False
        if self.needs_graph and ctx.graph is None:
            return False
        return self.when is None or self.when(ctx)


def _set(*names: str) -> frozenset[str]:
    return frozenset(names)


RULES: list[Rule] = [
    Rule(
        key="model",
        reason="causal_lm trains a decoder-only model, but this model is encoder-decoder",
        suggestion="use task=seq2seq_lm, or a decoder model such as model=tiny_llama",
        task=_set("causal_lm"),
        needs_graph=True,
        when=lambda ctx: ctx.graph.facts.is_encoder_decoder,
    ),
]


def check(ctx: Context) -> None:
    """Raise the first refusal that applies (spec-level rules when ctx.graph is None)."""
    for rule in RULES:
        if rule.applies(ctx):
            value = {
                "model": ctx.family,
                "peft": ctx.method,
                "task": ctx.task,
                "quant": ctx.quant,
            }.get(rule.key.split(".")[0])
            raise ConfigError(rule.key, value, rule.reason, rule.suggestion)
