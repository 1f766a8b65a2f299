"""peft-ortho's tuners, one folder each: ``config.py``, ``layer.py``, ``model.py`` and, in ``__init__.py``, the
tuner's facts (``peft_ortho.peft_types.TunerFacts``) and its registration with peft.

Importing a tuner's package registers it; ``import peft_ortho`` imports every one (one line in
``peft_ortho/__init__.py``). This package's own ``__init__`` imports none of them, so a module that needs one
tuner's helpers (``tuners.block_lora.layout``) does not import the others.
"""
