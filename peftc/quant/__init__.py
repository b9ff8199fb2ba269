"""The quantization-backend registry (`quant=` group): one module per backend."""

from __future__ import annotations

from peftc.config.registry import Registry
from peftc.quant.base import QuantBackend

REGISTRY: Registry[QuantBackend] = Registry("quant", __name__)
register = REGISTRY.register
get = REGISTRY.get
for_spec = REGISTRY.for_spec
all_backends = REGISTRY.all
