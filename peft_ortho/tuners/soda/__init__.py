"""SODA: spectrum and Kronecker-orthogonal basis adaptation (Zhang et al., WACV 2025) as a peft tuner."""

from .config import SodaConfig
from .export import SodaExportReport, export_lora, soda_lora_state_dict
from .layer import KroneckerRotation, SodaLayer, auto_factors, kron_apply
from .model import SodaModel

__all__ = [
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
