"""`python -m peftc.diff A -- B`: kept as the public entry point of the plan diff (peftc.cli.diff)."""

import sys

from peftc.cli.diff import main

if __name__ == "__main__":
    sys.exit(main())
