"""The layer types the LoRA-shaped tuners (orthogonal, block) adapt, the one check that refuses the others, and the
refusal of peft features a tuner does not implement."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from transformers.pytorch_utils import Conv1D  # GPT-2 style linear layer (weight stored as in × out)

from ..errors import UnsupportedFeatureError, UnsupportedLayerError

SUPPORTED_LAYERS: tuple[type, ...] = (nn.Linear, nn.Conv2d, Conv1D)


def check_supported_layer(base_layer: nn.Module, adapter_name: str, layer_name: str, config_name: str) -> None:
    """Refuse, before anything is modified, a target the tuner configured by ``config_name`` cannot adapt."""
    if not isinstance(base_layer, SUPPORTED_LAYERS):
        names = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
        raise UnsupportedLayerError(
            f"{type(base_layer).__name__} is not supported by {config_name} (supported: {names})",
            adapter=adapter_name,
            layer=layer_name,
        )
    if isinstance(base_layer, nn.Conv2d) and base_layer.groups != 1:
        raise UnsupportedLayerError(
            f"grouped Conv2d (groups={base_layer.groups}) is not supported by {config_name}",
            adapter=adapter_name,
            layer=layer_name,
        )


@contextlib.contextmanager
def refuse_mixed_batches(tuner: str, kwargs: dict) -> Iterator[None]:
    """``BaseTuner._enable_peft_forward_hooks`` for a tuner without mixed adapter batches.

    ``PeftModel.forward(..., adapter_names=[...])`` strips ``adapter_names`` and, unless the tuner enables it, runs every
    row through the active adapter: each row would silently get another adapter than the one asked for. Refuse instead.
    """
    names = kwargs.get("adapter_names")
    if names is not None:
        asked = sorted({str(n) for n in names} - {"__base__"})
        raise UnsupportedFeatureError(
            f"{tuner} does not support mixed adapter batches (adapter_names=...): run one batch per adapter with "
            "set_adapter",
            adapter=asked[0] if asked else None,
        )
    yield
