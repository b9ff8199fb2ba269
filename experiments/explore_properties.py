"""Run the suite's property tests (tests/test_properties.py) with many random examples.

The suite runs them derandomized (the same examples every run, so CI is reproducible); this
explores: each run draws new examples. A failure prints hypothesis' shrunk example.

    python experiments/explore_properties.py --examples 800
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import settings  # noqa: E402

import tests.conftest  # noqa: E402,F401  (the suite's environment: offline hub, quiet logs)
import tests.test_properties as properties  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=800, help="examples per property")
    args = parser.parse_args(argv)
    failed = 0
    for name in sorted(dir(properties)):
        test = getattr(properties, name)
        if not (name.startswith("test_") and hasattr(test, "hypothesis")):
            continue
        # hypothesis keeps a test's settings on this attribute; replacing it widens the search
        test._hypothesis_internal_use_settings = settings(
            test._hypothesis_internal_use_settings, max_examples=args.examples, derandomize=False, database=None
        )
        try:
            test()
            print(f"ok    {name} ({args.examples} examples)", flush=True)
        except Exception:  # noqa: BLE001 - every property is run and reported
            failed += 1
            print(f"FAIL  {name}", flush=True)
            traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
