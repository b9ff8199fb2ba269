"""A causal-LM output whose logits are computed on first read.

When `model(input_ids=..., labels=...)` gets its loss in chunks (lm_loss.py), the full
(batch x length x vocabulary) logits are never needed for the loss, so they are not made. A caller
who reads them anyway (`out.logits`, `out["logits"]`, `out[1]`, `out.to_tuple()`, `keys()`,
iteration) gets them then: the head applied to the kept last hidden states under the grad and
autocast modes of the original call, so they equal transformers' logits and are differentiable
exactly as transformers' would be. Reading only the loss (`out.loss`, `out["loss"]`, what the
HF Trainer reads) never makes them.

Kept in its own module so transformers is imported only when such an output is built.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast


class LazyLogitsCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast (a dataclass by inheritance) with `logits` made on first read."""

    def _read_logits(self) -> torch.Tensor | None:
        make = self.__dict__.pop("_make_logits", None)
        if make is not None:
            self.__dict__["_logits"] = make()
            self._reorder()
        return self.__dict__.get("_logits")

    def _write_logits(self, value: torch.Tensor | None) -> None:
        self.__dict__["_logits"] = value

    logits = property(_read_logits, _write_logits)

    @classmethod
    def deferred(cls, output: CausalLMOutputWithPast, loss: torch.Tensor, make_logits: Callable[[], torch.Tensor]):  # noqa: ANN206
        """`output` with `loss` set and its logits replaced by `make_logits()`, run on first read."""
        values = {f.name: getattr(output, f.name) for f in fields(output)}
        lazy = cls(**{**values, "loss": loss, "logits": None})
        lazy.__dict__["_make_logits"] = make_logits
        return lazy

    @property
    def logits_pending(self) -> bool:
        """Whether the logits have not been made yet (for tests and benchmarks)."""
        return "_make_logits" in self.__dict__

    def _reorder(self) -> None:
        """Keep the dict order of the dataclass fields, so `out[1]` is the logits as usual."""
        present = [(f.name, getattr(self, f.name)) for f in fields(self)]
        OrderedDict.clear(self)
        for name, value in present:
            if value is not None:
                OrderedDict.__setitem__(self, name, value)

    def _materialize(self) -> None:
        if self.logits_pending:
            self._read_logits()

    # Every view that reveals the keys or their order makes the logits first; a string lookup of
    # another key does not (the HF Trainer reads out["loss"]).
    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str) and key != "logits":
            return OrderedDict.__getitem__(self, self._replace_old_cache_name(key))
        self._materialize()
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        return (key == "logits" and self.logits_pending) or super().__contains__(key)

    def get(self, key: str, default: Any = None) -> Any:
        if key == "logits":
            self._materialize()
        return super().get(key, default)

    def keys(self) -> Any:
        self._materialize()
        return super().keys()

    def values(self) -> Any:
        self._materialize()
        return super().values()

    def items(self) -> Any:
        self._materialize()
        return super().items()

    def __iter__(self) -> Iterator[str]:
        self._materialize()
        return super().__iter__()

    def __len__(self) -> int:
        self._materialize()
        return super().__len__()

    def to_tuple(self) -> tuple:
        self._materialize()
        return super().to_tuple()
