"""peftc: parameter-efficient fine-tuning as a declarative config compiler.

plan = peftc.compile(["peft=lora", "peft.r=8", "model=tiny_llama"])  # no weights touched
print(plan); plan.trainable_params; plan.to_json()
model = peftc.materialize(plan)                 # or materialize(plan, base_model=my_model)
model.save_adapter("out/")                      # PEFT layout, loadable by the peft package
model = peftc.load_adapter(base_model, "out/")  # ours and peft-saved adapters alike
merged = model.merge_and_unload()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from peftc.errors import AdapterFileError, ConfigError, DataError, PeftcError, PlanError
from peftc.noise import silence_import_noise
from peftc.version import __version__

silence_import_noise()

if TYPE_CHECKING:
    from peftc.planning.plan import Plan

__all__ = [
    "compile",
    "materialize",
    "load_adapter",
    "PeftcError",
    "ConfigError",
    "PlanError",
    "AdapterFileError",
    "DataError",
    "__version__",
]


def compile(overrides: Sequence[str] = ()) -> Plan:  # noqa: A001 - the public name is part of the design
    """Hydra overrides -> validated Plan (builds the model graph on the meta device only)."""
    if isinstance(overrides, str):  # a str is a Sequence of one-letter overrides
        raise ConfigError(
            "overrides",
            overrides,
            "is one string; peftc.compile takes a list of overrides",
            f"peftc.compile({overrides.split()!r})",
        )
    from peftc.config.compose import compose, to_spec
    from peftc.planning import planner

    return planner.plan(to_spec(compose(overrides)))


def __getattr__(name: str) -> Any:
    # materialize/load_adapter pull in torch-heavy code; keep `import peftc` light.
    if name == "materialize":
        from peftc.runtime.materialize import materialize

        return materialize
    if name == "load_adapter":
        from peftc.files.load import load_adapter

        return load_adapter
    raise AttributeError(f"module 'peftc' has no attribute {name!r}")
