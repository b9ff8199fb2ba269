"""peftc's version (one place: the package, --version and the wheel metadata agree)."""

__version__ = "0.1.0"
