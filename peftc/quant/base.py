"""The quantization contract: how the frozen base is stored, what it costs, how it is applied.

The planner asks a backend for the bytes of the base; the materializer asks it to quantize the
loaded model before adapters are injected. Nothing else knows a backend's details.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from torch import nn

    from peftc.graph import ModelGraph
    from peftc.spec import SpecNode


class QuantBackend:
    name: ClassVar[str]
    schema: ClassVar[type[SpecNode]]
    extra: ClassVar[str | None] = None  # pip extra that installs the backend

    def check_available(self) -> None:
        """Raise ConfigError naming the extra to install when the backend is missing."""

    def base_bytes(self, spec: Any, graph: ModelGraph) -> int:
        """Bytes of the frozen base weights once quantized."""
        return graph.param_bytes

    def quantize(self, spec: Any, model: nn.Module) -> nn.Module:
        """Quantize a loaded base model in place (before adapters are injected)."""
        return model
