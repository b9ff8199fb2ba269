"""`python -m peftc [overrides]`: a shim into the command line (peftc.cli.main)."""

from peftc.cli.main import main

if __name__ == "__main__":
    main()
