"""The method registry: each module in this package defines one PEFT method and registers it
with `@register`. Adding a method is one file here plus one YAML in conf/peft/; the planner and
the CLI never name a method.
"""

from __future__ import annotations

from peftc.config.registry import Registry
from peftc.errors import AdapterFileError, did_you_mean
from peftc.methods.base import Method

REGISTRY: Registry[Method] = Registry("peft", __name__, skip=("base", "common", "defaults"))
register = REGISTRY.register
get = REGISTRY.get
for_spec = REGISTRY.for_spec
all_methods = REGISTRY.all


def for_peft_type(peft_type: str, source: str = "adapter_config.json") -> Method:
    method = REGISTRY.find(lambda m: m.peft_type == peft_type)
    if method is None:
        known = sorted(m.peft_type for m in all_methods().values())
        hint = did_you_mean(str(peft_type), known) or "supported: " + ", ".join(known)
        raise AdapterFileError(source, f"peft_type {peft_type!r} is not supported by peftc", hint)
    return method
