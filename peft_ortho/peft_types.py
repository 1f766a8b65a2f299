"""peft-ortho's adapter types and the facts each tuner declares about itself, as plain data.

A leaf module, like peft's ``peft/utils/peft_types.py``: it imports nothing from peft-ortho, so every other module
(configs, file formats, cards, the merge) can read it without an import cycle. Each ``tuners/<name>/__init__.py``
declares its ``TunerFacts`` and registers them with ``peft_ortho._registry.register_tuner``; the modules that used to
keep their own tables of type strings (the diffusers export, the model card, the merge's reader) ask the registry.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["LORA_FACTS", "LoraExport", "PeftOrthoType", "TunerFacts"]


class PeftOrthoType(str, enum.Enum):
    """peft-ortho's adapter types, as written to ``adapter_config.json`` (``"peft_type"``)."""

    ORTHO_LORA = "ORTHO_LORA"
    BLOCK_LORA = "BLOCK_LORA"
    SODA = "SODA"

    def __str__(self) -> str:  # peft formats peft_type into messages and model cards
        return self.value


class LoraExport(str, enum.Enum):
    """How an adapter becomes a plain LoRA (``ΔW = s · B A``) for diffusers, kohya and the merge.

    - ``AS_IS``: it *is* a LoRA; its ``lora_A``/``lora_B`` tensors are written bit for bit (LoRA, OrthoLoRA).
    - ``PADDED_BLOCKS``: it stores only one block of each factor; the block is zero-padded to the whole layer,
      which is exact (BlockLoRA).
    - ``SVD``: its update is a dense ``ΔW`` that depends on the base weights; it is factored by a truncated SVD
      (rank ``k``, error reported) or exactly at full rank, from the live model only (SODA).
    """

    AS_IS = "as_is"
    PADDED_BLOCKS = "padded_blocks"
    SVD = "svd"


@dataclass(frozen=True)
class TunerFacts:
    """What the rest of peft-ortho needs to know about one adapter type, declared once by its tuner.

    Args:
        peft_type: the ``"peft_type"`` string of its ``adapter_config.json``.
        lora_export: how it exports to a plain LoRA (``LoraExport``).
        title: the method's name, as a model card writes it ("Orthogonal adaptation").
        citation: the paper it implements ("Po et al., CVPR 2024, arXiv 2312.02432"); empty for none.
        tag: the Hub tag of the method (``"orthogonal-adaptation"``).
        card_note: an optional paragraph for the model card; ``{field}`` is filled from the adapter's config.
        mixed_model: whether it is registered in peft's ``PEFT_TYPE_TO_MIXED_MODEL_MAPPING``. True only where a test
            shows ``PeftMixedModel`` works with it; peft 0.21's mixed model accepts only peft's own LoRA-family types,
            so no peft-ortho tuner is registered there.
        needs_plugin: whether loading it needs ``import peft_ortho`` (every peft-ortho type; not peft's LoRA).
    """

    peft_type: str
    lora_export: LoraExport
    title: str
    citation: str
    tag: str
    card_note: str = ""
    mixed_model: bool = False
    needs_plugin: bool = True

    @property
    def method(self) -> str:
        """``"title (citation)"``, the model card's one-line description of the method."""
        return f"{self.title} ({self.citation})" if self.citation else self.title

    @property
    def stores_lora_factors(self) -> bool:
        """True when its saved tensors are LoRA factors (whole or one block), readable without the base model."""
        return self.lora_export is not LoraExport.SVD


# peft's own LoRA, which every peft-ortho path also reads and writes.
LORA_FACTS = TunerFacts(
    peft_type="LORA",
    lora_export=LoraExport.AS_IS,
    title="LoRA",
    citation="Hu et al., 2021",
    tag="lora",
    needs_plugin=False,
)
