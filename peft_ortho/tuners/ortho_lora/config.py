"""Configuration of orthogonal adaptation (Po et al., CVPR 2024) as a peft tuner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft import LoraConfig

from ...bases import ALGORITHM_VERSION, BASIS_KINDS
from ...peft_types import PeftOrthoType


@dataclass
class OrthoLoraConfig(LoraConfig):
    """A LoRA whose down-projection ``lora_A`` is frozen to rows of a basis shared through ``basis_seed``.

    ``ΔW = s · B A`` with ``A ∈ R^{r×in}`` frozen (rows of the seeded basis of width ``in``) and only
    ``B ∈ R^{out×r}`` trained, starting at zero. Adapters trained by different people from the same seed on
    different rows read orthogonal input subspaces, so their sum does not interfere (``A_i A_jᵀ = 0``).

    Which rows an adapter uses (its *slot*) is chosen by exactly one of:

    - ``concept_id="alice/rex"``: the id is hashed (SHA-256) to one of the ``in // r`` disjoint blocks of each
      layer. Two different ids collide on a layer with probability ``r / in``; compose detects it exactly.
    - ``slot=3``: the block ``[3r, 4r)``. Teams that agree on slots never collide.
    - ``slot="random"`` (default when neither is given): ``r`` random rows, the paper's behaviour. Two such
      adapters share ``r² / in`` rows on average.

    Fields filled when the adapter is created and verified when it is loaded: ``basis_algorithm``,
    ``basis_rows`` (rows used per ``"in/r"`` shape) and ``basis_checksums`` (SHA-256 of the float64 rows).
    """

    basis: str = field(
        default="orthogonal",
        metadata={
            "help": "'orthogonal' (rows of a seeded orthogonal matrix) or 'gaussian' (i.i.d., paper's alternative)."
        },
    )
    basis_seed: int = field(default=0, metadata={"help": "Seed shared by everyone whose adapters should merge."})
    slot: Optional[Union[int, str]] = field(
        default=None, metadata={"help": "Block index (int) or 'random'. Mutually exclusive with concept_id."}
    )
    concept_id: Optional[str] = field(
        default=None, metadata={"help": "A name hashed to a deterministic block. Mutually exclusive with slot."}
    )
    basis_algorithm: str = field(default=ALGORITHM_VERSION, metadata={"help": "Version of the basis algorithm."})
    basis_rows: Optional[dict[str, list[int]]] = field(
        default=None, metadata={"help": "Filled at creation: basis rows used, per 'in/r' shape."}
    )
    basis_checksums: Optional[dict[str, str]] = field(
        default=None, metadata={"help": "Filled at creation: checksum of the float64 basis rows, per 'in/r' shape."}
    )

    def __post_init__(self):
        super().__post_init__()
        # LoraConfig.__post_init__ forces peft_type = LORA.
        self.peft_type = PeftOrthoType.ORTHO_LORA
        # Per-process state of this config object, never saved: plain attributes, not dataclass fields, so neither
        # to_dict() nor adapter_config.json sees them. slot="random" draws rows once per config: the first adapter
        # that used them, and whether reusing them for another adapter was already warned about.
        self.random_rows_owner: tuple[int, str] | None = None
        self.random_rows_warned: bool = False
        if self.basis not in BASIS_KINDS:
            raise ValueError(f"OrthoLoraConfig: unknown basis {self.basis!r}; choose one of {BASIS_KINDS}")
        if self.basis_algorithm != ALGORITHM_VERSION:
            raise ValueError(
                f"OrthoLoraConfig: basis_algorithm {self.basis_algorithm!r} is not supported by this version of "
                f"peft-ortho (which generates {ALGORITHM_VERSION!r}); upgrade peft-ortho to load this adapter"
            )
        if self.slot is not None and self.concept_id is not None:
            raise ValueError("OrthoLoraConfig: give either `slot` or `concept_id`, not both")
        if isinstance(self.slot, bool) or not (
            self.slot is None or self.slot == "random" or (isinstance(self.slot, int) and self.slot >= 0)
        ):
            raise ValueError(f"OrthoLoraConfig: `slot` must be a non-negative int or 'random', got {self.slot!r}")
        if self.concept_id is not None and (not isinstance(self.concept_id, str) or not self.concept_id):
            raise ValueError(f"OrthoLoraConfig: `concept_id` must be a non-empty string, got {self.concept_id!r}")
        if self.slot is None and self.concept_id is None:
            self.slot = "random"
        if self.use_dora:
            raise ValueError("OrthoLoraConfig: use_dora=True is not supported (DoRA rescales the frozen basis)")
        if self.lora_bias:
            raise ValueError("OrthoLoraConfig: lora_bias=True is not supported (a bias is not a low-rank delta)")
        if self.target_parameters:
            raise ValueError("OrthoLoraConfig: target_parameters is not supported; use target_modules")
        if isinstance(self.init_lora_weights, str):
            raise ValueError(
                "OrthoLoraConfig: init_lora_weights must be True (B = 0) or False (random B, for tests); "
                f"{self.init_lora_weights!r} would replace the shared basis"
            )
