"""What the merge will do, predicted from input statistics, and how the adapters' bases relate, per layer and pair.

**Predicted behaviour** (needs each adapter's input statistics, ``Adapter.statistics``). For a layer with merged
update ``ΔW`` and adapter ``i``'s own ``E_i = w_i ΔW_i``, on concept ``i``'s inputs ``X_i`` (second moment ``G_i``,
the concept and, when recorded, the unconditional inputs classifier-free guidance adds, averaged):

- **output change** ``‖(ΔW − E_i) X_i‖ / ‖E_i X_i‖ = sqrt(tr(D G_i Dᵀ) / tr(E_i G_i E_iᵀ))``, ``D = ΔW − E_i``:
  how far the merged layer's output on the concept's inputs is from what the adapter alone did, relative to the
  adapter's own effect. 0 keeps the concept exactly; 1 is as far off as the base model. Per concept it is
  aggregated over the layers the adapter adapts by energy, ``sqrt(Σ_l tr(D G Dᵀ) / Σ_l tr(E G Eᵀ))``.
- **predicted retention** ``1 − change²``: the share of the adapter's gain kept if each adapter's own change is
  what its concept needs (then the merged residual is ``‖D X‖²``). It is negative when the other adapters push the
  output further than the concept moved it: expect the concept to be lost.
- **drift** on ordinary inputs ``X_0`` (``G_0``: the mean of the adapters' ``"prior"`` moments):
  ``‖ΔW X_0‖ / ‖W X_0‖`` when the base weights ``W`` are known (``compose(..., base=model)``, the calibration target,
  or after ``fuse``), and always ``‖ΔW X_0‖`` relative to the single adapters' own ``rms_i ‖E_i X_0‖``.

Everything is computed in the factors' space, batched per layer (``_layer_predictions``): every quadratic form is
``tr(X G Yᵀ) = ρ ⟨X, Y⟩_F + Σ_c w_c (X u_c)ᵀ (Y u_c)`` over the statistics' vectors (a sketch's basis; an exact
Gram's rows against the identity), so with ``ΔW = B A`` the layer needs one product ``A [u_1 … u_n]`` for all its
moments (equal moments taken once), the ``R × R`` Grams ``BᵀB``, ``AAᵀ`` (shared with the basis relations and, for
the exact sum and ``"regmean"``, with the adapters' own ``E_i``), one batched product for each adapter's own vectors
and one for the prior vectors; ``‖W X_0‖`` is computed once per layer (``base_energies``). No ``out × in`` matrix
is formed except a dense merged ``ΔW`` (``"ties"``, ``"dare_*"``, ``"svd"``) and, for the sign conflicts, the
adapters' deltas a few rows at a time.

**Basis relations** (from the weights alone; they say nothing about the inputs a concept actually sees):

- **basis overlap** ``‖A_i A_jᵀ‖_F / sqrt(r_i r_j)``: 0 when the down-projections read orthogonal subspaces (disjoint
  orthogonal slots); for orthonormal rows sharing ``k`` rows it is ``sqrt(k) / r``.
- **basis response** ``‖ΔW_j A_iᵀ‖_F / ‖ΔW_i A_iᵀ‖_F``: how strongly adapter ``j`` responds to the input
  *directions* adapter ``i`` reads, relative to ``i``'s own response. It is 0 for disjoint slots whatever the
  inputs, so it is not the interference a user sees (an input of concept ``i`` still has energy in ``j``'s
  directions); that is the output change above. Aggregated over layers as a ratio of root sums of squares.
  (Called "crosstalk" in earlier versions.)
- **sign conflicts**: among the weights both deltas change, the fraction where they push in opposite directions
  (what TIES resolves; zero by construction for disjoint blocks).
"""

from __future__ import annotations

import json
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import torch

from .._io import atomic_file
from .load import Adapter
from .merge import MergedLayer, _MomentIndex, concept_terms, statistics_key

RETENTION_WARNING = 0.5  # below this predicted retention the text report warns that the concept will be lost


def _layer_name(layer: tuple[str | None, str]) -> str:
    return layer[1] if layer[0] is None else f"{layer[0]}.{layer[1]}"


def _ratio(num: float, den: float) -> float:
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


_F64 = torch.float64
_SIGN_ENTRIES = 1 << 17  # entries of one adapter's ΔW formed at a time for the sign conflicts (1 MiB of float64)
_SIGN_BLOCK_WORDS = 1 << 12  # 64-bit words of sign bits per adapter counted at a time (the pairs' scratch in cache)
_LAYOUT_CACHE_BYTES = 64 << 20  # moments' vectors kept for layers that read the same inputs (bound independent of N)


