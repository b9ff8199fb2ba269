"""The values Lightning accepts for the trainer settings peftc passes it through.

Lightning checks these only when it builds the Trainer, after plan.json is written; the trainer
schema (`spec.TrainerSpec`) checks them at compile time instead. Pure values only: what this
machine can run (a GPU, a package) is the compatibility table's (`planning/compat.py`).
"""

from __future__ import annotations

from typing import Any

from omegaconf import ListConfig

# Lightning 2.6's names, which it checks only when the Trainer is built (after plan.json is
# written): its AcceleratorRegistry plus the aliases 'auto' and 'gpu', and its precision inputs
# (_PRECISION_INPUT_STR and the aliases it converts). A test keeps both in step with Lightning.
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps", "tpu")
PRECISIONS = (
    "32-true",
    "bf16-mixed",
    "16-mixed",
    "bf16-true",
    "16-true",
    "64-true",
    "transformer-engine",
    "transformer-engine-float16",
)
PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def lightning_devices(value: Any) -> str | None:
    """What Lightning accepts as `devices`: a count (-1: all), 'auto', a list of device ids, or
    the same as a string ('2', '0,1', '-1'). 0 and [] select nothing, which Lightning refuses."""
    allowed = "must be a device count >= 1, -1 (all), 'auto', or a list of device ids such as [0, 1]"
    if isinstance(value, str):
        text = value.strip()
        if text == "auto" or text == "-1":
            return None
        ids = [part.strip() for part in text.split(",") if part.strip()]
        return allowed if not ids or not all(part.isdigit() for part in ids) or ids == ["0"] else None
    if isinstance(value, bool):
        return allowed
    if isinstance(value, int):
        return None if value >= 1 or value == -1 else allowed
    if isinstance(value, (list, tuple, ListConfig)):
        ok = len(value) > 0 and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)
        return None if ok and len(set(value)) == len(value) else allowed
    return allowed
