"""The method plug-ins: each module (or family subpackage) here defines PEFT methods and registers
them with `@register`. Adding a method is one file here plus one YAML in conf/peft/; the planner
and the CLI never name a method (they find it through peftc.config.registry.METHODS).
"""

from __future__ import annotations

from peftc.config.registry import METHODS as REGISTRY
from peftc.config.registry import method_for_peft_type as for_peft_type

register = REGISTRY.register
get = REGISTRY.get
for_spec = REGISTRY.for_spec
all_methods = REGISTRY.all

__all__ = ["REGISTRY", "all_methods", "for_peft_type", "for_spec", "get", "register"]
