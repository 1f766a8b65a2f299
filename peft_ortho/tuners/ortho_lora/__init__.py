"""Orthogonal adaptation (Po et al., CVPR 2024) as a peft tuner: a LoRA whose ``lora_A`` is a frozen, shared basis."""

from ..._registry import register_tuner
from ...peft_types import LoraExport, PeftOrthoType, TunerFacts
from .config import OrthoLoraConfig
from .model import OrthoLoraModel

FACTS = TunerFacts(
    peft_type=PeftOrthoType.ORTHO_LORA.value,
    lora_export=LoraExport.AS_IS,
    title="Orthogonal adaptation",
    citation="Po et al., CVPR 2024, arXiv 2312.02432",
    tag="orthogonal-adaptation",
    card_note=(
        "It is a standard LoRA (`ΔW = (lora_alpha / r) · B A` per layer) whose down-projection `A` is frozen to rows "
        "of an orthogonal basis shared through a seed; only `B` was trained. Adapters drawn from the same basis on "
        "different rows read orthogonal input subspaces, so they can be summed without crosstalk."
    ),
)
register_tuner(FACTS, OrthoLoraConfig, OrthoLoraModel)

__all__ = ["FACTS", "OrthoLoraConfig", "OrthoLoraModel"]
