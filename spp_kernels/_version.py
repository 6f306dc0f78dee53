"""The package version (one place: pyproject.toml reads the same number by hand)."""

__version__ = "0.3.0"
