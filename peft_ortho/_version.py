"""The package version (a leaf module, so that the card and state writers can read it without a cycle)."""

__version__ = "0.1.0.dev0"
