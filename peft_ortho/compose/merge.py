"""One pass over the adapters' weights: check each layer, then stack (exact) or combine deltas (plain LoRAs).

``method="auto"`` / ``"linear"`` stack the factors, which is exact for *any* LoRAs::

    Σ_i w_i s_i B_i A_i = [w_1 s_1 B_1 … w_N s_N B_N] · [A_1; …; A_N]      (one LoRA of rank Σ r_i)

Exact means the merged ΔW equals the weighted sum of the deltas to float rounding. Whether the concepts then
*interfere* is a different question: orthogonal adapters on disjoint slots do not (``A_i A_jᵀ = 0``), plain LoRAs
generally do; ``merged.report`` measures it.

``"ties"``, ``"dare_linear"``, ``"dare_ties"`` and ``"svd"`` combine the deltas ``ΔW_i`` themselves with peft's
``merge_utils`` (peft's ``add_weighted_adapter`` applies them to A and B separately, which is not a function of
the deltas). Their result is a full-rank ΔW per layer: ``fuse`` uses it exactly, the LoRA exports re-factor it
with a truncated SVD of rank ``svd_rank`` and record the relative error per layer.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .check import check_adapter_finite, check_basis, check_shapes, prepare_basis_checks
from .load import Adapter

EXACT_METHODS = ("auto", "linear", "cat")
DELTA_METHODS = ("ties", "dare_linear", "dare_ties", "svd", "sequential")
METHODS = EXACT_METHODS + DELTA_METHODS
# Solved from calibration forward passes of a base model (``compose.sequential``), not from the weights alone.
CALIBRATED_METHODS = ("sequential",)


class MergedLayer:
    """The merged update of one layer.

    Stacked: ``B`` ``(out, R)`` with weights and scales folded in, ``A`` ``(R, in)``; ``ΔW = B A``.
    Delta: ``delta`` ``(out, in)``; exports factor it as ``B A`` of rank ``svd_rank``.
    ``a_shape`` is the stored shape of one ``lora_A`` (conv kernels), used to write files in the layout peft expects.
    """

    __slots__ = ("A", "B", "delta", "a_shape", "b_shape", "ranks", "blocks", "svd_error", "_svd")

    def __init__(self, A=None, B=None, delta=None, a_shape=None, b_shape=None, ranks=None, blocks=None):
        self.A, self.B, self.delta = A, B, delta
        self.a_shape, self.b_shape, self.ranks = a_shape, b_shape, ranks
        # Stacked only: per adapter, None or (axis, start, end) of its BlockLoRA block; its rank columns of B (rows
        # of A) are zero outside it, which lets ``fuse`` update the block alone.
        self.blocks = blocks
        self.svd_error: float | None = None
        self._svd: tuple[int, torch.Tensor, torch.Tensor] | None = None

    @property
    def out_features(self) -> int:
        return (self.B if self.delta is None else self.delta).shape[0]

    @property
    def in_features(self) -> int:
        return (self.A.shape[1]) if self.delta is None else self.delta.shape[1]

    def delta_weight(self) -> torch.Tensor:
        """``ΔW`` ``(out, in)`` (flattened for convs)."""
        return self.B @ self.A if self.delta is None else self.delta

    def factors(self, svd_rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``ΔW ≈ B A``: the exact stack, or the truncated SVD of a delta-space merge."""
        if self.delta is None:
            return self.A, self.B
        rank = min(svd_rank or sum(self.ranks), *self.delta.shape)
        if self._svd is None or self._svd[0] != rank:  # the card and the file both need it: decompose once
            U, S, Vh = torch.linalg.svd(self.delta.float(), full_matrices=False)
            total = float(S.square().sum())
            self.svd_error = float(S[rank:].square().sum() / total) ** 0.5 if total > 0 else 0.0
            self._svd = (rank, Vh[:rank].contiguous(), (U[:, :rank] * S[:rank]).contiguous())
        return self._svd[1], self._svd[2]

    def stored_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``lora_A``/``lora_B`` as peft stores them for this layer type, at ``rank``."""
        return (rank, *self.a_shape[1:]), (self.b_shape[0], rank, *self.b_shape[2:])


def iter_merged_layers(
    adapters: list[Adapter],
    weights: list[float],
    method: str,
    *,
    density: float = 0.5,
    majority_sign_method: str = "total",
    dtype: torch.dtype = torch.float32,
    check: bool = True,
    merge: bool = True,
) -> Iterator[tuple[tuple[str | None, str], MergedLayer | None]]:
    """The single pass, one layer at a time: read that layer of each adapter, check it, merge it, yield it.

    Only one layer's factors are in memory at a time, so consumers that stream (``fuse``, validation) use memory
    independent of the number of adapters. ``merge=False`` only checks (yields ``None``); ``check=False`` skips the
    checks for adapters already validated.
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {METHODS}")
    if method in CALIBRATED_METHODS and merge:
        raise ValueError(f"method {method!r} needs calibration forward passes: see peft_ortho.compose.sequential")
    if check:
        for adapter in adapters:
            check_adapter_finite(adapter)
        prepare_basis_checks(adapters)
    layer_owners: dict[tuple[str | None, str], list[int]] = {}
    for i, adapter in enumerate(adapters):
        for layer in adapter.layers():
            layer_owners.setdefault(layer, []).append(i)
    for layer, owners in layer_owners.items():
        group = [adapters[i] for i in owners]
        fs = [a.factors(layer, dtype=dtype) for a in group]  # views of the memory maps: nothing copied yet
        check_shapes(group, layer, fs)
        if check:  # finite values were checked per adapter, in one reduction over each file (check_adapter_finite)
            for adapter, f in zip(group, fs):
                if adapter.is_orthogonal:
                    check_basis(adapter, layer[1], f)
        if not merge:
            yield layer, None
            continue
        ranks = [f.rank for f in fs]
        a_shape, b_shape = fs[0].a_shape, fs[0].b_shape
        blocks = [a.block(layer) for a in group]
        blocks = [b if b is None else (b[0], b[2], b[3]) for b in blocks] if any(blocks) else None
        if method in EXACT_METHODS:
            # One copy per element: A rows concatenated, B columns written already scaled by w_i · s_i.
            A = torch.cat([f.A for f in fs])
            B = torch.empty(fs[0].B.shape[0], sum(ranks), dtype=dtype)
            col = 0
            for i, f in zip(owners, fs):
                torch.mul(f.B, weights[i] * f.scale, out=B[:, col : col + f.rank])
                col += f.rank
            yield layer, MergedLayer(A, B, None, a_shape, b_shape, ranks, blocks)
        else:
            deltas = [(f.B * f.scale) @ f.A for f in fs]
            layer_weights = torch.tensor([weights[i] for i in owners], dtype=dtype)
            delta = _combine_deltas(deltas, layer_weights, method, density, majority_sign_method)
            yield layer, MergedLayer(None, None, delta, a_shape, b_shape, ranks)


def _combine_deltas(deltas, weights, method, density, majority_sign_method) -> torch.Tensor:
    from peft.utils import merge_utils

    if method == "svd":  # the weighted sum, re-factored at export
        return merge_utils.task_arithmetic(deltas, weights)
    if method == "ties":
        return merge_utils.ties(deltas, weights, density, majority_sign_method)
    if method == "dare_linear":
        return merge_utils.dare_linear(deltas, weights, density)
    return merge_utils.dare_ties(deltas, weights, density, majority_sign_method)
