"""SODA: spectrum and Kronecker-orthogonal basis adaptation (Zhang et al., WACV 2025) as a peft tuner."""

from ..._registry import register_tuner
from ...peft_types import LoraExport, PeftOrthoType, TunerFacts
from .config import SodaConfig
from .layer import KroneckerRotation, SodaLayer, auto_factors, kron_apply
from .lora_conversion import SodaExportReport, export_lora, soda_lora_state_dict
from .model import SodaModel

FACTS = TunerFacts(
    peft_type=PeftOrthoType.SODA.value,
    lora_export=LoraExport.SVD,
    title="SODA",
    citation="Zhang et al., WACV 2025",
    tag="soda",
    card_note=(
        "It tunes the spectrum of each frozen weight and rotates its input basis by a Kronecker product of small "
        "orthogonal factors (`{decomposition}` decomposition, `{rotation}` rotation); its update depends on the "
        "base weights, so it loads onto the base model it was trained on."
    ),
)
register_tuner(FACTS, SodaConfig, SodaModel)

__all__ = [
    "FACTS",
    "KroneckerRotation",
    "SodaConfig",
    "SodaExportReport",
    "SodaLayer",
    "SodaModel",
    "auto_factors",
    "export_lora",
    "kron_apply",
    "soda_lora_state_dict",
]
