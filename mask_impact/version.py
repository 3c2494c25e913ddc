"""The package's version, in a module of its own: every layer may read it (docs/DESIGN.md §7)."""

__version__ = "0.3.0"
