"""Research studies (merge fidelity, LLM skill composition, continual personalization, prior preservation), run from
the repository root as ``python -m studies.<name>`` (see ``studies/README.md``). Each writes or backs a docs page."""