class _Stack:
    """The owners' own updates ``E_j = w_j s_j B_j A_j`` of one layer, stacked: ``B`` ``(out, R)``, ``A`` ``(R, in)``.

    With the ``R × R`` Grams the basis relations and the predictions share: ``AA = A Aᵀ``, ``BB = Bᵀ B`` (from the
    unscaled ``raw = [B_1 … B_K]``: ``BB = s sᵀ ⊙ rawᵀ raw``, ``s`` the per-column scales), and the block indicator
    ``S`` ``(K, R)`` that sums an ``R``-indexed quantity per adapter.
    """

    def __init__(self, adapters: list[Adapter], owners: list[int], layer, weights: list[float]):
        fs = [adapters[i].factors(layer, dtype=_F64) for i in owners]
        self.ranks = [f.rank for f in fs]
        self.As = [f.A for f in fs]
        self.Bs = [f.B * (weights[i] * f.scale) for i, f in zip(owners, fs)]
        self.A = torch.cat(self.As) if len(fs) > 1 else fs[0].A
        self.B = torch.cat(self.Bs, dim=1) if len(fs) > 1 else self.Bs[0]
        self.raw = torch.cat([f.B for f in fs], dim=1) if len(fs) > 1 else fs[0].B
        self.scale = torch.cat([torch.full((f.rank,), weights[i] * f.scale, dtype=_F64) for i, f in zip(owners, fs)])
        blocks = torch.repeat_interleave(torch.arange(len(fs)), torch.tensor(self.ranks))
        self.S = torch.nn.functional.one_hot(blocks, len(fs)).T.to(_F64)  # (K, R)
        self.same = blocks[:, None] == blocks[None, :]  # (R, R): both rank rows belong to one adapter
        self.raw_gram = self.raw.T @ self.raw
        self.BB = self.raw_gram * (self.scale[:, None] * self.scale[None, :])
        self.AA = self.A @ self.A.T
        self.BB_own = self.BB * self.same  # block diagonal: Σ_j E_jᵀ E_j = Aᵀ BB_own A

    def own_fro2(self) -> torch.Tensor:
        """``‖E_j‖_F²`` per owner ``(K,)``: ``Σ_{block j} BB ⊙ AA``."""
        return self.S @ (self.BB_own * self.AA).sum(0)

    def diagonal_blocks(self, M: torch.Tensor) -> torch.Tensor:
        """The owners' ``(r_j, r_j)`` diagonal blocks of an ``(R, R)`` matrix, zero-padded and stacked ``(K, r, r)``."""
        r = max(self.ranks)
        out = M.new_zeros(len(self.ranks), r, r)
        start = 0
        for j, k in enumerate(self.ranks):
            out[j, :k, :k] = M[start : start + k, start : start + k]
            start += k
        return out

    def padded(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """``t`` split along ``dim`` into the owners' rank blocks, zero-padded to the largest rank and stacked first."""
        parts = t.split(self.ranks, dim=dim)
        r = max(self.ranks)
        if all(k == r for k in self.ranks):
            return torch.stack(parts)
        pad = []
        for p in parts:
            shape = list(p.shape)
            shape[dim] = r - p.shape[dim]
            pad.append(torch.cat([p, p.new_zeros(shape)], dim=dim))
        return torch.stack(pad)


def _basis_relations(stack: _Stack) -> tuple[torch.Tensor, torch.Tensor]:
    """``(response, overlap)`` ``(K, K)``: ``response[j, i] = ‖E_j A_iᵀ‖²`` (``[i, i]``: ``i``'s own) and
    ``overlap[i, j] = ‖A_i A_jᵀ‖_F²``, from ``‖B_j (A_j A_iᵀ)‖² = Σ (BB_jj G_ji) ⊙ G_ji`` with ``G = AA``."""
    S, AA = stack.S, stack.AA
    response = S @ ((stack.BB_own @ AA) * AA) @ S.T
    overlap = S @ (AA * AA) @ S.T
    return response, overlap


def _sign_counts(stack: _Stack) -> tuple[np.ndarray, np.ndarray]:
    """``(both, opposite)`` ``(K, K)`` int64, upper triangle: over the entries of ``ΔW_i = E_i`` and ``ΔW_j``, how
    many both change (``≠ 0``) and how many of those they change in opposite directions.

    The deltas are formed in float64 a few rows at a time (``_SIGN_ENTRIES`` entries per adapter), their signs packed
    into bits, and all pairs counted on blocks of bits with bitwise operations and population counts.
    """
    K = len(stack.Bs)
    out, width = stack.Bs[0].shape[0], stack.As[0].shape[1]
    both = np.zeros((K, K), dtype=np.int64)
    opposite = np.zeros((K, K), dtype=np.int64)
    rows = max(1, min(out, _SIGN_ENTRIES // max(width, 1)))
    seg = -(-rows * width // 64)  # words of one chunk's bits (zero-padded: padding counts nowhere)
    chunks = max(1, _SIGN_BLOCK_WORDS // seg)  # chunks per counting block
    pos = np.zeros((K, chunks * seg), dtype=np.uint64)
    neg = np.zeros((K, chunks * seg), dtype=np.uint64)
    work = np.empty((3, K, chunks * seg), dtype=np.uint64)
    counts = np.empty((K, chunks * seg), dtype=np.uint8)
    values = torch.empty(rows, width, dtype=_F64)
    flags = np.empty(rows * width, dtype=bool)
    filled = entries = 0
    for start in range(0, out, rows):
        stop = min(start + rows, out)
        n = (stop - start) * width
        d = values[: stop - start]
        flat = d.numpy().reshape(-1)
        for i, (B, A) in enumerate(zip(stack.Bs, stack.As)):
            torch.mm(B[start:stop], A, out=d)
            for bits, compare in ((pos, np.greater), (neg, np.less)):
                compare(flat, 0.0, out=flags[:n])
                packed = np.packbits(flags[:n])
                target = bits[i, filled * seg : (filled + 1) * seg].view(np.uint8)
                target[: packed.shape[0]] = packed
                target[packed.shape[0] :] = 0
        filled, entries = filled + 1, entries + n
        if filled == chunks or stop == out:
            _count_pairs(pos[:, : filled * seg], neg[:, : filled * seg], entries, both, opposite, work, counts)
            filled = entries = 0
    return both, opposite


def _count_pairs(pos, neg, entries: int, both, opposite, work, counts) -> None:
    """Add the pairs' counts of one block of sign bits ``(K, w)`` (``entries`` real entries) to ``both``/``opposite``.

    Opposite directions: both nonzero and the negative bits differ, ``nz_i & nz_j & (neg_i ^ neg_j)``; where every
    entry of the block is nonzero in every delta (plain LoRAs) that is ``neg_i ^ neg_j`` and ``both`` is ``entries``.
    """
    K, w = pos.shape
    nz = np.bitwise_or(pos, neg, out=work[0, :, :w])
    dense = bool((_popcount(nz, counts) == entries).all())
    for i in range(K - 1):
        k = K - 1 - i
        differ = np.bitwise_xor(neg[i], neg[i + 1 :], out=work[1, :k, :w])
        if dense:
            both[i, i + 1 :] += entries
        else:
            common = np.bitwise_and(nz[i], nz[i + 1 :], out=work[2, :k, :w])
            both[i, i + 1 :] += _popcount(common, counts)
            np.bitwise_and(differ, common, out=differ)
        opposite[i, i + 1 :] += _popcount(differ, counts)


_BYTE_COUNTS = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


def _popcount(words: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Set bits per row of a ``(k, w)`` uint64 array ``(k,)`` (numpy ≥ 2.0 counts in hardware; ``counts``: scratch)."""
    if hasattr(np, "bitwise_count"):
        k, w = words.shape
        return np.bitwise_count(words, out=counts[:k, :w]).sum(axis=1, dtype=np.uint32).astype(np.int64)
    return _BYTE_COUNTS[words.view(np.uint8)].sum(axis=1, dtype=np.int64)


class _Layout:
    """The moments of one layer as rows of vectors: ``tr(X G_t Yᵀ) = ρ_t ⟨X, Y⟩_F + Σ_{c ∈ t} w_c (X l_c)ᵀ (Y r_c)``,
    and which of them each concept and the prior statistics use.

    A sketch ``U diag(σ) Uᵀ + ρ (I − UUᵀ)`` gives ``l_c = r_c = u_c``, ``w_c = σ_c − ρ`` (what ``Moment.dense``
    writes out); an exact Gram gives ``l_c = G e_c``, ``r_c = e_c``, ``w_c = 1``, ``ρ = 0``. ``left``/``right``
    ``(n, in)`` hold every distinct moment's vectors as rows (``right`` is ``None`` when it equals ``left``: sketches
    only); ``term`` maps a row to its moment.

    Concepts (``concepts``: ``{owner position: [(coef, moment)]}``): ``coef`` ``(P, T)``, and each owner's own rows
    ``own`` ``(P, width)`` with weights ``own_weight`` (``w_c`` times the concept's coefficient; padding 0).
    Prior (``priors``: ``[(coef, moment)]``): ``pi`` ``(T,)``, its rows ``prior`` with weights ``prior_weight``.
    """

    def __init__(self, moments: list, concepts: dict, priors: list):
        left, right, weight, term, rho, ranges = [], [], [], [], [], []
        exact = any(not m.is_sketch for m in moments)
        start = 0
        for t, m in enumerate(moments):
            if m.is_sketch:
                U = m.basis.to(_F64).T
                left.append(U)
                right.append(U)
                weight.append((m.values - m.residual).to(_F64))
                rho.append(float(m.residual))
            else:
                G = m.gram.to(_F64)
                left.append(G)  # symmetric: its rows are its columns
                right.append(torch.eye(G.shape[0], dtype=_F64))
                weight.append(torch.ones(G.shape[0], dtype=_F64))
                rho.append(0.0)
            n = left[-1].shape[0]
            term.append(torch.full((n,), t, dtype=torch.long))
            ranges.append(torch.arange(start, start + n))
            start += n
        self.left = torch.cat(left).contiguous()
        self.right = torch.cat(right).contiguous() if exact else None
        self.weight = torch.cat(weight)
        self.term = torch.cat(term)
        self.rho = torch.tensor(rho, dtype=_F64)
        self.rho_any = bool((self.rho != 0).any())
        T = self.count = len(moments)
        self.positions = list(concepts)
        if concepts:
            self.coef = torch.zeros(len(concepts), T, dtype=_F64)  # G_p = Σ_t coef[p, t] G_t
            rows = []
            for k, terms in enumerate(concepts.values()):
                for c, t in terms:
                    self.coef[k, t] += c
                rows.append(torch.cat([ranges[t] for t in sorted({t for _, t in terms})]))
            width = max(len(r) for r in rows)
            self.own = torch.zeros(len(rows), width, dtype=torch.long)
            self.own_weight = torch.zeros(len(rows), width, dtype=_F64)
            for k, r in enumerate(rows):
                self.own[k, : len(r)] = r
                self.own_weight[k, : len(r)] = self.weight[r] * self.coef[k, self.term[r]]
            self.coef_rho = self.coef @ self.rho
        self.pi = None
        if priors:
            self.pi = torch.zeros(T, dtype=_F64)
            for c, t in priors:
                self.pi[t] += c
            self.prior = torch.cat([ranges[t] for t in sorted({t for _, t in priors})])
            self.prior_weight = self.weight[self.prior] * self.pi[self.term[self.prior]]
            self.prior_rho = float(self.pi @ self.rho)
        self.nbytes = sum(t.numel() * t.element_size() for t in (self.left, self.right) if t is not None)

    def per_term(self, values: torch.Tensor) -> torch.Tensor:
        """``Σ_{c ∈ t} w_c values_c`` per moment ``(T,)`` for ``values`` ``(n,)``."""
        return values.new_zeros(self.count).index_add_(0, self.term, values * self.weight)


class _LayoutCache:
    """``_Layout`` by its moments (tokens) and terms, least recently used first out past ``_LAYOUT_CACHE_BYTES``:
    layers that read the same inputs (``to_q``/``to_k``/``to_v``; every cross-attention ``to_k``/``to_v``) build it
    once."""

    def __init__(self, limit: int = _LAYOUT_CACHE_BYTES):
        self._items: OrderedDict = OrderedDict()
        self._bytes, self._limit = 0, limit

    def get(self, key: tuple, moments: list, concepts: dict, priors: list) -> _Layout:
        layout = self._items.get(key)
        if layout is not None:
            self._items.move_to_end(key)
            return layout
        layout = _Layout(moments, concepts, priors)
        self._items[key] = layout
        self._bytes += layout.nbytes
        while self._bytes > self._limit and len(self._items) > 1:
            self._bytes -= self._items.popitem(last=False)[1].nbytes
        return layout


class _Merged:
    """The merged ``ΔW`` of one layer against the owners' ``_Stack``: ``B A`` (stacked) or a dense ``delta``.

    ``C = BᵀB`` and ``X = Bᵀ B_stack`` are taken from the stack's Grams when ``B`` is the stack's (the exact methods)
    or its unscaled columns (``"regmean"``: ``B'_i = B_i``), and ``A Aᵀ``/``A A_stackᵀ`` likewise when ``A`` is the
    stack's, so the exact sum costs no product the basis relations did not already compute.
    """

    def __init__(self, merged_layer: MergedLayer, stack: _Stack):
        self.stack = stack
        self.delta = self.A = self.B = None
        if merged_layer.delta is not None:
            self.delta = merged_layer.delta.to(_F64)
            return
        self.A, self.B = merged_layer.A.to(_F64), merged_layer.B.to(_F64)
        self.same_A = self.A.shape == stack.A.shape and torch.equal(self.A, stack.A)
        if self.B.shape == stack.B.shape and torch.equal(self.B, stack.B):
            self.C = self.X = stack.BB
        elif self.B.shape == stack.raw.shape and torch.equal(self.B, stack.raw):
            self.C = stack.raw_gram
            self.X = stack.raw_gram * stack.scale[None, :]
        else:
            self.C = self.B.T @ self.B
            self.X = self.B.T @ stack.B

    def times(self, rows: torch.Tensor) -> torch.Tensor:
        """``(A V)ᵀ`` (stacked) or ``(ΔW V)ᵀ`` (dense) for ``rows = Vᵀ`` ``(n, in)``."""
        return rows @ (self.delta if self.delta is not None else self.A).T

    def fro2(self) -> float:
        """``‖ΔW‖_F²``."""
        if self.delta is not None:
            return float(self.delta.square().sum())
        AA = self.stack.AA if self.same_A else self.A @ self.A.T
        return float((self.C * AA).sum())

    def inner(self) -> torch.Tensor:
        """``⟨ΔW, E_j⟩_F`` per owner ``(K,)``."""
        st = self.stack
        if self.delta is not None:
            return st.S @ ((st.B.T @ self.delta) * st.A).sum(1)
        AF = st.AA if self.same_A else self.A @ st.A.T
        return st.S @ (self.X * AF).sum(0)

    def energies(self, layout: _Layout, PL: torch.Tensor, PR: torch.Tensor) -> torch.Tensor:
        """``Σ_{c ∈ t} w_c (ΔW l_c)ᵀ (ΔW r_c)`` per moment, from ``PL = times(left)``, ``PR = times(right)``."""
        if self.delta is not None:
            return layout.per_term((PL * PR).sum(1))
        return layout.per_term(((PL @ self.C) * PR).sum(1))

    def against(self) -> torch.Tensor:
        """``L`` with ``B_stackᵀ ΔW l = Lᵀ times(l)``: ``X`` (stacked), ``B_stack`` (dense)."""
        return self.stack.B if self.delta is not None else self.X


def _layer_predictions(stack: _Stack, merged: _Merged, concepts: dict, priors: list, index, cache) -> dict:
    """Per owner position ``p`` with concept terms: ``(d2, e2)`` = ``(‖(ΔW − E_p) X_p‖², ‖E_p X_p‖²)`` (per row);
    and the drift energies ``("merged", "single")`` = ``(‖ΔW X_0‖², mean_j ‖E_j X_0‖²)`` when ``priors`` are given.

    ``concepts``: ``{p: [(coef, Moment)]}`` (``G_p``); ``priors``: ``[(coef, Moment)]`` (``G_0``). Every quadratic
    form is a sum over the moments' vectors (``_Layout``), batched: one product ``ΔW [l_1 … l_n]`` for all moments
    of the layer, one batched product for the owners' own vectors, one for the prior vectors.
    """
    tokens: dict[int, int] = {}
    moments = []

    def position(m) -> int:
        tok = index.token(m)
        if tok not in tokens:
            tokens[tok] = len(moments)
            moments.append(m)
        return tokens[tok]

    concept_terms_ = {p: tuple((c, position(m)) for c, m in terms) for p, terms in concepts.items()}
    prior_terms_ = tuple((c, position(m)) for c, m in priors)
    key = (tuple(tokens), tuple(concept_terms_.items()), prior_terms_)
    lay = cache.get(key, moments, concept_terms_, prior_terms_)
    right = lay.right if lay.right is not None else lay.left
    PL = merged.times(lay.left)  # (n, ·): row c is (A l_c)ᵀ, or (ΔW l_c)ᵀ for a dense ΔW
    PR = PL if lay.right is None else merged.times(lay.right)
    fro_m = merged.fro2() if lay.rho_any else 0.0
    mm = merged.energies(lay, PL, PR) + lay.rho * fro_m  # tr(ΔW G_t ΔWᵀ) per moment
    own_fro = stack.own_fro2() if lay.rho_any else None
    out: dict = {}
    if lay.positions:
        ps = torch.tensor(lay.positions)
        A_own = stack.padded(stack.A, 0)[ps].transpose(1, 2)  # (P, in, r)
        QL = torch.bmm(lay.left[lay.own], A_own)  # (P, width, r): (A_p l_c)ᵀ
        QR = QL if lay.right is None else torch.bmm(right[lay.own], A_own)
        BB_own = stack.diagonal_blocks(stack.BB)[ps]  # (P, r, r): B_pᵀ B_p
        e2 = ((torch.bmm(QL, BB_own) * QR).sum(2) * lay.own_weight).sum(1)  # Σ_c w_c (E_p l_c)ᵀ (E_p r_c)
        L_own = stack.padded(merged.against(), 1)[ps]  # (P, ·, r): B_pᵀ ΔW l = L_pᵀ times(l)
        XL = torch.bmm(PL[lay.own], L_own)  # (P, width, r): (B_pᵀ ΔW l_c)ᵀ
        cross = ((XL * QR).sum(2) * lay.own_weight).sum(1)  # Σ_c w_c (ΔW l_c)ᵀ (E_p r_c)
        m2 = lay.coef @ mm
        if lay.rho_any:
            e2 = e2 + lay.coef_rho * own_fro[ps]
            cross = cross + lay.coef_rho * merged.inner()[ps]
        d2 = (m2 - 2 * cross + e2).clamp_min(0.0)  # ‖(ΔW − E_p) X_p‖² (clamped: rounding near an exact match)
        out["concepts"] = {p: (float(d2[k]), float(e2[k])) for k, p in enumerate(lay.positions)}
    if lay.pi is not None:
        if merged.delta is None and merged.same_A:  # the exact methods: A_stack V was computed above
            QP, QPR = PL[lay.prior], PR[lay.prior]
        else:
            QP = lay.left[lay.prior] @ stack.A.T  # (Kp, R)
            QPR = QP if lay.right is None else right[lay.prior] @ stack.A.T
        per_row = ((QP @ stack.BB_own) * QPR).sum(1)  # Σ_j (E_j l_c)ᵀ (E_j r_c)
        single = float(per_row @ lay.prior_weight)
        if lay.rho_any:
            single += lay.prior_rho * float(own_fro.sum())
        out["drift"] = (float(lay.pi @ mm), single / len(stack.ranks))
    return out


def prior_terms(adapters: list[Adapter], owners: list[int], layer) -> list:
    """``G_0`` of a layer as ``[(1/n, Moment)]``: the mean of the owners' ``"prior"`` moments (empty if none)."""
    priors = []
    for i in owners:
        stats = adapters[i].statistics
        if stats is not None:
            m = stats.moment(statistics_key(adapters[i], layer), "prior")
            if m is not None:
                priors.append(m)
    return [(1.0 / len(priors), m) for m in priors]


def base_energies(adapters: list[Adapter], weights: dict) -> dict:
    """``{layer: tr(W G_0 Wᵀ)}`` = ``‖W X_0‖²/n`` of the base weights ``{layer: (weight, transposed)}`` (views).

    Computed at once, so a later ``fuse`` into the same model does not change them.
    """
    out = {}
    owners: dict = {}
    for i, a in enumerate(adapters):
        for layer in a.layers():
            owners.setdefault(layer, []).append(i)
    for layer, idx in owners.items():
        terms = prior_terms(adapters, idx, layer)
        if terms and layer in weights:
            weight, transposed = weights[layer]
            W = weight.detach().to(_F64)
            W = W.t() if transposed else W.reshape(W.shape[0], -1)
            out[layer] = _dense_energy(W, terms)
    return out


def _dense_energy(W: torch.Tensor, terms: list) -> float:
    """``tr(W G Wᵀ)`` for ``G = Σ_t c_t G_t`` and a dense ``W``: one product ``W [l_1 … l_n]`` for all terms."""
    lay = _Layout([m for _, m in terms], {}, [])
    PL = lay.left @ W.T
    PR = PL if lay.right is None else lay.right @ W.T
    per_term = lay.per_term((PL * PR).sum(1))
    if lay.rho_any:
        per_term = per_term + lay.rho * float(W.square().sum())
    coef = torch.tensor([c for c, _ in terms], dtype=_F64)
    return float(coef @ per_term)


class Report:
    """Predicted behaviour (from statistics) and basis relations. ``str(report)`` is a summary; ``to_json()`` all.

    Args:
        adapters, weights, method: what was merged.
        layers: ``((component, layer), MergedLayer)`` of the merge, in one pass (``MergedAdapter.iter_layers``);
            without it only the basis relations are computed.
        base_energy: ``{(component, layer): tr(W G_0 Wᵀ)}`` of the base model (``base_energies``), for the drift
            relative to ``‖W X_0‖``.
        sign_conflicts: compute sign conflicts (they need the dense deltas of every pair).

    Attributes:
        output_change: ``{adapter: {layer: change}}`` and ``concepts``: ``{adapter: {"output_change",
            "retention"}}`` for adapters with statistics; ``drift``: aggregated drift numbers (empty without
            prior statistics); ``basis_response`` ``(N, N)``: ``[i, j]`` is ``j``'s response to ``i``'s directions;
            ``sign_conflicts`` ``(N, N)``; ``layers``: per-layer entries.
    """

    def __init__(
        self,
        adapters: list[Adapter],
        weights: list[float],
        method: str,
        *,
        layers: Iterable[tuple[tuple[str | None, str], MergedLayer]] | None = None,
        base_energy: dict | None = None,
        sign_conflicts: bool = True,
    ):
        self.names = [a.name for a in adapters]
        self.input_paths = [a.source.path for a in adapters]  # files written from the report never replace these
        self.method = method
        self.layers: dict[str, dict] = {}
        self.has_base = bool(base_energy)
        n = len(adapters)
        num = torch.zeros(n, n, dtype=torch.float64)  # Σ_layers ‖ΔW_j A_iᵀ‖² at [i, j]
        den = torch.zeros(n, dtype=torch.float64)  # Σ_layers ‖ΔW_i A_iᵀ‖²
        conflicts = torch.zeros(n, n, dtype=torch.float64)
        conflict_layers = torch.zeros(n, n, dtype=torch.float64)
        with_stats = [a.statistics is not None for a in adapters]
        self.without_statistics = [a.name for a, s in zip(adapters, with_stats) if not s]
        change = torch.zeros(n, dtype=torch.float64)  # Σ_l tr(D_i G_i D_iᵀ)
        own = torch.zeros(n, dtype=torch.float64)  # Σ_l tr(E_i G_i E_iᵀ)
        drift = {"merged": 0.0, "single": 0.0, "base": 0.0, "layers": 0}
        self.output_change: dict[str, dict[str, float]] = {a.name: {} for a, s in zip(adapters, with_stats) if s}
        if layers is None:
            pairs = ((layer, None) for layer in sorted({la for a in adapters for la in a.layers()}, key=_sort_key))
        else:
            pairs = iter(layers)
        index = _MomentIndex()  # equal moments (one file's to_q/to_k/to_v; the empty prompt in every file) once
        cache = _LayoutCache()
        for layer, merged_layer in pairs:
            owners = [i for i, a in enumerate(adapters) if layer in a.layer_keys]
            stack = _Stack(adapters, owners, layer, weights)
            idx = torch.tensor(owners)
            response, overlap = _basis_relations(stack)  # response[b, a]: ‖E_j A_iᵀ‖² for i = owners[a], j = owners[b]
            own_response = response.diagonal()
            den[idx] += own_response
            num[idx[:, None], idx[None, :]] += response.T * ~torch.eye(len(owners), dtype=torch.bool)
            resp, ov, ownr = response.tolist(), overlap.tolist(), own_response.tolist()
            entry = {"overlap": {}, "basis_response": {}}
            for a, i in enumerate(owners):
                for b, j in enumerate(owners):
                    if i == j:
                        continue
                    entry["basis_response"][f"{self.names[i]} <- {self.names[j]}"] = _ratio(resp[b][a], ownr[a])
                    if i < j:
                        r = math.sqrt(stack.ranks[a] * stack.ranks[b])
                        entry["overlap"][f"{self.names[i]} | {self.names[j]}"] = math.sqrt(ov[a][b]) / r
            if sign_conflicts and len(owners) > 1:
                both, opposite = (t.tolist() for t in _sign_counts(stack))
                entry["sign_conflicts"] = {}
                for a, i in enumerate(owners):
                    for b in range(a + 1, len(owners)):
                        j = owners[b]
                        total = both[a][b]
                        frac = opposite[a][b] / total if total else 0.0
                        entry["sign_conflicts"][f"{self.names[i]} | {self.names[j]}"] = frac
                        conflicts[i, j] += frac
                        conflict_layers[i, j] += 1
            name = _layer_name(layer)
            if merged_layer is not None and any(with_stats[i] for i in owners):
                energies = self._predict_layer(
                    entry, name, layer, merged_layer, adapters, owners, stack, index, cache, base_energy
                )
                for p, (d2, e2) in energies.items():
                    change[owners[p]] += d2
                    own[owners[p]] += e2
                d = entry.get("drift")
                if d is not None:
                    drift["merged"] += d["_merged"]
                    drift["single"] += d["_single"]
                    drift["base"] += d.pop("_base", 0.0)
                    drift["layers"] += 1
                    del d["_merged"], d["_single"]
            self.layers[name] = entry
        # Pairwise aggregates; basis_response[i, j]: j's response to i's directions.
        self.basis_response = torch.where(den[:, None] > 0, (num / den[:, None].clamp_min(1e-300)).sqrt(), num.sqrt())
        self.basis_response.fill_diagonal_(0.0)
        upper = conflicts / conflict_layers.clamp_min(1)
        self.sign_conflicts = upper + upper.t()
        self.concepts: dict[str, dict[str, float]] = {}
        for i, a in enumerate(adapters):
            if with_stats[i] and own[i] > 0:
                c = _ratio(float(change[i]), float(own[i]))
                self.concepts[a.name] = {"output_change": c, "retention": 1.0 - c * c}
        self.drift: dict[str, float] = {}
        if drift["layers"]:
            self.drift["vs_single"] = _ratio(drift["merged"], drift["single"])
            if self.has_base and drift["base"] > 0:
                self.drift["relative"] = _ratio(drift["merged"], drift["base"])
                self.drift["single_relative"] = _ratio(drift["single"], drift["base"])
            self.drift["layers"] = drift["layers"]

    def _predict_layer(self, entry, name, layer, merged_layer, adapters, owners, stack, index, cache, base) -> dict:
        """Fill ``entry``'s predictions for one layer; returns ``{owner position: (d2, e2)}``, the energies the
        per-concept totals sum (``_layer_predictions``)."""
        concepts = {}  # owner position → G_p as [(coefficient, Moment)]
        for p, i in enumerate(owners):
            stats = adapters[i].statistics
            if stats is None:
                continue
            key = statistics_key(adapters[i], layer)
            concept, uncond = stats.moment(key, "concept"), stats.moment(key, "unconditional")
            if concept is not None:
                concepts[p] = concept_terms({"concept": concept, "unconditional": uncond})
        priors = prior_terms(adapters, owners, layer)
        entry["output_change"] = {}
        if not concepts and not priors:
            return {}
        got = _layer_predictions(stack, _Merged(merged_layer, stack), concepts, priors, index, cache)
        energies = got.get("concepts", {})
        for p, (d2, e2) in energies.items():
            value = _ratio(d2, e2)
            entry["output_change"][self.names[owners[p]]] = value
            self.output_change[self.names[owners[p]]][name] = value
        if "drift" in got:
            m2, s2 = got["drift"]
            entry["drift"] = {"vs_single": _ratio(m2, s2), "_merged": m2, "_single": s2}
            if base and layer in base:
                entry["drift"]["relative"] = _ratio(m2, base[layer])
                entry["drift"]["_base"] = base[layer]
        return energies

    def max_overlap(self) -> float:
        return max((v for e in self.layers.values() for v in e["overlap"].values()), default=0.0)

    def max_basis_response(self) -> tuple[float, str, str]:
        """Largest per-layer basis response, with the pair and the layer."""
        best = (0.0, "", "")
        for layer, e in self.layers.items():
            for pair, v in e["basis_response"].items():
                if v > best[0]:
                    best = (v, pair, layer)
        return best

    def worst_concept(self) -> tuple[str, float] | None:
        """The concept with the lowest predicted retention, or None without statistics."""
        if not self.concepts:
            return None
        name = min(self.concepts, key=lambda k: self.concepts[k]["retention"])
        return name, self.concepts[name]["retention"]

    def to_dict(self) -> dict:
        return {
            "adapters": self.names,
            "method": self.method,
            "concepts": self.concepts,
            "drift": self.drift,
            "without_statistics": self.without_statistics,
            "pairwise_basis_response": self.basis_response.tolist(),
            "pairwise_sign_conflicts": self.sign_conflicts.tolist(),
            "max_overlap": self.max_overlap(),
            "layers": self.layers,
        }

    def to_json(self, path: str | None = None, *, overwrite: bool = False) -> str:
        """The report as JSON text, optionally written to a file.

        Args:
            path: also write it there (atomically; never over or inside one of the adapters it describes).
            overwrite: replace an existing ``path``.

        Returns:
            The JSON text.
        """
        text = json.dumps(self.to_dict(), indent=2, default=float)
        if path is not None:
            with atomic_file(path, overwrite, inputs=self.input_paths) as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    def _prediction_lines(self) -> list[str]:
        if not self.concepts:
            return [
                "  no input statistics: the change on each concept's inputs cannot be predicted (record statistics "
                "while training, or compose(..., calibrate=pipe, prompts=...))"
            ]
        width = max(8, *(len(k) for k in self.concepts))
        lines = [
            "  predicted from input statistics (energy-weighted over the layers each adapter adapts):",
            f"    {'concept':<{width}}  output change  retention",
        ]
        for name, c in self.concepts.items():
            lines.append(f"    {name:<{width}}  {c['output_change']:13.3g}  {c['retention']:9.3g}")
        if self.without_statistics:
            lines.append(f"    (no statistics, not predicted: {', '.join(self.without_statistics)})")
        if self.drift:
            text = f"  drift on ordinary inputs: ‖ΔW X0‖ = {self.drift['vs_single']:.3g}× a single adapter's (rms)"
            if "relative" in self.drift:
                text += (
                    f"; ‖ΔW X0‖/‖W X0‖ = {self.drift['relative']:.3g} (single adapters "
                    f"{self.drift['single_relative']:.3g})"
                )
            else:
                text += "; pass base= for ‖ΔW X0‖/‖W X0‖"
            lines.append(text)
        else:
            lines.append("  drift on ordinary inputs: not predicted (no 'prior' statistics)")
        lost = [k for k, c in self.concepts.items() if c["retention"] < RETENTION_WARNING]
        if lost:
            lines.append(
                f"  warning: predicted retention below {RETENTION_WARNING} for {len(lost)} concept(s) "
                f"({', '.join(lost[:5])}{', …' if len(lost) > 5 else ''}): expect them to be lost"
                + ("; try method='regmean'" if self.method != "regmean" else "")
            )
        return lines

    def __str__(self) -> str:
        n = len(self.names)
        value, pair, layer = self.max_basis_response()
        off = ~torch.eye(n, dtype=torch.bool)
        lines = [
            f"peft-ortho merge report: {n} adapter(s), {len(self.layers)} layer(s), method={self.method}",
            *self._prediction_lines(),
            "  basis relations (weights only; 0 for disjoint slots whatever the inputs):",
            f"  max basis overlap      {self.max_overlap():.3g}   (0 = orthogonal down-projections)",
            f"  max basis response     {value:.3g}" + (f"   ({pair} at {layer})" if pair else ""),
        ]
        if n > 1:
            lines.append(f"  mean basis response    {self.basis_response[off].mean().item():.3g}")
            lines.append(f"  mean sign conflicts    {self.sign_conflicts[off].mean().item():.3g}")
            lines.append("  basis response (row i: response of column j to i's input directions, all layers):")
            width = max(len(s) for s in self.names)
            for i, name in enumerate(self.names):
                row = " ".join(f"{self.basis_response[i, j].item():7.3g}" for j in range(n))
                lines.append(f"    {name:<{width}} {row}")
        return "\n".join(lines)

    def plot(self, path: str, *, overwrite: bool = False) -> str:
        """Heatmap PNG: predicted output change per concept and layer (with statistics), pairwise basis response.

        Needs matplotlib (``pip install peft-ortho[plot]``). Written atomically; never over an input adapter.

        Args:
            path: the PNG to write.
            overwrite: replace an existing ``path``.

        Returns:
            ``path``.
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("the heatmap needs matplotlib: pip install 'peft-ortho[plot]'") from e
        n = len(self.names)
        panels = 2 if self.concepts else 1
        fig, axes = plt.subplots(1, panels, figsize=(1.2 + 0.5 * n + (6 if panels == 2 else 0), 1.0 + 0.5 * n))
        axes = [axes] if panels == 1 else list(axes)
        if self.concepts:
            ax = axes.pop(0)
            names = list(self.concepts)
            layer_names = list(self.layers)
            grid = torch.full((len(names), len(layer_names)), float("nan"))
            for r, name in enumerate(names):
                for c, layer in enumerate(layer_names):
                    v = self.output_change[name].get(layer)
                    if v is not None:
                        grid[r, c] = min(v, 2.0)
            im = ax.imshow(grid.numpy(), cmap="magma", vmin=0, vmax=max(1.0, float(grid.nan_to_num(0).max())))
            ax.set_yticks(range(len(names)), names, fontsize=8)
            ax.set_xlabel("layer (merge order)")
            ax.set_title("predicted output change ‖(ΔW − E_i)X_i‖ / ‖E_i X_i‖ (clipped at 2)", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
        ax = axes[0]
        im = ax.imshow(self.basis_response.numpy(), cmap="magma", vmin=0)
        ax.set_xticks(range(n), self.names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), self.names, fontsize=8)
        ax.set_xlabel("adapter j (responds)")
        ax.set_ylabel("adapter i (directions read)")
        ax.set_title("basis response ‖ΔW_j A_iᵀ‖ / ‖ΔW_i A_iᵀ‖", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
        try:
            with warnings.catch_warnings():  # long names: "tight layout not applied" is cosmetic, not the user's
                warnings.simplefilter("ignore")
                fig.tight_layout()
                with atomic_file(path, overwrite, inputs=self.input_paths) as tmp:
                    fig.savefig(tmp, dpi=120)
        finally:
            plt.close(fig)
        return path


def _sort_key(layer: tuple[str | None, str]) -> tuple[str, str]:
    return (layer[0] or "", layer[1])
