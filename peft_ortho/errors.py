"""Exceptions raised by peft-ortho.

Every error that concerns a specific adapter or layer carries them as attributes and names them in its
message, so a user merging fifteen adapters knows which file and which module to look at.
"""

from __future__ import annotations


class PeftOrthoError(Exception):
    """Base class of every error peft-ortho raises on purpose."""

    def __init__(self, message: str, *, adapter: str | None = None, layer: str | None = None):
        prefix = []
        if adapter is not None:
            prefix.append(f"adapter {adapter!r}")
        if layer is not None:
            prefix.append(f"layer {layer!r}")
        full = f"{', '.join(prefix)}: {message}" if prefix else message
        super().__init__(full)
        self.adapter = adapter
        self.layer = layer


class BasisError(PeftOrthoError, ValueError):
    """The shared basis cannot serve this layer (rank too large, slot out of range, unknown basis)."""


class BasisMismatchError(PeftOrthoError, ValueError):
    """An adapter's frozen down-projection is not the basis its config says it was drawn from."""


class BlockError(PeftOrthoError, ValueError):
    """A BlockLoRA block cannot serve this layer (too few channels, rank too large, layout of another model)."""


class UnsupportedLayerError(PeftOrthoError, TypeError):
    """A targeted module is of a type the tuner does not support."""


class UnsupportedFeatureError(PeftOrthoError, ValueError):
    """A peft feature the tuner does not implement was asked for (e.g. mixed adapter batches, ``adapter_names=``)."""


class AdapterFileError(PeftOrthoError, ValueError):
    """An adapter file is missing, corrupt, pickled or holds non-finite values."""


class IncompatibleAdaptersError(PeftOrthoError, ValueError):
    """Two adapters cannot be merged correctly (different base, basis, shapes, overlapping blocks...)."""


class UnsupportedAdapterError(PeftOrthoError, ValueError):
    """The adapter is not a LoRA the target format can hold (another peft type, DoRA, modules_to_save, ...)."""


class OutputExistsError(PeftOrthoError, FileExistsError):
    """The output exists and is not empty, and ``overwrite`` was not given (or another writer created it first)."""


class UnsafeOutputError(PeftOrthoError, ValueError):
    """An output path is, contains or lies inside one of the inputs: writing it would replace or delete an input."""
