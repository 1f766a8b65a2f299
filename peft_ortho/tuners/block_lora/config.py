"""Configuration of BlockLoRA (blockwise LoRA parameterization, Zhu et al. 2025) as a peft tuner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from ...peft_types import PeftOrthoType
from .layout import AXES


@dataclass
class BlockLoraConfig(PeftConfig):
    """A full LoRA (``A`` and ``B`` both trained) whose update ``ΔW = s · B A`` is confined to one block of each layer.

    Each targeted layer is split along ``block_axis`` into ``num_blocks`` contiguous, near-equal blocks (output
    channels for ``"out"``, input channels for ``"in"``). The adapter owns one block index, the same in every layer,
    and stores and trains only that block: ``B`` ``(block_out, r)`` and ``A`` ``(r, in)`` along ``"out"``, or ``B``
    ``(out, r)`` and ``A`` ``(r, block_in)`` along ``"in"``; the scale is ``s = lora_alpha / r``. Adapters in
    different blocks change disjoint weights, so summing them is exact and free of sign conflicts.

    Which block is chosen by exactly one of:

    - ``block_index=3``: block 3 (``0 <= block_index < num_blocks``). Teams that agree on indices never collide;
    - ``concept_id="alice/rex"``: the id hashed (SHA-256) to a block; two ids collide with probability
      ``1 / num_blocks``, and ``compose`` refuses the collision;
    - ``block_index="random"`` (default when neither is given): a block drawn once, when the adapter is created.

    Filled when the adapter is created and checked when it is loaded: ``resolved_block`` (the block index used) and
    ``block_layout`` (``{module name: [axis width, start, end]}``), from which ``compose`` proves disjointness.
    """

    r: int = field(default=8, metadata={"help": "Rank of the LoRA inside the block."})
    lora_alpha: int = field(default=8, metadata={"help": "Scale numerator: ΔW = (lora_alpha / r) · B A."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (suffixes) or a regex to adapt, as in LoraConfig."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to leave alone."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True for layers storing weight as (in, out), e.g. GPT-2's Conv1D."}
    )
    bias: str = field(default="none", metadata={"help": "Only 'none': a bias is not a blockwise low-rank update."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Extra modules to train and save."})
    init_lora_weights: bool = field(
        default=True,
        metadata={"help": "True: A Kaiming-uniform, B = 0 (adapter starts as identity). False: both random."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "As in LoraConfig."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "As in LoraConfig."})
    num_blocks: int = field(default=16, metadata={"help": "Blocks per layer along block_axis."})
    block_axis: str = field(default="out", metadata={"help": "'out' (rows of ΔW) or 'in' (columns of ΔW)."})
    block_index: Optional[Union[int, str]] = field(
        default=None, metadata={"help": "Block index (int) or 'random'. Mutually exclusive with concept_id."}
    )
    concept_id: Optional[str] = field(
        default=None, metadata={"help": "A name hashed to a deterministic block. Mutually exclusive with block_index."}
    )
    resolved_block: Optional[int] = field(default=None, metadata={"help": "Filled at creation: the block used."})
    block_layout: Optional[dict[str, list[int]]] = field(
        default=None, metadata={"help": "Filled at creation: {module: [axis width, start, end]}."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftOrthoType.BLOCK_LORA
        # Per-process state of this config object, never saved: plain attributes, not dataclass fields, so neither
        # to_dict() nor adapter_config.json sees them. Whether block_index="random" drew the block in this
        # process (then only state dicts it saved itself may be loaded: their digests), and the adapters an overlap
        # warning was already given for.
        self.block_drawn_here: bool = False
        self.saved_digests: set[str] = set()
        self.overlap_warned: set[str] = set()
        name = type(self).__name__
        self.target_modules = (
            set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        )
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if self.block_axis not in AXES:
            raise ValueError(f"{name}: block_axis must be one of {AXES}, got {self.block_axis!r}")
        if isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or self.num_blocks < 1:
            raise ValueError(f"{name}: num_blocks must be a positive int, got {self.num_blocks!r}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"{name}: r must be a positive int, got {self.r!r}")
        if self.block_index is not None and self.concept_id is not None:
            raise ValueError(f"{name}: give either `block_index` or `concept_id`, not both")
        if self.block_index is None and self.concept_id is None:
            self.block_index = "random"
        if isinstance(self.block_index, bool) or not (
            self.block_index is None
            or self.block_index == "random"
            or (isinstance(self.block_index, int) and 0 <= self.block_index < self.num_blocks)
        ):
            raise ValueError(
                f"{name}: block_index must be 'random' or an int in [0, num_blocks={self.num_blocks}), "
                f"got {self.block_index!r}"
            )
        if self.concept_id is not None and (not isinstance(self.concept_id, str) or not self.concept_id):
            raise ValueError(f"{name}: `concept_id` must be a non-empty string, got {self.concept_id!r}")
        if self.bias != "none":
            raise ValueError(f"{name}: bias={self.bias!r} is not supported (a bias update is not confined to a block)")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError(f"{name}: layers_pattern is only used together with layers_to_transform")
