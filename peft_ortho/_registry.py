"""The one module that touches peft's registries, and the record of every tuner's facts.

peft 0.21's ``register_peft_method`` only accepts names already present in peft's own ``PeftType`` enum,
and a bare string ``peft_type`` half-works and then crashes where peft or transformers call
``peft_type.value``. So peft-ortho defines its own ``str``-Enum (``peft_ortho.peft_types.PeftOrthoType``) and writes
its members into peft's ``peft.mapping.PEFT_TYPE_TO_*`` dicts. Because the members are ``str`` subclasses they hash
and compare equal to the plain strings read back from ``adapter_config.json``, which is how peft looks them up.
Nothing in peft is patched; registering twice is a no-op.

Each ``tuners/<name>/__init__.py`` calls ``register_tuner(facts, config_cls, model_cls)`` when it is imported (as
peft's tuners call ``register_peft_method``); ``tuner_facts(peft_type)`` is what the rest of the package reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import mapping

from .peft_types import LORA_FACTS, PeftOrthoType, TunerFacts

__all__ = [
    "PeftOrthoType",
    "is_registered",
    "lora_types",
    "register",
    "register_all",
    "register_tuner",
    "tuner_facts",
    "tuners",
]


@dataclass(frozen=True)
class Tuner:
    """A registered tuner: its facts and the classes peft builds it from."""

    facts: TunerFacts
    config_cls: type
    model_cls: type


# Kept across ``importlib.reload`` of this module (a notebook re-running its imports): the tuner packages, already
# imported, would not register again.
_TUNERS: dict[str, Tuner] = globals().get("_TUNERS", {})


def register(
    peft_type: PeftOrthoType, config_cls: type, model_cls: type, prefix: str, *, mixed_model: bool = False
) -> None:
    """Make ``peft_type`` known to ``get_peft_model``, ``PeftModel``/``PeftConfig.from_pretrained`` and friends.

    Args:
        peft_type: the adapter type.
        config_cls: its ``PeftConfig`` subclass.
        model_cls: its ``BaseTuner`` subclass.
        prefix: the prefix of its parameter names (``"lora_"``).
        mixed_model: also register it in peft's mixed-model table (only for a tuner a test shows works there).

    Idempotent: the same registration may run any number of times (re-imports, reloads in notebooks).
    A *different* class already registered under the same name is refused rather than silently replaced.
    """
    tables = [
        (mapping.PEFT_TYPE_TO_CONFIG_MAPPING, config_cls),
        (mapping.PEFT_TYPE_TO_TUNER_MAPPING, model_cls),
        (mapping.PEFT_TYPE_TO_PREFIX_MAPPING, prefix),
    ]
    if mixed_model:
        tables.append((mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING, model_cls))
    for table, value in tables:
        current = table.get(peft_type)
        if (
            current is not None
            and current is not value
            and getattr(current, "__qualname__", current) != getattr(value, "__qualname__", value)
        ):
            raise RuntimeError(f"peft already has a different {peft_type.value} registered: {current!r}")
    for table, value in tables:
        table[peft_type] = value


def register_tuner(facts: TunerFacts, config_cls: type, model_cls: type) -> Tuner:
    """Record a tuner's facts and register it with peft (``register``); called by each tuner's ``__init__``.

    Args:
        facts: what the tuner declares about itself (``TunerFacts``).
        config_cls: its ``PeftConfig`` subclass.
        model_cls: its ``BaseTuner`` subclass; its ``prefix`` is peft's parameter prefix.

    Returns:
        The recorded ``Tuner``.
    """
    peft_type = PeftOrthoType(facts.peft_type)
    register(peft_type, config_cls, model_cls, model_cls.prefix, mixed_model=facts.mixed_model)
    tuner = Tuner(facts, config_cls, model_cls)
    _TUNERS[peft_type.value] = tuner
    return tuner


def register_all() -> None:
    """Register again every tuner whose package was imported (``import peft_ortho`` imports them all)."""
    for tuner in _TUNERS.values():
        register(
            PeftOrthoType(tuner.facts.peft_type),
            tuner.config_cls,
            tuner.model_cls,
            tuner.model_cls.prefix,
            mixed_model=tuner.facts.mixed_model,
        )


def is_registered(peft_type: PeftOrthoType) -> bool:
    """True when peft can build and load ``peft_type`` adapters."""
    return peft_type in mapping.PEFT_TYPE_TO_CONFIG_MAPPING and peft_type in mapping.PEFT_TYPE_TO_TUNER_MAPPING


def tuners() -> dict[str, Tuner]:
    """Every registered peft-ortho tuner, by peft type string."""
    return dict(_TUNERS)


def tuner_facts(peft_type) -> TunerFacts | None:
    """The facts of ``peft_type`` (a peft-ortho type, or peft's ``"LORA"``); None for a type peft-ortho does not know."""
    key = str(getattr(peft_type, "value", peft_type))
    if key == LORA_FACTS.peft_type:
        return LORA_FACTS
    tuner = _TUNERS.get(key)
    return tuner.facts if tuner is not None else None


def lora_types(*kinds) -> tuple[str, ...]:
    """The known peft types (``"LORA"`` first) whose ``lora_export`` is one of ``kinds``."""
    known = [LORA_FACTS, *(t.facts for t in _TUNERS.values())]
    return tuple(f.peft_type for f in known if f.lora_export in kinds)
