"""No quantization: the frozen base keeps model.dtype."""

from __future__ import annotations

from dataclasses import dataclass

from peftc.config.spec import SpecNode
from peftc.quant import register
from peftc.quant.base import QuantBackend


@dataclass
class NoQuantSpec(SpecNode):
    """No fields: the base is stored as model.dtype."""


@register
class NoQuant(QuantBackend):
    name = "none"
    schema = NoQuantSpec
