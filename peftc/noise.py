"""Silence the known, harmless messages optional backends print when they are imported.

Once torchao is installed, transformers imports it with every model class (its quantizer
registry does), and torchao logs failed loads of CUDA-only kernels; torch then warns about
torchao's enum registrations; bitsandbytes asks the `kernels` package (which transformers
>= 5.25 installs) for a Hub-hosted CPU kernel, and both log that it cannot be had offline. None of these is actionable, and they would bury the plan and the
metrics, so each is dropped by an exact pattern on the logger that emits it (as is one runtime
message bitsandbytes repeats on every int8 matmul, which the plan of a bnb_int8 run states once). Anything else
those loggers say still shows. No library is imported here.
"""

from __future__ import annotations

import logging
import re

KNOWN_NOISE: dict[str, re.Pattern[str]] = {
    "torchao": re.compile(r"Failed to load .*\.so\b"),
    "torchao.kernel.intmm": re.compile(r"Detected no triton"),
    "torch.utils._pytree": re.compile(r"is an Enum subclass and is now natively supported"),
    "bitsandbytes.backends.cpu.ops": re.compile(r"Failed to load CPU gemm_4bit_forward from kernels-community"),
    "kernels._internals.hf_hub": re.compile(r"Skipping publisher trust check for .* Hub is in offline mode"),
    # Logged on every int8 matmul (each layer, each step); the bnb_int8 plan states it once.
    "bitsandbytes.autograd._functions": re.compile(r"MatMul8bitLt: inputs will be cast from .* to float16"),
}


class _DropKnown(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def silence_import_noise() -> None:
    """Install the filters (idempotent)."""
    for name, pattern in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(pattern))
