"""Configuration of SODA (Zhang et al., WACV 2025: spectrum + orthogonal basis adaptation) as a peft tuner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ...peft_types import PeftOrthoType

DECOMPOSITIONS = ("svd", "lq")
ROTATIONS = ("cayley", "stiefel")
DECOMPOSITION_DTYPES = ("float32", "float64")


@dataclass
class SodaConfig(PeftConfig):
    """SODA: tune the spectrum of each frozen weight and rotate its input basis by a Kronecker-orthogonal ``R``.

    For a layer ``y = W0 x`` with ``W0 ∈ R^{out×in}`` and ``p = min(out, in)``:

    - ``decomposition="svd"``: ``W0 = U diag(σ) Vᵀ`` and ``W = U diag(σ + Δσ) Vᵀ R``;
    - ``decomposition="lq"``: ``W0 = L Q`` (``L`` lower-trapezoidal with a non-negative diagonal, ``Q`` orthonormal
      rows) and ``W = (L + diag(Δ)) Q R``: cheaper to compute (one QR, no SVD) and half the frozen memory.

    ``R = R_1 ⊗ … ⊗ R_k ∈ O(in)`` is never formed: each small factor is applied to the activations. Trainable:
    ``Δσ`` (or ``Δ``; ``spectrum_rank`` entries) and the factors. At initialisation ``Δ = 0`` and ``R = I``, so the
    adapted layer computes exactly what the base layer computes. For convolutions ``R`` rotates the input channels
    (``R ⊗ I`` on the flattened ``C_in·kh·kw`` kernel), so the factor sizes multiply to ``C_in``.

    The decomposition is recomputed from the base weights whenever the adapter is created or loaded (it is not stored
    in the adapter file, which then holds only the trainable tensors and the base spectrum for verification).
    """

    decomposition: Literal["svd", "lq"] = field(
        default="svd", metadata={"help": "'svd' (W0 = U Σ Vᵀ, tune σ) or 'lq' (W0 = L Q, tune diag(L); cheaper)."}
    )
    rotation: Literal["cayley", "stiefel"] = field(
        default="cayley",
        metadata={
            "help": "'cayley': each factor is the Cayley transform of a trained skew-symmetric matrix (any optimizer). "
            "'stiefel': raw orthogonal factors, to be trained with peft_ortho.optim (make_optimizer)."
        },
    )
    num_factors: int = field(
        default=2, metadata={"help": "Number of Kronecker factors of R when their sizes are chosen automatically."}
    )
    factors: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None,
        metadata={
            "help": "Factor sizes of R: a list used for every layer (its product must equal each layer's input "
            "width), or a dict {input width (as a string): list}; widths not in the dict get automatic near-equal "
            "factors. None: automatic everywhere."
        },
    )
    spectrum_rank: Optional[int] = field(
        default=None,
        metadata={
            "help": "Tune only k spectrum entries (SVD: the k largest singular values; LQ: the first k diagonal "
            "entries of L) and keep only those k singular vectors / rows of Q: frozen memory k·(in + out) "
            "(SVD) or k·in (LQ) instead of ≈ 2·in·out, and a spectral term as cheap as a rank-k LoRA. None: all p."
        },
    )
    decomposition_dtype: Literal["float32", "float64"] = field(
        default="float32",
        metadata={"help": "Precision of the one-off decomposition (also for half-precision models)."},
    )
    forward_mode: Literal["auto", "activations", "weight"] = field(
        default="auto",
        metadata={
            "help": "How the spectral term is computed: on the activations (U_k (Δσ ⊙ V_kᵀ z), cheap for few tokens "
            "or a small spectrum_rank) or by forming W0 + S once per call (cheap for many tokens and a full "
            "spectrum). 'auto' picks the cheaper by counting multiply-adds for the call's token count."
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of the layers to adapt (nn.Linear, nn.Conv2d)."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of the layers not to adapt."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: Δ = 0, R = I (the adapted model equals the base). False: random values (for tests)."},
    )
    bias: str = field(default="none", metadata={"help": "Bias type: 'none', 'all' or 'soda_only'."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the SODA layers to train and save."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Layer indexes to transform (with layers_pattern)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list for layers_to_transform."}
    )
    stiefel_check_every: int = field(
        default=50,
        metadata={
            "help": "rotation='stiefel': every this many training forwards, measure ‖RᵀR − I‖ of the factors and "
            "warn (once) when it exceeds stiefel_tolerance (a plain optimizer was used). 0 disables the check."
        },
    )
    stiefel_tolerance: float = field(
        default=1e-4, metadata={"help": "Largest ‖R_jᵀR_j − I‖_F accepted by the stiefel check."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftOrthoType.SODA
        # Per-process state of this config object, never saved: plain attributes, not dataclass fields, so neither
        # to_dict() nor adapter_config.json sees them. Whether the Stiefel drift warning was given.
        self.stiefel_warned: bool = False
        self.target_modules = (
            set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        )
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if self.decomposition not in DECOMPOSITIONS:
            raise ValueError(f"SodaConfig: decomposition must be one of {DECOMPOSITIONS}, got {self.decomposition!r}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"SodaConfig: rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if self.forward_mode not in ("auto", "activations", "weight"):
            raise ValueError(
                f"SodaConfig: forward_mode must be 'auto', 'activations' or 'weight', got {self.forward_mode!r}"
            )
        if self.decomposition_dtype not in DECOMPOSITION_DTYPES:
            raise ValueError(
                f"SodaConfig: decomposition_dtype must be one of {DECOMPOSITION_DTYPES}, got {self.decomposition_dtype!r}"
            )
        if isinstance(self.num_factors, bool) or not isinstance(self.num_factors, int) or self.num_factors < 1:
            raise ValueError(f"SodaConfig: num_factors must be a positive int, got {self.num_factors!r}")
        if self.spectrum_rank is not None and (
            isinstance(self.spectrum_rank, bool) or not isinstance(self.spectrum_rank, int) or self.spectrum_rank < 1
        ):
            raise ValueError(f"SodaConfig: spectrum_rank must be None or a positive int, got {self.spectrum_rank!r}")
        if self.factors is not None:
            lists = self.factors.values() if isinstance(self.factors, dict) else [self.factors]
            for sizes in lists:
                if (
                    not isinstance(sizes, (list, tuple))
                    or not sizes
                    or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in sizes)
                ):
                    raise ValueError(
                        f"SodaConfig: factor sizes must be non-empty lists of positive ints, got {sizes!r}"
                    )
            if isinstance(self.factors, dict):
                # JSON turns int keys into strings: normalise now so a saved and a live config agree.
                self.factors = {str(int(k)): list(v) for k, v in self.factors.items()}
            else:
                self.factors = list(self.factors)
        if self.bias not in ("none", "all", "soda_only"):
            raise ValueError(f"SodaConfig: bias must be 'none', 'all' or 'soda_only', got {self.bias!r}")
        if self.stiefel_check_every < 0 or self.stiefel_tolerance <= 0:
            raise ValueError("SodaConfig: stiefel_check_every must be >= 0 and stiefel_tolerance > 0")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("SodaConfig: layers_to_transform cannot be used when target_modules is a str")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("SodaConfig: layers_pattern requires layers_to_transform")
