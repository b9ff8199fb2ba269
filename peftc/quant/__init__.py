"""The quantization-backend plug-ins (`quant=` group): one module per backend."""

from __future__ import annotations

from peftc.config.registry import QUANT_BACKENDS as REGISTRY

register = REGISTRY.register
get = REGISTRY.get
for_spec = REGISTRY.for_spec
all_backends = REGISTRY.all

__all__ = ["REGISTRY", "all_backends", "for_spec", "get", "register"]
