"""BlockLoRA (Zhu et al., 2025) as a peft tuner: a LoRA confined to one block of each layer's channels."""

from ..._registry import register_tuner
from ...peft_types import LoraExport, PeftOrthoType, TunerFacts
from .config import BlockLoraConfig
from .layer import BlockLoraLayer
from .model import BlockLoraModel

FACTS = TunerFacts(
    peft_type=PeftOrthoType.BLOCK_LORA.value,
    lora_export=LoraExport.PADDED_BLOCKS,
    title="BlockLoRA",
    citation="Zhu et al., 2025, arXiv 2503.08575",
    tag="blocklora",
    card_note=(
        "A LoRA confined to block {resolved_block} of {num_blocks} along the `{block_axis}` axis of every adapted "
        "layer (both factors trained, only the block stored). Adapters in different blocks change disjoint weights, "
        "so they sum exactly, without sign conflicts."
    ),
)
register_tuner(FACTS, BlockLoraConfig, BlockLoraModel)

__all__ = ["FACTS", "BlockLoraConfig", "BlockLoraLayer", "BlockLoraModel"]
