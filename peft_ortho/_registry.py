"""The one module that touches peft's registries.

peft 0.21's ``register_peft_method`` only accepts names already present in peft's own ``PeftType`` enum,
and a bare string ``peft_type`` half-works and then crashes where peft or transformers call
``peft_type.value``. So peft-ortho defines its own ``str``-Enum and writes its members into the four
``peft.mapping.PEFT_TYPE_TO_*`` dicts. Because the members are ``str`` subclasses they hash and compare
equal to the plain strings read back from ``adapter_config.json``, which is how peft looks them up.
Nothing in peft is patched; registering twice is a no-op.
"""

from __future__ import annotations

import enum

from peft import mapping


class PeftOrthoType(str, enum.Enum):
    """peft-ortho's adapter types, as written to ``adapter_config.json`` (``"peft_type"``)."""

    ORTHO_LORA = "ORTHO_LORA"
    BLOCK_LORA = "BLOCK_LORA"
    SODA = "SODA"

    def __str__(self) -> str:  # peft formats peft_type into messages and model cards
        return self.value


def register(peft_type: PeftOrthoType, config_cls: type, model_cls: type, prefix: str) -> None:
    """Make ``peft_type`` known to ``get_peft_model``, ``PeftModel``/``PeftConfig.from_pretrained`` and friends.

    Idempotent: the same registration may run any number of times (re-imports, reloads in notebooks).
    A *different* class already registered under the same name is refused rather than silently replaced.
    """
    for table, value in (
        (mapping.PEFT_TYPE_TO_CONFIG_MAPPING, config_cls),
        (mapping.PEFT_TYPE_TO_TUNER_MAPPING, model_cls),
        (mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING, model_cls),
        (mapping.PEFT_TYPE_TO_PREFIX_MAPPING, prefix),
    ):
        current = table.get(peft_type)
        if (
            current is not None
            and current is not value
            and getattr(current, "__qualname__", current) != getattr(value, "__qualname__", value)
        ):
            raise RuntimeError(f"peft already has a different {peft_type.value} registered: {current!r}")
        table[peft_type] = value


def is_registered(peft_type: PeftOrthoType) -> bool:
    return peft_type in mapping.PEFT_TYPE_TO_CONFIG_MAPPING and peft_type in mapping.PEFT_TYPE_TO_TUNER_MAPPING


def register_all() -> None:
    """Register every tuner peft-ortho ships. Called once by ``import peft_ortho``."""
    from .tuners.block_lora import BlockLoraConfig, BlockLoraModel
    from .tuners.ortho_lora import OrthoLoraConfig, OrthoLoraModel
    from .tuners.soda import SodaConfig, SodaModel

    register(PeftOrthoType.ORTHO_LORA, OrthoLoraConfig, OrthoLoraModel, OrthoLoraModel.prefix)
    register(PeftOrthoType.BLOCK_LORA, BlockLoraConfig, BlockLoraModel, BlockLoraModel.prefix)
    register(PeftOrthoType.SODA, SodaConfig, SodaModel, SodaModel.prefix)
