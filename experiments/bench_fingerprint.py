"""Time plan.fingerprint, plan.to_json() and peftc.compile on a Llama all-linear plan (ms, medians).

Run from a checkout: python experiments/bench_fingerprint.py <label>; compare commits back to back.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import peftc

OVERRIDES = ["peft.target_modules=all-linear"]


def median_ms(fn: Callable[[], object], calls: int = 200, repeats: int = 5) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples) * 1e3


def main() -> None:
    label = sys.argv[1] if len(sys.argv) > 1 else "this checkout"
    plan = peftc.compile(OVERRIDES)
    fingerprint = median_ms(lambda: plan.fingerprint)
    to_json = median_ms(plan.to_json)
    compile_ms = median_ms(lambda: peftc.compile(OVERRIDES), calls=20)
    print(f"{label} fingerprint {fingerprint:.3f} ms to_json {to_json:.3f} ms compile {compile_ms:.2f} ms")


if __name__ == "__main__":
    main()
