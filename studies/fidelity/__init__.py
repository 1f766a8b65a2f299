"""Merge-fidelity benchmark on a tiny text-to-image model trained here (``python -m studies.fidelity.run``).

``base_model`` builds, trains and caches the model from scikit-learn's digits; ``concepts`` makes the personal
concepts; ``methods`` trains and merges adapters per method; ``metrics`` measures; ``run`` is the one command;
``report`` writes the figures and the section of ``docs/benchmarks.md``.
"""
