"""Benchmarks that check the README's speed and memory claims, run from the repository root as
``python -m benchmarks.<name>`` (see ``benchmarks/README.md``). Each writes its section of ``docs/benchmarks.md``."""
