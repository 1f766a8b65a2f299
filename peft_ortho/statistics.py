"""Per-layer input statistics of an adapter's training distribution, for merges that keep behaviour.

For a layer ``y = W x`` (``x`` of width ``in``; unfolded patches ``C_in·k·k`` for convolutions) and one kind of
batch, the statistic is the mean second moment of the inputs the layer saw,

    G = Xᵀ X / n        (in × in, float64; X holds one input vector per row, n rows)

kept exactly, or as a low-rank sketch ``G ≈ U diag(σ) Uᵀ + ρ (I − U Uᵀ)`` with the top-k eigenpairs and the mean of
the remaining eigenvalues ``ρ`` (the residual trace spread over the residual subspace). No input is stored.

Kinds: ``"concept"`` (the concept's own prompts and images), ``"prior"`` (ordinary / prior-class inputs, e.g.
DreamBooth's prior-preservation batches) and ``"unconditional"`` (the concept's images under the empty prompt, which
classifier-free guidance feeds the model at sampling time).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KINDS = ("concept", "prior", "unconditional")


@dataclass(frozen=True)
class Moment:
    """``G = XᵀX / count`` of one layer and one kind: exact (``gram``) or sketched (``basis``, ``values``, ``residual``).

    ``gram``: ``(in, in)`` float64. Sketch: ``basis`` ``(in, k)`` orthonormal columns, ``values`` ``(k,)``,
    ``residual`` ρ ≥ 0, with ``in`` given by ``in_features``.
    """

    count: int
    gram: torch.Tensor | None = None
    basis: torch.Tensor | None = None
    values: torch.Tensor | None = None
    residual: float = 0.0

    @property
    def in_features(self) -> int:
        return (self.gram if self.gram is not None else self.basis).shape[0]

    @property
    def is_sketch(self) -> bool:
        return self.gram is None

    def dense(self) -> torch.Tensor:
        """``G`` as an ``(in, in)`` float64 matrix."""
        if self.gram is not None:
            return self.gram
        U, s = self.basis, self.values
        G = (U * (s - self.residual)) @ U.T
        G.diagonal().add_(self.residual)
        return G

    def right_multiply(self, M: torch.Tensor) -> torch.Tensor:
        """``M G`` for ``M`` ``(r, in)``, in ``O(r·in·k)`` for a sketch (``G`` is never formed)."""
        M = M.to(torch.float64)
        if self.gram is not None:
            return M @ self.gram
        U = self.basis
        return self.residual * M + ((M @ U) * (self.values - self.residual)) @ U.T


@dataclass
class AdapterStatistics:
    """The statistics one adapter carries: ``layers[layer][kind] → Moment``.

    ``layer`` is the layer's name as in the adapter's own weight file, without peft's ``base_model.model.`` prefix
    and without the adapter name (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``); for files that
    hold several components of a pipeline, prefixed with the component (``text_encoder.…``).
    """

    layers: dict[str, dict[str, Moment]] = field(default_factory=dict)
    adapter: str | None = None

    def moment(self, layer: str, kind: str) -> Moment | None:
        return self.layers.get(layer, {}).get(kind)
